"""Metrics over tensors: accuracy, calibration, temperature scaling, feature separation, memorisation.

Pure functions. Shapes: ``logits`` (N, K) of any floating dtype (float16/bfloat16 are upcast to float32
chunk by chunk), integer ``labels`` (N,) in [0, K-1]. Everything is computed over row chunks of
``chunk_size`` rows (default: the module-level :data:`CHUNK_SIZE`, read at call time) with float64
accumulators, so 1M x 100 logits need only O(chunk x K) extra memory and the result does not depend
on the chunk size. N = 0, wrong shapes or dtypes, and out-of-range labels raise ValueError; NaN logits
are not checked and make the affected metrics NaN.

Predictions and confidences are ``p.max(dim=1)`` of ``p = softmax(logits)``, exactly as torchmetrics
computes them (ties go to the index torch returns). Calibration binning follows torchmetrics 1.9
``multiclass_calibration_error``: see :mod:`study._calibration`; note that a confidence of exactly 1.0
(a saturated float32 softmax) gets an extra top bin of its own instead of joining ``[1 - 1/n_bins, 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from study.metrics import _calibration as _c

CHUNK_SIZE = 65536
"""Rows per chunk when a function's ``chunk_size`` is None (65536 x 100 x 4 B = 26 MB per temporary)."""


def _prepare(
    logits: Tensor, labels: Tensor, n_bins: int = 15, chunk_size: int | None = None
) -> tuple[int, int]:
    _, k = _c.check_logits(logits)
    _c.check_labels(labels, logits.shape[0], k)
    _c.check_n_bins(n_bins)
    return n_bins, _c.check_chunk_size(CHUNK_SIZE if chunk_size is None else chunk_size)


def _summary(
    logits: Tensor, labels: Tensor, n_bins: int = 15, chunk_size: int | None = None, **kw: object
) -> _c.Summary:
    n_bins, chunk = _prepare(logits, labels, n_bins, chunk_size)
    return _c.summarise(logits, labels, n_bins, chunk, **kw)


