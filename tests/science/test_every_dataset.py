"""Every registered dataset loads from small files in its native format and trains one epoch (no
network). A dataset registered without a writer in tests/native_files.py fails here."""

from __future__ import annotations

import pytest
from native_files import NATIVE_FILES

from study import data, models
from study.trial.config import TrialConfig
from study.trial.run import run_trial


@pytest.mark.parametrize("name", data.list_datasets())
def test_a_registered_dataset_loads_its_native_files_and_trains_one_epoch(tmp_path, name):
    if name not in NATIVE_FILES:
        pytest.fail(f"dataset {name!r} has no native-format writer: add one to tests/native_files.py")
    options = NATIVE_FILES[name](tmp_path)
    bundle = data.load_dataset(name, root=tmp_path, **options)
    entry = data.DATASETS[name]
    assert bundle.kind == entry.kind and len(bundle.y_train) > 0 and len(bundle.y_test) > 0
    assert entry.num_classes is None or bundle.num_classes == entry.num_classes
    assert int(bundle.y_train.max()) < bundle.num_classes and int(bundle.y_train.min()) >= 0
    model = next(m for m in ("mlp", "cnn1d", "cnn") if models.MODELS[m].input_kind in ("any", bundle.kind))
    cfg = TrialConfig(
        dataset={"name": name, "root": str(tmp_path), "options": options, "val_fraction": 0.2},
        model={"name": model},
        train={"epochs": 1, "batch_size": 16, "device": "cpu"},
    )
    result = run_trial(cfg)
    assert result.status == "completed" and result.epochs_run == 1, result.error
    (row,) = result.epoch_rows
    assert 0.0 <= row["val_accuracy"] <= 1.0 and row["train_loss"] > 0
