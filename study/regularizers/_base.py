"""The base class of every regularizer: shape checks, float32 upcast, batch-mean reduction, schedules."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.regularizers._schedule import Schedule, check_progress
from study.regularizers._spec import ParamSpec, check_params


def prepare(logits: Tensor, targets: Tensor) -> Tensor:
    """Check shapes and return the logits upcast to float32.

    Every loss computes in float32 so that bf16/fp16 logits and logits of size ~1e4 stay finite;
    ``.float()`` keeps the autograd link, so gradients flow back in the input dtype.

    Raises:
        ValueError: Unless logits are (B, K) with B >= 1, K >= 2 and targets are (B,) integers.
    """
    if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must have shape (B, K) with B >= 1 and K >= 2, but got {tuple(logits.shape)}."
        )
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must have shape ({logits.shape[0]},), but got {tuple(targets.shape)}.")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be class indices (an integer dtype), but got {targets.dtype}.")
    return logits.float()


def nll_per_sample(log_probs: Tensor, targets: Tensor) -> Tensor:
    """-log p_y per sample, shape (B,)."""
    return -log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)


class Regularizer(nn.Module, abc.ABC):
    """A classification loss ``forward(logits (B, K), targets (B,)) -> 0-dim batch mean``.

    Subclasses implement :meth:`_per_sample` (one abstract method) on float32 logits; the base class
    checks shapes, upcasts, and reduces by the mean over the batch, so every regularizer has the same
    reduction. Parameters declared schedulable follow :meth:`set_progress`; read them with
    :meth:`param`.

    Args:
        name: Registry name, used in error messages.
        specs: The parameter specs to check ``params`` against (None: no checking, all fixed).
        **params: Parameter values; schedulable ones may be schedules.
    """

    def __init__(self, name: str, specs: Mapping[str, ParamSpec] | None = None, **params: Any) -> None:
        super().__init__()
        self.name = name
        checked = check_params(name, specs, params) if specs is not None else dict(params)
        self._schedules: dict[str, Schedule] = {}
        self._values: dict[str, Any] = {}
        for key, value in checked.items():
            if specs is not None and specs[key].schedulable and value is not None:
                self._schedules[key] = Schedule.parse(value)
                self._values[key] = self._schedules[key].value(0.0)
            else:
                self._values[key] = value
        self._progress = 0.0

    def param(self, key: str) -> Any:
        """Current value of parameter ``key`` (schedules evaluated at the last progress set)."""
        return self._values[key]

    def schedules(self) -> dict[str, Schedule]:
        """The schedule of each schedulable parameter (constant ones included)."""
        return dict(self._schedules)

    def set_progress(self, progress: float) -> None:
        """Move scheduled parameters to training progress ``progress`` (0 = start, 1 = end).

        Raises:
            ValueError: If ``progress`` is outside [0, 1] or NaN.
        """
        self._progress = check_progress(progress)
        for key, schedule in self._schedules.items():
            self._values[key] = schedule.value(self._progress)

    def on_epoch_end(self) -> None:
        """Hook called once after every training epoch; stateful regularizers update here."""

    def current_params(self) -> dict[str, float]:
        """Current numeric parameter values (bools and None left out), for per-epoch logging."""
        return {
            k: float(v)
            for k, v in self._values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Batch-mean loss, a 0-dim float32 tensor.

        Args:
            logits: (B, K) raw scores, any float dtype; computed in float32.
            targets: (B,) class indices in [0, K).
        """
        return self._per_sample(prepare(logits, targets), targets).mean()

    def forward_with(self, logits: Tensor, targets: Tensor, values: Mapping[str, Any]) -> Tensor:
        """``forward`` with these parameter values in place of the current ones, which stay as they were.

        For trainers that evaluate one instance for several parameter settings at once: values may be
        tensors, e.g. one per member under ``torch.func.vmap`` (study/trial/pack.py).
        """
        saved = self._values
        self._values = {**saved, **values}
        try:
            return self(logits, targets)
        finally:
            self._values = saved

    def per_sample_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Unreduced loss, shape (B,); ``forward`` is its mean (stateful effects apply the same way)."""
        return self._per_sample(prepare(logits, targets), targets)

    @torch.no_grad()
    def terms(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Detached 0-dim batch means of logged loss components; always contains ``ce``.

        Has no side effects (no label disturbance, no accumulation), so it can be called on any batch.
        """
        z = prepare(logits, targets)
        out = {"ce": F.cross_entropy(z, targets.long())}
        out.update({k: v.mean() for k, v in self._terms(z, targets).items()})
        return out

    def _terms(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Per-sample (B,) components beyond ``ce``; none by default."""
        return {}

    @abc.abstractmethod
    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        """Loss per sample, shape (B,), from float32 logits ``z`` (B, K); must stay differentiable."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._values.items())
