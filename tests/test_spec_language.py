"""The spec language: seed specs load, every error path gives its exact message, `check` never crashes."""

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from sla_dsl import SpecError, load_spec, parse_spec
from sla_dsl.codegen import REPO_ROOT
from sla_dsl.spec import Decay, Gates, WriteGateOn, WriteRule

SEEDS = sorted((REPO_ROOT / "specs").glob("*.yaml"))


def errors_of(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(SpecError) as info:
        parse_spec(data, "x.yaml")
    return [str(p) for p in info.value.problems]


def test_six_seed_specs_load_with_their_features():
    specs = {path.stem: load_spec(path) for path in SEEDS}
    assert set(specs) == {"retnet", "gla", "gdn", "sla_retnet", "sla_gla", "sla_gdn"}
    assert specs["retnet"].recurrence.decay is Decay.CONSTANT
    assert specs["retnet"].recurrence.log_gammas(2)[1] == pytest.approx(__import__("math").log(1 - 2 ** -6))
    assert specs["gla"].recurrence.decay is Decay.VECTOR
    assert specs["gdn"].recurrence.write is WriteRule.DELTA and specs["gdn"].recurrence.qk_l2_norm
    for name in ("sla_retnet", "sla_gla", "sla_gdn"):
        assert specs[name].recurrence.gates is Gates.BOTH
        backbone = specs[name.removeprefix("sla_")]
        assert specs[name].recurrence.decay is backbone.recurrence.decay
        assert specs[name].layer == backbone.layer


def test_specs_are_frozen():
    spec = load_spec(SEEDS[0])
    with pytest.raises(AttributeError):
        spec.recurrence.decay = Decay.NONE


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec(b"name: tiny\n", "tiny.yaml")
    rec = spec.recurrence
    assert (rec.decay, rec.write, rec.gates, rec.scale) == (Decay.NONE, WriteRule.ADDITIVE, Gates.NONE, None)
    assert spec.layer.decay_form is None and spec.layer.beta_form is None


@pytest.mark.parametrize("text, expected", [
    ("name: x\ndescription: d\nwrite: additive\ndecay: banana\n",
     ["x.yaml:4: decay: 'banana' is not one of none, constant, scalar, vector"]),
    ("name: x\ngates: all\n", ["x.yaml:2: gates: 'all' is not one of none, read, write, both"]),
    ("name: x\nbogus: 1\n", ["x.yaml:2: bogus: unknown field; allowed: name, description, decay, decay_constant, "
                             "write, gates, write_gate_on, feature_map, qk_l2_norm, scale, layer"]),
    ("name: x\nlayer:\n  heads: 4\n", ["x.yaml:3: layer.heads: unknown field; allowed: num_heads, expand_k, "
                                       "expand_v, decay_form, decay_low_rank, decay_normalizer, beta_form, "
                                       "short_conv, conv_size, output_norm, output_gate, norm_eps"]),
    ("name: x\nname: y\n", ["x.yaml:2: name: duplicate key (first given on line 1)"]),
    ("description: no name\n", ["x.yaml:1: name: required field is missing"]),
    ("name: Bad-Name\n", ["x.yaml:1: name: 'Bad-Name' is not a name of lower case letters, digits and "
                          "underscores, starting with a letter"]),
    ("name: x\nqk_l2_norm: 3\n", ["x.yaml:2: qk_l2_norm: 3 is not true or false"]),
    ("name: x\nscale: 0\n", ["x.yaml:2: scale: 0 is not greater than 0"]),
    ("name: x\nscale: fast\n", ["x.yaml:2: scale: 'fast' is not a number"]),
    ("name: x\nlayer:\n  num_heads: 2.5\n", ["x.yaml:3: layer.num_heads: 2.5 is not an integer"]),
    ("name: x\nlayer: 3\n", ["x.yaml:2: layer: expected a mapping of fields, got 3"]),
    ("name: x\nfeature_map: {q: silu, k: tanh}\n",
     ["x.yaml:2: feature_map.k: 'tanh' is not one of identity, elu_plus_one, relu, silu, sigmoid"]),
    ("name: x\nfeature_map: {q: silu}\n", ["x.yaml:2: feature_map.k: required field is missing"]),
    ("name: x\ndecay: constant\n",
     ["x.yaml:2: decay_constant: required with decay: constant (e.g. 1 - 2**(-5 - h))"]),
    ("name: x\ndecay: scalar\ndecay_constant: 0.9\n",
     ["x.yaml:3: decay_constant: only allowed with decay: constant (decay is scalar)"]),
    ("name: x\ndecay: constant\ndecay_constant: __import__('os')\n",
     ["x.yaml:3: decay_constant: \"__import__('os')\" uses \"__import__('os')\"; a formula may use only numbers, "
      "h, H, + - * / **, and exp, log, log2, sqrt, min, max"]),
    ("name: x\ndecay: constant\ndecay_constant: 1 + h\n",
     ["x.yaml:3: decay_constant: '1 + h' gives gamma=2.0 at h=1, H=4; a decay must be in (0, 1]"]),
    ("name: x\ndecay: constant\ndecay_constant: 1 - (\n",
     ["x.yaml:3: decay_constant: '1 - (' is not a valid formula ('(' was never closed)"]),
    ("name: x\nwrite_gate_on: beta\n", ["x.yaml:2: write_gate_on: only allowed with write: delta and a write gate "
                                        "(write is additive, gates is none)"]),
    ("name: x\nwrite: delta\ngates: read\nwrite_gate_on: key\n",
     ["x.yaml:4: write_gate_on: only allowed with write: delta and a write gate (write is delta, gates is read)"]),
    ("name: x\nlayer:\n  decay_form: gdn\n",
     ["x.yaml:3: layer.decay_form: only allowed with decay: scalar or vector (decay is none)"]),
    ("name: x\ndecay: vector\nlayer:\n  decay_form: gdn\n",
     ["x.yaml:4: layer.decay_form: gdn gives one decay per head; use logsigmoid or logsigmoid_low_rank with "
      "decay: vector"]),
    ("name: x\ndecay: scalar\nlayer:\n  decay_low_rank: 8\n",
     ["x.yaml:4: layer.decay_low_rank: only allowed with decay_form logsigmoid_low_rank"]),
    ("name: x\nlayer:\n  beta_form: sigmoid\n", ["x.yaml:3: layer.beta_form: only allowed with write: delta"]),
    ("name: x\nlayer:\n  conv_size: 4\n", ["x.yaml:3: layer.conv_size: only allowed with short_conv: true"]),
    ("", ["x.yaml: empty file; a spec needs at least `name:`"]),
    ("# only a comment\n", ["x.yaml: empty file; a spec needs at least `name:`"]),
    ("- a\n- b\n", ["x.yaml:1: expected a mapping of fields, got a list"]),
    ("name: x\ndecay: [unclosed\n", ["x.yaml:3: YAML syntax error: expected ',' or ']', but got '<stream end>'"]),
    ("name: x\n---\nname: y\n", ["x.yaml:2: YAML syntax error: but found another document"]),
    ("name: &a [*a]\n", ["x.yaml:1: name[0]: recursive alias: a value may not contain itself",
                         "x.yaml:1: name: a list is not a string"]),
    ("name: !!python/object/apply:os.system ['echo pwned']\n",
     ["x.yaml:1: name: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed; spec files "
      "hold plain values"]),
    ("name: x\n1: y\n", ["x.yaml:2: keys must be plain names, got '1'"]),
    ("name: x\nscale: .nan\n", ["x.yaml:2: scale: nan is not a finite number"]),
])
def test_error_messages_are_exact(text, expected):
    assert errors_of(text) == expected


def test_several_problems_are_reported_together():
    problems = errors_of("name: x\nname: y\nbogus: 1\nscale: -1\n")
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4"]


def test_binary_and_oversized_input():
    assert errors_of(bytes(range(256))) == ["x.yaml: not UTF-8 text (byte 128); a spec is a YAML file"]
    assert errors_of(b"name: x\x00\n") == ["x.yaml: contains NUL bytes; a spec is a YAML text file"]
    assert errors_of(b"#" * (2 << 20))[0].startswith("x.yaml: file is 2097152 bytes")


def test_alias_bomb_is_refused_quickly():
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    problems = errors_of("\n".join(lines) + "\n")
    assert len(problems) == 1 and "alias bomb" in problems[0]


def test_python_tags_never_execute(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    errors_of(text)
    assert not marker.exists()


def run_check(*paths):
    return subprocess.run([sys.executable, "-m", "sla_dsl", "check", *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def test_check_cli_on_valid_and_invalid_inputs(tmp_path):
    ok = run_check(*SEEDS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(ok.stdout.splitlines()) == len(SEEDS)
    bad = {"empty.yaml": b"", "garbage.yaml": bytes(range(256)) * 4, "syntax.yaml": b"name: [\n",
           "tag.yaml": b"name: !!python/object:os.system x\n", "bomb.yaml": b"a: &a [1,1]\nb: &b [*a,*a]\n" +
           b"".join(b"%c: &%c [%s]\n" % (c, c, b",".join([b"*" + bytes([c - 1])] * 40)) for c in b"cdefghij")}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()
    result = run_check(*(tmp_path / n for n in bad), tmp_path / "folder", tmp_path / "missing.yaml", SEEDS[0])
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(bad) + 3  # one per bad file, the folder, the missing file, the valid seed
    assert f"{tmp_path / 'folder'}: is a directory; pass spec files (e.g. specs/*.yaml)" in lines
    assert f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory" in lines


def test_every_combination_is_expressible_without_new_python(tmp_path):
    for decay in ("none", "constant", "scalar", "vector"):
        for write in ("additive", "delta"):
            for gates in ("none", "read", "write", "both"):
                text = f"name: combo\ndecay: {decay}\nwrite: {write}\ngates: {gates}\n"
                if decay == "constant":
                    text += "decay_constant: 0.9\n"
                spec = parse_spec(text.encode(), "combo.yaml")
                assert (spec.recurrence.decay.value, spec.recurrence.write.value,
                        spec.recurrence.gates.value) == (decay, write, gates)
    spec = parse_spec(b"name: c\nwrite: delta\ngates: write\nwrite_gate_on: beta\n", "c.yaml")
    assert spec.recurrence.write_gate_on is WriteGateOn.BETA and spec.recurrence.write_gate_scales_beta


def test_json_schema_accepts_seeds_and_rejects_bad_specs():
    schema = json.loads((REPO_ROOT / "sla_dsl" / "spec.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in SEEDS:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    for bad in ({"name": "x", "decay": "banana"}, {"name": "x", "bogus": 1}, {"decay": "none"},
                {"name": "x", "decay": "constant"}, {"name": "x", "layer": {"heads": 2}}):
        assert list(validator.iter_errors(bad)), bad


def test_reference_page_documents_every_field():
    from sla_dsl.language import ROOT

    page = (REPO_ROOT / "docs" / "spec-language.md").read_text()
    for field in ROOT.fields + ROOT.by_name()["layer"].fields:
        assert f"| `{field.name}` |" in page
