"""Max Suppression (MaxSup): label smoothing's penalty applied to the top logit instead of the target."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.regularizers._base import Regularizer
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

PARAMS = {
    "alpha": ParamSpec(
        default=0.1,
        low=0.0,
        high=1.0,
        schedulable=True,
        neutral=0.0,
        description="weight of a (z_max - z_mean); the reference code ramps it 0.1 -> 0.2 over training",
    ),
}


class MaxSup(Regularizer):
    """``CE + a (z_max - z_mean)``, nothing detached.

    The gradient of the penalty wrt z is ``a (1 - 1/K)`` on the argmax logit and ``-a/K`` elsewhere
    (ties share the argmax part, through ``amax``). Logged terms, the analogue of the LS split with
    z_gt replaced by z_max: ``regularization = (a/K) sum_{k: z_k < z_max} (z_max - z_k)``, which is the
    whole penalty ``a (z_max - z_mean)`` (>= 0 for a >= 0), and ``error_amplification``, the sum over
    logits above z_max, which is identically 0: MaxSup has no error-amplification part, which is the
    point of the method. Logging the zero keeps the columns aligned with label smoothing's.

    Args:
        alpha: Weight in [0, 1], or a schedule such as ``{"start": 0.1, "end": 0.2}``.
    """

    def __init__(self, alpha: float | Mapping[str, Any] = PARAMS["alpha"].default) -> None:
        super().__init__("maxsup", PARAMS, alpha=alpha)

    def _penalty(self, z: Tensor) -> Tensor:
        return self.param("alpha") * (z.amax(1) - z.mean(1))

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(z, targets.long(), reduction="none") + self._penalty(z)

    def _terms(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        reg = self._penalty(z)
        return {"regularization": reg, "error_amplification": torch.zeros_like(reg)}


INFO = RegularizerInfo(
    name="maxsup",
    factory=MaxSup,
    description="Max Suppression: CE + a (z_max - z_mean).",
    params=PARAMS,
    strength="alpha",
    reference="Zhou et al., MaxSup: Overcoming Representation Collapse in Label Smoothing, NeurIPS 2025",
    vmappable=True,
)
register(INFO)
