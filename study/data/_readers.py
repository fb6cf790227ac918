"""Dataset readers: generated (mnist1d), bundled (digits) and torchvision-family files on disk.

torchvision is used only to DOWNLOAD (``download=True``); the files are read here directly, because
torchvision's CIFAR and SVHN classes verify MD5 sums on every load (which rejects small test
fixtures and costs a full read) and materialise per-item PIL images we do not need. Every reader
returns :class:`RawSplits` with uint8 images of shape (N, C, H, W) and int64 labels; ``study.data``
turns them into a ``DatasetBundle``.

On-disk layouts (torchvision's, so an existing torchvision data root works unchanged):

- mnist:         ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
- fashion_mnist: ``root/FashionMNIST/raw/`` (same file names)
- cifar10:       ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- cifar100:      ``root/cifar-100-python/{train,test,meta}`` (fine and coarse labels)
- svhn:          ``root/{train,test}_32x32.mat``
- image_folder:  ``root/{train,test}/<class name>/<image file>`` (no download)
- mnist1d:       generated offline, cached as ``root/mnist1d_<hash of its args>.npz``
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

__all__ = ["RawSplits", "load_mnist", "load_fashion_mnist", "load_cifar10", "load_cifar100", "load_svhn"]
__all__ += ["load_image_folder", "load_mnist1d", "load_digits", "MNIST1D_OPTIONS", "cache_root"]

_MISSING = "{name}: no data under {root} (expected {expected}); {how}"
_HOW_DOWNLOAD = "pass download: true in the spec's dataset block or place the files there"


@dataclass
class RawSplits:
    """Train/test arrays as read from disk: x uint8 (N, C, H, W), y int64 (N,)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    class_names: list[str] | None = None
    coarse_train: Tensor | None = None
    coarse_test: Tensor | None = None

    def head(self, n_train: int | None, n_test: int | None) -> RawSplits:
        """The first n_train training and n_test test samples (None keeps a split whole)."""
        tr, te = slice(0, n_train), slice(0, n_test)
        cut = lambda t, s: None if t is None else t[s].contiguous()  # noqa: E731
        return RawSplits(
            cut(self.x_train, tr),
            cut(self.y_train, tr),
            cut(self.x_test, te),
            cut(self.y_test, te),
            self.class_names,
            cut(self.coarse_train, tr),
            cut(self.coarse_test, te),
        )


def _ensure(name: str, root: Path, files: list[Path], expected: str, download: bool, fetch: Callable) -> None:
    """Download with torchvision (under a file lock) if files are missing and allowed; else fail clearly."""
    if all(f.exists() for f in files):
        return
    if download:
        root.mkdir(parents=True, exist_ok=True)
        # Parallel trials share the root: one downloads, the others wait and then find the files.
        with FileLock(str(root / f".{name}.download.lock")):
            if not all(f.exists() for f in files):
                fetch(str(root))
    if not all(f.exists() for f in files):
        raise FileNotFoundError(_MISSING.format(name=name, root=root, expected=expected, how=_HOW_DOWNLOAD))


def _mnist_like(name: str, folder: str, tv_class: str, root: Path, download: bool) -> RawSplits:
    import torchvision.datasets as tvd
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = root / folder / "raw"
    files = [
        raw / f"{split}-{kind}-ubyte"
        for split in ("train", "t10k")
        for kind in ("images-idx3", "labels-idx1")
    ]
    fetch = lambda r: getattr(tvd, tv_class)(r, download=True)  # noqa: E731  (fetches both splits)
    _ensure(name, root, files, f"{folder}/raw/*-ubyte", download, fetch)
    x_tr, y_tr = read_image_file(str(files[0])), read_label_file(str(files[1]))
    x_te, y_te = read_image_file(str(files[2])), read_label_file(str(files[3]))
    classes = list(getattr(tvd, tv_class).classes)
    return RawSplits(x_tr.unsqueeze(1).contiguous(), y_tr, x_te.unsqueeze(1).contiguous(), y_te, classes)


def load_mnist(root: Path, download: bool) -> RawSplits:
    """MNIST, 60000/10000 28x28 grey images, 10 classes."""
    return _mnist_like("mnist", "MNIST", "MNIST", root, download)


