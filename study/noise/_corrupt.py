"""Synthetic label noise for the training labels (test labels stay clean).

Kinds (definitions in reference.md, "Label noise"): ``none``, ``symmetric`` (to a uniformly chosen OTHER
class), ``asymmetric`` (published class maps, else pairflip), ``pairflip`` (i -> i+1 mod K), ``instance``
(Xia et al. NeurIPS 2020) and ``adversarial`` (label-flip poisoning from reference probabilities); and
two kinds whose noisy labels are given, not drawn (``_given``): ``human`` (CIFAR-10N / CIFAR-100N) and
``file`` (a user's label file).

Every flip is drawn from the CLEAN labels in one vectorised step, with a generator seeded by ``seed``
only (``numpy.random.default_rng``), so the noisy labels for (dataset, kind, rate, seed) are the same for
every regularizer and do not depend on numpy's or torch's global random state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from study import vocabulary
from study.noise._given import flip_given, given_label, validate_source
from study.noise._maps import (
    ArrayLike,
    _check_labels,
    _coarse_per_class,
    _to_numpy_float,
    asymmetric_map,
)
from study.registry import Registry

# The public names are re-exported (and listed in __all__) by study/noise/__init__.py.

ADVERSARIAL_MODES = tuple(vocabulary.ADVERSARIAL_MODES)


@dataclass(frozen=True)
class NoisyLabels:
    """Result of :func:`corrupt`.

    Attributes:
        labels: (N,) int64 noisy labels (CPU).
        flipped: (N,) bool, ``labels != clean``.
        transition: (K, K) float32 EMPIRICAL transition matrix, ``T[i, j]`` = fraction of clean-class-i
            samples whose noisy label is j; rows sum to 1; a class absent from the input gets the
            identity row.
        realized_rate: ``flipped.float().mean()`` (0.0 for empty input).
        kind: requested kind (also when asymmetric fell back to pairflip; see ``note``).
        rate: requested rate.
        note: "" or a remark on how the request was realised.
    """

    labels: torch.Tensor
    flipped: torch.Tensor
    transition: torch.Tensor
    realized_rate: float
    kind: str
    rate: float
    note: str = ""


def validate_noise(
    kind: str, rate: float, *, mode: str | None = None, dataset_labels: str | None = None,
    label_set: str | None = None, path: str | None = None,
) -> None:  # fmt: skip
    """Check a noise setting; raise ``ValueError`` naming the field, the value and what is allowed.

    ``dataset_labels`` / ``label_set`` (kind ``human``) and ``path`` (kind ``file``) name where given
    labels come from; those kinds take no rate (their realised rate is measured).
    """
    _validate_kind(kind, rate, mode)
    validate_source(kind, dataset_labels, label_set, path)


def setting_label(
    kind: str, rate: float, mode: str | None = None, label_set: str | None = None, path: str | None = None
) -> str:
    """The last part of a cell id: ``none``, ``symmetric:0.4``, ``adversarial-confident:0.2``, ``human-x``,
    ``file-<stem>``. A rate ``:g`` would round keeps every digit, so two rates never share a label."""
    if kind == "none":
        return "none"
    if not NOISE_REGISTRY[kind].uses_rate:
        return given_label(kind, label_set, path)
    name, short = (f"{kind}-{mode}" if mode else kind), f"{rate:g}"
    return f"{name}:{short if float(short) == rate else repr(float(rate))}"


def _validate_kind(kind: str, rate: float, mode: str | None) -> None:
    if kind not in NOISE_REGISTRY:
        raise ValueError(
            f"kind must be a known noise kind (allowed: {', '.join(NOISE_REGISTRY)}), but got {kind!r}."
        )
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be a number in [0, 1] (allowed: 0 <= rate <= 1), but got {rate!r}.")
    if mode is not None and mode not in ADVERSARIAL_MODES:
        raise ValueError(
            f"mode must be an adversarial mode (allowed: {', '.join(ADVERSARIAL_MODES)}), but got {mode!r}."
        )
    if not NOISE_REGISTRY[kind].uses_rate and rate != 0:
        raise ValueError(
            f"rate is not used by kind {kind!r} (its realised rate is measured), but got {rate!r}."
        )


def _empirical_transition(clean: np.ndarray, noisy: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(clean * k + noisy, minlength=k * k).reshape(k, k).astype(np.float64)
    n = counts.sum(axis=1, keepdims=True)
    t = np.where(n > 0, counts / np.maximum(n, 1.0), np.eye(k))
    return t


def _symmetric(rng: np.random.Generator, y: np.ndarray, k: int, r: float) -> np.ndarray:
    flip = rng.random(len(y)) < r
    # An offset in 1..K-1 is a uniformly chosen OTHER class, so the realised rate is r, not r(K-1)/K.
    offset = rng.integers(1, k, size=len(y))
    return np.where(flip, (y + offset) % k, y)


def _mapped(rng: np.random.Generator, y: np.ndarray, k: int, r: float, mapping: dict[int, int]) -> np.ndarray:
    target = np.arange(k)
    for src, dst in mapping.items():
        target[src] = dst
    flip = rng.random(len(y)) < r  # one draw per sample, from the clean label: no chained flips
    return np.where(flip, target[y], y)


def _truncnorm_mean(r: float, std: float) -> float:
    if std == 0.0 or r in (0.0, 1.0):
        return r
    from scipy import stats  # here, not at import: scipy.stats costs every trial process ~1 s

    return float(stats.truncnorm.mean(-r / std, (1.0 - r) / std, loc=r, scale=std))


def _instance_probs_rng(
    rng: np.random.Generator, y: np.ndarray, k: int, r: float, features: torch.Tensor | np.ndarray, std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample flip rate q (N,) and log-target distribution log softmax(a) with a[y] = -inf (N, K).

    Draw order (part of the contract, the tests re-derive it): q (N draws), then W[c] (d, K) for
    c = 0..K-1. The noisy label is y with prob. 1 - q and j != y with prob. q softmax(a)_j, i.e. P.
    """
    x = _to_numpy_float(features, "features")
    n = len(y)
    if x.ndim < 2 or x.shape[0] != n:
        raise ValueError(f"features must have shape (N={n}, d, ...), but got {tuple(x.shape)}.")
    x = x.reshape(n, int(np.prod(x.shape[1:])))  # not -1: N = 0 must work
    d = x.shape[1]
    # Standardise each dimension over the N samples (the analogue of ToTensor+Normalize in Xia et al.'s
    # loaders); it makes the result independent of the pixel scale (uint8 vs [0,1] floats). Two passes by
    # chunks in float64, so a (50000, 3072) input is never copied whole and large means cancel exactly.
    chunks = range(0, n, 4096)
    mu = sum((x[s : s + 4096].astype(np.float64).sum(axis=0) for s in chunks), np.zeros(d)) / max(n, 1)
    ss = sum((np.square(x[s : s + 4096].astype(np.float64) - mu).sum(axis=0) for s in chunks), np.zeros(d))
    sd = np.sqrt(ss / max(n, 1))
    inv_sd = np.divide(1.0, sd, out=np.zeros(d), where=sd > 1e-12)  # constant dimensions -> 0

    if r == 0.0 or std == 0.0:
        # TruncNormal(0, s) on [0, 1] has mean ~0.8 s > 0: rate 0 must mean no noise, so q = r exactly.
        q = np.full(n, r)
    else:
        from scipy import stats

        q = stats.truncnorm.rvs(-r / std, (1.0 - r) / std, loc=r, scale=std, size=n, random_state=rng)
    log_p = np.empty((n, k))
    for c in range(k):
        w = rng.standard_normal((d, k))
        idx = np.flatnonzero(y == c)
        if idx.size:
            a = ((x[idx].astype(np.float64) - mu) * inv_sd) @ w
            a[:, c] = -np.inf
            a_max = a.max(axis=1, keepdims=True)
            log_p[idx] = a - a_max - np.log(np.exp(a - a_max).sum(axis=1, keepdims=True))
    return q, log_p


