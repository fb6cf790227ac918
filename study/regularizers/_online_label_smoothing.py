"""Online label smoothing: soft labels learned from the model's own correct predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from study.regularizers._base import Regularizer, nll_per_sample
from study.regularizers._spec import ParamSpec, RegularizerInfo, register

PARAMS = {
    "alpha": ParamSpec(
        default=0.5,
        low=0.0,
        high=1.0,
        schedulable=True,
        neutral=1.0,
        description="weight of the hard-label CE; 1 - alpha goes to the soft labels (alpha = 1 is CE)",
    ),
    "eps": ParamSpec(
        default=0.1,
        low=0.0,
        high=1.0,
        high_inclusive=False,
        description="initial soft labels: 1 - eps on the diagonal, eps / (K - 1) elsewhere",
    ),
}

_BUFFERS = ("soft_labels", "pred_sum", "correct_count")


class OnlineLabelSmoothing(Regularizer):
    """``alpha CE(y, p) + (1 - alpha) CE(S[:, y], p)`` with a K x K soft-label matrix S.

    Column c of S is a distribution over classes (columns sum to 1). S starts at ``1 - eps`` on the
    diagonal and ``eps / (K - 1)`` elsewhere. In training mode every forward accumulates, per class c,
    the softmax predictions of the correctly classified samples of class c; :meth:`on_epoch_end`
    replaces column c by their mean and resets the accumulators. The loss itself is the same in eval
    mode; only the accumulation stops. S is a buffer, so no gradient flows into it.

    A class with no correct prediction in an epoch keeps its column from before that epoch (the initial
    smoothed one-hot until it has had one), so its samples keep a soft target of total weight 1 - alpha.
    This is our choice: the paper leaves the case open, and the authors' code (``OLS.update`` in
    Kurumi233/OnlineLabelSmoothing) zeroes that column instead, which drops the soft term and leaves
    those samples with alpha x CE for the next epoch - a smaller loss for exactly the classes the model
    gets wrong. It matters early in training and for rare or hard classes.

    K is taken from the first batch (buffers are created lazily, and resized on ``load_state_dict``,
    so checkpoints round-trip); later batches with another K raise ValueError.

    Args:
        alpha: Hard-label weight in [0, 1], or a schedule.
        eps: Initial smoothing in [0, 1).
    """

    soft_labels: Tensor
    pred_sum: Tensor
    correct_count: Tensor

    def __init__(
        self,
        alpha: float | Mapping[str, Any] = PARAMS["alpha"].default,
        eps: float = PARAMS["eps"].default,
    ) -> None:
        super().__init__("online_label_smoothing", PARAMS, alpha=alpha, eps=eps)
        for name in _BUFFERS:
            self.register_buffer(name, torch.empty(0))

    def initial_soft_labels(self, num_classes: int) -> Tensor:
        """The initial S for K = ``num_classes``, (K, K) float32."""
        eps = self.param("eps")
        s = torch.full((num_classes, num_classes), eps / (num_classes - 1))
        return s.fill_diagonal_(1.0 - eps)

    def _ensure_state(self, z: Tensor) -> None:
        k = z.shape[1]
        if self.soft_labels.numel() == 0:
            self.soft_labels = self.initial_soft_labels(k).to(z.device)
            self.pred_sum = torch.zeros(k, k, device=z.device)
            self.correct_count = torch.zeros(k, device=z.device)
        elif self.soft_labels.shape[0] != k:
            raise ValueError(
                f"online_label_smoothing: logits must have {self.soft_labels.shape[0]} classes (the K of "
                f"the first batch), but got {k}."
            )
        elif self.soft_labels.device != z.device:
            for name in _BUFFERS:
                setattr(self, name, getattr(self, name).to(z.device))

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        self._ensure_state(z)
        y = targets.long()
        log_p = z.log_softmax(1)
        if self.training:
            with torch.no_grad():
                # Weights instead of boolean indexing: no host-device sync on GPU.
                correct = (z.argmax(1) == y).float()
                self.pred_sum.index_add_(1, y, (log_p.exp() * correct.unsqueeze(1)).T)
                self.correct_count.index_add_(0, y, correct)
        soft_ce = -(self.soft_labels[:, y].T * log_p).sum(1)
        a = self.param("alpha")
        return a * nll_per_sample(log_p, y) + (1.0 - a) * soft_ce

    def _terms(self, z: Tensor, targets: Tensor) -> dict[str, Tensor]:
        # Before the first forward, S is the initial matrix (not stored: terms has no side effects).
        s = self.soft_labels if self.soft_labels.numel() else self.initial_soft_labels(z.shape[1])
        log_p = z.log_softmax(1)
        return {"soft_ce": -(s.to(z.device)[:, targets.long()].T * log_p).sum(1)}

    @torch.no_grad()
    def on_epoch_end(self) -> None:
        """Replace each column of S that saw a correct sample by the mean prediction; reset counts."""
        if self.soft_labels.numel() == 0:
            return
        seen = self.correct_count > 0
        means = self.pred_sum / self.correct_count.clamp(min=1.0)
        self.soft_labels.copy_(torch.where(seen.unsqueeze(0), means, self.soft_labels))
        self.pred_sum.zero_()
        self.correct_count.zero_()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # The buffers are created lazily; take the checkpoint's shapes so that loading works on a
        # fresh instance.
        for name in _BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)


INFO = RegularizerInfo(
    name="online_label_smoothing",
    factory=OnlineLabelSmoothing,
    description="Online label smoothing: soft labels = mean correct predictions of the previous epoch.",
    params=PARAMS,
    strength="alpha",
    reference="Zhang et al., Delving Deep into Label Smoothing, IEEE TIP 2021",
)
register(INFO)
