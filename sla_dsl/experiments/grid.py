"""What one training run is (`Run`), the presets of the two tasks, and the expansion of a grid into runs.

A preset is a list of sub-grids (dicts of axes); each expands to the product of its axes. Options given on the
command line replace that axis in every sub-grid. Runs come out in priority order: sub-grid by sub-grid, and
within one all cells of seed 0 before any of seed 1, so a run stopped by its time budget has the headline
cells first and complete seeds rather than half a grid of every seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json


TASKS = ("mqar", "niah")
SEED_SPECS = ("retnet", "sla_retnet", "gla", "sla_gla", "gdn", "sla_gdn")
ZOOLOGY_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything that defines a run's result; its JSON is the run's identity in a results file."""

    task: str
    spec: str  # spec name
    width: int
    heads: int
    layers: int
    lr: float
    seed: int
    steps: int
    batch_size: int  # at the first training length (NIAH keeps the tokens per batch fixed across lengths)
    vocab_size: int
    eval_examples: int  # MQAR: test examples; NIAH: examples per (length, depth) cell
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    seq_len: int | None = None  # MQAR
    kv_pairs: int | None = None  # MQAR
    train_lens: tuple[int, ...] | None = None  # NIAH: training batches cycle through these lengths
    eval_lens: tuple[int, ...] | None = None  # NIAH: lengths evaluated (beyond the training ones: extrapolation)

    def __post_init__(self):
        for name in ("width", "heads", "layers", "steps", "batch_size", "vocab_size", "eval_examples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("train_lens", "eval_lens"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Run":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"run config: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        for name in ("train_lens", "eval_lens"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    def model_key(self) -> tuple:
        """Runs with the same model key share one (compiled) model: only the parameters are re-initialised."""
        return (self.spec, self.width, self.heads, self.layers, self.vocab_size)

    def label(self) -> str:
        setting = (f"T={self.seq_len} kv={self.kv_pairs}" if self.task == "mqar"
                   else f"train T={','.join(map(str, self.train_lens))}")
        return f"{self.task} {self.spec} {setting} d={self.width} H={self.heads} lr={self.lr:g} seed={self.seed}"


_MQAR_BASE = dict(task="mqar", layers=2, vocab_size=8192, batch_size=64, eval_examples=1000)
_NIAH_BASE = dict(task="niah", layers=2, vocab_size=8192, batch_size=16, eval_examples=64)

# Sub-grids per (task, preset). Axis names are `Run` fields in the plural where they are lists.
PRESETS: dict[str, dict[str, list[dict]]] = {
    "mqar": {
        # Seconds on a CPU: the whole pipeline, nothing learned.
        "smoke": [dict(_MQAR_BASE, specs=["gla", "sla_gla"], seq_lens=[64], kv_pairs=[4], widths=[32], heads=[4],
                       lrs=[3e-3], seeds=[0], steps=20, batch_size=8, eval_examples=32)],
        # About 7 minutes of one H100, eager (see `compile_default`): the headline comparison only, every
        # backbone with and without SLA, two seeds. The first version (30 runs of 400 steps x batch 64 = 25,600
        # sequences each, kv 16 and 64, lr 2e-3) learned nothing in any run: accuracy 0.000 and loss ln(4096),
        # the plateau of "the answer is some value token". MQAR sits on such plateaus for hundreds to thousands of
        # steps before its phase transition (Zoology trains ~20k steps of batch 256), and a short run needs a
        # high learning rate to get there: on a CPU (GLA, width 64, 4 heads, T=32, kv=4, vocab 64, batch 64, 1000
        # steps) lr 3e-3 ended on the next plateau (accuracy 0.27, one of the 4 bound values) and lr 1e-2 reached
        # 0.77 (0.56 at step 500). So: fewer cells, lr 1e-2, 8x the sequences and 2x the steps of a first-version
        # run (`GPU_SMALL_MQAR_BUDGET` below has the time). Try `--lrs 3e-3,1e-2` where a spec diverges.
        # On the H100, lr 3e-3 x 3000 steps x batch 64 (kv 16) taught RetNet (0.92) but not GLA or GDN (<0.01):
        # benchmarks/NVIDIA_H100_80GB_HBM3/retrieval/. This preset itself has not run on a GPU yet.
        "gpu-small": [
            dict(_MQAR_BASE, specs=list(SEED_SPECS), seq_lens=[256], kv_pairs=[32], widths=[128], heads=[8],
                 lrs=[1e-2], seeds=[0, 1], steps=800, batch_size=256),
        ],
        # The grid (combinations with kv_pairs > seq_len / 4 are left out).
        "full": [
            dict(_MQAR_BASE, specs=list(SEED_SPECS), seq_lens=[256, 512], kv_pairs=[16, 32, 64, 128],
                 widths=[128, 256], heads=[8], lrs=list(ZOOLOGY_LRS), seeds=[0, 1], steps=4000),
            dict(_MQAR_BASE, specs=list(SEED_SPECS), seq_lens=[256, 512], kv_pairs=[16, 32, 64, 128],
                 widths=[128], heads=[4, 16], lrs=list(ZOOLOGY_LRS), seeds=[0, 1], steps=4000),
        ],
    },
    "niah": {
        "smoke": [dict(_NIAH_BASE, specs=["gla", "sla_gla"], train_lens=[64], eval_lens=[64, 128], widths=[32],
                       heads=[4], lrs=[3e-3], seeds=[0], steps=20, batch_size=4, eval_examples=4)],
        # Training straight at 1K/2K (batch 16, lr 2e-3-3e-3, 300-600 steps on the H100) left every model at loss
        # ln 16, the value alphabet's plateau: 8 labelled tokens per example are a sparse signal, and the plateau
        # lasts longer the longer the sequence (on a CPU, width 64: RetNet escaped after ~1,400 steps of batch 8 at
        # T=64 and not within 1,800 at T=128; lr 1e-2 never escaped). So batches of T=128 (128 examples) take turns
        # with the 1K and 2K ones at the same 16k tokens a batch: 8x the labels on one step in three, while the
        # model still trains at 1K and 2K. On the H100 (six processes side by side, ~250 s each, compiled) this left
        # the plateau for GDN, GLA+SLA and RetNet+SLA (per-token accuracy up to 0.39) with exact match still 0.00:
        # benchmarks/NVIDIA_H100_80GB_HBM3/retrieval/2026-11-23-sweep/.
        "gpu-small": [dict(_NIAH_BASE, specs=list(SEED_SPECS), train_lens=[128, 1024, 2048],
                           eval_lens=[128, 1024, 2048, 4096, 8192], widths=[128], heads=[8], lrs=[3e-3], seeds=[0],
                           steps=3000, batch_size=128, eval_examples=32)],
        "full": [dict(_NIAH_BASE, specs=list(SEED_SPECS), train_lens=[128, 1024, 2048],
                      eval_lens=[128, 1024, 2048, 4096, 8192], widths=[128, 256], heads=[4, 8, 16],
                      lrs=list(ZOOLOGY_LRS[1:]), seeds=[0, 1], steps=3000, batch_size=128, eval_examples=100)],
    },
}

# The time of MQAR gpu-small, eager on one H100 (tests/test_experiments.py holds the preset to it):
#   12 runs (6 specs x 1 setting x 2 seeds) x 800 steps = 9,600 steps; at 22 steps/s = 436 s = 7.3 min.
# 22-24 steps/s is what the first version's runs took all in (400 steps in 16.8-18.2 s, kernel builds and the
# evaluation included) at batch 64 x T 256. That step, ~40 ms for a 2-layer width-128 model whose GPU work is a
# few ms (the head's 16k x 128 x 8192 product and its cross entropy dominate), is bound by launching hundreds of
# small kernels from Python, not by the GPU: a compiled 43M-parameter GLA does the same 16k tokens a step at ~22
# steps/s (benchmarks/NVIDIA_H100_80GB_HBM3/training/results.md). So batch 256 (Zoology's batch at T=256, ~4x
# the GPU work, est. ~15 ms) should cost about the same per step and gives 4x the sequences. Not yet measured at
# batch 256: if a run reports fewer than ~20 steps/s, pass `--batch-size 128`, or `--budget-minutes 8` (the
# runner stops cleanly between runs; running the command again resumes).
GPU_SMALL_MQAR_BUDGET = dict(steps_per_s=22.0, seconds=8 * 60)


# Axes a sub-grid may list (each becomes one `Run` field) and the scalar settings it may fix.
LIST_AXES = {"specs": "spec", "seq_lens": "seq_len", "kv_pairs": "kv_pairs", "widths": "width", "heads": "heads",
             "lrs": "lr", "seeds": "seed"}
SCALARS = ("task", "layers", "vocab_size", "batch_size", "eval_examples", "steps", "weight_decay",
           "warmup_fraction", "train_lens", "eval_lens")


def compile_default(preset: str) -> bool:
    """torch.compile on CUDA for every preset but the smoke run. The eager step of these small models is bound by
    launching kernels from Python (see `GPU_SMALL_MQAR_BUDGET`); measured on the H100 (MQAR T=256 batch 128,
    width 128, twelve processes side by side): eager 6.6-7.3 steps/s per process, compiled 12.4-14.7, the
    ~20-40 s compile of each model included."""
    return preset != "smoke"


def sub_grids(task: str, preset: str, overrides: dict) -> list[dict]:
    if task not in PRESETS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if preset not in PRESETS[task]:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS[task])}, got {preset!r}")
    unknown = sorted(set(overrides) - set(LIST_AXES) - set(SCALARS))
    if unknown:
        raise ValueError(f"overrides: unknown axis {', '.join(unknown)}")
    given = {name: value for name, value in overrides.items() if value is not None}
    return [dict(grid, **given) for grid in PRESETS[task][preset]]


