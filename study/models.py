"""Model registry: every model is a :class:`Classifier` = normalisation -> body (features) -> linear head.

``create_model(name, input_shape, num_classes, mean=..., std=..., **options)`` builds one. The
split into ``features`` and ``head`` is what the feature-space metrics (penultimate activations)
and linear probes need; normalisation with the data's mean/std is the first op inside the model,
so attacks and corruptions operate on raw inputs ([0, 1] for images).

Registered names: ``mlp``, ``cnn1d`` (MNIST-1D ConvBase), ``cnn``, ``resnet20/32/44/56/110``
(He et al. 2016 CIFAR ResNets), ``resnet18/34`` (the ImageNet ResNets' CIFAR variant: 3x3 stem, no
max-pool, as in the MaxSup and OLS papers' CIFAR-100 code), ``wide_resnet`` (WRN-28-10 by default),
and any torchvision classification model as ``tv:<name>`` (e.g. ``tv:resnet18``, random init).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from study.registry import Registry, check_option_types

__all__ = ["Classifier", "ModelEntry", "MODELS", "list_models", "model_options", "create_model"]


class Classifier(nn.Module):
    """(x - mean) / std -> body -> features (B, D) -> head -> logits (B, K).

    Args:
        body: maps normalised inputs (B, *input_shape) to features (B, feature_dim).
        feature_dim: D.
        num_classes: K.
        input_shape: (C, L) or (C, H, W), without the batch dim.
        mean, std: per-channel input statistics (length C); None means 0 / 1 (no normalisation).
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        input_shape: tuple[int, ...],
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        c = input_shape[0]
        bshape = (1, c, *([1] * (len(input_shape) - 1)))
        # Built on the CPU even under a `torch.device("meta")` context, so the checks below can run.
        m = torch.as_tensor([0.0] * c if mean is None else mean, dtype=torch.float32, device="cpu").flatten()
        s = torch.as_tensor([1.0] * c if std is None else std, dtype=torch.float32, device="cpu").flatten()
        if m.numel() != c or s.numel() != c:
            raise ValueError(
                f"mean and std must have {c} entries (one per channel), but got {m.numel()} and {s.numel()}."
            )
        if not bool((s > 0).all()):
            raise ValueError(f"std must be > 0 in every channel, but got {s.tolist()}.")
        self.register_buffer("mean", m.reshape(bshape))
        self.register_buffer("std", s.reshape(bshape))
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.input_shape, self.num_classes, self.feature_dim = tuple(input_shape), num_classes, feature_dim

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, D) of raw inputs x (B, *input_shape)."""
        return self.body((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K); equals ``self.head(self.features(x))``."""
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------------------- small models


def _mlp(shape: tuple[int, ...], k: int, hidden: Sequence[int] = (100, 100)) -> tuple[nn.Module, int]:
    """MNIST-1D paper MLP: flatten -> Linear+ReLU per hidden width (it memorises noisy labels)."""
    ok = isinstance(hidden, (list, tuple)) and hidden
    if not ok or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty list of positive integer widths, but got {hidden!r}.")
    layers: list[nn.Module] = [nn.Flatten()]
    d = math.prod(shape)
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    return nn.Sequential(*layers), d


