"""Input checks and the chunked single pass behind :mod:`study.metrics` (private).

Every public metric reduces to sums over samples, so one pass over row chunks of the logits
accumulates everything (in float64, so that the result does not depend on the chunk size) and never
holds more than a few ``(chunk, K)`` temporaries. The only O(N) state is the vector of max-probability
confidences kept for the adaptive (equal-mass) ECE, which needs a global sort.

Binning follows torchmetrics 1.9 (``_binning_bucketize``): ``n_bins + 1`` float32 edges
``linspace(0, 1, n_bins + 1)``, a sample with confidence ``c`` goes to bin
``bucketize(c, edges, right=True) - 1``, i.e. bin ``b`` holds ``edges[b] <= c < edges[b + 1]`` and a
confidence of exactly 1.0 lands in an extra top bin (index ``n_bins``) of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"an object of type {type(x).__name__}"


def check_logits(logits: object, name: str = "logits") -> tuple[int, int]:
    """Check a (N, K) floating tensor with N > 0 and K > 0; return (N, K)."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor of shape (N, K), but got {_describe(logits)}.")
    n, k = logits.shape
    if n == 0:
        raise ValueError(f"{name} must hold at least one sample (N > 0), but got N=0.")
    if k == 0:
        raise ValueError(f"{name} must have at least one column (K > 0), but got K=0.")
    return n, k


def check_labels(labels: object, n: int, num_classes: int | None, name: str = "labels") -> None:
    """Check an integer (N,) tensor whose values lie in [0, num_classes - 1] (or are >= 0 when None)."""
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be a tensor of shape (N,) = ({n},), but got {_describe(labels)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, but got dtype {labels.dtype}.")
    lo, hi = int(labels.min()), int(labels.max())
    upper = "inf" if num_classes is None else num_classes - 1
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise ValueError(f"{name} must lie in [0, {upper}], but got values in [{lo}, {hi}].")


def check_mask(mask: object, n: int, name: str = "flipped") -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"{name} must be a bool tensor of shape (N,) = ({n},), but got {_describe(mask)}.")


def check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, but got {n_bins!r}.")
    return n_bins


def check_chunk_size(chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, but got {chunk_size!r}.")
    return chunk_size


def bin_edges(n_bins: int, device: torch.device | str = "cpu") -> Tensor:
    """torchmetrics' edges: float32 ``linspace(0, 1, n_bins + 1)`` (the edge values matter at ties)."""
    return torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=device)


@dataclass
class Summary:
    """Sums over all N samples; every tensor is float64 on the logits' device.

    ``bin_*`` have n_bins + 1 entries (the last one holds confidences equal to 1.0);
    ``classwise_gap`` is (K, n_bins + 1): sum over samples in bin b of p_k of (1[y = k] - p_k).
    """

    n: int
    num_classes: int
    correct: Tensor
    nll_sum: Tensor
    brier_sum: Tensor
    conf_sum: Tensor
    error_conf_sum: Tensor
    bin_count: Tensor
    bin_conf: Tensor
    bin_acc: Tensor
    classwise_gap: Tensor | None = None
    confidences: Tensor | None = None  # (N,) float32, only when asked for
    hits: Tensor | None = None  # (N,) bool, only when asked for


