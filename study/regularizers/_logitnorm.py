"""LogitNorm: cross-entropy on L2-normalized logits with a temperature."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from study.regularizers._base import Regularizer
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

# The reference implementation adds 1e-7 to the norm before dividing; we keep its placement.
NORM_EPS = 1e-7

PARAMS = {
    "tau": ParamSpec(
        default=0.04,
        low=0.0,
        high=10.0,
        low_inclusive=False,
        schedulable=True,
        neutral=None,
        description="temperature; normalized logits have norm 1/tau (no value recovers plain CE)",
    ),
}


class LogitNorm(Regularizer):
    """``CE(z / (tau (||z|| + 1e-7)), y)``.

    No value of tau recovers plain CE: the normalized logits always have norm ~1/tau, so the
    ``neutral`` of tau is None. Smaller tau means sharper (higher-norm) normalized logits.

    Args:
        tau: Temperature in (0, 10], or a schedule.
    """

    def __init__(self, tau: float | Mapping[str, Any] = PARAMS["tau"].default) -> None:
        super().__init__("logitnorm", PARAMS, tau=tau)

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        norms = z.norm(dim=1, keepdim=True) + NORM_EPS
        return F.cross_entropy(z / (norms * self.param("tau")), targets.long(), reduction="none")


INFO = RegularizerInfo(
    name="logitnorm",
    factory=LogitNorm,
    description="LogitNorm: CE on logits normalized to norm 1/tau.",
    params=PARAMS,
    strength="tau",
    reference="Wei et al., Mitigating Neural Network Overconfidence with Logit Normalization, ICML 2022",
    vmappable=True,
)
register(INFO)
