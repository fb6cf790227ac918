"""K models of one architecture as one batched model: stacked weights, one forward for all members.

A pack's members have their own weights, inputs and data order; only the architecture is shared. The
weights live as one leaf tensor per parameter name with a leading member dim (K, ...), so one optimizer
op and one kernel launch serve all K members (the small models this tool trains are launch-bound:
bench/bench_fusion.md).

Two forward paths, both exact per member up to float rounding:

- ``fast``: Classifiers whose body is an ``nn.Sequential`` of Conv1d / Linear / ReLU / Flatten (the
  MNIST-1D ``mlp`` and ``cnn1d``) run as batched matmuls in a channels-last layout (K, B, L, C). On a
  CPU core this is what makes packing pay: PyTorch's grouped and vmapped convolutions of tiny shapes
  cost as much per member as K separate calls, and (K, B, C, L) layouts make ReLU's backward strided.
- ``vmap``: anything else (BatchNorm, residual blocks, torchvision models) through
  ``torch.func.functional_call`` under ``torch.func.vmap``; BatchNorm running statistics are stacked
  buffers, so they stay per member. Dropout draws differ from a model trained alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study import models

_FAST_LAYERS = (nn.Conv1d, nn.Linear, nn.ReLU, nn.Flatten)


def fast_path_supported(model: nn.Module) -> bool:
    """Whether `model` can use the batched-matmul path (see the module docstring)."""
    if not isinstance(model, models.Classifier) or not isinstance(model.body, nn.Sequential):
        return False
    for layer in model.body:
        if not isinstance(layer, _FAST_LAYERS):
            return False
        if isinstance(layer, nn.Conv1d) and (
            layer.groups != 1 or layer.dilation != (1,) or layer.padding_mode != "zeros"
            or not isinstance(layer.padding, tuple)
        ):  # fmt: skip
            return False
        if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
            return False
    return True


def _conv1d_nlc(h: Tensor, w: Tensor, b: Tensor | None, stride: int, padding: int) -> Tensor:
    """Per-member Conv1d, channels last: h (K, B, L, Cin), w (K, Cout, Cin, k) -> (K, B, L', Cout).

    im2col by one gather (its backward is one scatter-add), then one batched matmul over members.
    """
    k_members, batch, length, cin = h.shape
    cout, ksize = w.shape[1], w.shape[3]
    hp = F.pad(h, (0, 0, padding, padding))
    lout = (length + 2 * padding - ksize) // stride + 1
    taps = (torch.arange(lout, device=h.device) * stride)[:, None] + torch.arange(ksize, device=h.device)
    cols = hp[:, :, taps].reshape(k_members, batch * lout, ksize * cin)  # (tap, channel) order
    weight = w.permute(0, 1, 3, 2).reshape(k_members, cout, ksize * cin)
    if b is None:
        out = torch.bmm(cols, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(b.unsqueeze(1), cols, weight.transpose(1, 2))
    return out.view(k_members, batch, lout, cout)


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Per-member Linear: h (K, B, D), w (K, O, D) -> (K, B, O)."""
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class PackedNet:
    """Stacked weights of K members of one architecture and their batched forward.

    Args:
        members: K >= 1 models of the same architecture (same parameter names and shapes); their
            weights are copied, the models themselves are not kept.
        fast: use the batched-matmul path when the architecture allows it (``fast_path_supported``).
    """

    def __init__(self, members: Sequence[nn.Module], *, fast: bool = True) -> None:
        if not members:
            raise ValueError("a pack needs at least one member model")
        template = members[0]
        self.names = [n for n, _ in template.named_parameters()]
        self.buffer_names = [n for n, _ in template.named_buffers()]
        self.params: dict[str, Tensor] = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in members]).requires_grad_()
            for n in self.names
        }
        self.buffers: dict[str, Tensor] = {
            n: torch.stack([dict(m.named_buffers())[n].detach() for m in members]).clone()
            for n in self.buffer_names
        }
        self.fast = fast and fast_path_supported(template)
        # The architecture without storage: functional_call supplies each member's tensors.
        self.base = copy.deepcopy(template).to("meta")
        self._body = list(template.body) if self.fast else []
        self._vmapped: Callable[..., Tensor] | None = None

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (K, B, classes) of inputs x (K, B, *input_shape), member k on x[k]."""
        if self.fast:
            return self._fast_forward(x)
        if self._vmapped is None:

            def one(params: dict[str, Tensor], buffers: dict[str, Tensor], xb: Tensor) -> Tensor:
                return torch.func.functional_call(self.base, (params, buffers), (xb,))

            self._vmapped = torch.func.vmap(one, randomness="different")
        return self._vmapped(self.params, self.buffers, x)

    __call__ = forward

    def _fast_forward(self, x: Tensor) -> Tensor:
        p, bufs = self.params, self.buffers
        h = (x - bufs["mean"]) / bufs["std"]  # (K, B, C, L); the buffers are (K, 1, C, 1)
        channels_last = False
        pending: tuple[int, int] | None = None  # (C, L) of a channels-last flatten the next Linear undoes
        for i, layer in enumerate(self._body):
            if isinstance(layer, nn.Conv1d):
                if not channels_last:
                    h, channels_last = h.transpose(2, 3), True
                bias = p.get(f"body.{i}.bias")
                h = _conv1d_nlc(h, p[f"body.{i}.weight"], bias, layer.stride[0], layer.padding[0])
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.Flatten):
                if channels_last:
                    pending, channels_last = (h.shape[3], h.shape[2]), False
                h = h.flatten(2)
            else:  # nn.Linear
                h = _linear(h, self._linear_weight(p[f"body.{i}.weight"], pending), p.get(f"body.{i}.bias"))
                pending = None
        return _linear(h, self._linear_weight(p["head.weight"], pending), p["head.bias"])

    @staticmethod
    def _linear_weight(w: Tensor, pending: tuple[int, int] | None) -> Tensor:
        # A flatten of (L, C) instead of the model's (C, L): reorder the weight's columns to match.
        if pending is None:
            return w
        c, length = pending
        return w.view(w.shape[0], w.shape[1], c, length).transpose(2, 3).reshape(w.shape)

    def member_state(self, k: int) -> dict[str, Tensor]:
        """Member k's ``state_dict`` (detached copies, loadable into one model of the architecture)."""
        state = {n: self.params[n][k].detach().clone() for n in self.names}
        state.update({n: self.buffers[n][k].clone() for n in self.buffer_names})
        return state

    def parameters(self) -> list[Tensor]:
        return [self.params[n] for n in self.names]

    def all_finite(self) -> Tensor:
        """(K,) bool: whether every weight of member k is finite."""
        flags = [t.detach().flatten(1).isfinite().all(1) for t in self.params.values()]
        return torch.stack(flags).all(0)
