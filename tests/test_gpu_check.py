"""The GPU suite's case list and its split over runs (`python -m sla_dsl gpu-check --shard K/N`); the cases
themselves need a GPU and run on the GPU machine."""

from __future__ import annotations

import pytest

from sla_dsl import gpu_check
from sla_dsl.cli import build_parser


@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_shards_split_the_suite_into_disjoint_parts_that_cover_it(backend):
    everything = gpu_check.cases(backend, quick=False)
    parts = [gpu_check.shard(everything, k, 3) for k in (1, 2, 3)]
    names = [case.name for part in parts for case in part]
    assert sorted(names) == sorted(case.name for case in everything) and len(set(names)) == len(names)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # interleaved: every shard has seed-spec cases and combination cases, not one kind each
    assert all(any("B2 T4096" in c.name for c in part) and any("T1000" in c.name for c in part) for part in parts)


def test_shard_option_parses_and_rejects_with_a_clear_message(capsys):
    assert build_parser().parse_args(["gpu-check", "--shard", "2/3"]).shard == (2, 3)
    assert build_parser().parse_args(["gpu-check"]).shard is None
    for bad, why in (("3/2", "expected 1 <= K <= N, got '3/2'"), ("two", "expected K/N such as 2/3, got 'two'"),
                     ("0/4", "expected 1 <= K <= N")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["gpu-check", "--shard", bad])
        assert why in capsys.readouterr().err


def test_specs_option_keeps_only_those_seed_specs_cases():
    args = build_parser().parse_args(["gpu-check", "--quick", "--specs", "gla", "sla_gla"])
    picked = gpu_check.cases("tilelang", args.quick, args.specs)
    assert sorted({case.name.split()[0] for case in picked}) == ["gla", "sla_gla"] and len(picked) == 6
    everything = gpu_check.cases("tilelang", quick=False)
    without_seeds = [c for c in everything if "B2 T4096" not in c.name]
    assert len(gpu_check.cases("tilelang", False, ["gla"])) == len(without_seeds) + 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gpu-check", "--specs", "no_such_spec"])
