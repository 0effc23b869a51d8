"""Spec files -> `Spec` objects, strictly: every problem is reported as `file:line: field: message`.

YAML is only *composed* (turned into a node tree), never constructed by PyYAML, so tags such as
`!!python/object` cannot execute anything; aliases are followed with a depth and node budget, so
recursive aliases and alias bombs fail cleanly.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import yaml

from sla_dsl.formula import Formula, FormulaError
from sla_dsl.language import REQUIRED, ROOT, Field
from sla_dsl.spec import (BetaForm, Decay, DecayForm, FeatureMap, Gates, LayerConfig, OutputGate, OutputNorm,
                          Recurrence, Spec, WriteGateOn, WriteRule)

_MAX_DEPTH = 32
_MAX_NODES = 10_000
_MAX_BYTES = 1 << 20
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
_UNREADABLE = object()  # a value whose problem is already reported: present, but not checked again


@dataclass(frozen=True)
class SpecProblem:
    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(ValueError):
    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class _Value:
    """A plain value with the line it came from."""

    value: object
    line: int


class _Reader:
    """Walks the composed YAML tree into `_Value`s, collecting problems instead of raising."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[SpecProblem] = []
        self.nodes = 0
        self.exhausted = False
        self.scalars = yaml.constructor.SafeConstructor()

    def problem(self, line: int | None, field: str | None, message: str) -> None:
        self.problems.append(SpecProblem(self.path, line, field, message))

    def read(self, node: yaml.Node, field: str, stack: tuple[int, ...] = ()) -> _Value | None:
        line = node.start_mark.line + 1
        self.nodes += 1
        if id(node) in stack:
            self.problem(line, field, "recursive alias: a value may not contain itself")
            return None
        if self.exhausted:
            return None
        if len(stack) > _MAX_DEPTH or self.nodes > _MAX_NODES:
            self.exhausted = True  # report once, then stop walking
            self.problem(line, field, f"document too large or too deep (more than {_MAX_NODES} values or "
                         f"{_MAX_DEPTH} levels; an alias bomb?)")
            return None
        if node.tag not in _CORE_TAGS:
            self.problem(line, field, f"YAML tag {node.tag!r} is not allowed; spec files hold plain values")
            return None
        stack = stack + (id(node),)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, tuple[int, _Value]] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    self.problem(key_line, field or None, f"keys must be plain names, got {key_node.value!r}"
                                 if isinstance(key_node, yaml.ScalarNode) else "keys must be plain names")
                    continue
                name = key_node.value
                child_field = f"{field}.{name}" if field else name
                if name in out:
                    self.problem(key_line, child_field, f"duplicate key (first given on line {out[name][0]})")
                    continue
                child = self.read(value_node, child_field, stack)
                out[name] = (key_line, child if child is not None else _Value(_UNREADABLE, key_line))
            return _Value({k: v for k, (_, v) in out.items()}, line)
        if isinstance(node, yaml.SequenceNode):
            items = [self.read(item, f"{field}[{i}]", stack) for i, item in enumerate(node.value)]
            return _Value(items, line)
        try:
            return _Value(self.scalars.construct_object(node, deep=True), line)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            self.problem(line, field, f"cannot read value {node.value!r}: {exc}")
            return None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