def load_fashion_mnist(root: Path, download: bool) -> RawSplits:
    """Fashion-MNIST, 60000/10000 28x28 grey images, 10 classes."""
    return _mnist_like("fashion_mnist", "FashionMNIST", "FashionMNIST", root, download)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_images(entries: list[dict]) -> Tensor:
    data = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries])
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def load_cifar10(root: Path, download: bool) -> RawSplits:
    """CIFAR-10, 50000/10000 32x32 colour images, 10 classes (python pickle batches)."""
    import torchvision.datasets as tvd

    base = root / "cifar-10-batches-py"
    train = [base / f"data_batch_{i}" for i in range(1, 6)]
    test = base / "test_batch"
    _ensure(
        "cifar10",
        root,
        [*train, test],
        "cifar-10-batches-py/",
        download,
        lambda r: tvd.CIFAR10(r, train=True, download=True),
    )
    tr, te = [_unpickle(p) for p in train], _unpickle(test)
    meta = base / "batches.meta"
    names = list(_unpickle(meta)["label_names"]) if meta.exists() else None
    y_tr = torch.tensor([lab for e in tr for lab in e["labels"]], dtype=torch.long)
    return RawSplits(_cifar_images(tr), y_tr, _cifar_images([te]), torch.tensor(te["labels"]), names)


def load_cifar100(root: Path, download: bool) -> RawSplits:
    """CIFAR-100, 50000/10000 32x32 colour images, 100 fine classes plus the 20 coarse superclasses.

    torchvision's CIFAR100 drops the coarse labels, so they are read from the pickles here.
    """
    import torchvision.datasets as tvd

    base = root / "cifar-100-python"
    _ensure(
        "cifar100",
        root,
        [base / "train", base / "test"],
        "cifar-100-python/",
        download,
        lambda r: tvd.CIFAR100(r, train=True, download=True),
    )
    tr, te = _unpickle(base / "train"), _unpickle(base / "test")
    meta = base / "meta"
    names = list(_unpickle(meta)["fine_label_names"]) if meta.exists() else None
    return RawSplits(
        _cifar_images([tr]),
        torch.tensor(tr["fine_labels"], dtype=torch.long),
        _cifar_images([te]),
        torch.tensor(te["fine_labels"], dtype=torch.long),
        names,
        torch.tensor(tr["coarse_labels"], dtype=torch.long),
        torch.tensor(te["coarse_labels"], dtype=torch.long),
    )


def _svhn_split(path: Path) -> tuple[Tensor, Tensor]:
    from scipy.io import loadmat

    mat = loadmat(str(path))
    x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    return torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y)


def load_svhn(root: Path, download: bool) -> RawSplits:
    """SVHN cropped digits, 73257/26032 32x32 colour images, 10 classes (the 'extra' split is not used)."""
    import torchvision.datasets as tvd

    files = [root / "train_32x32.mat", root / "test_32x32.mat"]

    def fetch(r: str) -> None:
        tvd.SVHN(r, split="train", download=True)
        tvd.SVHN(r, split="test", download=True)

    _ensure("svhn", root, files, "train_32x32.mat and test_32x32.mat", download, fetch)
    (x_tr, y_tr), (x_te, y_te) = _svhn_split(files[0]), _svhn_split(files[1])
    return RawSplits(x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)])


def _read_tree(folder: Path, classes: list[str], image_size: int, mode: str) -> tuple[Tensor, Tensor]:
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    xs, ys = [], []
    for label, cls in enumerate(classes):
        cls_dir = folder / cls
        paths = (
            sorted(p for p in cls_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if cls_dir.is_dir()
            else []
        )
        for p in paths:
            with Image.open(p) as img:
                img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise FileNotFoundError(
            f"image_folder: no images under {folder} (expected <class name>/<image file>)."
        )
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def load_image_folder(root: Path, download: bool, image_size: int = 32, grayscale: bool = False) -> RawSplits:
    """A user's ImageFolder tree ``root/{train,test}/<class>/*``, resized to image_size x image_size.

    Classes are the sorted sub-directory names of ``train/``; ``test/`` may lack some of them but must
    not add new ones. Images are converted to RGB (3 channels) or, with ``grayscale``, to one channel.
    """
    if download:
        raise ValueError(
            "image_folder: download is not possible for a user's image tree; set download: false."
        )
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, but got {image_size!r}.")
    train_dir, test_dir = root / "train", root / "test"
    if not (train_dir.is_dir() and test_dir.is_dir()):
        raise FileNotFoundError(
            _MISSING.format(
                name="image_folder",
                root=root,
                expected="train/<class>/*.png and test/<class>/*.png",
                how="set the dataset's root to such a directory",
            )
        )
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    extra = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise ValueError(f"image_folder: test/ has classes missing from train/: {extra}.")
    mode = "L" if grayscale else "RGB"
    x_tr, y_tr = _read_tree(train_dir, classes, image_size, mode)
    x_te, y_te = _read_tree(test_dir, classes, image_size, mode)
    return RawSplits(x_tr, y_tr, x_te, y_te, classes)


def cache_root() -> Path:
    """Default data/cache directory: ``$REGSTUDY_CACHE`` or ``~/.cache/regstudy``."""
    return Path(os.environ.get("REGSTUDY_CACHE") or Path.home() / ".cache" / "regstudy")


# -------------------------------------------------------------------------------- generated / bundled


def _generate_mnist1d(args: dict[str, Any]) -> dict[str, np.ndarray]:
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    # make_dataset reseeds numpy's and Python's GLOBAL generators; restore them so that loading data
    # never changes the randomness of anything else in the process.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


# mnist1d.data.get_dataset_args() without its download url (a test keeps the two equal). A copy, so
# that reading the cached file does not import mnist1d (with scipy and matplotlib: over a second in
# every fresh Ray worker); the package is imported only to generate the data.
MNIST1D_DEFAULTS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 0.02,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}
# The options a spec may override: exactly the generator's arguments.
MNIST1D_OPTIONS = tuple(MNIST1D_DEFAULTS)


