"""The regularizer registry: parameter validation and its messages, schedules, import-path
regularizers, registration, and input checks."""

from __future__ import annotations

import math
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from study.regularizers import (
    REGULARIZERS,
    ParamSpec,
    Regularizer,
    RegularizerInfo,
    Schedule,
    create,
    get_info,
    list_regularizers,
    register,
    validate_params,
)
from study.regularizers._label_smoothing import LabelSmoothing

# Every registered regularizer (built-in modules and any registered before collection): the tests below
# run on each, so a new module is tested with no edit here.
REGISTERED = list_regularizers()


def batch(b: int = 8, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(b, k, generator=g), torch.randint(k, (b,), generator=g)


# ---------------------------------------------------------------- registry contents


def test_every_regularizer_module_registers_itself() -> None:
    """Adding a regularizer is one new module: ``_registry`` imports every module of the package and
    each registers its ``INFO`` (no list to edit)."""
    import importlib
    import pkgutil

    import study.regularizers as package
    from study.regularizers._registry import _SUPPORT

    modules = [m.name for m in pkgutil.iter_modules(package.__path__) if m.name not in _SUPPORT]
    infos = [importlib.import_module(f"study.regularizers.{m}").INFO for m in modules]
    assert len(infos) >= 9 and all(get_info(info.name) is info for info in infos)
    assert {"ce", "label_smoothing", "maxsup", "online_label_smoothing"} <= set(list_regularizers())


@pytest.mark.parametrize("name", REGISTERED)
def test_info_is_consistent_and_factory_builds(name: str) -> None:
    info = get_info(name)
    assert info.name == name and info.description
    assert (info.strength is None) == (name == "ce")
    assert info.strength is None or info.params[info.strength].kind == "float"
    with pytest.raises(TypeError):
        info.params["x"] = ParamSpec(default=0.0)  # read-only
    loss_fn = create(name)
    assert isinstance(loss_fn, Regularizer) and loss_fn.name == name
    defaults = validate_params(name, {})
    assert defaults == {k: spec.default for k, spec in info.params.items()}
    assert set(loss_fn.current_params()) == {k for k, v in defaults.items() if type(v) in (int, float)}


def test_validate_params_merges_defaults_and_canonicalises() -> None:
    out = validate_params("focal", {"gamma": 1})
    assert out == {"gamma": 1.0, "adaptive": False} and type(out["gamma"]) is float
    assert validate_params("maxsup", {"alpha": {"start": 0.1, "end": 0.2}}) == {
        "alpha": {"schedule": "linear", "start": 0.1, "end": 0.2}
    }
    assert validate_params("confidence_penalty", {"threshold": 1}) == {"beta": 0.1, "threshold": 1.0}


# ---------------------------------------------------------------- bad input


BAD_PARAMS = [
    ("label_smoothing", {"alpha": 1.0}, ["label_smoothing: alpha must be in [-10, 1), but got 1.0."]),
    ("label_smoothing", {"alpha": -10.5}, ["label_smoothing: alpha must be in [-10, 1), but got -10.5."]),
    ("label_smoothing", {"beta": 0.1}, ["label_smoothing: unknown parameter 'beta' (allowed: alpha)."]),
    ("ce", {"alpha": 0.1}, ["ce: unknown parameter 'alpha' (allowed: none)."]),
    ("confidence_penalty", {"beta": -0.1}, ["confidence_penalty: beta must be in [0, 10], but got -0.1."]),
    ("confidence_penalty", {"threshold": -1.0}, ["threshold must be in [0, inf) or None", "-1.0"]),
    ("logitnorm", {"tau": 0.0}, ["logitnorm: tau must be in (0, 10], but got 0.0."]),
    ("logit_penalty", {"beta": math.inf}, ["logit_penalty: beta", "but got inf."]),
    ("maxsup", {"alpha": math.nan}, ["maxsup: alpha must be in [0, 1], but got nan."]),
    ("maxsup", {"alpha": "0.1"}, ["maxsup: alpha", "but got '0.1'."]),
    ("maxsup", {"alpha": True}, ["maxsup: alpha", "but got True."]),
    ("maxsup", {"alpha": {"start": 0.1, "end": 1.5}}, ["maxsup: alpha", "at both ends", "end=1.5"]),
    ("maxsup", {"alpha": {"start": 0.1, "stop": 0.2}}, ["maxsup: alpha", "unknown schedule key(s) 'stop'"]),
    ("maxsup", {"alpha": {"end": 0.2}}, ["maxsup: alpha", "needs a 'start'"]),
    (
        "maxsup",
        {"alpha": {"schedule": "step", "start": 0.1, "end": 0.2}},
        ["schedule must be one of", "'step'"],
    ),
    (
        "maxsup",
        {"alpha": {"schedule": "constant", "start": 0.1, "end": 0.2}},
        ["constant schedule needs start"],
    ),
    ("focal", {"adaptive": 1}, ["focal: adaptive must be a bool, but got 1."]),
    ("disturb_label", {"seed": 1.5}, ["disturb_label: seed must be an integer in [0, inf), but got 1.5."]),
    ("disturb_label", {"seed": -1}, ["disturb_label: seed must be an integer in [0, inf), but got -1."]),
    ("disturb_label", {"seed": {"start": 0, "end": 1}}, ["disturb_label: seed cannot be scheduled"]),
    ("disturb_label", {"rate": 1.2}, ["disturb_label: rate must be in [0, 1], but got 1.2."]),
    ("online_label_smoothing", {"eps": 1.0}, ["online_label_smoothing: eps must be in [0, 1), but got 1.0."]),
    ("online_label_smoothing", {"eps": {"start": 0.1, "end": 0.2}}, ["eps cannot be scheduled"]),
]


@pytest.mark.parametrize(("name", "params", "fragments"), BAD_PARAMS)
def test_bad_params_are_rejected_with_clear_messages(name: str, params: dict, fragments: list[str]) -> None:
    for call in (lambda: validate_params(name, params), lambda: create(name, **params)):
        with pytest.raises(ValueError) as err:
            call()
        for fragment in fragments:
            assert fragment in str(err.value)


def test_unknown_name_lists_known_ones() -> None:
    for call in (
        lambda: create("smoothing"),
        lambda: validate_params("smoothing", {}),
        lambda: get_info("smoothing"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert "unknown regularizer 'smoothing'" in str(err.value)
        assert all(name in str(err.value) for name in REGISTERED)


def test_constructors_fail_early() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[-10, 1\), but got 1.0"):
        LabelSmoothing(alpha=1.0)


@pytest.mark.parametrize(
    ("logits", "targets", "fragment"),
    [
        (torch.randn(5), torch.zeros(5, dtype=torch.long), "logits must have shape (B, K)"),
        (torch.randn(4, 1), torch.zeros(4, dtype=torch.long), "K >= 2"),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), "B >= 1"),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), "targets must have shape (4,)"),
        (torch.randn(4, 3), torch.zeros(4), "integer dtype"),
    ],
)
@pytest.mark.parametrize("name", REGISTERED)
def test_bad_tensors_are_rejected(
    name: str, logits: torch.Tensor, targets: torch.Tensor, fragment: str
) -> None:
    loss_fn = create(name)
    with pytest.raises(ValueError) as err:
        loss_fn(logits, targets)
    assert fragment in str(err.value)