class _Checker:
    """Checks `_Value` trees against the language's field table; returns plain values with their lines."""

    def __init__(self, reader: _Reader):
        self.reader = reader

    def section(self, spec: Field, value: _Value, prefix: str) -> dict[str, _Value]:
        if not isinstance(value.value, dict):
            self.reader.problem(value.line, prefix or None, f"expected a mapping of fields, got "
                                f"{_describe(value.value)}")
            return {}
        known = spec.by_name()
        out: dict[str, _Value] = {}
        for name, child in value.value.items():
            field_name = f"{prefix}.{name}" if prefix else name
            if child.value is _UNREADABLE:
                continue
            if name not in known:
                self.reader.problem(child.line, field_name, f"unknown field; allowed: {', '.join(known)}")
                continue
            checked = self.field(known[name], child, field_name)
            if checked is not None:
                out[name] = checked
        for name, field in known.items():
            if field.default is REQUIRED and name not in value.value:
                self.reader.problem(value.line, f"{prefix}.{name}" if prefix else name, "required field is missing")
        return out

    def field(self, field: Field, value: _Value, name: str) -> _Value | None:
        v = value.value
        bad = lambda expected: self.reader.problem(value.line, name, f"{_describe(v)} is not {expected}")  # noqa: E731
        if v is None and field.nullable:
            return value
        if field.kind == "section":
            return _Value(self.section(field, value, name), value.line)
        if field.kind == "enum":
            if not isinstance(v, str) or v not in field.choices:
                return bad(f"one of {', '.join(field.choices)}")
            return value
        if field.kind == "feature_map":
            if isinstance(v, str):
                v = {"q": _Value(v, value.line), "k": _Value(v, value.line)}
            if not isinstance(v, dict):
                return bad(f"a feature map name ({', '.join(field.choices)}) or a mapping {{q: ..., k: ...}}")
            out = {}
            for side in ("q", "k"):
                if side not in v:
                    self.reader.problem(value.line, f"{name}.{side}", "required field is missing")
                    continue
                choice = v[side].value
                if not isinstance(choice, str) or choice not in field.choices:
                    self.reader.problem(v[side].line, f"{name}.{side}" if isinstance(value.value, dict) else name,
                                        f"{_describe(choice)} is not one of {', '.join(field.choices)}")
                    continue
                out[side] = choice
            for extra in set(v) - {"q", "k"}:
                self.reader.problem(v[extra].line, f"{name}.{extra}", "unknown field; allowed: q, k")
            return _Value(out, value.line) if len(out) == 2 else None
        if field.kind == "bool":
            return value if isinstance(v, bool) else bad("true or false")
        if field.kind in ("int", "number"):
            ok_type = (int,) if field.kind == "int" else (int, float)
            if isinstance(v, bool) or not isinstance(v, ok_type):
                return bad("an integer" if field.kind == "int" else "a number")
            if v != v or v in (float("inf"), float("-inf")):
                return bad("a finite number")
            if field.minimum is not None and v < field.minimum:
                return bad(f"at least {field.minimum:g}")
            if field.positive and v <= 0:
                return bad("greater than 0")
            return _Value(float(v) if field.kind == "number" else v, value.line)
        if field.kind in ("string", "identifier"):
            if not isinstance(v, str):
                return bad("a string")
            if field.kind == "identifier" and not _IDENTIFIER.match(v):
                return bad("a name of lower case letters, digits and underscores, starting with a letter")
            return value
        assert field.kind == "formula", field.kind
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            return bad("a formula of h and H, or a number")
        try:
            return _Value(Formula.parse(str(v)), value.line)
        except FormulaError as exc:
            self.reader.problem(value.line, name, str(exc))
            return None


def _get(values: dict[str, _Value], name: str) -> object:
    field = ROOT.by_name()[name]
    return values[name].value if name in values else field.default


