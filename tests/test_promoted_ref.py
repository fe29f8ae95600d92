"""``promoted.json``'s ``ref`` loads from any directory (issue 20, item 7): a run started with a relative
``--run-dir`` records the absolute path of its model folder, not one relative to where the command ran."""

from __future__ import annotations

import json
from pathlib import Path

from gplflow.adapters.store import ArtifactStore
from gplflow.tasks import promote


def _better() -> dict:
    return {"evaluation": "heldout", "verdict": "better", "reason": "the adapted model is better", "base": 0.5,
            "adapted": 0.6, "gain": 0.1}


def test_a_relative_run_dir_records_an_absolute_model_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore("runs/mine")  # as `gplflow run cfg.yaml --run-dir runs/mine` gives it
    (tmp_path / "runs" / "mine" / "model").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir(parents=True)
    refs = {"base": "models/base", "adapted": store.url("model"), "pretrained": "some-org/a-hub-model"}
    assert not Path(refs["adapted"]).is_absolute()  # what the flow hands over

    promote.publish(store, promote.decide("always", 0.0, _better()), refs, {"model": "m1"})
    record = json.loads((tmp_path / "runs" / "mine" / "promoted" / "promoted.json").read_text())
    assert record["promoted"] == "adapted" and record["ref"] == str((tmp_path / "runs" / "mine" / "model").resolve())
    monkeypatch.chdir(tmp_path / "models")  # read from elsewhere: the path still names the folder
    assert Path(record["ref"]).is_dir() and promote.read(ArtifactStore(tmp_path / "runs" / "mine"))["ref"] == \
        record["ref"]

    assert promote._absolute("models/base") == "models/base"  # from here, no such folder: kept as given
    monkeypatch.chdir(tmp_path)
    assert promote._absolute("models/base") == str((tmp_path / "models" / "base").resolve())
    assert promote._absolute("some-org/a-hub-model") == "some-org/a-hub-model"  # a hub name is not a path
    assert promote._absolute("s3://bucket/run/model") == "s3://bucket/run/model"
