"""study.data: loaders on small native-format files, mnist1d generation/cache, splits, batching."""

from __future__ import annotations

import pickle
import random
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from study import data

# ---------------------------------------------------------------------------------------------- fixtures


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX (LeCun) file: 0x00 0x00 0x08 (uint8) ndim, big-endian int32 dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]))
        f.write(struct.pack(f">{arr.ndim}i", *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------ torchvision family


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_like_reads_idx_files(tmp_path, rng, name, folder):
    x_tr, x_te = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    y_tr, y_te = rng.integers(0, 10, 6), rng.integers(0, 10, 4)
    raw = tmp_path / folder / "raw"
    for stem, arr in [
        ("train-images-idx3", x_tr),
        ("train-labels-idx1", y_tr),
        ("t10k-images-idx3", x_te),
        ("t10k-labels-idx1", y_te),
    ]:
        _write_idx(raw / f"{stem}-ubyte", arr)
    b = data.load_dataset(name, root=tmp_path)
    assert b.x_train.dtype == torch.uint8 and b.x_train.shape == (6, 1, 28, 28)
    assert torch.equal(b.x_train[:, 0], torch.from_numpy(x_tr.astype(np.uint8)))
    assert torch.equal(b.x_test[:, 0], torch.from_numpy(x_te.astype(np.uint8)))
    assert (
        b.y_train.dtype == torch.long
        and b.y_train.tolist() == y_tr.tolist()
        and b.y_test.tolist() == y_te.tolist()
    )
    assert (b.num_classes, b.input_shape, b.kind, b.value_range) == (10, (1, 28, 28), "image", (0.0, 1.0))
    assert len(b.class_names) == 10 and b.coarse_train is None


def _cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072)).astype(np.uint8)