# ---------------------------------------------------------------- schedules


def test_schedule_values() -> None:
    lin = Schedule.parse({"start": 0.1, "end": 0.2})
    assert lin.kind == "linear"
    assert lin.value(0.0) == 0.1 and lin.value(1.0) == 0.2 and math.isclose(lin.value(0.5), 0.15)
    cos = Schedule.parse({"schedule": "cosine", "start": 1.0, "end": 0.0})
    assert cos.value(0.0) == 1.0 and cos.value(1.0) == 0.0 and math.isclose(cos.value(0.5), 0.5)
    assert math.isclose(cos.value(0.25), 1.0 - (1.0 - math.cos(math.pi / 4)) / 2)
    assert Schedule.parse(0.3) == Schedule.parse({"start": 0.3}) == Schedule.constant(0.3)
    assert Schedule.parse(lin.to_dict()) == lin
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="progress must be in"):
            lin.value(bad)


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(["linear", "cosine"]),
    start=st.floats(-5, 5),
    end=st.floats(-5, 5),
    p=st.floats(0, 1),
    q=st.floats(0, 1),
)
def test_schedules_stay_between_endpoints_and_are_monotone(
    kind: str, start: float, end: float, p: float, q: float
) -> None:
    s = Schedule(kind, start, end)
    lo, hi = min(start, end), max(start, end)
    assert lo - 1e-12 <= s.value(p) <= hi + 1e-12
    p, q = min(p, q), max(p, q)
    assert (s.value(q) - s.value(p)) * (end - start) >= -1e-12


