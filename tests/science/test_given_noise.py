"""Given noisy labels: CIFAR-N human labels (files written here in the authors' exact format) and a
user's label file (.npy / .csv / .pt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from study.noise import (
    CIFARN,
    NOISE_KINDS,
    LabelFileError,
    corrupt,
    human_labels_path,
    load_human_labels,
    load_label_file,
    synthetic_kinds,
    validate_noise,
)
from study.spec import NoiseSetting, NoiseSpec

# Keys of the published files, typed in from the authors' README / data/cifar.py (UCSC-REAL/cifar-10-100n),
# not imported from the module under test.
C10N_KEYS = {"aggre": "aggre_label", "random1": "random_label1", "random2": "random_label2",
             "random3": "random_label3", "worst": "worse_label"}  # fmt: skip


def write_cifar10n(
    root: Path, clean: np.ndarray, rates: dict[str, float], seed: int = 0
) -> dict[str, np.ndarray]:
    """A CIFAR-10_human.pt as the authors publish it: torch.save of a dict of numpy int arrays (N,)."""
    rng = np.random.default_rng(seed)
    content: dict[str, np.ndarray] = {"clean_label": clean.copy()}
    for name, key in C10N_KEYS.items():
        flip = rng.random(len(clean)) < rates.get(name, 0.1)
        content[key] = np.where(flip, (clean + rng.integers(1, 10, len(clean))) % 10, clean)
    path = root / "cifar-n" / "CIFAR-10_human.pt"
    path.parent.mkdir(parents=True)
    torch.save(content, path)
    return content


def test_registry_split_into_synthetic_and_given_kinds():
    assert {"human", "file"} <= set(NOISE_KINDS)
    assert "human" not in synthetic_kinds() and "symmetric" in synthetic_kinds()
    assert set(CIFARN["cifar10n"].label_sets) == set(C10N_KEYS)
    assert CIFARN["cifar10n"].label_sets == C10N_KEYS
    assert CIFARN["cifar100n"].label_sets == {"noisy_label": "noisy_label"}
    # The published rates (Wei et al. 2022, reference.md).
    assert CIFARN["cifar10n"].published_rates["worst"] == 0.4021
    assert CIFARN["cifar10n"].published_rates["aggre"] == 0.0901


def test_cifar10n_labels_read_and_realised_rate_is_the_disagreement(tmp_path):
    clean = np.tile(np.arange(10), 5000)  # the published length: 50000
    content = write_cifar10n(tmp_path, clean, {"worst": 0.4, "aggre": 0.09})
    for label_set in ("worst", "aggre", "random2"):
        got = load_human_labels("cifar10n", label_set, torch.from_numpy(clean), 10, root=tmp_path)
        expected = content[C10N_KEYS[label_set]]
        np.testing.assert_array_equal(got, expected)
        res = corrupt(clean, 10, "human", 0.0, seed=3, given_labels=got)
        np.testing.assert_array_equal(res.labels.numpy(), expected)
        assert res.realized_rate == pytest.approx(float((expected != clean).mean()))
        # The noise seed plays no part: given labels are the same for every seed.
        assert torch.equal(corrupt(clean, 10, "human", 0.0, seed=99, given_labels=got).labels, res.labels)
    rate_worst = float((content["worse_label"] != clean).mean())
    assert 0.37 < rate_worst < 0.43  # the 40% this file was written with, realised


def test_cifar10n_prefix_for_max_train_and_clean_label_mismatch(tmp_path):
    clean = np.arange(50000) % 10
    content = write_cifar10n(tmp_path, clean, {})
    head = load_human_labels("cifar10n", "worst", clean[:300], 10, root=tmp_path)
    np.testing.assert_array_equal(head, content["worse_label"][:300])
    shuffled = np.roll(clean, 1)
    with pytest.raises(LabelFileError, match="clean_label differs from the cifar10 training labels"):
        load_human_labels("cifar10n", "worst", shuffled, 10, root=tmp_path)


def test_cifar10n_missing_file_needs_download_and_names_the_url(tmp_path):
    with pytest.raises(LabelFileError) as err:
        load_human_labels("cifar10n", "worst", np.zeros(10, dtype=int), 10, root=tmp_path)
    msg = str(err.value)
    assert str(human_labels_path("cifar10n", tmp_path)) in msg and "download: true" in msg
    assert "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/CIFAR-10_human.pt" in msg


def test_cifar10n_wrong_format_names_file_and_shape(tmp_path):
    path = tmp_path / "cifar-n" / "CIFAR-10_human.pt"
    path.parent.mkdir()
    torch.save({"clean_label": np.zeros(50000, dtype=np.int64)}, path)  # no worse_label
    with pytest.raises(LabelFileError, match=r"'worse_label' arrays of shape \(50000,\)"):
        load_human_labels("cifar10n", "worst", np.zeros(10, dtype=int), 10, root=tmp_path)
    torch.save({"clean_label": np.zeros(7, dtype=np.int64), "worse_label": np.zeros(7, dtype=np.int64)}, path)
    with pytest.raises(LabelFileError, match=r"shape \(50000,\).*got shape \(7,\)"):
        load_human_labels("cifar10n", "worst", np.zeros(7, dtype=int), 10, root=tmp_path)


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".pt"])
def test_label_file_formats(tmp_path, suffix):
    labels = np.random.default_rng(0).integers(0, 7, size=123)
    path = tmp_path / f"my labels{suffix}"
    if suffix == ".npy":
        np.save(path, labels)
    elif suffix == ".csv":
        path.write_text("label\n" + "\n".join(map(str, labels)) + "\n")
    else:
        torch.save(torch.from_numpy(labels), path)
    np.testing.assert_array_equal(load_label_file(path, 123, 7), labels)


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (
            lambda p: np.save(p.with_suffix(".npy"), np.zeros(122, dtype=int)),
            r"shape \(123,\).*got shape \(122,\)",
        ),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros((123, 2), dtype=int)), r"got shape \(123, 2\)"),
        (lambda p: np.save(p.with_suffix(".npy"), np.full(123, 0.5)), "got dtype float64"),
        (
            lambda p: np.save(p.with_suffix(".npy"), np.full(123, 7)),
            r"integers in \[0, 7\).*got values in \[7, 7\]",
        ),
        (
            lambda p: p.with_suffix(".csv").write_text("a,b\n1,x\n"),
            r"cannot read labels, expected shape \(123,\)",
        ),
        (
            lambda p: p.with_suffix(".pt").write_bytes(b"not a pickle"),
            r"cannot read labels, expected shape \(123,\)",
        ),
    ],
)
def test_bad_label_file_names_file_and_expected_shape(tmp_path, write, fragment):
    write(tmp_path / "bad")
    path = next(tmp_path.glob("bad.*"))
    with pytest.raises(LabelFileError, match=fragment) as err:
        load_label_file(path, 123, 7)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_settings_labels_and_validation():
    spec = NoiseSpec(kind="human", dataset_labels="cifar10n", label_set=["aggre", "worst"])
    assert [s.label for s in spec.settings()] == ["human-aggre", "human-worst"]
    assert NoiseSetting(kind="file", path="/data/run 3/labels:v2.npy").label == "file-labels_v2"
    with pytest.raises(ValueError, match="label_set must be one of aggre, random1, random2, random3, worst"):
        validate_noise("human", 0.0, dataset_labels="cifar10n", label_set="noisy_label")
    with pytest.raises(ValueError, match="rate is not used by kind 'human'"):
        validate_noise("human", 0.2, dataset_labels="cifar10n", label_set="worst")
    with pytest.raises(ValueError, match="path must end in one of .npy, .csv, .pt"):
        validate_noise("file", 0.0, path="labels.txt")
    with pytest.raises(ValueError, match="not used by kind 'symmetric'"):
        validate_noise("symmetric", 0.2, path="labels.npy")
    with pytest.raises(ValueError, match=r"given_labels must have shape \(N,\) = \(4,\)"):
        corrupt([0, 1, 2, 3], 4, "file", 0.0, 0, given_labels=[0, 1])