def instance_probabilities(
    labels: ArrayLike,
    num_classes: int,
    rate: float,
    seed: int,
    features: torch.Tensor | np.ndarray,
    instance_std: float = 0.1,
) -> np.ndarray:
    """The (N, K) matrix P of Xia et al.: P[i, y_i] = 1 - q_i, P[i, j] = q_i softmax(x_i . W[y_i])_j.

    Uses the same generator stream as ``corrupt(kind="instance")`` with the same arguments, so the noisy
    labels returned there are one draw from these rows.
    """
    validate_noise("instance", rate)
    y = _check_labels(labels, num_classes)
    q, log_p = _instance_probs_rng(
        np.random.default_rng(seed), y, num_classes, float(rate), features, instance_std
    )
    p = q[:, None] * np.exp(log_p)
    p[np.arange(len(y)), y] = 1.0 - q
    return p


def _instance(
    rng: np.random.Generator, y: np.ndarray, k: int, r: float, features: torch.Tensor | np.ndarray, std: float
) -> np.ndarray:
    q, log_p = _instance_probs_rng(rng, y, k, r, features, std)
    flip = rng.random(len(y)) < q
    # Gumbel-max draws j ~ softmax(a) among the other classes (a[y] = -inf is never chosen); together with
    # the Bernoulli(q) flip this samples exactly from P, and q = 0 gives no flip at all.
    target = np.argmax(log_p + rng.gumbel(size=log_p.shape), axis=1)
    return np.where(flip, target, y)


