"""SGD (Nesterov) and AdamW over stacked (K, ...) weights with a learning rate and weight decay per member.

The update of member k is torch.optim's single-tensor update (the one torch uses on the CPU) with that
member's lr and weight decay; only the rounding of an ``alpha=`` scalar vs a tensor factor differs.
Each member's state converts to and from torch's own optimizer ``state_dict`` format, so a member's
checkpoint is the checkpoint of the same trial trained alone (study/trial/fit.py), and back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# torch.optim.AdamW's defaults: the trainer never changes them.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class PackedOptimizer:
    """One optimizer for stacked weights; ``kind`` is "sgd" (Nesterov momentum) or "adamw".

    Args:
        kind: "sgd" or "adamw" (TrainSpec.optimizer).
        params: the stacked leaf tensors, each (K, ...), in the model's parameter order.
        weight_decay: K per-member weight decays.
        momentum: SGD momentum (shared: it is not a searched hyperparameter).
    """

    def __init__(
        self, kind: str, params: Sequence[Tensor], weight_decay: Sequence[float], momentum: float
    ) -> None:
        if kind not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, but got {kind!r}")
        self.kind, self.momentum = kind, momentum
        self.params = list(params)
        self.weight_decay = [float(w) for w in weight_decay]
        self.steps = [0] * len(self.weight_decay)
        names = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
        self.state: dict[str, list[Tensor]] = {n: [torch.zeros_like(p) for p in self.params] for n in names}

    def _columns(self, **values: Sequence[float]) -> dict[str, Tensor]:
        # Per-member scalars, computed in float64 like torch's python scalars, one (K,) tensor each
        # per step (see _column); a tensor per parameter and scalar cost 5% of a packed cnn1d step.
        like = self.params[0]
        stacked = torch.tensor(list(values.values()), dtype=torch.float64).to(like.dtype).to(like.device)
        return dict(zip(values, stacked.unbind(0), strict=True))

    @staticmethod
    def _column(values: Tensor, like: Tensor) -> Tensor:
        """(K,) per-member values as (K, 1, ..., 1), to broadcast against a stacked parameter."""
        return values.view(-1, *([1] * (like.dim() - 1)))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One update; member k with learning rate ``lrs[k]``."""
        self.steps = [s + 1 for s in self.steps]
        if self.kind == "sgd":
            self._sgd(lrs)
        else:
            self._adamw(lrs)

    def _sgd(self, lrs: Sequence[float]) -> None:
        decay = any(self.weight_decay)
        col = self._columns(wd=self.weight_decay, neg_lr=[-lr for lr in lrs])
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if decay:
                grad = grad + self._column(col["wd"], p) * p
            buf = self.state["momentum_buffer"][i]
            # A zero buffer times momentum plus grad is grad exactly: torch's first-step clone.
            buf.mul_(self.momentum).add_(grad)
            grad = grad.add(buf, alpha=self.momentum)
            p.addcmul_(grad, self._column(col["neg_lr"], p))

    def _adamw(self, lrs: Sequence[float]) -> None:
        beta1, beta2 = ADAM_BETAS
        step_size = [lr / (1 - beta1**s) for lr, s in zip(lrs, self.steps, strict=True)]
        bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in self.steps]
        shrink = [1 - lr * wd for lr, wd in zip(lrs, self.weight_decay, strict=True)]
        col = self._columns(shrink=shrink, bc2_sqrt=bc2_sqrt, neg_step=[-s for s in step_size])
        decay = any(self.weight_decay)
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if decay:
                p.mul_(self._column(col["shrink"], p))
            exp_avg, exp_avg_sq = self.state["exp_avg"][i], self.state["exp_avg_sq"][i]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / self._column(col["bc2_sqrt"], p)).add_(ADAM_EPS)
            p.addcmul_(exp_avg / denom, self._column(col["neg_step"], p))

    def member_state_dict(self, k: int, param_groups: list[dict[str, Any]], lr: float) -> dict[str, Any]:
        """Member k's state as torch.optim's ``state_dict`` (``param_groups``: the alone optimizer's)."""
        state: dict[int, dict[str, Tensor]] = {}
        for i in range(len(self.params)):
            entry = {n: ts[i][k].clone() for n, ts in self.state.items()}
            if self.kind == "adamw":
                entry["step"] = torch.tensor(float(self.steps[k]))
            state[i] = entry
        groups = [{**g, "lr": lr} for g in param_groups]
        return {"state": state, "param_groups": groups, "steps": self.steps[k]}

    @torch.no_grad()
    def load_member_state_dict(self, k: int, saved: dict[str, Any]) -> None:
        """Restore member k from a torch.optim ``state_dict`` (an alone trial's, or ``member_state_dict``)."""
        steps = saved.get("steps")
        for i, entry in saved["state"].items():
            for n, ts in self.state.items():
                if n in entry:
                    ts[int(i)][k].copy_(entry[n])
            if "step" in entry and steps is None:
                steps = int(float(entry["step"]))
        self.steps[k] = int(steps or 0)