def test_scheduled_maxsup_follows_progress() -> None:
    z, y = batch()
    loss_fn = create("maxsup", alpha={"start": 0.1, "end": 0.2})
    assert loss_fn.current_params() == {"alpha": 0.1}
    loss_fn.set_progress(0.5)
    assert math.isclose(loss_fn.current_params()["alpha"], 0.15)
    loss_fn.set_progress(1.0)
    assert loss_fn.current_params() == {"alpha": 0.2}
    assert torch.allclose(loss_fn(z, y), create("maxsup", alpha=0.2)(z, y))
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\], but got 1.5"):
        loss_fn.set_progress(1.5)


@pytest.mark.parametrize(
    ("name", "param"),
    [(n, p) for n in REGISTERED for p, spec in get_info(n).params.items() if spec.schedulable],
)
def test_every_schedulable_param_accepts_a_schedule(name: str, param: str) -> None:
    spec = get_info(name).params[param]
    start = spec.neutral if spec.neutral is not None else spec.default / 2
    loss_fn = create(name, **{param: {"schedule": "cosine", "start": start, "end": spec.default}})
    assert loss_fn.current_params()[param] == start
    loss_fn.set_progress(1.0)
    assert loss_fn.current_params()[param] == spec.default
    z, y = batch()
    assert torch.allclose(loss_fn.eval()(z, y), create(name, **{param: spec.default}).eval()(z, y))


def test_strength_params_of_builtins_are_all_schedulable() -> None:
    for name in REGISTERED:
        info = get_info(name)
        assert info.strength is None or info.params[info.strength].schedulable


# ---------------------------------------------------------------- import-path regularizers


