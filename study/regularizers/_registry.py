"""Name -> RegularizerInfo registry, import-path regularizers, and ``create``.

A name containing ``:`` is an import path ``"package.module:attr"``. One rule decides what ``attr`` is:

- a ``RegularizerInfo``: used exactly like a registered entry (ranges, schedules, strength);
- anything else callable (a function or an ``nn.Module`` class): its factory. Its parameters are read
  from its signature: every keyword-capable parameter needs a default that is a bool, int, float or
  None, which fixes its kind (None: an optional float); values are type-checked but have no range and
  cannot be scheduled. ``*args``/``**kwargs`` are ignored. Anything richer needs a ``RegularizerInfo``.

The factory's result must be an ``nn.Module`` whose ``forward(logits, targets)`` returns the batch-mean
loss. Modules that are not ``Regularizer`` subclasses are wrapped, so the trainer sees one interface.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from study.regularizers._base import Regularizer
from study.regularizers._spec import REGULARIZERS, ParamSpec, RegularizerInfo

# The package's modules that are not a regularizer; every other ``_<name>.py`` registers one on import.
_SUPPORT = frozenset({"_base", "_registry", "_schedule", "_spec"})
for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _module.name.startswith("_") and _module.name not in _SUPPORT:
        importlib.import_module(f"study.regularizers.{_module.name}")


def list_regularizers() -> list[str]:
    """Registered names, sorted (import-path regularizers are not listed)."""
    return sorted(REGULARIZERS)


def get_info(name: str) -> RegularizerInfo:
    """The entry for a registered name or an import path ``"package.module:attr"``.

    Raises:
        ValueError: For an unknown name (listing the known ones) or an import path that cannot be
            resolved or described.
    """
    if not isinstance(name, str):
        raise ValueError(f"a regularizer name must be a string, but got {name!r}.")
    if ":" in name:
        return _info_from_path(name)
    if name not in REGULARIZERS:
        raise ValueError(
            f"unknown regularizer {name!r} (known: {', '.join(list_regularizers())}; "
            "or an import path 'package.module:function')."
        )
    return REGULARIZERS[name]


def validate_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` for regularizer ``name`` without building it.

    Returns:
        The params merged with the defaults; floats as ``float``, schedules as the canonical mapping
        ``{"schedule": kind, "start": a, "end": b}``.

    Raises:
        ValueError: Unknown regularizer or parameter, or a value out of range (message names the
            regularizer, the parameter, the value and what is allowed).
    """
    return get_info(name).validate(params)


def create(name: str, **params: Any) -> Regularizer:
    """Build regularizer ``name`` (registered name or import path) with ``params``.

    Raises:
        ValueError: As :func:`validate_params`, or if the factory does not return an ``nn.Module``.
    """
    info = get_info(name)
    checked = info.validate(params)
    module = info.factory(**checked)
    if isinstance(module, Regularizer):
        return module
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"{info.name}: the factory must return an nn.Module, but got {type(module).__name__}."
        )
    return ExternalRegularizer(info.name, module, checked)


class ExternalRegularizer(Regularizer):
    """Adapter giving a plain ``nn.Module`` loss the ``Regularizer`` interface.

    ``forward`` calls the module on the raw logits and checks it returned a 0-dim tensor;
    ``set_progress`` and ``on_epoch_end`` are forwarded when the module defines them; ``terms`` logs
    ``ce`` only. ``per_sample_loss`` is unavailable (the module only gives the batch mean).
    """

    def __init__(self, name: str, module: nn.Module, params: Mapping[str, Any]) -> None:
        super().__init__(name, None, **params)
        self.inner = module

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = self.inner(logits, targets)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"{self.name}: forward must return a 0-dim batch-mean loss, but got {shape}.")
        return loss

    def _per_sample(self, z: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name}: an external loss gives only the batch mean.")

    def set_progress(self, progress: float) -> None:
        super().set_progress(progress)
        if callable(getattr(self.inner, "set_progress", None)):
            self.inner.set_progress(progress)

    def on_epoch_end(self) -> None:
        if callable(getattr(self.inner, "on_epoch_end", None)):
            self.inner.on_epoch_end()


_KIND_OF_DEFAULT = {bool: "bool", int: "int", float: "float"}


def _info_from_path(path: str) -> RegularizerInfo:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"an import path must look like 'package.module:function', but got {path!r}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} of regularizer {path!r}: {err}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (regularizer {path!r}).")
        obj = getattr(obj, part)
    if isinstance(obj, RegularizerInfo):
        return obj
    if not callable(obj):
        raise ValueError(f"{path}: must name a RegularizerInfo or a callable, but got {type(obj).__name__}.")
    doc = inspect.getdoc(obj) or ""
    return RegularizerInfo(
        name=path,
        factory=obj,
        description=doc.splitlines()[0] if doc else "",
        params=_specs_from_signature(path, obj),
        strength=None,
        reference=path,
    )


def _specs_from_signature(path: str, factory: Callable[..., Any]) -> dict[str, ParamSpec]:
    specs: dict[str, ParamSpec] = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind == p.POSITIONAL_ONLY or p.default is p.empty:
            raise ValueError(
                f"{path}: parameter {p.name!r} needs a default and must be passable by keyword "
                "(or export a RegularizerInfo instead)."
            )
        if p.default is None:
            specs[p.name] = ParamSpec(default=None, kind="float", optional=True)
        elif type(p.default) in _KIND_OF_DEFAULT:
            specs[p.name] = ParamSpec(default=p.default, kind=_KIND_OF_DEFAULT[type(p.default)])
        else:
            raise ValueError(
                f"{path}: the default of {p.name!r} must be a bool, int, float or None, but got "
                f"{p.default!r} (or export a RegularizerInfo instead)."
            )
    return specs
