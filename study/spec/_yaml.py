"""Reading a spec's YAML: UTF-8 only, duplicate keys refused, YAML 1.2 floats, bounded alias expansion.

PyYAML alone would let a second ``train:`` silently replace the first, read ``1e-3`` as a string
(YAML 1.1 wants a dot), and hand over a 1 KB file whose anchors expand to millions of values (the
tool would then validate, store and dump every one of them).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# Nodes of the spec once aliases are expanded. The largest shipped spec has a few hundred.
MAX_NODES = 20_000
# Bytes of a spec file, checked before parsing (PyYAML takes minutes over a 10 MB file). The largest
# shipped spec is under 2 KB.
MAX_BYTES = 1_000_000


class SpecYAMLError(ValueError):
    """What is wrong with the file's text (one line), and the YAML line when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads ``1e-3`` as a float (as YAML 1.2 does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden below it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise SpecYAMLError(
                        f"duplicate key {key!r} (first at line {seen[key]}); each key may appear once "
                        "per mapping",
                        line,
                    )
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
        return super().construct_mapping(node, deep=deep)


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Replace the float resolver (YAML 1.1's needs a dot in the mantissa) by one that also takes 1e-3.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))

# YAML 1.2 integers (decimal, 0o octal, 0x hex): YAML 1.1 also reads `1:30` as the sexagesimal 90,
# `0b11` as 3 and `017` as 15, so `epochs: 1:30` would silently train 90 epochs.
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:int"]
    for k, v in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    value = str(loader.construct_scalar(node))
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)  # "017" is 17, as in YAML 1.2


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def check_size(size: int) -> None:
    """A spec over MAX_BYTES is refused before any parsing."""
    if size > MAX_BYTES:
        raise SpecYAMLError(
            f"the spec is {size} bytes, more than the {MAX_BYTES} allowed (a spec lists values, not data)"
        )


def decode(data: bytes) -> str:
    """A spec file's bytes as text: UTF-8 (a BOM is allowed), else a one-line SpecYAMLError."""
    check_size(len(data))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise SpecYAMLError("not UTF-8 text (UTF-16, or NUL bytes); save the spec as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecYAMLError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the spec as UTF-8"
        ) from None


def _count(value: Any, budget: int) -> int:
    """Nodes under value with aliases expanded, stopping once past ``budget`` (so a billion-laughs
    spec costs ``budget`` steps, not its expanded size)."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        n += 1
        if n > budget:
            return n
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def load(text: str) -> Any:
    """Parse a spec's text. Raises SpecYAMLError (one line, with the YAML line when known)."""
    check_size(len(text.encode("utf-8", "surrogatepass")))
    try:
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecYAMLError(f"not valid YAML: {problem}", mark.line + 1 if mark else None) from None
    except RecursionError:
        raise SpecYAMLError("not valid YAML: nested too deeply") from None
    if _count(raw, MAX_NODES) > MAX_NODES:
        raise SpecYAMLError(
            f"the spec expands to more than {MAX_NODES} values (YAML anchors/aliases or very long "
            "lists); write the values it needs"
        )
    return raw