def expand(grids: list[dict], spec_layers: dict) -> tuple[list[Run], list[str]]:
    """Runs of the sub-grids in priority order (duplicates dropped), and one line per combination left out.

    `spec_layers`: spec name -> the spec's `LayerConfig` (its expand_k / expand_v decide which head counts
    divide the width)."""
    runs: list[Run] = []
    skipped: list[str] = []
    seen: set[str] = set()
    for grid in grids:
        scalars = {name: grid[name] for name in SCALARS if name in grid}
        if scalars.get("train_lens") is not None:
            scalars["train_lens"] = tuple(scalars["train_lens"])
            scalars["eval_lens"] = tuple(scalars["eval_lens"])
        axes = {field: grid.get(axis, [None]) for axis, field in LIST_AXES.items()}
        names = list(axes)
        combos = [dict(zip(names, values)) for values in itertools.product(*axes.values())]
        combos.sort(key=lambda c: c["seed"])  # stable: seed-major, the axes' order within a seed
        for combo in combos:
            if scalars["task"] == "niah" and (combo["seq_len"], combo["kv_pairs"]) != (None, None):
                raise ValueError("seq_lens, kv_pairs: MQAR axes; the needle task takes train_lens and eval_lens")
            run = Run(**scalars, **combo)
            problem = _problem(run, spec_layers)
            if problem:
                skipped.append(f"{run.label()}: {problem}")
            elif run.key() not in seen:
                seen.add(run.key())
                runs.append(run)
    return runs, skipped