def _build(path: str, sha: str, values: dict[str, _Value], reader: _Reader) -> Spec | None:
    """Cross-field rules; returns None when any problem was found."""
    layer_field = ROOT.by_name()["layer"]
    layer_values: dict[str, _Value] = values["layer"].value if "layer" in values else {}
    line_of = lambda name, section=values: section[name].line if name in section else None  # noqa: E731
    layer_default = lambda name: layer_field.by_name()[name].default  # noqa: E731
    layer_get = lambda name: layer_values[name].value if name in layer_values else layer_default(name)  # noqa: E731

    decay = Decay(_get(values, "decay"))
    write = WriteRule(_get(values, "write"))
    gates = Gates(_get(values, "gates"))
    constant = _get(values, "decay_constant")
    if decay is Decay.CONSTANT and constant is None:
        reader.problem(line_of("decay"), "decay_constant", "required with decay: constant (e.g. 1 - 2**(-5 - h))")
    if decay is not Decay.CONSTANT and constant is not None:
        reader.problem(line_of("decay_constant"), "decay_constant",
                       f"only allowed with decay: constant (decay is {decay.value})")
    num_heads = layer_get("num_heads")
    if decay is Decay.CONSTANT and constant is not None:
        try:
            for h in range(num_heads):
                constant.evaluate_gamma(h, num_heads)
        except FormulaError as exc:
            reader.problem(line_of("decay_constant"), "decay_constant", str(exc))
    write_gate_on = _get(values, "write_gate_on")
    if write_gate_on is not None and not (write is WriteRule.DELTA and gates.write):
        reader.problem(line_of("write_gate_on"), "write_gate_on",
                       f"only allowed with write: delta and a write gate (write is {write.value}, gates is "
                       f"{gates.value})")

    decay_form = layer_get("decay_form")
    data_dependent = decay in (Decay.SCALAR, Decay.VECTOR)
    if decay_form is not None and not data_dependent:
        reader.problem(line_of("decay_form", layer_values), "layer.decay_form",
                       f"only allowed with decay: scalar or vector (decay is {decay.value})")
    if decay_form == DecayForm.GDN.value and decay is Decay.VECTOR:
        reader.problem(line_of("decay_form", layer_values), "layer.decay_form",
                       "gdn gives one decay per head; use logsigmoid or logsigmoid_low_rank with decay: vector")
    if data_dependent and decay_form is None:
        decay_form = DecayForm.GDN.value if decay is Decay.SCALAR else DecayForm.LOGSIGMOID_LOW_RANK.value
    for name, needs in (("decay_low_rank", {DecayForm.LOGSIGMOID_LOW_RANK.value}),
                        ("decay_normalizer", {DecayForm.LOGSIGMOID.value, DecayForm.LOGSIGMOID_LOW_RANK.value})):
        if name in layer_values and decay_form not in needs:
            reader.problem(line_of(name, layer_values), f"layer.{name}",
                           f"only allowed with decay_form {' or '.join(sorted(needs))}")
    beta_form = layer_get("beta_form")
    if beta_form is not None and write is not WriteRule.DELTA:
        reader.problem(line_of("beta_form", layer_values), "layer.beta_form", "only allowed with write: delta")
    if write is WriteRule.DELTA and beta_form is None:
        beta_form = BetaForm.SIGMOID.value
    if "conv_size" in layer_values and not layer_get("short_conv"):
        reader.problem(line_of("conv_size", layer_values), "layer.conv_size", "only allowed with short_conv: true")
    if reader.problems:
        return None

    feature_map = _get(values, "feature_map")
    if isinstance(feature_map, str):
        feature_map = {"q": feature_map, "k": feature_map}
    recurrence = Recurrence(
        decay=decay, decay_constant=constant, write=write, gates=gates,
        write_gate_on=WriteGateOn(write_gate_on or WriteGateOn.KEY.value),
        feature_map_q=FeatureMap(feature_map["q"]), feature_map_k=FeatureMap(feature_map["k"]),
        qk_l2_norm=_get(values, "qk_l2_norm"), scale=_get(values, "scale"))
    layer = LayerConfig(
        num_heads=num_heads, expand_k=layer_get("expand_k"), expand_v=layer_get("expand_v"),
        decay_form=DecayForm(decay_form) if data_dependent else None,
        decay_low_rank=layer_get("decay_low_rank"), decay_normalizer=layer_get("decay_normalizer"),
        beta_form=BetaForm(beta_form) if beta_form else None, short_conv=layer_get("short_conv"),
        conv_size=layer_get("conv_size"), output_norm=OutputNorm(layer_get("output_norm")),
        output_gate=OutputGate(layer_get("output_gate")), norm_eps=layer_get("norm_eps"))
    return Spec(name=_get(values, "name"), description=_get(values, "description"), recurrence=recurrence,
                layer=layer, source_path=path, source_sha256=sha)


def parse_spec(text: bytes, path: str) -> Spec:
    """Parses the bytes of a spec file; raises SpecError listing every problem found."""
    reader = _Reader(path)
    fail = lambda line, message: SpecError([SpecProblem(path, line, None, message)])  # noqa: E731
    if len(text) > _MAX_BYTES:
        raise fail(None, f"file is {len(text)} bytes; a spec is at most {_MAX_BYTES}")
    try:
        source = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(None, f"not UTF-8 text (byte {exc.start}); a spec is a YAML file") from None
    if "\x00" in source:
        raise fail(None, "contains NUL bytes; a spec is a YAML text file")
    try:
        root = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise fail(mark.line + 1 if mark else None, f"YAML syntax error: {exc.problem or exc.context}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise fail(None, f"YAML error: {exc}") from None
    if root is None:
        raise fail(None, "empty file; a spec needs at least `name:`")
    value = reader.read(root, "")
    if value is not None and not reader.exhausted:
        checked = _Checker(reader).section(ROOT, value, "")
        if not reader.problems:
            spec = _build(path, hashlib.sha256(text).hexdigest(), checked, reader)
            if spec is not None:
                return spec
    raise SpecError(reader.problems)


def load_spec(path: str | os.PathLike) -> Spec:
    """Loads one spec file; raises SpecError (never another exception) for any bad input."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SpecError([SpecProblem(path, None, None, "is a directory; pass spec files (e.g. specs/*.yaml)")])
    try:
        with open(path, "rb") as handle:
            text = handle.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError([SpecProblem(path, None, None, f"cannot read: {exc.strerror}")]) from None
    return parse_spec(text, path)
