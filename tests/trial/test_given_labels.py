"""Given noisy labels end to end: a CIFAR-10 tree and a CIFAR-10N file written here in their native
formats -> prepare_data trains on the label set's labels; a user's label file on MNIST-1D; a bad label
file stops `study run` before Ray starts (exit 2, the file and the expected shape named)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from study import data
from study.cli import app
from study.spec import parse_spec
from study.sweep.runner import RunError, check_given_labels
from study.trial.config import TrialConfig
from study.trial.run import prepare_data, run_trial

N_TRAIN = 200  # 5 batches of 40: a prefix of the 50000 CIFAR-N labels


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 10, 50000)
    base = tmp_path / "cifar-10-batches-py"
    for i in range(5):
        rows = rng.integers(0, 256, (40, 3072)).astype(np.uint8)
        _pickle(base / f"data_batch_{i + 1}", {"data": rows, "labels": clean[40 * i : 40 * (i + 1)].tolist()})
    _pickle(
        base / "test_batch", {"data": rng.integers(0, 256, (30, 3072)).astype(np.uint8), "labels": [3] * 30}
    )
    _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    flip = rng.random(50000) < 0.4
    worse = np.where(flip, (clean + rng.integers(1, 10, 50000)) % 10, clean)
    content = {"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy()}
    content |= {f"random_label{i}": clean.copy() for i in (1, 2, 3)}
    (tmp_path / "cifar-n").mkdir()
    torch.save(content, tmp_path / "cifar-n" / "CIFAR-10_human.pt")
    return tmp_path, clean[:N_TRAIN], content


def _cfg(root: Path, **kw) -> TrialConfig:
    return TrialConfig.model_validate(
        {
            "dataset": {"name": "cifar10", "root": str(root)},
            "model": {"name": "mlp"},
            "noise": {"kind": "human", "dataset_labels": "cifar10n", "label_set": "worst"},
            "train": {"epochs": 1, "batch_size": 50, "device": "cpu", "augment": False},
            **kw,
        }
    )


def test_cifar10n_worst_labels_are_the_training_labels(cifar_root):
    root, clean, content = cifar_root
    bundle = data.load_dataset("cifar10", root=root)
    cfg = _cfg(root, noise_seed=4)
    prep = prepare_data(cfg, bundle)
    train_idx, val_idx = data.split_train_val(N_TRAIN, cfg.dataset.val_fraction, seed=4)
    worse = torch.from_numpy(content["worse_label"][:N_TRAIN])
    assert torch.equal(prep.y_train, worse[train_idx]) and torch.equal(prep.y_val, worse[val_idx])
    assert torch.equal(prep.y_train_clean, torch.from_numpy(clean)[train_idx])
    assert prep.noisy.realized_rate == pytest.approx(
        float((content["worse_label"][:N_TRAIN] != clean).mean())
    )
    assert 0.25 < prep.noisy.realized_rate < 0.55
    assert torch.equal(bundle.y_test, torch.full((30,), 3))  # test labels untouched
    # Paired: another regularizer and training seed see the same labels; so does another noise seed.
    other = prepare_data(
        _cfg(root, noise_seed=4, seed=2, regularizer={"name": "label_smoothing", "params": {"alpha": 0.1}}),
        bundle,
    )
    assert torch.equal(other.y_train, prep.y_train)
    reseeded = prepare_data(_cfg(root, noise_seed=9), bundle)
    assert torch.equal(reseeded.noisy.labels, prep.noisy.labels)
    result = run_trial(cfg, bundle=bundle)  # trains on them
    assert result.status == "completed" and result.realized_noise_rate == prep.noisy.realized_rate


def test_label_file_on_mnist1d(tmp_path):
    bundle = data.load_dataset("mnist1d", root=tmp_path, max_train=300, max_test=50)
    labels = (bundle.y_train.numpy() + (np.arange(300) % 3 == 0)) % 10  # every third label moved
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(map(str, labels)))
    cfg = TrialConfig.model_validate(
        {
            "dataset": {
                "name": "mnist1d",
                "root": str(tmp_path),
                "options": {"max_train": 300, "max_test": 50},
            },
            "noise": {"kind": "file", "path": str(path)},
        }
    )
    prep = prepare_data(cfg, bundle)
    assert torch.equal(prep.noisy.labels, torch.from_numpy(labels))
    assert prep.noisy.realized_rate == pytest.approx(100 / 300)
    assert cfg.noise.label == "file-labels"


SPEC = """
name: given
dataset: {{name: mnist1d, root: {root}, options: {{max_train: 300, max_test: 50}}}}
models: [mlp]
regularizers: [ce]
noise: [{{kind: file, path: {path}}}]
train: {{epochs: 1, device: cpu}}
search: {{trials_per_cell: 1}}
final: {{seeds: 1}}
"""


def test_bad_label_file_is_bad_input_before_ray(tmp_path):
    path = tmp_path / "short.npy"
    np.save(path, np.zeros(299, dtype=np.int64))
    text = SPEC.format(root=tmp_path, path=path)
    with pytest.raises(
        RunError, match=r"short.npy: expected one label per training sample of shape \(300,\)"
    ):
        check_given_labels(parse_spec(text))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(spec_path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "short.npy" in res.output and "(300,)" in res.output and "got shape (299,)" in res.output
    assert not out.exists()  # nothing written
    np.save(path, np.zeros(300, dtype=np.int64))
    check_given_labels(parse_spec(text))  # the right length passes


def test_human_labels_need_their_dataset():
    from study.spec import SpecError

    text = SPEC.replace(
        "{{kind: file, path: {path}}}", "{{kind: human, dataset_labels: cifar10n, label_set: worst}}"
    )
    with pytest.raises(SpecError, match="noise.0.dataset_labels: cifar10n relabels dataset 'cifar10'"):
        parse_spec(text.format(root="/tmp"))