def _problem(run: Run, spec_layers: dict) -> str | None:
    from sla_dsl.experiments.mqar import MQAR  # imported here: the command line parser imports this module
    from sla_dsl.experiments.niah import NeedleInHaystack  # and must not pull in torch

    if run.spec not in spec_layers:
        raise ValueError(f"specs: no spec named {run.spec!r} was loaded (have {', '.join(sorted(spec_layers))})")
    layer = spec_layers[run.spec]
    for name, expand_by in (("key", layer.expand_k), ("value", layer.expand_v)):
        dim = int(run.width * expand_by)
        if dim % run.heads:
            return f"the {name} width {dim} is not divisible by {run.heads} heads"
    try:
        if run.task == "mqar":
            MQAR(run.seq_len, run.kv_pairs, run.vocab_size)
        else:
            needle = NeedleInHaystack(run.vocab_size)
            if not set(run.train_lens) <= set(run.eval_lens):
                raise ValueError("eval_lens must include every training length (a run's accuracy is scored there)")
            for length in run.train_lens + run.eval_lens:
                if length < needle.min_seq_len():
                    raise ValueError(f"length {length} is below {needle.min_seq_len()} (2 x value_len + 1)")
            if run.batch_size * run.train_lens[0] < max(run.train_lens):
                raise ValueError(f"batch_size {run.batch_size} at length {run.train_lens[0]} leaves no whole example "
                                 f"at length {max(run.train_lens)} (the tokens per batch are kept fixed)")
    except ValueError as exc:
        return str(exc)
    return None
