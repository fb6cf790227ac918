"""Label smoothing, including negative label smoothing (a < 0)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from study.regularizers._base import Regularizer, nll_per_sample
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

PARAMS = {
    "alpha": ParamSpec(
        default=0.1,
        low=-10.0,
        high=1.0,
        high_inclusive=False,
        schedulable=True,
        neutral=0.0,
        description="smoothing weight; uniform over all K classes (PyTorch semantics); < 0 is negative LS",
    ),
}


def ls_decomposition(z: Tensor, targets: Tensor, alpha: float) -> dict[str, Tensor]:
    """Split the LS term ``alpha (z_gt - z_mean)`` per sample as in the MaxSup paper.

    ``regularization = (alpha/K) sum_{k: z_k < z_gt} (z_gt - z_k)`` and
    ``error_amplification = (alpha/K) sum_{k: z_k > z_gt} (z_gt - z_k)``; they add up exactly to
    ``alpha (z_gt - z_mean)``. For alpha >= 0 the first is >= 0 and the second <= 0, nonzero only on
    misclassified samples; for negative alpha both signs flip.

    Args:
        z: (B, K) logits.
        targets: (B,) class indices.
        alpha: Smoothing weight.

    Returns:
        ``{"regularization": (B,), "error_amplification": (B,)}``.
    """
    gap = z.gather(1, targets.long().unsqueeze(1)) - z  # (B, K): z_gt - z_k
    scale = alpha / z.shape[1]
    return {
        "regularization": scale * gap.clamp(min=0).sum(1),
        "error_amplification": scale * gap.clamp(max=0).sum(1),
    }


class LabelSmoothing(Regularizer):
    """``(1-a)(-log p_y) + a mean_k(-log p_k)``, which equals ``CE + a (z_gt - z_mean)``.

    Equal to ``F.cross_entropy(z, y, label_smoothing=a)`` for a in [0, 1); negative a (Wei et al. 2022)
    uses the same formula. Logged terms: ``regularization`` and ``error_amplification``
    (see :func:`ls_decomposition`).

    Args:
        alpha: Smoothing weight in [-10, 1), or a schedule.
    """

    def __init__(self, alpha: float | Mapping[str, Any] = PARAMS["alpha"].default) -> None:
        super().__init__("label_smoothing", PARAMS, alpha=alpha)

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        a = self.param("alpha")
        log_p = z.log_softmax(1)
        return (1.0 - a) * nll_per_sample(log_p, targets) - a * log_p.mean(1)

    def _terms(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return ls_decomposition(z, targets, self.param("alpha"))


INFO = RegularizerInfo(
    name="label_smoothing",
    factory=LabelSmoothing,
    description="Label smoothing: CE + a (z_gt - z_mean); a < 0 is negative label smoothing.",
    params=PARAMS,
    strength="alpha",
    reference="Szegedy et al., CVPR 2016; Wei et al., ICML 2022 (negative LS)",
    vmappable=True,
)
register(INFO)
