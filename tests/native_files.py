"""Small files in each registered dataset's native format, written offline (no network).

``NATIVE_FILES[name](root)`` writes dataset ``name``'s files under ``root`` and returns the dataset
options a test loads it with. A new dataset adds its writer here (or, as tests/extension.py shows, from
wherever it is registered); tests/science/test_every_dataset.py fails for a registered dataset without
one.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RNG_SEED = 7


def _idx(path: Path, arr: np.ndarray) -> None:
    """IDX (LeCun): 0x00 0x00 0x08 (uint8) ndim, big-endian int32 dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes())


def _pickle(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _mnist_like(folder: str) -> Callable[[Path], dict[str, Any]]:
    def write(root: Path) -> dict[str, Any]:
        rng = np.random.default_rng(RNG_SEED)
        for split, n in (("train", 40), ("t10k", 20)):
            _idx(
                root / folder / "raw" / f"{split}-images-idx3-ubyte",
                rng.integers(0, 256, (n, 28, 28), np.uint8),
            )
            _idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
        return {}

    return write


def _cifar10(root: Path) -> dict[str, Any]:
    rng, base = np.random.default_rng(RNG_SEED), root / "cifar-10-batches-py"
    for i in range(1, 6):
        _pickle(
            base / f"data_batch_{i}",
            {"data": rng.integers(0, 256, (10, 3072), np.uint8), "labels": list(range(10))},
        )
    _pickle(
        base / "test_batch", {"data": rng.integers(0, 256, (10, 3072), np.uint8), "labels": list(range(10))}
    )
    _pickle(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return {}


def _cifar100(root: Path) -> dict[str, Any]:
    rng, base = np.random.default_rng(RNG_SEED), root / "cifar-100-python"
    for split, n in (("train", 200), ("test", 100)):
        fine = (np.arange(n) % 100).tolist()
        data = rng.integers(0, 256, (n, 3072), np.uint8)
        _pickle(base / split, {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]})
    names = {
        "fine_label_names": [f"f{i}" for i in range(100)],
        "coarse_label_names": [f"c{i}" for i in range(20)],
    }
    _pickle(base / "meta", names)
    return {}


def _svhn(root: Path) -> dict[str, Any]:
    from scipy.io import savemat

    rng = np.random.default_rng(RNG_SEED)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 20)):
        y = (np.arange(n) % 10 + 1).astype(np.uint8)[:, None]  # SVHN stores digit 0 as 10
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), np.uint8), "y": y})
    return {}


def _image_folder(root: Path) -> dict[str, Any]:
    from PIL import Image

    for split, n in (("train", 6), ("test", 3)):
        for cls, rgb in {"cat": (255, 0, 0), "dog": (0, 0, 255)}.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), rgb).save(root / split / cls / f"{i}.png")
    return {"image_size": 8}


NATIVE_FILES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "mnist1d": lambda root: {"max_train": 200, "max_test": 100},  # generated offline, cached under root
    "digits": lambda root: {"max_train": 200, "max_test": 100},  # bundled with scikit-learn
    "mnist": _mnist_like("MNIST"),
    "fashion_mnist": _mnist_like("FashionMNIST"),
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "svhn": _svhn,
    "image_folder": _image_folder,
}