MODULE = '''
import torch.nn.functional as F
from torch import nn

from study.regularizers import ParamSpec, RegularizerInfo


class ScaledCE(nn.Module):
    """Cross-entropy times a factor (class form)."""

    def __init__(self, factor: float = 1.0, squared: bool = False, offset=None):
        super().__init__()
        self.factor, self.squared, self.offset = factor, squared, offset
        self.epochs, self.progress = 0, None

    def forward(self, logits, targets):
        loss = self.factor * F.cross_entropy(logits, targets)
        loss = loss**2 if self.squared else loss
        return loss if self.offset is None else loss + self.offset

    def on_epoch_end(self):
        self.epochs += 1

    def set_progress(self, progress):
        self.progress = progress


def scaled_ce(factor: float = 1.0, squared: bool = False, offset=None, **ignored):
    """Scaled cross-entropy.

    More text.
    """
    return ScaledCE(factor, squared, offset)


INFO = RegularizerInfo(
    name="scaled_ce",
    factory=scaled_ce,
    params={"factor": ParamSpec(default=1.0, low=0.0, high=5.0, neutral=1.0)},
    strength="factor",
)


def per_sample():
    class PerSample(nn.Module):
        def forward(self, logits, targets):
            return F.cross_entropy(logits, targets, reduction="none")
    return PerSample()


def needs_arg(x):
    return ScaledCE(x)


def bad_default(mode="a"):
    return ScaledCE()


def not_a_module():
    return 3


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_losses_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_import_path_function(user_module: str) -> None:
    path = f"{user_module}:scaled_ce"
    z, y = batch()
    info = get_info(path)
    assert info.name == path and info.description == "Scaled cross-entropy." and info.strength is None
    assert validate_params(path, {"factor": 2}) == {"factor": 2.0, "squared": False, "offset": None}
    loss_fn = create(path, factor=2.0, squared=True)
    assert isinstance(loss_fn, Regularizer)
    assert torch.allclose(loss_fn(z, y), (2.0 * F.cross_entropy(z, y)) ** 2)
    assert torch.allclose(loss_fn.terms(z, y)["ce"], F.cross_entropy(z, y))
    assert loss_fn.current_params() == {"factor": 2.0}
    loss_fn.on_epoch_end()
    loss_fn.set_progress(0.5)
    assert loss_fn.inner.epochs == 1 and loss_fn.inner.progress == 0.5
    assert torch.allclose(create(path, offset=1)(z, y), F.cross_entropy(z, y) + 1.0)
    with pytest.raises(ValueError, match=r"unknown parameter 'ignored' \(allowed: factor, squared, offset\)"):
        create(path, ignored=1)
    with pytest.raises(ValueError, match="squared must be a bool, but got 1"):
        validate_params(path, {"squared": 1})


def test_import_path_class_and_info(user_module: str) -> None:
    z, y = batch()
    assert torch.allclose(create(f"{user_module}:ScaledCE", factor=3.0)(z, y), 3.0 * F.cross_entropy(z, y))
    info_path = f"{user_module}:INFO"
    assert get_info(info_path).strength == "factor"
    assert torch.allclose(create(info_path, factor=0.5)(z, y), 0.5 * F.cross_entropy(z, y))
    with pytest.raises(ValueError, match=r"scaled_ce: factor must be in \[0, 5\], but got 6.0."):
        validate_params(info_path, {"factor": 6.0})


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "must name a RegularizerInfo or a callable"),
        ("needs_arg", "parameter 'x' needs a default"),
        ("bad_default", "must be a bool, int, float or None, but got 'a'"),
        ("not_a_module", "the factory must return an nn.Module, but got int"),
    ],
)
def test_import_path_errors(user_module: str, attr: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        create(f"{user_module}:{attr}")
    assert fragment in str(err.value)


def test_import_path_format_errors(user_module: str) -> None:
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_q9'"):
        get_info("no_such_module_q9:f")
    for bad in (":f", f"{user_module}:"):
        with pytest.raises(ValueError, match="must look like 'package.module:function'"):
            get_info(bad)


def test_external_loss_must_be_a_batch_mean(user_module: str) -> None:
    loss_fn = create(f"{user_module}:per_sample")
    with pytest.raises(ValueError, match=r"must return a 0-dim batch-mean loss, but got \(8,\)"):
        loss_fn(*batch())


# ---------------------------------------------------------------- registration


@pytest.fixture
def registry() -> Iterator[None]:
    before = set(REGULARIZERS)
    yield
    for name in set(REGULARIZERS) - before:
        REGULARIZERS.remove(name)


def test_register_adds_a_regularizer(registry: None) -> None:
    class DoubleCE(Regularizer):
        def __init__(self, weight: float = 2.0) -> None:
            super().__init__("double_ce", SPECS, weight=weight)

        def _per_sample(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return self.param("weight") * F.cross_entropy(z, targets, reduction="none")

    SPECS = {"weight": ParamSpec(default=2.0, low=0.0, high=4.0, schedulable=True, neutral=1.0)}
    register(RegularizerInfo(name="double_ce", factory=DoubleCE, params=SPECS, strength="weight"))
    assert "double_ce" in list_regularizers()
    z, y = batch()
    loss_fn = create("double_ce", weight={"start": 1.0, "end": 3.0})
    loss_fn.set_progress(0.5)
    assert torch.allclose(loss_fn(z, y), 2.0 * F.cross_entropy(z, y))
    with pytest.raises(ValueError, match="'double_ce' is already registered"):
        register(get_info("double_ce"))
    with pytest.raises(ValueError, match="register needs a RegularizerInfo"):
        register("double_ce")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not contain ':'"):
        register(RegularizerInfo(name="a:b", factory=DoubleCE, params=SPECS))
    assert "a:b" not in list_regularizers()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": ""}, "name must be a non-empty string, but got ''."),
        ({"factory": 3}, "factory must be callable"),
        ({"strength": "beta"}, "strength must be one of its params (alpha) or None, but got 'beta'"),
        (
            {"params": {"alpha": ParamSpec(default=2.0, low=0.0, high=1.0)}},
            "alpha (default) must be in [0, 1]",
        ),
        ({"params": {"alpha": ParamSpec(default=0.5, low=0.0, high=1.0, neutral=3.0)}}, "alpha (neutral)"),
        ({"params": {"alpha": 0.5}}, "must be a ParamSpec"),
    ],
)
def test_regularizer_info_checks_itself(kwargs: dict, fragment: str) -> None:
    base = {
        "name": "x",
        "factory": lambda alpha=0.5: None,
        "params": {"alpha": ParamSpec(default=0.5, low=0.0, high=1.0)},
        "strength": "alpha",
    }
    with pytest.raises(ValueError) as err:
        RegularizerInfo(**{**base, **kwargs})
    assert fragment in str(err.value)


def test_param_spec_checks_itself() -> None:
    with pytest.raises(ValueError, match="low must be <= high"):
        ParamSpec(default=0.0, low=1.0, high=0.0)
    with pytest.raises(ValueError, match="only float parameters can be schedulable"):
        ParamSpec(default=1, kind="int", schedulable=True)
    with pytest.raises(ValueError, match="needs a non-empty choices"):
        ParamSpec(default="a", kind="choice")
    spec = ParamSpec(default="a", kind="choice", choices=("a", "b"))
    assert spec.check("r", "mode", "b") == "b"
    with pytest.raises(ValueError, match="r: mode must be one of 'a', 'b', but got 'c'."):
        spec.check("r", "mode", "c")
