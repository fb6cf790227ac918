"""Given noisy labels: real human annotations (CIFAR-10N / CIFAR-100N) and a user's label file.

Nothing is drawn here: the noisy labels come from a file, so they are the same for every regularizer
and every seed by construction, and the realised rate is measured against the clean labels.

CIFAR-N (Wei et al., ICLR 2022, https://github.com/UCSC-REAL/cifar-10-100n): the authors publish
``data/CIFAR-10_human.pt`` and ``data/CIFAR-100_human.pt``, each a ``torch.save``-d dict of numpy int
arrays of length 50000 in CIFAR training order: CIFAR-10N ``clean_label``, ``aggre_label``,
``random_label1``, ``random_label2``, ``random_label3``, ``worse_label``; CIFAR-100N ``clean_label``,
``noisy_label`` (their loader, ``data/cifar.py``, asserts ``clean_label`` equals the training labels;
so do we). The file is fetched only with ``dataset.download: true``.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from study.noise._maps import _check_labels

__all__ = ["CIFARN", "CifarN", "LabelFileError", "given_label", "load_human_labels", "load_label_file"]

CIFARN_URL = "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/{file}"
LABEL_FILE_SUFFIXES = (".npy", ".csv", ".pt")


class LabelFileError(ValueError):
    """A label file that is missing, unreadable or of the wrong shape (one line, names the file)."""


@dataclass(frozen=True)
class CifarN:
    """One published CIFAR-N file: its name, the dataset it relabels and its label sets (name -> key)."""

    name: str
    file: str
    dataset: str
    num_train: int
    label_sets: dict[str, str]
    published_rates: dict[str, float]  # noise rates in the CIFAR-N paper (Table 1), for reference


CIFARN: dict[str, CifarN] = {
    "cifar10n": CifarN(
        "cifar10n",
        "CIFAR-10_human.pt",
        "cifar10",
        50000,
        {
            "aggre": "aggre_label",
            "random1": "random_label1",
            "random2": "random_label2",
            "random3": "random_label3",
            "worst": "worse_label",
        },
        {"aggre": 0.0901, "random1": 0.1723, "random2": 0.1812, "random3": 0.1764, "worst": 0.4021},
    ),
    "cifar100n": CifarN(
        "cifar100n",
        "CIFAR-100_human.pt",
        "cifar100",
        50000,
        {"noisy_label": "noisy_label"},
        {"noisy_label": 0.4020},
    ),  # fmt: skip
}


def validate_source(kind: str, dataset_labels: str | None, label_set: str | None, path: str | None) -> None:
    """Check the label source fields of a noise setting (ValueError naming the field and what is allowed)."""
    if kind == "human":
        if dataset_labels not in CIFARN:
            raise ValueError(
                f"dataset_labels must be one of {', '.join(CIFARN)} for kind 'human', "
                f"but got {dataset_labels!r}."
            )
        sets = CIFARN[dataset_labels].label_sets
        if label_set not in sets:
            raise ValueError(
                f"label_set must be one of {', '.join(sets)} for {dataset_labels}, but got {label_set!r}."
            )
        if path is not None:
            raise ValueError("path is only used by kind 'file', but got a path for kind 'human'.")
    elif kind == "file":
        if not path:
            raise ValueError("path must name a label file (.npy, .csv or .pt) for kind 'file', but got None.")
        if Path(path).suffix.lower() not in LABEL_FILE_SUFFIXES:
            raise ValueError(f"path must end in one of {', '.join(LABEL_FILE_SUFFIXES)}, but got {path!r}.")
        if dataset_labels is not None or label_set is not None:
            raise ValueError("dataset_labels / label_set are only used by kind 'human'.")
    elif dataset_labels is not None or label_set is not None or path is not None:
        raise ValueError(f"dataset_labels, label_set and path are not used by kind {kind!r}.")


def flip_given(rng: np.random.Generator, y: np.ndarray, k: int, r: float, inp: Any) -> tuple[np.ndarray, str]:
    """The registry's flip function of ``human`` and ``file``: the given labels, checked (no draw)."""
    if inp.given_labels is None:
        raise ValueError("given_labels must be given for kinds 'human' and 'file' (N labels), but got None.")
    noisy = _check_labels(inp.given_labels, k)
    if noisy.shape != y.shape:
        raise ValueError(f"given_labels must have shape (N,) = ({len(y)},), but got {tuple(noisy.shape)}.")
    return noisy.copy(), "given labels: realised rate measured against the clean labels"


def given_label(kind: str, label_set: str | None, path: str | None) -> str:
    """Short, unique noise-setting label: ``human-worst``, ``file-<file stem>`` (no ``/`` or ``:``)."""
    if kind == "human":
        return f"human-{label_set}"
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", Path(str(path)).stem)
    return f"file-{stem}"