def accuracy(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> float:
    """Fraction of samples whose arg-max probability equals the label. Shapes (N, K), (N,)."""
    s = _summary(logits, labels, chunk_size=chunk_size)
    return float(s.correct) / s.n


def nll(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> float:
    """Mean negative log-likelihood -log p_y, with log_softmax in float32 (== F.cross_entropy)."""
    s = _summary(logits, labels, chunk_size=chunk_size)
    return float(s.nll_sum) / s.n


def brier(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> float:
    """Brier score: mean over samples of sum_k (p_k - 1[y = k])^2.

    Summed over the K classes and NOT divided by K, so it lies in [0, 2] whatever K is.
    """
    s = _summary(logits, labels, chunk_size=chunk_size)
    return float(s.brier_sum) / s.n


def ece(logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None) -> float:
    """Expected calibration error: sum_b (n_b / N) |acc_b - conf_b| over equal-width confidence bins.

    Equals torchmetrics ``multiclass_calibration_error(softmax(logits), labels, K, n_bins, norm="l1")``:
    bin b holds confidences in ``[edges[b], edges[b+1])`` with float32 ``edges = linspace(0, 1, n_bins+1)``,
    and confidences of exactly 1.0 form one extra bin.
    """
    return _c.ece_from(_summary(logits, labels, n_bins, chunk_size))


def mce(logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None) -> float:
    """Maximum calibration error: max over non-empty bins of |acc_b - conf_b| (bins as in :func:`ece`)."""
    return _c.mce_from(_summary(logits, labels, n_bins, chunk_size))


def adaptive_ece(logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None) -> float:
    """Equal-mass ECE: confidences sorted (stable) and split into n_bins bins of near-equal size.

    Bin sizes follow ``torch.tensor_split``: the first ``N % n_bins`` bins get one extra sample; with
    N < n_bins the surplus bins are empty. Needs O(N) extra memory for the sort.
    """
    s = _summary(logits, labels, n_bins, chunk_size, keep_confidences=True)
    return _c.adaptive_ece_from(s.confidences, s.hits, n_bins)


def classwise_ece(
    logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None
) -> float:
    """Classwise ECE: (1/K) sum_k sum_b (n_kb / N) |freq_k(b) - mean p_k(b)|.

    For every class k the samples are binned on p_k (all N samples, bins as in :func:`ece`, so p_k == 1.0
    has its own bin); freq_k(b) is the fraction of bin b whose label is k. K is logits.shape[1].
    """
    return _c.classwise_ece_from(_summary(logits, labels, n_bins, chunk_size, classwise=True))


def reliability_bins(
    logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Per-bin statistics for reliability diagrams, with the binning of :func:`ece`.

    Returns float64 tensors of shape (n_bins + 1,): "accuracy" and "confidence" (NaN for empty bins),
    "count", and "lower" / "upper" edges. Entry n_bins is the degenerate bin [1, 1] of confidences
    exactly 1.0. ``sum(count * |accuracy - confidence|) / N`` (empty bins skipped) equals :func:`ece`.
    """
    s = _summary(logits, labels, n_bins, chunk_size)
    edges = _c.bin_edges(n_bins, s.bin_count.device).double()
    count = s.bin_count
    nan = torch.full_like(count, math.nan)
    return {
        "accuracy": torch.where(count > 0, s.bin_acc / count.clamp_min(1), nan),
        "confidence": torch.where(count > 0, s.bin_conf / count.clamp_min(1), nan),
        "count": count,
        "lower": edges,
        "upper": torch.cat([edges[1:], edges[-1:]]),
    }


def overconfidence_on_errors(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> float:
    """Mean max-probability over misclassified samples; NaN when no sample is misclassified."""
    s = _summary(logits, labels, chunk_size=chunk_size)
    return _c.nan_if_empty(s.error_conf_sum, s.n - int(s.correct))


def classification_metrics(
    logits: Tensor, labels: Tensor, n_bins: int = 15, *, chunk_size: int | None = None
) -> dict[str, float]:
    """All per-prediction metrics in one pass, keyed by the names the results tables use.

    Keys: accuracy, nll, brier, ece, mce, adaptive_ece, classwise_ece, overconfidence_on_errors
    (NaN if no error), mean_confidence. Definitions as in the single-metric functions.
    """
    s = _summary(logits, labels, n_bins, chunk_size, classwise=True, keep_confidences=True)
    return {
        "accuracy": float(s.correct) / s.n,
        "nll": float(s.nll_sum) / s.n,
        "brier": float(s.brier_sum) / s.n,
        "ece": _c.ece_from(s),
        "mce": _c.mce_from(s),
        "adaptive_ece": _c.adaptive_ece_from(s.confidences, s.hits, n_bins),
        "classwise_ece": _c.classwise_ece_from(s),
        "overconfidence_on_errors": _c.nan_if_empty(s.error_conf_sum, s.n - int(s.correct)),
        "mean_confidence": float(s.conf_sum) / s.n,
    }


# The temperatures fit_temperature may return: at the bounds the NLL is still falling (separable or
# uninformative logits) and the bound is returned.
T_MIN, T_MAX = 1e-3, 1e3


def _nll_in_beta(logits: Tensor, labels: Tensor, beta: float, chunk: int) -> tuple[float, float, float]:
    """Mean NLL of ``beta * logits`` and its first two derivatives in beta, in float64 chunks.

    d/dbeta = mean(E_p[z] - z_y) and d2/dbeta2 = mean(Var_p[z]) >= 0 (p = softmax(beta z)): the NLL is
    convex in beta = 1/T.
    """
    f = g = h = 0.0
    for start in range(0, logits.shape[0], chunk):
        z = logits[start : start + chunk].double()
        y = labels[start : start + chunk].to(device=z.device, dtype=torch.long)
        zy = z.gather(1, y.unsqueeze(1)).squeeze(1)
        log_p = torch.log_softmax(beta * z, 1)
        p = log_p.exp()
        mean_z = (p * z).sum(1)
        f += float((-log_p.gather(1, y.unsqueeze(1))).sum())
        g += float((mean_z - zy).sum())
        h += float((p * (z - mean_z.unsqueeze(1)) ** 2).sum())
    n = logits.shape[0]
    return f / n, g / n, h / n


def fit_temperature(
    logits: Tensor, labels: Tensor, max_iter: int = 100, *, chunk_size: int | None = None
) -> float:
    """Temperature scaling (Guo et al. 2017): T minimising the mean NLL of ``logits / T``.

    Solved to convergence, not with Guo's fixed LBFGS budget (at lr 0.01 that stopped 0.4% short of the
    optimum T when it lay near the start): the NLL is convex in beta = 1/T, so a Newton iteration on
    beta with exact float64 derivatives, kept inside a bisection bracket, reaches the minimum to
    ~1e-12 relative in a handful of passes. T is limited to [T_MIN, T_MAX] (a bound is returned when
    the NLL still falls there: separable or uninformative logits). Chunked over rows (O(chunk x K)
    memory). Call it on validation logits. Raises ValueError on bad arguments and RuntimeError on
    non-finite logits.
    """
    _, chunk = _prepare(logits, labels, 15, chunk_size)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, but got {max_iter!r}.")
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN  # bracket on beta: g(lo) < 0 < g(hi) once checked
    for edge, sign in ((lo, 1.0), (hi, -1.0)):
        _, g, _ = _nll_in_beta(logits, labels, edge, chunk)
        if not math.isfinite(g):
            raise RuntimeError("temperature fit diverged: the NLL is not finite (non-finite logits?).")
        if sign * g >= 0:  # the minimum lies at or beyond this bound
            return 1.0 / edge
    beta = 1.0
    for _ in range(max_iter):
        _, g, h = _nll_in_beta(logits, labels, beta, chunk)
        if g < 0:
            lo = beta
        else:
            hi = beta
        step = g / h if h > 0 else math.inf
        new = beta - step
        if not lo < new < hi:  # Newton would leave the bracket: bisect it (geometrically, beta > 0)
            new = math.sqrt(lo * hi)
        if abs(new - beta) <= 1e-13 * beta or hi - lo <= 1e-13 * hi:
            beta = new
            break
        beta = new
    return 1.0 / beta


def calibration_after_temperature(
    val_logits: Tensor,
    val_labels: Tensor,
    test_logits: Tensor,
    test_labels: Tensor,
    n_bins: int = 15,
    *,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Fit T on validation logits (:func:`fit_temperature`), then score ``test_logits / T``.

    Returns {"temperature", "ece_ts", "nll_ts", "adaptive_ece_ts", "brier_ts"}. Accuracy is unchanged by
    a positive temperature and is not repeated. The two sets may have different N but need the same K.
    """
    _, k_val = _c.check_logits(val_logits, "val_logits")
    _, k_test = _c.check_logits(test_logits, "test_logits")
    if k_val != k_test:
        raise ValueError(f"test_logits must have K = {k_val} columns like val_logits, but got K = {k_test}.")
    t = fit_temperature(val_logits, val_labels, chunk_size=chunk_size)
    s = _summary(test_logits, test_labels, n_bins, chunk_size, temperature=t, keep_confidences=True)
    return {
        "temperature": t,
        "ece_ts": _c.ece_from(s),
        "nll_ts": float(s.nll_sum) / s.n,
        "adaptive_ece_ts": _c.adaptive_ece_from(s.confidences, s.hits, n_bins),
        "brier_ts": float(s.brier_sum) / s.n,
    }


def _predictions(logits: Tensor, chunk: int) -> Tensor:
    return torch.cat([c.float().argmax(dim=1) for c in logits.split(chunk)])


def _flipped_agreement(
    logits: Tensor, labels: Tensor, flipped: Tensor, chunk_size: int | None, name: str
) -> float:
    n, k = _c.check_logits(logits)
    _c.check_labels(labels, n, k, name)
    _c.check_mask(flipped, n)
    chunk = _c.check_chunk_size(CHUNK_SIZE if chunk_size is None else chunk_size)
    pred = _predictions(logits, chunk)
    flipped = flipped.to(pred.device)
    hits = (pred == labels.to(pred.device))[flipped].sum()
    return _c.nan_if_empty(hits, flipped.sum())


def memorisation_rate(
    logits: Tensor, noisy_labels: Tensor, flipped: Tensor, *, chunk_size: int | None = None
) -> float:
    """Fraction of flipped training samples (``flipped`` (N,) bool) predicted as their NOISY label.

    Prediction = arg-max logit. NaN when no sample is flipped.
    """
    return _flipped_agreement(logits, noisy_labels, flipped, chunk_size, "noisy_labels")


def clean_label_recovery(
    logits: Tensor, clean_labels: Tensor, flipped: Tensor, *, chunk_size: int | None = None
) -> float:
    """Fraction of flipped training samples predicted as their CLEAN label; NaN if none is flipped."""
    return _flipped_agreement(logits, clean_labels, flipped, chunk_size, "clean_labels")


def feature_separation(
    features: Tensor, labels: Tensor, *, include_self_pairs: bool = True, chunk_size: int | None = None
) -> dict[str, float]:
    """Class separation of penultimate features (Kornblith et al. 2021, "Why do better loss functions
    lead to less transferable features?", Sec. on class separation), with cosine distance 1 - cos:

        d_within = sum_k sum_{m,n in class k} (1 - cos(x_m, x_n)) / (K N_k^2)
        d_total  = sum_{j,k} sum_{m in j, n in k} (1 - cos(x_m, x_n)) / (K^2 N_j N_k)
        r2       = 1 - d_within / d_total        (higher = more separable)

    i.e. d_within is the mean over classes of each class's mean pair distance and d_total is the
    class-balanced mean over all pairs; as in the paper, the sums include the pairs m = n (distance 0).
    ``include_self_pairs=False`` drops them instead (divisors N_k (N_k - 1); every class needs >= 2
    samples). K counts the classes present in ``labels``. Computed in O(N D) from per-class sums of the
    L2-normalised rows u: sum_{m,n in k} u_m . u_n = ||sum_{m in k} u_m||^2. A zero row normalises to the
    zero vector (cosine 0 with every row, itself included). r2 is NaN when d_total is 0.

    Args:
        features: (N, D) floating tensor, any float dtype.
        labels: (N,) integer class ids >= 0.
    """
    n, d = _c.check_logits(features, "features")
    _c.check_labels(labels, n, None)
    chunk = _c.check_chunk_size(CHUNK_SIZE if chunk_size is None else chunk_size)
    dev = features.device
    num = int(labels.max()) + 1
    sums = torch.zeros(num, d, dtype=torch.float64, device=dev)
    counts = torch.zeros(num, dtype=torch.float64, device=dev)
    sq_norms = torch.zeros(num, dtype=torch.float64, device=dev)
    for start in range(0, n, chunk):
        u = F.normalize(features[start : start + chunk].float(), dim=1).double()
        y = labels[start : start + chunk].to(device=dev, dtype=torch.long)
        sums.index_add_(0, y, u)
        counts += torch.bincount(y, minlength=num)
        sq_norms += torch.bincount(y, weights=(u * u).sum(dim=1), minlength=num)
    present = counts > 0
    sums, counts, sq_norms = sums[present], counts[present], sq_norms[present]
    means = sums / counts[:, None]
    if include_self_pairs:
        within_cos = (means * means).sum(dim=1)
        total_cos = (means.mean(dim=0) ** 2).sum()
    else:
        if bool((counts < 2).any()):
            raise ValueError(
                "labels must give every present class >= 2 samples when include_self_pairs=False, "
                f"but got class sizes {counts.long().tolist()}."
            )
        within_cos = ((sums * sums).sum(dim=1) - sq_norms) / (counts * (counts - 1))
        gram = means @ means.T
        gram.diagonal().copy_(within_cos)
        total_cos = gram.mean()
    d_within = float((1 - within_cos).mean())
    d_total = float(1 - total_cos)
    r2 = math.nan if d_total == 0 else 1 - d_within / d_total
    return {"d_within": d_within, "d_total": d_total, "r2": r2}