def _adversarial(y: np.ndarray, k: int, r: float, probs: torch.Tensor | np.ndarray, mode: str) -> np.ndarray:
    p = _to_numpy_float(probs, "probs").astype(np.float64)
    n = len(y)
    if p.shape != (n, k):
        raise ValueError(f"probs must have shape (N, K) = ({n}, {k}), but got {tuple(p.shape)}.")
    if not np.isfinite(p).all() or (p < -1e-6).any() or (p > 1 + 1e-6).any():
        raise ValueError(
            "probs must be finite class probabilities in [0, 1] (not logits), but got values outside."
        )
    rows = np.arange(n)
    others = p.copy()
    others[rows, y] = -np.inf
    runner_up = np.argmax(others, axis=1)  # most confusable class; lowest index on ties
    margin = p[rows, y] - others[rows, runner_up]
    noisy = y.copy()
    for c in range(k):
        idx = np.flatnonzero(y == c)  # ascending, so a stable sort breaks ties by index
        # floor(r n_c); the epsilon stops 0.29 * 100 = 28.999... from losing a flip to rounding.
        budget = int(math.floor(r * idx.size + 1e-9))
        if budget == 0:
            continue
        key = -margin[idx] if mode == "confident" else margin[idx]
        chosen = idx[np.argsort(key, kind="stable")[:budget]]
        noisy[chosen] = runner_up[chosen]
    return noisy


@dataclass(frozen=True)
class NoiseInputs:
    """What a noise kind may read besides the clean labels (see ``NoiseKind.inputs``)."""

    dataset: str | None = None
    coarse_labels: ArrayLike | None = None
    features: torch.Tensor | np.ndarray | None = None
    probs: torch.Tensor | np.ndarray | None = None
    mode: str = ADVERSARIAL_MODES[0]
    instance_std: float = 0.1
    given_labels: ArrayLike | None = None


FlipFn = Callable[[np.random.Generator, np.ndarray, int, float, NoiseInputs], tuple[np.ndarray, str]]


@dataclass(frozen=True)
class NoiseKind:
    """Registry entry: ``flip(rng, clean labels, K, rate, inputs) -> (noisy labels, note)``.

    ``inputs`` names the ``NoiseInputs`` fields the kind reads from the dataset, a reference model or
    the setting (``dataset``, ``coarse_labels``, ``features``, ``probs``, ``mode``, ``given_labels``):
    the trial supplies exactly those, so it needs no knowledge of individual kinds. ``uses_rate``
    False: the labels are given (a file), the rate must be 0 and the realised rate is what the file holds.
    """

    name: str
    flip: FlipFn
    description: str
    inputs: tuple[str, ...] = ()
    uses_rate: bool = True


