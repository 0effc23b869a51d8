"""`python -m sla_dsl experiment mqar|niah|report`: the options and what they run.

    experiment mqar [--preset smoke|gpu-small|full] [--specs ...] [--seq-lens ...] [--kv-pairs ...]
                    [--widths ...] [--heads ...] [--lrs ...] [--seeds ...] [--steps N] [--out FILE]
                    [--device auto|cpu|cuda] [--budget-minutes M] [--compile auto|on|off] [--workers N]
                    [--seeds-at-best-lr] [--dry-run]
    experiment niah   (the same, with --train-lens / --eval-lens instead of --seq-lens / --kv-pairs)
    experiment report --results FILE [FILE ...] --out DIR

List options take comma- or space-separated values and replace that axis in every sub-grid of the preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sla_dsl.experiments.grid import PRESETS


def _list_of(kind):
    def parse(text: str):
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from exc
    return parse


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _flatten(value):
    return None if value is None else [x for part in value for x in part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="experiment", required=True, metavar="TASK")
    for task, text in (("mqar", "multi-query associative recall (Zoology)"),
                       ("niah", "synthetic needle in a haystack, with length extrapolation")):
        sub = tasks.add_parser(task, help=f"train and score the grid of {text}")
        sub.add_argument("--preset", choices=list(PRESETS[task]), default="full",
                         help="grid to start from (default: full, the issue's grid); gpu-small fits ~8 min of one "
                              "H100; smoke runs in seconds on a CPU")
        sub.add_argument("--specs", nargs="+", type=_list_of(str), metavar="NAME|PATH",
                         help="spec names (specs/<name>.yaml) or paths")
        if task == "mqar":
            sub.add_argument("--seq-lens", nargs="+", type=_list_of(int), metavar="T")
            sub.add_argument("--kv-pairs", nargs="+", type=_list_of(int), metavar="N")
        else:
            sub.add_argument("--train-lens", nargs="+", type=_list_of(int), metavar="T",
                             help="training lengths, cycled batch by batch at a fixed number of tokens per batch")
            sub.add_argument("--eval-lens", nargs="+", type=_list_of(int), metavar="T",
                             help="evaluated lengths (must include the training ones; longer ones: extrapolation)")
        sub.add_argument("--widths", nargs="+", type=_list_of(int), metavar="D")
        sub.add_argument("--heads", nargs="+", type=_list_of(int), metavar="H")
        sub.add_argument("--lrs", nargs="+", type=_list_of(float), metavar="LR")
        sub.add_argument("--seeds", nargs="+", type=_list_of(int), metavar="S")
        sub.add_argument("--steps", type=int)
        sub.add_argument("--batch-size", type=int)
        sub.add_argument("--layers", type=int)
        sub.add_argument("--eval-examples", type=int,
                         help="MQAR: test examples; niah: examples per (length, depth) cell")
        sub.add_argument("--out", type=Path, help="results file (default: results/<task>-<preset>.json); runs "
                                                   "already in it are skipped")
        sub.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
        sub.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "tilelang"),
                         help="kernels of the spec op (auto: triton on CUDA, the reference on CPU)")
        sub.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                         help="torch.compile the models (auto: on CUDA, except the smoke preset)")
        sub.add_argument("--budget-minutes", type=float, metavar="M",
                         help="stop cleanly before a run would end past M minutes; what finished is kept")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars (one line per run stays)")
        sub.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                         help="processes side by side on the device, process k training runs k, k+N, ... into the "
                              "same results file (these small models leave a GPU mostly idle: on the H100, twelve MQAR "
                              "processes ran at 12-15 steps/s each, one alone at ~22)")
        sub.add_argument("--seeds-at-best-lr", action="store_true",
                         help="Zoology's protocol in one command: stage 1 trains the first seed at every --lrs, "
                              "stage 2 the other --seeds only at each (setting, spec)'s best learning rate, picked "
                              "from stage 1's runs in the results file as the report picks it; stage 2 starts once "
                              "stage 1 is complete there (with --workers, once every worker has finished it)")
        sub.add_argument("--dry-run", action="store_true", help="list the runs and exit")
        sub.set_defaults(task=task)
    report = tasks.add_parser("report", help="markdown table and plots from results files")
    report.add_argument("--results", nargs="+", type=Path, required=True, metavar="FILE")
    report.add_argument("--out", type=Path, default=Path("results/report"), metavar="DIR")
    report.set_defaults(task=None)


def run(args) -> int:
    if args.experiment == "report":
        from sla_dsl.experiments.report import write_report

        for path in write_report(args.results, args.out):
            print(f"wrote {path}")
        return 0
    return _run_task(args)


def _run_task(args, worker: tuple[int, int] | None = None, stage: str | None = None) -> int:
    """Expands the grid and trains it; `worker` (k, N): only runs k, k+N, ... of it (one of --workers);
    `stage` ("sweep" or "best-lr", under --seeds-at-best-lr): only that stage's runs."""
    import torch

    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.experiments.grid import compile_default, expand, sub_grids
    from sla_dsl.experiments.runner import run_grid

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: CUDA is not available on this machine")
        return 2
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "layers": args.layers,
                 "eval_examples": args.eval_examples, "widths": _flatten(args.widths),
                 "heads": _flatten(args.heads), "lrs": _flatten(args.lrs), "seeds": _flatten(args.seeds)}
    if args.task == "mqar":
        overrides.update(seq_lens=_flatten(args.seq_lens), kv_pairs=_flatten(args.kv_pairs))
    else:
        overrides.update(train_lens=_flatten(args.train_lens), eval_lens=_flatten(args.eval_lens))
    grids = sub_grids(args.task, args.preset, overrides)
    names = _flatten(args.specs) or sorted({name for grid in grids for name in grid["specs"]})
    specs = {spec.name: spec for spec in resolve_specs(names)}
    if args.specs:
        grids = [dict(grid, specs=list(specs)) for grid in grids]
    runs, skipped = expand(grids, {name: spec.layer for name, spec in specs.items()})
    out = args.out or Path("results") / f"{args.task}-{args.preset}.json"
    if worker is None and stage is None:  # the command itself, not one of its workers or stages
        for line in skipped:
            print(f"left out: {line}")
        if args.dry_run:
            return _dry_run(runs, out, args.seeds_at_best_lr)
        if args.seeds_at_best_lr:
            return _run_stages(args, runs, out)
        if args.workers > 1:
            return _run_workers(args, out)
    if stage is not None:
        runs = _stage_runs(runs, stage, out)
    if worker is not None:
        runs = runs[worker[0]::worker[1]]
    compile_models = args.compile == "on" or (args.compile == "auto" and device.type == "cuda"
                                              and compile_default(args.preset))
    run_grid(runs, specs, out, device=device, backend=args.backend, compile_models=compile_models,
             budget_minutes=args.budget_minutes, progress=not args.no_progress and worker is None,
             log=print if worker is None else lambda line: print(f"[worker {worker[0]}] {line}", flush=True))
    return 0


