"""Label-smoothing-family regularizers: a data registry plus one small module per loss.

Every regularizer is an ``nn.Module`` ``forward(logits (B, K), targets (B,)) -> 0-dim batch mean``,
computed in float32. Build one with ``create(name, **params)``; check a spec's params without building
with ``validate_params``. A name ``"package.module:attr"`` loads a user-defined one (see ``_registry``).
"""

from study.regularizers._base import Regularizer
from study.regularizers._registry import (
    ExternalRegularizer,
    create,
    get_info,
    list_regularizers,
    validate_params,
)
from study.regularizers._schedule import Schedule
from study.regularizers._spec import REGULARIZERS, ParamSpec, RegularizerInfo, register

__all__ = [
    "REGULARIZERS",
    "ExternalRegularizer",
    "ParamSpec",
    "Regularizer",
    "RegularizerInfo",
    "Schedule",
    "create",
    "get_info",
    "list_regularizers",
    "register",
    "validate_params",
]