def test_cifar10_reads_pickle_batches(tmp_path, rng):
    base = tmp_path / "cifar-10-batches-py"
    rows, labels = [], []
    for i in range(1, 6):
        r, lab = _cifar_rows(rng, 2), rng.integers(0, 10, 2).tolist()
        _pickle(base / f"data_batch_{i}", {"data": r, "labels": lab})
        rows.append(r)
        labels += lab
    te_rows, te_lab = _cifar_rows(rng, 3), [9, 0, 4]
    _pickle(base / "test_batch", {"data": te_rows, "labels": te_lab})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(base / "batches.meta", {"label_names": names})
    b = data.load_dataset("cifar10", root=tmp_path)
    all_rows = np.concatenate(rows)
    assert b.x_train.shape == (10, 3, 32, 32) and b.x_train.dtype == torch.uint8
    # CIFAR rows are channel-major: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert torch.equal(b.x_train[3, 1], torch.from_numpy(all_rows[3, 1024:2048].reshape(32, 32)))
    assert torch.equal(b.x_test[2, 2], torch.from_numpy(te_rows[2, 2048:].reshape(32, 32)))
    assert b.y_train.tolist() == labels and b.y_test.tolist() == te_lab
    assert b.class_names == names and b.num_classes == 10
    # Statistics are those of the float inputs in [0, 1], per channel.
    f = all_rows.reshape(10, 3, 1024).astype(np.float64) / 255
    np.testing.assert_allclose(b.mean, f.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(b.std, f.std(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(b.data_std, f.std(), rtol=1e-6)


def test_cifar100_reads_fine_and_coarse_labels(tmp_path, rng):
    base = tmp_path / "cifar-100-python"
    tr, te = _cifar_rows(rng, 7), _cifar_rows(rng, 5)
    fine_tr, coarse_tr = rng.integers(0, 100, 7).tolist(), rng.integers(0, 20, 7).tolist()
    fine_te, coarse_te = rng.integers(0, 100, 5).tolist(), rng.integers(0, 20, 5).tolist()
    _pickle(base / "train", {"data": tr, "fine_labels": fine_tr, "coarse_labels": coarse_tr})
    _pickle(base / "test", {"data": te, "fine_labels": fine_te, "coarse_labels": coarse_te})
    fine_names = [f"f{i}" for i in range(100)]
    _pickle(
        base / "meta", {"fine_label_names": fine_names, "coarse_label_names": [f"c{i}" for i in range(20)]}
    )
    b = data.load_dataset("cifar100", root=tmp_path, max_test=4)
    assert b.num_classes == 100 and b.class_names == fine_names
    assert b.y_train.tolist() == fine_tr and b.coarse_train.tolist() == coarse_tr
    assert b.coarse_train.dtype == torch.long
    # max_test keeps the first 4 test samples, coarse labels cut alongside.
    assert b.y_test.tolist() == fine_te[:4] and b.coarse_test.tolist() == coarse_te[:4]
    assert torch.equal(b.x_test[3, 0], torch.from_numpy(te[3, :1024].reshape(32, 32)))


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path, rng):
    from scipy.io import savemat

    arrays = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        arrays[split] = (x, y)
    b = data.load_dataset("svhn", root=tmp_path)
    x, y = arrays["train"]
    assert b.x_train.shape == (5, 3, 32, 32) and b.x_train.dtype == torch.uint8
    # Stored as (H, W, C, N): our (n, c, h, w) must equal X[h, w, c, n].
    assert torch.equal(b.x_train[4, 2], torch.from_numpy(x[:, :, 2, 4]))
    assert b.y_train.tolist() == [0, 1, 2, 0, 9] and b.y_test.tolist() == [0, 1, 2]


def test_image_folder_reads_resizes_and_maps_classes(tmp_path):
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 3), ("test", 2)):
        for cls, rgb in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 24), rgb).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    b = data.load_dataset("image_folder", root=tmp_path, image_size=16)
    assert b.class_names == ["cat", "dog"] and b.num_classes == 2
    assert b.x_train.shape == (6, 3, 16, 16) and b.x_test.shape == (4, 3, 16, 16)
    assert b.x_train.dtype == torch.uint8
    assert b.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    # A solid colour stays that colour after resizing.
    assert torch.equal(b.x_train[0, :, 5, 5], torch.tensor([255, 0, 0], dtype=torch.uint8))
    assert torch.equal(b.x_test[3, :, 0, 0], torch.tensor([0, 0, 255], dtype=torch.uint8))
    grey = data.load_dataset("image_folder", root=tmp_path, image_size=8, grayscale=True)
    assert grey.x_train.shape == (6, 1, 8, 8) and len(grey.mean) == 1


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "MNIST/raw"),
        ("fashion_mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_files_say_how_to_get_them(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset(name, root=tmp_path)
    msg = str(e.value)
    assert name in msg and str(tmp_path) in msg and expected in msg and "download: true" in msg
    assert "\n" not in msg


def test_image_folder_missing_and_download_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        data.load_dataset("image_folder", root=tmp_path)
    with pytest.raises(ValueError, match="download"):
        data.load_dataset("image_folder", root=tmp_path, download=True)


def test_unknown_dataset_and_option_errors(tmp_path):
    with pytest.raises(ValueError, match="mnist1d") as e:
        data.load_dataset("imagenet")
    assert all(n in str(e.value) for n in data.list_datasets())
    with pytest.raises(ValueError, match="colour"):
        data.load_dataset("digits", colour=True)
    with pytest.raises(ValueError, match="max_train"):
        data.load_dataset("digits", max_train=0)
    assert set(data.list_datasets()) >= {"mnist1d", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100"}
    assert data.DATASETS["image_folder"].options == ("image_size", "grayscale")


# ------------------------------------------------------------------------------------ mnist1d, digits


def test_mnist1d_generates_offline_caches_and_keeps_global_rng(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(7)
    random.seed(7)
    np_before, py_before = np.random.get_state(), random.getstate()
    b = data.load_dataset("mnist1d", root=tmp_path, num_samples=500)
    np_after = np.random.get_state()
    assert (
        np_before[0] == np_after[0]
        and np.array_equal(np_before[1], np_after[1])
        and np_before[2:] == np_after[2:]
    )
    assert random.getstate() == py_before

    assert (
        b.x_train.shape == (400, 1, 40)
        and b.x_test.shape == (100, 1, 40)
        and b.x_train.dtype == torch.float32
    )
    assert b.kind == "signal" and b.value_range is None and b.input_shape == (1, 40) and b.num_classes == 10
    # Same numbers as calling the package directly with the same arguments.
    args = get_dataset_args()
    args.num_samples = 500
    ref = make_dataset(args)
    np.testing.assert_allclose(b.x_train[:, 0].numpy(), ref["x"], rtol=1e-6)
    assert b.y_test.tolist() == ref["y_test"].tolist()
    np.testing.assert_allclose(b.data_std, ref["x"].astype(np.float32).std(), rtol=1e-5)
    assert torch.equal(b.to_float(b.x_train), b.x_train)  # signals pass through unchanged

    # The second load reads the cache file: tamper with it and see the tampered values come back.
    (cache,) = tmp_path.glob("mnist1d_*.npz")
    with np.load(cache) as d:
        stored = dict(d)
    stored["x"] = np.zeros_like(stored["x"])
    np.savez(cache, **stored)
    again = data.load_dataset("mnist1d", root=tmp_path, num_samples=500)
    assert float(again.x_train.abs().sum()) == 0.0
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file
    with pytest.raises(ValueError, match="num_samples"):
        data.load_dataset("mnist1d", root=tmp_path, n_samples=10)


def test_mnist1d_defaults_match_the_package_and_a_cached_load_does_not_import_it(tmp_path):
    import subprocess
    import sys

    from mnist1d.data import get_dataset_args

    from study.data._readers import MNIST1D_DEFAULTS

    # Our copy keys the cache: if mnist1d changes a default, this fails instead of serving stale data.
    package = get_dataset_args(as_dict=True)
    package.pop("url")
    assert package == MNIST1D_DEFAULTS
    data.load_dataset("mnist1d", root=tmp_path, num_samples=300)  # generates and caches
    code = (
        "import sys; from study import data; "
        f"b = data.load_dataset('mnist1d', root={str(tmp_path)!r}, num_samples=300); "
        "print(b.x_train.shape[0], 'mnist1d' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["240", "False"]


def test_digits_split_is_fixed_and_complete():
    from sklearn.datasets import load_digits

    a, b = data.load_dataset("digits"), data.load_dataset("digits")
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert (
        a.x_train.shape == (1438, 1, 8, 8)
        and a.x_test.shape == (359, 1, 8, 8)
        and a.x_train.dtype == torch.uint8
    )
    d = load_digits()
    expected = np.round(d.images * 255 / 16).astype(np.uint8)
    key = lambda x, y: (bytes(np.asarray(x).tobytes()), int(y))  # noqa: E731
    ours = Counter(
        key(x[0].numpy(), y)
        for x, y in zip(torch.cat([a.x_train, a.x_test]), torch.cat([a.y_train, a.y_test]), strict=True)
    )
    assert ours == Counter(key(x, y) for x, y in zip(expected, d.target, strict=True))
    assert int(a.x_train.max()) == 255 and a.to_float(a.x_train).max() == 1.0


# ---------------------------------------------------------------------------------------------- splits


def test_split_train_val_uniform():
    tr, va = data.split_train_val(103, 0.2, seed=3)
    assert len(va) == round(0.2 * 103) and torch.equal(torch.cat([tr, va]).sort().values, torch.arange(103))
    tr2, va2 = data.split_train_val(103, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, data.split_train_val(103, 0.2, seed=4)[1])
    assert len(data.split_train_val(10, 0.0, seed=0)[1]) == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_train_val(10, bad, seed=0)


# ---------------------------------------------------------------------------------------------- batching


def test_device_batches_cover_every_index_once_and_are_deterministic():
    x, y = torch.arange(23).float()[:, None], torch.arange(23)
    gen = torch.Generator().manual_seed(0)
    batches = data.DeviceBatches(x, y, 5, shuffle=True, generator=gen)
    assert len(batches) == 5
    epoch1 = [yb for _, yb in batches]
    epoch2 = [yb for _, yb in batches]
    for ep in (epoch1, epoch2):
        assert [len(b) for b in ep] == [5, 5, 5, 5, 3]
        assert torch.equal(torch.cat(ep).sort().values, torch.arange(23))
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))  # a fresh permutation each epoch
    xb, yb = next(iter(batches))
    assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired
    replay = data.DeviceBatches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([yb for _, yb in replay]), torch.cat(epoch1))
    dropped = data.DeviceBatches(x, y, 5, shuffle=True, generator=gen, drop_last=True)
    assert len(dropped) == 4 and sum(len(yb) for _, yb in dropped) == 20
    ordered = data.DeviceBatches(x.to(torch.uint8), y, 10, shuffle=False, to_float=lambda t: t.float() / 255)
    xs = [xb for xb, _ in ordered]
    assert xs[0].dtype == torch.float32 and torch.equal(torch.cat(xs)[:, 0], torch.arange(23).float() / 255)


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = img[..., i + dy, j + dx], zero where that index falls outside the image."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    rows_out, rows_in = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
    cols_out, cols_in = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
    out[..., rows_out, cols_out] = img[..., rows_in, cols_in]
    return out


def test_crop_flip_is_a_real_padded_crop_and_flip():
    h = w = 12
    base = (torch.arange(h * w).float() + 1).reshape(1, 1, h, w).expand(16, 2, h, w).clone()
    base[:, 1] *= -1  # channels must move together
    batches = data.DeviceBatches(
        base,
        torch.zeros(16, dtype=torch.long),
        16,
        shuffle=False,
        generator=torch.Generator().manual_seed(5),
        augment="crop_flip",
    )
    ((out, _),) = list(batches)
    assert out.shape == base.shape
    # Every sample is the same input, so enumerate its 9 x 9 shifts x 2 flips once.
    candidates = {
        (dy, dx, f): _shifted(base[0], dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) for f in (0, 1)
    }
    candidates = {k: v.flip(-1) if k[2] else v for k, v in candidates.items()}
    seen = set()
    for s in range(16):
        matches = [k for k, v in candidates.items() if torch.equal(out[s], v)]
        assert len(matches) == 1, f"sample {s} is not a padded crop (+flip) of its input"
        seen.add(matches[0])
    assert len({m[:2] for m in seen}) > 1 and {m[2] for m in seen} == {0, 1}
    # Over many samples every offset in [-4, 4] occurs: read it off the (never padded) centre pixel.
    crops = data.random_crop(base[:1].expand(400, 2, h, w), 4, torch.Generator().manual_seed(0))
    centre = crops[:, 0, 6, 6].long() - 1
    assert set((centre // w - 6).tolist()) == set(range(-4, 5)) == set((centre % w - 6).tolist())


def test_bad_augment():
    sig = (torch.arange(20).float() + 1).expand(8, 1, 20).clone()
    with pytest.raises(ValueError, match="crop_flip"):
        data.DeviceBatches(sig, torch.zeros(8), 4, shuffle=False, augment="crop_flip")
    for bad in ("mixup", "shift"):
        with pytest.raises(ValueError, match="augment must be"):
            data.DeviceBatches(sig, torch.zeros(8), 4, shuffle=False, augment=bad)


@pytest.mark.gpu
def test_device_batches_stay_on_cuda():
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.arange(50, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for xb, yb in data.DeviceBatches(
        x, y, 16, shuffle=True, generator=gen, augment="crop_flip", to_float=lambda t: t.float() / 255
    ):
        assert xb.is_cuda and yb.is_cuda and xb.dtype == torch.float32
    cpu_gen = data.DeviceBatches(
        x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(0), augment="crop_flip"
    )
    assert all(xb.is_cuda for xb, _ in cpu_gen)


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # what an install without the extra sees
    with pytest.raises(ImportError, match=r'pip install "regstudy\[digits\]"'):
        data.load_dataset("digits")