def _stage_runs(runs: list, stage: str, out: Path) -> list:
    from sla_dsl.experiments import protocol, results

    if stage == "sweep":
        return protocol.sweep_runs(runs)
    return protocol.best_lr_runs(runs, results.load(out))


def _dry_run(runs: list, out: Path, staged: bool) -> int:
    if not staged:
        for run in runs:
            print(run.label())
        print(f"{len(runs)} run(s)")
        return 0
    from sla_dsl.experiments import protocol, results

    sweep = protocol.sweep_runs(runs)
    print("stage 1, every learning rate at the first seed:")
    for run in sweep:
        print(run.label())
    print(f"{len(sweep)} run(s) in stage 1")
    records = results.load(out)
    if protocol.missing_sweep_runs(runs, records):
        print(f"stage 2: {protocol.later_seed_count(runs)} run(s), the other seeds at each (setting, spec)'s best "
              f"learning rate, decided once stage 1 is complete in {out}")
        return 0
    best = protocol.best_lr_runs(runs, records)
    print(f"stage 2, the other seeds at each (setting, spec)'s best learning rate in {out}:")
    for run in best:
        print(run.label())
    print(f"{len(best)} run(s) in stage 2")
    return 0


def _run_stages(args, runs: list, out: Path) -> int:
    """--seeds-at-best-lr: stage 1, then, once all of it is in `out`, stage 2 within what is left of the budget.
    This process runs each stage (with --workers: starts its workers and waits for all of them) before deciding
    the next, so a failed or budget-stopped worker ends stage 1 instead of leaving the others waiting for runs
    that never come; stage 2 then starts only if stage 1 is complete in the file."""
    import time

    from sla_dsl.experiments import protocol, results

    started = time.monotonic()
    print(f"stage 1: {len(protocol.sweep_runs(runs))} run(s), every learning rate at the first seed")
    failed = _run_stage(args, out, "sweep", args.budget_minutes)
    missing = protocol.missing_sweep_runs(runs, results.load(out))
    if missing:
        print(f"stage 2 not started: {len(missing)} stage-1 run(s) are not in {out}; the same command resumes")
        return failed
    budget_minutes = None
    if args.budget_minutes:
        budget_minutes = args.budget_minutes - (time.monotonic() - started) / 60
        if budget_minutes <= 0:
            print("stage 2 not started: the budget is spent; the same command resumes")
            return failed
    print(f"stage 2: {protocol.later_seed_count(runs)} run(s), the other seeds at each (setting, spec)'s best "
          "learning rate")
    return max(failed, _run_stage(args, out, "best-lr", budget_minutes))


def _run_stage(args, out: Path, stage: str, budget_minutes: float | None) -> int:
    staged = argparse.Namespace(**{**vars(args), "budget_minutes": budget_minutes})
    if args.workers > 1:
        return _run_workers(staged, out, stage)
    return _run_task(staged, stage=stage)


def _run_workers(args, out: Path, stage: str | None = None) -> int:
    """--workers N: N processes, each expanding the same grid (of `stage` alone, if given) and training its share
    into `out` (appends are serialised by a lock file next to it). Exit code 1 if any worker failed; what
    finished is kept."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA cannot be initialised again in a forked child
    workers = [context.Process(target=_worker, args=(args, (k, args.workers), stage)) for k in range(args.workers)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    failed = {k: process.exitcode for k, process in enumerate(workers) if process.exitcode != 0}
    if failed:
        print(f"worker(s) failed (index: exit code) {failed}; the finished runs are in {out}; the same command "
              "resumes the rest")
        return 1
    print(f"{args.workers} workers finished; results in {out}")
    return 0


def _worker(args, worker: tuple[int, int], stage: str | None) -> None:
    import sys

    sys.exit(_run_task(args, worker, stage))
