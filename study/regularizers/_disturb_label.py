"""DisturbLabel: replace a random fraction of each mini-batch's labels by uniformly random classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.regularizers._base import Regularizer
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

PARAMS = {
    "rate": ParamSpec(
        default=0.1,
        low=0.0,
        high=1.0,
        schedulable=True,
        neutral=0.0,
        description="probability that a label is redrawn uniformly over all K classes (true class included)",
    ),
    "seed": ParamSpec(
        default=0,
        low=0,
        kind="int",
        description="seed of the regularizer's own random generator (not a strength)",
    ),
}


class DisturbLabel(Regularizer):
    """CE on labels of which each, independently with probability ``rate``, is replaced by a class drawn
    uniformly from all K (so a fraction ``rate (K - 1) / K`` actually changes), in training mode only.

    Draws come from the module's own CPU ``torch.Generator`` seeded with ``seed`` (never the global
    RNG), so the disturbed labels depend only on the seed and the sequence of batch sizes, not on the
    device; the generator state is part of ``state_dict`` so that resumed runs continue the sequence.
    In eval mode the loss is plain CE.

    Attributes:
        generator: The CPU generator the draws come from (public so that trainers can save it too).

    Args:
        rate: Replacement probability in [0, 1], or a schedule.
        seed: Generator seed (>= 0).
    """

    def __init__(
        self,
        rate: float | Mapping[str, Any] = PARAMS["rate"].default,
        seed: int = PARAMS["seed"].default,
    ) -> None:
        super().__init__("disturb_label", PARAMS, rate=rate, seed=seed)
        self.generator = torch.Generator().manual_seed(self.param("seed"))

    def disturb(self, targets: Tensor, num_classes: int) -> Tensor:
        """Return ``targets`` (B,) with labels replaced at the current rate; advances the generator."""
        n = targets.shape[0]
        replace = torch.rand(n, generator=self.generator) < self.param("rate")
        random_labels = torch.randint(num_classes, (n,), generator=self.generator)
        return torch.where(replace.to(targets.device), random_labels.to(targets.device), targets.long())

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        if self.training and self.param("rate") > 0:
            targets = self.disturb(targets, z.shape[1])
        return F.cross_entropy(z, targets.long(), reduction="none")

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        # torch.load(map_location="cuda") moves this byte tensor too; a CPU generator needs it back.
        self.generator.set_state(state["generator_state"].cpu())


INFO = RegularizerInfo(
    name="disturb_label",
    factory=DisturbLabel,
    description="DisturbLabel: CE on labels of which a fraction is redrawn uniformly per mini-batch.",
    params=PARAMS,
    strength="rate",
    reference="Xie et al., DisturbLabel: Regularizing CNN on the Loss Layer, CVPR 2016",
)
register(INFO)