def _torch_load_arrays(path: Path) -> object:
    """``torch.load`` with ``weights_only`` (no arbitrary code), numpy arrays allow-listed: the CIFAR-N
    files pickle numpy arrays, saved by numpy 1.x (``numpy.core``) - both module names are accepted."""
    rec = np._core.multiarray._reconstruct
    dtypes = [type(np.dtype(c)) for c in "bBhHiIlLqQefd?"]
    allowed = [rec, (rec, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]
    allowed.append((np._core.multiarray.scalar, "numpy.core.multiarray.scalar"))
    allowed.append(np._core.multiarray.scalar)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _as_labels(values: object, path: Path, n: int, k: int, what: str) -> np.ndarray:
    arr = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    shape = f"expected {what} of shape ({n},), integers in [0, {k})"
    if arr.shape != (n,):
        raise LabelFileError(f"{path}: {shape}, but got shape {tuple(arr.shape)}")
    whole_floats = arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    if arr.dtype.kind not in "iu" and not whole_floats:  # a CSV of "3.0" is fine, 0.5 is not
        raise LabelFileError(f"{path}: {shape}, but got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= k):
        raise LabelFileError(f"{path}: {shape}, but got values in [{arr.min()}, {arr.max()}]")
    return arr


def load_label_file(path: str | Path, n: int, num_classes: int) -> np.ndarray:
    """A user's noisy labels, one per training sample in the dataset's training order.

    ``.npy``: a 1-D integer array (no pickles). ``.csv``: one integer per line, an optional header line.
    ``.pt``: a 1-D tensor or numpy array (loaded with ``weights_only``).

    Raises:
        LabelFileError: missing or unreadable file, or not ``n`` integer labels in [0, num_classes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LabelFileError(
            f"{path}: no such label file (expected {n} integer labels, one per training sample)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
            if lines and not re.fullmatch(r"[+-]?\d+(\.0*)?", lines[0]):
                lines = lines[1:]  # a header
            values = np.array([float(ln) for ln in lines]) if lines else np.zeros(0, dtype=np.int64)
        elif suffix == ".pt":
            values = _torch_load_arrays(path)
        else:
            raise LabelFileError(f"{path}: label files must be {', '.join(LABEL_FILE_SUFFIXES)}")
    except LabelFileError:
        raise
    except Exception as exc:  # any parse failure: one line that names the file and the expected shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LabelFileError(
            f"{path}: cannot read labels, expected shape ({n},) integers ({first[:120]})"
        ) from None
    return _as_labels(values, path, n, num_classes, "one label per training sample")


def human_labels_path(dataset_labels: str, root: str | Path) -> Path:
    return Path(root).expanduser() / "cifar-n" / CIFARN[dataset_labels].file


def _fetch(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Parallel trials share the root: one downloads, the others wait and find the file.
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if dest.exists():
            return
        tmp = dest.with_suffix(".part")
        with urllib.request.urlopen(url, timeout=60) as resp, tmp.open("wb") as out:  # noqa: S310
            out.write(resp.read())
        tmp.replace(dest)


def load_human_labels(
    dataset_labels: str, label_set: str, clean: np.ndarray | torch.Tensor, num_classes: int, *,
    root: str | Path, download: bool = False,
) -> np.ndarray:  # fmt: skip
    """The CIFAR-N label set for the first ``len(clean)`` training samples (``max_train`` keeps a prefix).

    Raises:
        LabelFileError: file missing (and ``download`` false), not the published format, or its
            ``clean_label`` differs from the dataset's training labels (another order or dataset).
    """
    entry = CIFARN[dataset_labels]
    path = human_labels_path(dataset_labels, root)
    if not path.exists() and download:
        _fetch(CIFARN_URL.format(file=entry.file), path)
    if not path.exists():
        raise LabelFileError(
            f"{path}: no {entry.name} label file; pass download: true in the spec's dataset block "
            f"or place {entry.file} (from {CIFARN_URL.format(file=entry.file)}) there"
        )
    clean = clean.numpy() if isinstance(clean, torch.Tensor) else np.asarray(clean)
    n = entry.num_train
    try:
        content = _torch_load_arrays(path)
    except Exception as exc:
        raise LabelFileError(f"{path}: not a CIFAR-N label file ({type(exc).__name__})") from None
    key = entry.label_sets[label_set]
    if not isinstance(content, dict) or "clean_label" not in content or key not in content:
        raise LabelFileError(
            f"{path}: expected a dict with 'clean_label' and {key!r} arrays of shape ({n},), "
            f"but got {type(content).__name__} with keys {sorted(content) if isinstance(content, dict) else []}"  # noqa: E501
        )
    file_clean = _as_labels(content["clean_label"], path, n, num_classes, "'clean_label'")
    noisy = _as_labels(content[key], path, n, num_classes, repr(key))
    m = len(clean)
    if m > n or not np.array_equal(file_clean[:m], clean):
        bad = int(np.sum(file_clean[:m] != clean)) if m <= n else m - n
        raise LabelFileError(
            f"{path}: its clean_label differs from the {entry.dataset} training labels "
            f"at {bad} of {m} samples "
            "(CIFAR-N labels are in CIFAR training order; is this the right dataset and file?)"
        )
    return noisy[:m]