def _cnn1d(shape: tuple[int, ...], k: int, channels: int = 25) -> tuple[nn.Module, int]:
    """MNIST-1D ConvBase (Greydanus): 3 Conv1d (kernels 5, 3, 3; stride 2; padding 1) + ReLU, flatten.

    On length-40 signals the flattened features are 25 x 5 = 125, as in the paper's ``linear_in``.
    """
    body = nn.Sequential(
        nn.Conv1d(shape[0], channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    return body, _out_dim(body, shape)


def _cnn(shape: tuple[int, ...], k: int, width: int = 32) -> tuple[nn.Module, int]:
    """Small 2-D CNN: 3 x (3x3 conv, BN, ReLU) at widths w/2w/4w, 2x2 max-pools between, global avg pool."""
    w = width
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    pool = [nn.MaxPool2d(2)] if min(shape[1:]) >= 4 else []  # 8x8 digits still get two pools
    body = nn.Sequential(
        *block(shape[0], w),
        *pool,
        *block(w, 2 * w),
        *pool,
        *block(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return body, 4 * w


def _out_dim(body: nn.Module, shape: tuple[int, ...]) -> int:
    try:
        with torch.no_grad():
            return int(body(torch.zeros(1, *shape)).shape[1])
    except RuntimeError as e:  # e.g. a signal too short for three stride-2 convolutions
        raise ValueError(f"input shape {shape} is too small for this model: {e}") from None


# ---------------------------------------------------------------------------------------------- resnets


class _BasicBlock(nn.Module):
    """CIFAR ResNet block; option A shortcut: stride-2 subsampling + zero-padded channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.proj: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "A":
                self.pad, self.stride = cout - cin, stride
            else:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.proj is not None:
            sc = self.proj(x)
        elif self.pad:
            sc = F.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)
            )
        else:
            sc = x
        return F.relu(out + sc)


def _he_init(body: nn.Module) -> nn.Module:
    """He et al. init of every conv, as in the reference CIFAR implementations."""
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return body


def _basic_resnet(in_channels: int, widths: Sequence[int], blocks: Sequence[int], shortcut: str) -> nn.Module:
    """3x3 stride-1 stem of widths[0] channels, then one stage of `_BasicBlock`s per width (stride 2 at
    the first block of every stage but the first), global average pooling: (B, C, H, W) -> (B, widths[-1])."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for stage, (n, cout) in enumerate(zip(blocks, widths, strict=True)):
        for i in range(n):
            layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, shortcut))
            cin = cout
    return _he_init(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()))


def _resnet_cifar(depth: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(shape: tuple[int, ...], k: int, shortcut: Literal["A", "B"] = "A") -> tuple[nn.Module, int]:
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', but got {shortcut!r}.")
        n = (depth - 2) // 6
        return _basic_resnet(shape[0], (16, 32, 64), (n, n, n), shortcut), 64

    build.__doc__ = (
        f"ResNet-{depth} (He et al. 2016): 3 stages x {(depth - 2) // 6} blocks, 16/32/64 channels."
    )
    return build


def _resnet_cifar_wide(blocks: tuple[int, ...], depth: int) -> Callable[..., tuple[nn.Module, int]]:
    def build(shape: tuple[int, ...], k: int) -> tuple[nn.Module, int]:
        # The CIFAR variant of the ImageNet ResNet-18/34 used by the MaxSup and OLS reference code: a
        # 3x3 stride-1 stem with no max-pool (torchvision's 7x7 stride-2 stem + max-pool would shrink
        # a 32x32 image to 8x8 before the first block), then 64/128/256/512 channels with 1x1
        # projection shortcuts (option B).
        return _basic_resnet(shape[0], (64, 128, 256, 512), blocks, "B"), 512

    build.__doc__ = f"ResNet-{depth}, CIFAR variant: 3x3 stem, no max-pool, blocks {list(blocks)}, 64-512 ch."
    return build


class _WideBlock(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016): BN-ReLU-conv-(dropout)-BN-ReLU-conv."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        sc = self.proj(o) if self.proj is not None else x
        o = self.conv2(F.relu(self.bn2(self.drop(self.conv1(o)))))
        return o + sc


def _wide_resnet(
    shape: tuple[int, ...], k: int, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> tuple[nn.Module, int]:
    """WRN-depth-widen_factor (default WRN-28-10): 3 stages of (depth-4)/6 wide blocks, 16k/32k/64k ch."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"depth must be 6n+4 with n >= 1 (e.g. 16, 22, 28, 40), but got {depth}.")
    if widen_factor < 1 or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"widen_factor must be >= 1 and dropout in [0, 1), but got {widen_factor}, {dropout}."
        )
    n, widths = (depth - 4) // 6, [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    layers: list[nn.Module] = [nn.Conv2d(shape[0], 16, 3, 1, 1, bias=False)]
    cin = 16
    for stage, cout in enumerate(widths):
        for i in range(n):
            layers.append(_WideBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, dropout))
            cin = cout
    layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _he_init(nn.Sequential(*layers)), cin


# ---------------------------------------------------------------------------------------------- torchvision


class _RepeatChannels(nn.Module):
    """Feeds 1-channel inputs to 3-channel torchvision models (grey -> RGB by repetition)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def _torchvision(
    name: str, shape: tuple[int, ...], k: int, **options: Any
) -> tuple[nn.Module, int, nn.Linear]:
    """torchvision model ``name`` (random init) minus its final Linear; returns (body, D, that Linear)."""
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ValueError(f"torchvision model must be one of {known}, but got {name!r}.")
    if shape[0] not in (1, 3):
        raise ValueError(
            f"model 'tv:{name}' needs 1 or 3 input channels, but dataset has input shape {shape}."
        )
    try:
        model = tvm.get_model(name, weights=None, num_classes=k, **options)
    except TypeError as e:
        raise ValueError(f"model 'tv:{name}': bad options {sorted(options)}: {e}") from None
    # The classifier's final layer is the last Linear with K outputs (fc, classifier[-1], heads.head, ...).
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == k]
    if not last:
        raise ValueError(
            f"model 'tv:{name}': no final nn.Linear layer found to split features from the head."
        )
    path, fc = last[-1]
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    if getattr(
        model, "aux_logits", False
    ):  # googlenet / inception: auxiliary heads return tuples in train mode
        raise ValueError(
            f"model 'tv:{name}': models with auxiliary heads are not supported; pass aux_logits: false."
        )
    body = model if shape[0] == 3 else _RepeatChannels(model)
    return body, fc.in_features, fc


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelEntry:
    """Registry entry: ``builder(input_shape, num_classes, **options) -> (body, feature_dim)``."""

    name: str
    builder: Callable[..., tuple[nn.Module, int]]
    input_kind: Literal["any", "signal", "image"]
    description: str


# Add a model: a builder (input_shape, num_classes, **options) -> (body, feature_dim), then
# MODELS.register(ModelEntry(...)); its keyword options become the spec's models[].options.
MODELS: Registry[ModelEntry] = Registry(
    "model",
    [
        ModelEntry("mlp", _mlp, "any", "MLP on flattened inputs, hidden=(100, 100)"),
        ModelEntry("cnn1d", _cnn1d, "signal", "MNIST-1D ConvBase: 3 Conv1d of 25 channels"),
        ModelEntry("cnn", _cnn, "image", "small 2-D CNN, widths 32/64/128"),
        *(
            ModelEntry(f"resnet{d}", _resnet_cifar(d), "image", f"CIFAR ResNet-{d}, option-A shortcuts")
            for d in (20, 32, 44, 56, 110)
        ),
        *(
            ModelEntry(
                f"resnet{d}",
                _resnet_cifar_wide(blocks, d),
                "image",
                f"ResNet-{d}, CIFAR variant (3x3 stem, no max-pool), 64-512 channels",
            )
            for d, blocks in ((18, (2, 2, 2, 2)), (34, (3, 4, 6, 3)))
        ),
        ModelEntry("wide_resnet", _wide_resnet, "image", "Wide ResNet, WRN-28-10 by default"),
    ],
)


def list_models() -> list[str]:
    """Registered model names; any torchvision classification model is also available as ``tv:<name>``."""
    return MODELS.names()


def model_options(name: str) -> tuple[str, ...] | None:
    """The keyword options of a registered model's builder (after input_shape, num_classes); None for
    ``tv:<name>`` (torchvision's constructor arguments) and unknown names."""
    entry = MODELS.get(name)
    return None if entry is None else tuple(inspect.signature(entry.builder).parameters)[2:]


def _check_shape(name: str, kind: str, shape: tuple[int, ...]) -> None:
    if kind == "signal" and len(shape) != 2:
        raise ValueError(
            f"model {name!r} needs 1-D signals of shape (C, L), but dataset has input shape {shape}"
        )
    if kind == "image" and len(shape) != 3:
        raise ValueError(
            f"model {name!r} needs images of shape (C, H, W), but dataset has input shape {shape}"
        )


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    **options: Any,
) -> Classifier:
    """Build a registered model (or ``tv:<name>``) as a :class:`Classifier`.

    Args:
        name: a key of ``MODELS`` or ``tv:<torchvision model name>``.
        input_shape: (C, L) or (C, H, W), no batch dim.
        num_classes: K >= 2.
        mean, std: per-channel normalisation applied inside the model (see ``DatasetBundle.mean``).
        **options: the builder's keyword options (e.g. ``hidden`` for mlp, ``depth``/``widen_factor``
            for wide_resnet, torchvision constructor kwargs for ``tv:``).

    Raises:
        ValueError: unknown model or option, or a model that does not fit the input shape.
    """
    shape = tuple(int(s) for s in input_shape)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, but got {num_classes}.")
    if name.startswith("tv:"):
        _check_shape(name, "image", shape)
        body, dim, fc = _torchvision(name[3:], shape, num_classes, **options)
        model = Classifier(body, dim, num_classes, shape, mean, std)
        model.head.load_state_dict(fc.state_dict())  # keep torchvision's own init of its final layer
        return model
    if name not in MODELS:
        raise ValueError(
            f"model must be one of {list_models()} or 'tv:<torchvision name>', but got {name!r}."
        )
    entry = MODELS[name]
    _check_shape(name, entry.input_kind, shape)
    allowed = list(model_options(name) or ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r}: options must be among {allowed}, but got {unknown}.")
    check_option_types(entry.builder, options)
    body, dim = entry.builder(shape, num_classes, **options)
    return Classifier(body, dim, num_classes, shape, mean, std)
