"""Plain cross-entropy, the baseline every regularizer is compared with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from study.regularizers._base import Regularizer
from study.regularizers._spec import RegularizerInfo, register


class CrossEntropy(Regularizer):
    """Cross-entropy ``-log p_y``, batch mean. No parameters."""

    def __init__(self) -> None:
        super().__init__("ce", {})

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(z, targets.long(), reduction="none")


INFO = RegularizerInfo(
    name="ce",
    factory=CrossEntropy,
    description="Plain cross-entropy (no regularization).",
    params={},
    strength=None,
    reference="",
    vmappable=True,
)
register(INFO)
