"""Every Prefect artifact key gplflow builds from config values is valid by construction: the progress artifact
of pretrain.method=ct_inbatch was 'pretrain-ct_inbatch', which Prefect refuses."""

from __future__ import annotations

import typing

import pytest
from prefect.client.schemas.actions import ArtifactCreate

from gplflow.tasks.pretrain import PretrainConfig
from gplflow.tasks.progress import ProgressArtifact, artifact_key

METHODS = typing.get_args(PretrainConfig.model_fields["method"].annotation)


@pytest.mark.parametrize("method", METHODS)
def test_a_progress_key_made_of_any_pretrain_method_is_one_prefect_accepts(method: str) -> None:
    def create(progress: float, key: str, description: str) -> str:
        ArtifactCreate(key=key, type="progress", data=progress)  # Prefect's own check of the key
        return "id"

    progress = ProgressArtifact(f"pretrain-{method}", 10, "pretraining", create=create, update=lambda *_: None)
    assert progress.key == artifact_key("pretrain", method)


def test_artifact_key_keeps_lowercase_letters_digits_and_dashes() -> None:
    assert artifact_key("gplflow-report", "My Corpus_v2!") == "gplflow-report-my-corpus-v2"
    assert artifact_key("__") == "gplflow"
