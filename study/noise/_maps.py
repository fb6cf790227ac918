"""Class maps for asymmetric (class-conditional) label noise, and input coercion for ``study.noise``.

The maps are the published ones (see reference.md, "Label noise"): CIFAR-10 from Patrini et al. CVPR 2017,
MNIST from the same paper's code, CIFAR-100 "next class within the same superclass". Datasets without a
published map return ``None`` and the caller falls back to pairflip.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]

# Patrini et al. 2017: truck->automobile, bird->airplane, deer->horse, cat<->dog; 0,1,6,7,8 never flip.
CIFAR10_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
# Patrini et al. 2017: 2->7, 3->8, 7->1, 5<->6.
MNIST_MAP: dict[int, int] = {2: 7, 3: 8, 7: 1, 5: 6, 6: 5}

_FIXED_MAPS: dict[str, tuple[int, dict[int, int]]] = {"cifar10": (10, CIFAR10_MAP), "mnist": (10, MNIST_MAP)}


def _normalise_name(dataset: str | None) -> str | None:
    # "CIFAR-10", "cifar_10" and "cifar10" are one dataset; "fashion_mnist" stays distinct from "mnist".
    return None if dataset is None else "".join(ch for ch in dataset.lower() if ch.isalnum())


def _as_int_array(x: torch.Tensor | np.ndarray | Sequence[int], name: str) -> np.ndarray:
    """Copy ``x`` into a 1-D int64 numpy array, rejecting float/bool dtypes (they hide bugs)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, but got shape {tuple(arr.shape)}.")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must have an integer dtype, but got {arr.dtype}.")
    return arr.astype(np.int64, copy=True)


def _to_numpy_float(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """A numpy view (CPU tensor, array) or copy (GPU tensor); bfloat16, unknown to numpy, becomes float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        arr = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    else:
        arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be a numeric array, but got dtype {arr.dtype}.")
    return arr


def _check_labels(labels: ArrayLike, num_classes: int) -> np.ndarray:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, but got {num_classes!r}.")
    y = _as_int_array(labels, "labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), but got {bad}.")
    return y


def _coarse_per_class(coarse_labels: ArrayLike, y: np.ndarray, k: int) -> np.ndarray:
    """Reduce per-sample coarse labels (length N) to the length-K fine->coarse vector.

    A vector as long as the labels is read per sample, also when N = K (100 CIFAR-100 samples): read as
    the fine->coarse vector it would name the superclass of class i by sample i's label.
    """
    coarse = _as_int_array(coarse_labels, "coarse_labels")
    if len(coarse) != len(y):
        return coarse  # the length-K vector; asymmetric_map checks the length
    per_class = np.full(k, -1)
    per_class[y] = coarse  # last write wins; checked for consistency just below
    if (per_class < 0).any() or (per_class[y] != coarse).any():
        raise ValueError(
            "coarse_labels given per sample must name one superclass per fine class and cover every fine "
            "class; pass the length-K fine-to-coarse vector instead."
        )
    return per_class


def superclass_next_map(coarse_of_fine: torch.Tensor | np.ndarray | Sequence[int]) -> dict[int, int]:
    """Map every fine class to the next fine class of its superclass (cyclic, members sorted).

    Args:
        coarse_of_fine: length-K vector, ``coarse_of_fine[f]`` = superclass of fine class f. Members of a
            superclass need not be contiguous (CIFAR-100's fine labels are alphabetical).

    Returns:
        ``{f: next member}`` for every fine class whose superclass has at least two members; singleton
        superclasses are left out (they cannot flip).
    """
    coarse = _as_int_array(coarse_of_fine, "coarse_labels")
    mapping: dict[int, int] = {}
    for c in np.unique(coarse):
        members = np.flatnonzero(coarse == c)  # sorted ascending
        if len(members) < 2:
            continue
        for pos, f in enumerate(members):
            mapping[int(f)] = int(members[(pos + 1) % len(members)])
    return mapping


def asymmetric_map(
    dataset: str | None,
    num_classes: int,
    coarse_labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> dict[int, int] | None:
    """The asymmetric-noise class map of ``dataset``, or ``None`` where none is published.

    Args:
        dataset: dataset name; matched case-insensitively ("cifar10", "mnist", "cifar100"). Anything
            else, including "fashion_mnist" and ``None``, has no published map.
        num_classes: K; must be 10 for cifar10/mnist and 100 for cifar100.
        coarse_labels: only for cifar100: the length-K fine-to-superclass vector (``coarse_labels[f]`` is
            the superclass of fine class f). ``corrupt`` also accepts per-sample coarse labels and
            reduces them to this vector first.

    Returns:
        ``{source class: target class}``; classes absent from the dict never flip. ``None`` means
        "no map: fall back to pairflip".

    Raises:
        ValueError: wrong ``num_classes`` for a known dataset, cifar100 without (or with malformed)
            coarse labels.
    """
    name = _normalise_name(dataset)
    if name in _FIXED_MAPS:
        k, mapping = _FIXED_MAPS[name]
        if num_classes != k:
            raise ValueError(f"num_classes must be {k} for dataset {dataset!r}, but got {num_classes}.")
        return dict(mapping)
    if name == "cifar100":
        if num_classes != 100:
            raise ValueError(f"num_classes must be 100 for dataset {dataset!r}, but got {num_classes}.")
        if coarse_labels is None:
            raise ValueError(
                "coarse_labels must be given for asymmetric noise on 'cifar100' (the superclass of every "
                "fine class; fine labels are alphabetical, so blocks of 5 are NOT superclasses), "
                "but got None."
            )
        coarse = _as_int_array(coarse_labels, "coarse_labels")
        if len(coarse) != num_classes:
            raise ValueError(
                f"coarse_labels must have length num_classes={num_classes} (one superclass per fine class), "
                f"but got length {len(coarse)}."
            )
        return superclass_next_map(coarse)
    return None
