"""The `sla-dsl` command line: `python -m sla_dsl <command>`."""

from __future__ import annotations

import argparse
import sys


def _check(args) -> int:
    from sla_dsl.loader import SpecError, load_spec

    failed = False
    for path in args.paths:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            failed = True
            for problem in exc.problems:
                print(problem)
        except Exception as exc:  # noqa: BLE001 -- `check` promises one line per problem, never a traceback
            failed = True
            print(f"{path}: internal error while checking ({type(exc).__name__}: {exc}); please report it")
        else:
            print(f"{path}: ok ({spec.name}: decay {spec.recurrence.decay.value}, write "
                  f"{spec.recurrence.write.value}, gates {spec.recurrence.gates.value})")
    return 1 if failed else 0


def _generate(args) -> int:
    from sla_dsl.codegen import generate

    differences = generate(check=args.check)
    for line in differences:
        print(("differs: " if args.check else "wrote: ") + line)
    if args.check:
        print("generated files are up to date" if not differences else
              f"{len(differences)} generated file(s) are out of date: run `python -m sla_dsl generate`")
        return 1 if differences else 0
    print(f"{len(differences)} file(s) written" if differences else "nothing to write: all files up to date")
    return 0


def _demo(args) -> int:
    from sla_dsl.demo import run_demo

    return run_demo(args)


def _bench(args) -> int:
    from sla_dsl.bench import run_bench

    return run_bench(args)


def _autotune(args) -> int:
    from sla_dsl.autotune.runner import run_autotune

    return run_autotune(args)


def _first_call(args) -> int:
    from sla_dsl.first_call import run_first_call

    return run_first_call(args)


def _gpu_check(args) -> int:
    from sla_dsl.gpu_check import run_gpu_check

    return run_gpu_check(args)


def _add_perf_commands(commands) -> None:
    """bench, autotune, first-call, gpu-check (their options live with their modules)."""
    from sla_dsl import bench, first_call, gpu_check
    from sla_dsl.autotune import runner

    for name, module, run, text in (
            ("bench", bench, _bench, "time our kernels against fla and torch SDPA on the GPU"),
            ("autotune", runner, _autotune, "tune kernel configs on this GPU into autotune/<gpu>/"),
            ("first-call", first_call, _first_call, "time the first forward+backward in a fresh process"),
            ("gpu-check", gpu_check, _gpu_check, "the correctness suite at real sizes on the GPU, both backends")):
        sub = commands.add_parser(name, help=text)
        module.add_arguments(sub)
        sub.set_defaults(run=run)


def _experiment(args) -> int:
    from sla_dsl.experiments.command import run

    return run(args)


def _add_training_commands(commands) -> None:
    """train, train-bench (their options live with their modules)."""
    from sla_dsl import train, train_bench

    for name, module, run, text in (
            ("train", train, train.run_train, "train a language model of one spec on the standard-library corpus"),
            ("train-bench", train_bench, train_bench.run_train_bench,
             "train every seed spec for one token budget; tokens/s, eval loss, loss curves")):
        sub = commands.add_parser(name, help=text)
        module.add_arguments(sub)
        sub.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sla-dsl", description="Gated linear attention kernels from YAML specs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate spec files; exit 1 if any is invalid")
    check.add_argument("paths", nargs="+", metavar="PATH")
    check.set_defaults(run=_check)
    generate = commands.add_parser("generate", help="regenerate generated/, the JSON Schema and the language page")
    generate.add_argument("--check", action="store_true", help="only compare; exit 1 if anything differs")
    generate.set_defaults(run=_generate)
    demo = commands.add_parser("demo", help="generate and run every seed spec's kernels on a small workload")
    demo.add_argument("--specs", nargs="*", default=None, metavar="PATH", help="spec files (default: specs/*.yaml)")
    demo.set_defaults(run=_demo)
    _add_perf_commands(commands)
    from sla_dsl.experiments import command as experiment_command

    experiment = commands.add_parser("experiment", help="small-scale retrieval experiments of the SLA gates: mqar, "
                                                        "niah, report")
    experiment_command.add_arguments(experiment)
    experiment.set_defaults(run=_experiment)
    _add_training_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
