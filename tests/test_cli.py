"""What a new user meets first, without Ray: cross-field config rules refused at load (and by ``sslflow run
--dry-run``) naming their keys, the batch checked against the data before any worker starts, the thread rule,
and ``sslflow ingest`` of an ``.npz`` whose arrays have other names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data import random_images

from pipelines.cli import main
from pipelines.config import QUICKSTART, config_from_mapping, load_config
from pipelines.datasets import MANIFEST_NAME
from pipelines.pretraining import fit_pretraining
from pipelines.stages.ingest import ingest
from pipelines.train_loop import worker_threads


def quickstart_with(tmp_path: Path, **sections: dict) -> Path:
    """The quickstart YAML with ``sections`` merged in, written under ``tmp_path``."""
    values = yaml.safe_load(QUICKSTART.read_text())
    values["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    for name, overrides in sections.items():
        values[name] = {**values.get(name, {}), **overrides}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_warmup_longer_than_the_run_is_refused_at_load_and_by_dry_run(tmp_path: Path, capsys) -> None:
    config = quickstart_with(tmp_path, pretrain={"warmup_epochs": 10, "epochs": 3})
    with pytest.raises(ValueError, match=r"pretrain\.warmup_epochs=10\.0 exceeds pretrain\.epochs=3"):
        load_config(config)
    assert main(["run", str(config), "--dry-run"]) == 2
    assert "pretrain.warmup_epochs=10.0 exceeds pretrain.epochs=3" in capsys.readouterr().err
    equal = load_config(quickstart_with(tmp_path, pretrain={"warmup_epochs": 3, "epochs": 3}))
    assert equal.pretrain.warmup_epochs == equal.pretrain.epochs == 3


def test_a_warmup_longer_than_a_tune_trial_is_refused_at_load(tmp_path: Path) -> None:
    config = quickstart_with(tmp_path, pretrain={"warmup_epochs": 2}, tune={"enabled": True, "epochs": 1})
    with pytest.raises(ValueError, match=r"pretrain\.warmup_epochs=2\.0 exceeds tune\.epochs=1"):
        load_config(config)
    # The search off: the trial rule does not apply.
    assert load_config(quickstart_with(tmp_path, pretrain={"warmup_epochs": 2}, tune={"epochs": 1})).tune.epochs == 1


def test_a_batch_the_data_cannot_fill_fails_before_any_worker(tmp_path: Path, capsys) -> None:
    source = str(tmp_path / "small.npz")
    np.savez(source, x=random_images(30, 8, 8, 3))
    ingest(source, tmp_path / "small", val_fraction=0.0)
    sections = {"data": {"source": source, "path": str(tmp_path / "small"), "image_size": 8},
                "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
                "pretrain": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}}
    message = "pretrain.batch_size=16 x 2 workers exceeds the 30 train rows"
    # No Ray is running: the driver checks before the Ray Data reader and the trainer ...
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        fit_pretraining(config_from_mapping(sections, base=tmp_path), None, "never-started")
    # ... and `sslflow run` (even --dry-run) before anything starts, the data being already ingested.
    assert main(["run", str(quickstart_with(tmp_path, **sections)), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("cpus_per_worker", "torch_threads", "expected"),
                         [(1.0, 0, 1), (1.5, 0, 1), (0.5, 0, 1), (0.1, 0, 1), (2.0, 0, 2), (4.75, 0, 4), (1.5, 2, 2)])
def test_worker_threads_are_the_whole_cpus_reserved_unless_set(cpus_per_worker: float, torch_threads: int,
                                                               expected: int) -> None:
    assert worker_threads(cpus_per_worker, torch_threads) == expected


def test_scaling_torch_threads_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"scaling\.torch_threads=-1 is out of range"):
        load_config(quickstart_with(tmp_path, scaling={"torch_threads": -1}))


def test_ingest_an_npz_with_common_or_mapped_array_names(tmp_path: Path, capsys) -> None:
    train, test = random_images(12, 6, 6, 3), random_images(5, 6, 6, 3, seed=1)
    np.savez(tmp_path / "keras.npz", x_train=train, y_train=(np.arange(12) % 3)[:, None], x_test=test,
             y_test=np.arange(5) % 3)
    assert main(["ingest", str(tmp_path / "keras.npz"), str(tmp_path / "keras"), "--val-fraction", "0"]) == 0
    manifest = json.loads((tmp_path / "keras" / MANIFEST_NAME).read_text())
    assert manifest["test_split_from"] == "source"
    assert (manifest["splits"]["train"]["rows"], manifest["splits"]["test"]["rows"]) == (12, 5)
    assert manifest["splits"]["train"]["labeled"] == 12 and "npz_keys" not in manifest

    np.savez(tmp_path / "own.npz", pictures=train, classes=np.arange(12) % 3, holdout=test)
    assert main(["ingest", str(tmp_path / "own.npz"), str(tmp_path / "bad")]) == 2
    assert "no image array (arrays in the file: pictures, classes, holdout)" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "own.npz"), str(tmp_path / "own"), "--npz-key", "x=pictures",
                 "--npz-key", "y=classes", "--npz-key", "x_test=holdout"]) == 0
    manifest = json.loads((tmp_path / "own" / MANIFEST_NAME).read_text())
    assert manifest["npz_keys"] == {"x": "pictures", "y": "classes", "x_test": "holdout"}
    assert manifest["splits"]["test"] == {"rows": 5, "labeled": 0, "unlabeled": 5, "labels": {}}
    assert main(["ingest", str(tmp_path / "own.npz"), str(tmp_path / "x"), "--npz-key", "pictures"]) == 2
    assert "--npz-key 'pictures' must be ROLE=NAME" in capsys.readouterr().err


def test_data_npz_keys_in_the_config_are_validated(tmp_path: Path) -> None:
    np.savez(tmp_path / "own.npz", pictures=random_images(4, 8, 8, 3))  # a source must exist to load
    own = {"source": str(tmp_path / "own.npz"), "npz_keys": {"x": "pictures"}}
    cfg = load_config(quickstart_with(tmp_path, data=own))
    assert cfg.data.npz_keys == {"x": "pictures"}
    with pytest.raises(ValueError, match=r"data\.npz_keys\.images='pictures' is not allowed: roles x, y, x_test"):
        load_config(quickstart_with(tmp_path, data={"npz_keys": {"images": "pictures"}}))