def _flip_none(rng: np.random.Generator, y: np.ndarray, k: int, r: float, _: NoiseInputs) -> tuple:
    return y.copy(), (f"none: rate {r:g} ignored" if r > 0 else "")


def _flip_symmetric(rng: np.random.Generator, y: np.ndarray, k: int, r: float, _: NoiseInputs) -> tuple:
    note = "symmetric: flips go to a uniformly chosen OTHER class (realised rate ~ r, not r(K-1)/K)"
    return _symmetric(rng, y, k, r), note


def _flip_pairflip(rng: np.random.Generator, y: np.ndarray, k: int, r: float, _: NoiseInputs) -> tuple:
    return _mapped(rng, y, k, r, {i: (i + 1) % k for i in range(k)}), ""


def _flip_asymmetric(rng: np.random.Generator, y: np.ndarray, k: int, r: float, inp: NoiseInputs) -> tuple:
    coarse = None if inp.coarse_labels is None else _coarse_per_class(inp.coarse_labels, y, k)
    mapping = asymmetric_map(inp.dataset, k, coarse)
    if mapping is None:
        mapping = {i: (i + 1) % k for i in range(k)}
        note = f"asymmetric: no class map for dataset {inp.dataset!r}; fell back to pairflip"
    else:
        name = "cifar100 next-in-superclass" if len(mapping) > 10 else f"{inp.dataset} {mapping}"
        note = f"asymmetric: {name} map; only source classes flip (overall rate < r)"
    return _mapped(rng, y, k, r, mapping), note


def _flip_instance(rng: np.random.Generator, y: np.ndarray, k: int, r: float, inp: NoiseInputs) -> tuple:
    if inp.features is None:
        raise ValueError("features must be given for kind 'instance' (an (N, ...) array), but got None.")
    noisy = _instance(rng, y, k, r, inp.features, inp.instance_std)
    mean_q = _truncnorm_mean(r, inp.instance_std)
    return noisy, f"instance: features standardised per dimension; E[q] = {mean_q:.4f} for r = {r:g}"


def _flip_adversarial(rng: np.random.Generator, y: np.ndarray, k: int, r: float, inp: NoiseInputs) -> tuple:
    if inp.probs is None:
        raise ValueError("probs must be given for kind 'adversarial' (an (N, K) array), but got None.")
    noisy = _adversarial(y, k, r, inp.probs, inp.mode)
    return noisy, f"adversarial-{inp.mode}: floor(r * n_c) flips per class, ties by index"


# Add a noise kind: a flip function above and one entry here (plus its test in tests/science/test_noise.py).
NOISE_REGISTRY: Registry[NoiseKind] = Registry(
    "noise kind",
    [
        NoiseKind("none", _flip_none, "clean labels"),
        NoiseKind("symmetric", _flip_symmetric, "each label to a uniformly chosen other class w.p. r"),
        NoiseKind("asymmetric", _flip_asymmetric, "published class maps", ("dataset", "coarse_labels")),
        NoiseKind("pairflip", _flip_pairflip, "i -> i+1 mod K w.p. r"),
        NoiseKind("instance", _flip_instance, "instance-dependent (Xia et al. 2020)", ("features",)),
        NoiseKind(
            "adversarial", _flip_adversarial, "label-flip poisoning by reference margin", ("probs", "mode")
        ),
        NoiseKind("human", flip_given, "CIFAR-10N/100N human labels", ("given_labels",), uses_rate=False),
        NoiseKind("file", flip_given, "noisy labels from a user's file", ("given_labels",), uses_rate=False),
    ],
)
NOISE_KINDS = tuple(NOISE_REGISTRY.names())


def synthetic_kinds() -> tuple[str, ...]:
    """Kinds that draw their noise at a rate (every kind but the given-label ones)."""
    return tuple(name for name, entry in NOISE_REGISTRY.items() if entry.uses_rate)