def summarise(
    logits: Tensor,
    labels: Tensor,
    n_bins: int,
    chunk_size: int,
    *,
    temperature: float = 1.0,
    classwise: bool = False,
    keep_confidences: bool = False,
) -> Summary:
    """One pass over row chunks of already-checked ``logits / temperature`` (upcast to float32)."""
    n, k = logits.shape
    dev = logits.device
    f64 = dict(dtype=torch.float64, device=dev)
    edges = bin_edges(n_bins, dev)
    zero = torch.zeros((), **f64)
    acc = {key: zero.clone() for key in ("correct", "nll", "brier", "conf", "err_conf")}
    bin_count, bin_conf, bin_acc = (torch.zeros(n_bins + 1, **f64) for _ in range(3))
    gap = torch.zeros(k * (n_bins + 1), **f64) if classwise else None
    # Offsets turn (class k, bin b) into one flat index so a single bincount does all classes
    # (the -1 converts bucketize's right=True position into the bin index, as in torchmetrics).
    offsets = torch.arange(k, device=dev) * (n_bins + 1) - 1
    confs = torch.empty(n, dtype=torch.float32, device=dev) if keep_confidences else None
    hits = torch.empty(n, dtype=torch.bool, device=dev) if keep_confidences else None
    for start in range(0, n, chunk_size):
        z = logits[start : start + chunk_size].float()
        if temperature != 1.0:
            z = z / temperature
        y = labels[start : start + chunk_size].to(device=dev, dtype=torch.long)
        # Same ops as torchmetrics (softmax, then max) so confidences match it bit for bit.
        p = torch.softmax(z, dim=1)
        conf, pred = p.max(dim=1)
        hit = pred == y
        p_y = p.gather(1, y[:, None]).squeeze(1)
        acc["correct"] += hit.sum()
        acc["nll"] += F.cross_entropy(z, y, reduction="none").sum(dtype=torch.float64)
        # sum_k (p_k - 1[y=k])^2 = sum_k p_k^2 - 2 p_y + 1
        acc["brier"] += ((p * p).sum(dim=1, dtype=torch.float64) - 2 * p_y.double() + 1).sum()
        acc["conf"] += conf.sum(dtype=torch.float64)
        acc["err_conf"] += conf[~hit].sum(dtype=torch.float64)
        idx = torch.bucketize(conf, edges, right=True) - 1
        bin_count += torch.bincount(idx, minlength=n_bins + 1)
        bin_conf += torch.bincount(idx, weights=conf.double(), minlength=n_bins + 1)
        bin_acc += torch.bincount(idx, weights=hit.double(), minlength=n_bins + 1)
        if gap is not None:
            # flat (class, bin) index per entry; sum_bin (1[y=k] - p_k) = (#labels k in bin) - sum_bin p_k
            cidx = torch.bucketize(p, edges, right=True).add_(offsets).view(-1)
            gap -= torch.bincount(cidx, weights=p.double().view(-1), minlength=k * (n_bins + 1))
            gap += torch.bincount(cidx.view(-1, k).gather(1, y[:, None]).view(-1), minlength=k * (n_bins + 1))
        if confs is not None and hits is not None:
            confs[start : start + len(y)] = conf
            hits[start : start + len(y)] = hit
    return Summary(
        n=n,
        num_classes=k,
        correct=acc["correct"],
        nll_sum=acc["nll"],
        brier_sum=acc["brier"],
        conf_sum=acc["conf"],
        error_conf_sum=acc["err_conf"],
        bin_count=bin_count,
        bin_conf=bin_conf,
        bin_acc=bin_acc,
        classwise_gap=None if gap is None else gap.view(k, n_bins + 1),
        confidences=confs,
        hits=hits,
    )


def ece_from(s: Summary) -> float:
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum_{i in b} (hit_i - conf_i)| / N
    return float((s.bin_acc - s.bin_conf).abs().sum() / s.n)


def mce_from(s: Summary) -> float:
    filled = s.bin_count > 0
    return float(((s.bin_acc - s.bin_conf).abs()[filled] / s.bin_count[filled]).max())


def classwise_ece_from(s: Summary) -> float:
    assert s.classwise_gap is not None
    # (1/K) sum_k sum_b (n_kb / N) |freq_k(b) - mean p_k(b)| = (1/K) sum_{k,b} |sum (1[y=k] - p_k)| / N
    return float(s.classwise_gap.abs().sum() / (s.n * s.num_classes))


def adaptive_ece_from(confidences: Tensor, hits: Tensor, n_bins: int) -> float:
    """Equal-mass ECE: stable sort by confidence, split like ``torch.tensor_split(sorted, n_bins)``.

    The first ``N % n_bins`` bins hold one sample more than the others; with N < n_bins the trailing
    bins are empty and contribute nothing. Tied confidences keep their input order (stable sort).
    """
    n = confidences.numel()
    order = torch.sort(confidences, stable=True).indices
    gaps = hits[order].double() - confidences[order].double()
    cum = torch.cat([gaps.new_zeros(1), gaps.cumsum(0)])
    base, extra = divmod(n, n_bins)
    sizes = torch.full((n_bins,), base, dtype=torch.long, device=cum.device)
    sizes[:extra] += 1
    ends = sizes.cumsum(0)
    return float((cum[ends] - cum[ends - sizes]).abs().sum() / n)


def nan_if_empty(num: Tensor, den: Tensor | int) -> float:
    den = float(den)
    return math.nan if den == 0 else float(num) / den