def _check_mnist1d_option(key: str, value: Any) -> None:
    """The generator's arguments keep their default's type and a range it can generate from (it would
    otherwise fail deep inside mnist1d, or silently make an empty split)."""
    default = MNIST1D_DEFAULTS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, rule = isinstance(value, bool), "true or false"
    elif key == "train_split":
        ok, rule = number and 0.0 < value < 1.0, "a number in (0, 1)"
    elif key == "padding":
        ok = isinstance(value, list) and len(value) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ok, rule = ok and value[0] <= value[1], "[low, high] integers with 0 <= low <= high"
    elif isinstance(default, int):
        least = 0 if key in ("seed", "max_translation") else (2 if key == "num_samples" else 1)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        rule = f"an integer >= {least}"
    else:
        ok, rule = number and value >= 0 and math.isfinite(value), "a finite number >= 0"
    if not ok:
        raise ValueError(f"{key} must be {rule}, but got {value!r}.")


def load_mnist1d(root: Path, download: bool, **overrides: Any) -> RawSplits:
    """MNIST-1D generated offline with ``mnist1d.data.make_dataset`` (defaults: 4000/1000, length 40).

    ``overrides`` replace entries of ``get_dataset_args()`` (names in MNIST1D_OPTIONS). The result is
    cached under root, keyed by a hash of the full argument dict; ``download`` is ignored (nothing to fetch).
    """
    unknown = sorted(set(overrides) - set(MNIST1D_OPTIONS))
    if unknown:
        raise ValueError(f"mnist1d options must be among {sorted(MNIST1D_OPTIONS)}, but got {unknown}.")
    for key, value in overrides.items():
        _check_mnist1d_option(key, value)
    args = {**MNIST1D_DEFAULTS, **overrides}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"mnist1d_{key}.npz"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        # Parallel trials: one generates, the others wait on the lock and then read its file.
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                data = _generate_mnist1d(args)
                fd, tmp = tempfile.mkstemp(dir=root, suffix=".npz.tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.savez(f, **data)
                    os.replace(tmp, path)  # atomic: readers never see a half-written file
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
    with np.load(path) as d:
        x, y, x_te, y_te = (d[k] for k in ("x", "y", "x_test", "y_test"))
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None, :]  # noqa: E731
    return RawSplits(
        f32(x),
        torch.from_numpy(y.astype(np.int64)),
        f32(x_te),
        torch.from_numpy(y_te.astype(np.int64)),
        [str(i) for i in range(10)],
    )


def load_digits(root: Path, download: bool, test_fraction: float = 0.2) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1797 images), values 0..16 scaled to uint8 0..255.

    The split is fixed for everyone: a permutation seeded with 0, its last ``test_fraction`` is the test set.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:  # the only use of scikit-learn: an optional extra
        raise ImportError('dataset digits needs scikit-learn: pip install "regstudy[digits]"') from None

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), but got {test_fraction}.")
    d = sk_load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # fixed split for everyone
    n_test = round(test_fraction * len(y))
    tr, te = perm[:-n_test].sort().values, perm[-n_test:].sort().values
    return RawSplits(x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])