def noise_inputs(kind: str) -> tuple[str, ...]:
    """The ``NoiseInputs`` fields a noise kind reads (ValueError for an unknown kind)."""
    return NOISE_REGISTRY[kind].inputs


def corrupt(
    labels: ArrayLike,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
    *,
    dataset: str | None = None,
    coarse_labels: ArrayLike | None = None,
    features: torch.Tensor | np.ndarray | None = None,
    probs: torch.Tensor | np.ndarray | None = None,
    mode: str = "confident",
    instance_std: float = 0.1,
    given_labels: ArrayLike | None = None,
) -> NoisyLabels:
    """Corrupt clean labels with one kind of label noise.

    Args:
        labels: (N,) clean integer labels in [0, K) (tensor on any device, array or sequence; never
            modified).
        num_classes: K >= 2.
        kind: one of ``NOISE_KINDS``.
        rate: r in [0, 1]. symmetric/pairflip: per-sample flip prob.; asymmetric: flip prob. of each
            SOURCE class of the map (overall rate below r); instance: centre of q_i ~ TruncNormal(r,
            instance_std) on [0, 1] (r = 0 gives q = 0); adversarial: per-class budget floor(r n_c).
        seed: seeds the dedicated generator (unused by adversarial, which is deterministic).
        dataset: selects the asymmetric map (cifar10, mnist, cifar100); others fall back to pairflip.
        coarse_labels: cifar100 asymmetric only: per-sample coarse labels (length N, read per sample
            whenever N equals the number of labels, N = K included), or the length-K fine->superclass
            vector.
        features: instance only: (N, ...) inputs, flattened to (N, d) and standardised per dimension.
        probs: adversarial only: (N, K) out-of-fold reference probabilities from a clean-label model.
        mode: adversarial only: "confident" flips the highest margins p_y - max_{k!=y} p_k, "boundary"
            the lowest; both flip to argmax_{k!=y} p. Ties in margin or class go to the lower index.
        instance_std: std of the truncated normal of q_i (0.1 in Xia et al.).
        given_labels: human / file only: the (N,) noisy labels (read by ``study.noise`` loaders).

    Returns:
        NoisyLabels with new CPU tensors.

    Raises:
        ValueError: unknown kind/mode, rate outside [0, 1], labels outside [0, K), instance without
            features, adversarial without probs or with the wrong shape, cifar100 without coarse labels.
    """
    inputs = NoiseInputs(dataset, coarse_labels, features, probs, mode, instance_std, given_labels)
    return _draw(labels, num_classes, kind, rate, seed, inputs)


def corrupt_setting(
    labels: ArrayLike, num_classes: int, setting: Any, seed: int, inputs: NoiseInputs
) -> NoisyLabels:
    """``corrupt`` for a trial: a setting's ``kind`` and ``rate`` (a ``study.spec.NoiseSetting``) and the
    ``NoiseInputs`` its kind declares (``noise_inputs(kind)``). Same checks and result as ``corrupt``."""
    return _draw(labels, num_classes, setting.kind, setting.rate, seed, inputs)


def _draw(labels: ArrayLike, k: int, kind: str, rate: float, seed: int, inputs: NoiseInputs) -> NoisyLabels:
    _validate_kind(kind, rate, inputs.mode)  # the label source (file, label set) was resolved by the caller
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, but got {seed!r}.")
    std = inputs.instance_std
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0 <= std < math.inf:
        raise ValueError(f"instance_std must be a finite number >= 0, but got {std!r}.")
    y = _check_labels(labels, k)
    rng = np.random.default_rng(seed)
    inputs = replace(inputs, instance_std=float(std))
    noisy, note = NOISE_REGISTRY[kind].flip(rng, y, k, float(rate), inputs)
    flipped = noisy != y
    return NoisyLabels(
        labels=torch.from_numpy(noisy.astype(np.int64)),
        flipped=torch.from_numpy(flipped),
        transition=torch.from_numpy(_empirical_transition(y, noisy, k)).float(),
        realized_rate=float(flipped.mean()) if len(y) else 0.0,
        kind=kind,
        rate=float(rate),
        note=note,
    )
