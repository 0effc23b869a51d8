"""`python -m sla_dsl train-bench`: the training evidence. Trains one model per spec, the same config and token
budget for all, each in a fresh `python -m sla_dsl train` subprocess (a crash, a CUDA error or a hang of one
spec cannot take the others' results with it), and records tokens/s and the final eval loss per spec.

    python -m sla_dsl train-bench [--specs retnet sla_retnet ...] [--token-budget N] [--out DIR]
    python -m sla_dsl train-bench --replot DIR      # rewrite results.md and loss_curves.png from results.json

Writes, after every spec (so that a later failure or a kill keeps what finished), into --out (default
`benchmarks/<gpu>/training/`, `<gpu>` = torch.cuda.get_device_name() with spaces as underscores):
`results.json` (the config, device, versions, command, and per spec: status, parameters, tokens/s, losses,
the loss curves), `results.md` (the table), `loss_curves.png` (train and eval loss against tokens) and
`train-bench.log` (every run's output). A spec is given at most --timeout-per-spec seconds and the whole
run --time-limit seconds: a spec that would start too late is skipped, so the files are complete in time.

tokens/s: the training steps after the first two of each run (the compile), without evaluation time.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Base and SLA variant next to each other: a run cut short still holds complete pairs.
SPECS = ("retnet", "sla_retnet", "gla", "sla_gla", "gdn", "sla_gdn")
# About 50M parameters with the 256-byte vocabulary (43M gla, 50M gdn, 57M retnet: the specs' expand_k /
# expand_v differ), head dims 64-128 for K and 128-256 for V.
MODEL = {"hidden_size": 768, "num_layers": 6, "num_heads": 6}
# 128 steps of 16 x 1024 tokens: sized so that all six specs, each with its cold compile, fit in ~8 min.
TRAINING = {"batch_size": 16, "seq_len": 1024, "token_budget": 2_097_152, "lr": 1.5e-3, "eval_every": 32,
            "eval_tokens": 262_144}
CURVE_SMOOTHING = 8  # train-loss points averaged per plotted point


def _spec_path(name: str) -> Path:
    from sla_dsl.codegen import SEED_SPECS_DIR

    path = Path(name)
    if path.exists():
        return path
    seed = SEED_SPECS_DIR / f"{name}.yaml"
    if seed.exists():
        return seed
    raise ValueError(f"--specs: expected a spec file or a seed name ({', '.join(SPECS)}), got {name!r}")


def train_command(spec: Path, args, log_json: Path) -> list[str]:
    command = [sys.executable, "-m", "sla_dsl", "train", "--spec", str(spec), "--log-json", str(log_json),
               "--no-progress", "--backend", args.backend, "--seed", str(args.seed)]
    for name in ("hidden_size", "num_layers", "num_heads", "batch_size", "seq_len", "token_budget", "lr",
                 "eval_every", "eval_tokens"):
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.device:
        command += ["--device", args.device]
    if not args.compile:
        command.append("--no-compile")
    return command


def _run(command: list[str], timeout: float, log) -> tuple[str, int | None, str]:
    """(status, exit code, last lines of output): status ok | failed | timeout."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own group: a timeout ends its compile workers too
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        output, _ = process.communicate()
        status = "timeout"
        output += f"\n[train-bench] killed after {time.perf_counter() - started:.0f} s (timeout {timeout:.0f} s)\n"
    log.write(output)
    log.flush()
    lines = [line for line in output.splitlines() if line.strip()]
    return status, process.returncode, "\n".join(lines[-6:])


def _row(spec_name: str, status: str, returncode, tail: str, run_log: dict | None, wall_s: float) -> dict:
    row = {"spec": spec_name, "status": status, "exit_code": returncode, "wall_s": round(wall_s, 1)}
    if status != "ok":
        row["error"] = tail
    if run_log is None:
        return row
    summary = run_log.get("summary", {})
    train = run_log.get("train", [])
    row.update({
        "parameters": run_log["model"]["parameters"],
        "steps": summary.get("steps", train[-1]["step"] if train else 0),
        "tokens": summary.get("tokens", train[-1]["tokens"] if train else 0),
        "tokens_per_s": summary.get("tokens_per_s"),
        "final_train_loss": summary.get("final_train_loss"),
        "final_eval_loss": summary.get("final_eval_loss", run_log["eval"][-1]["loss"] if run_log["eval"] else None),
        "train_curve": [[e["tokens"], e["loss"]] for e in train],
        "eval_curve": [[e["tokens"], e["loss"]] for e in run_log.get("eval", [])],
    })
    return row


# -- reports ------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _parameters(count: int | None) -> str:
    if not count:
        return "-"
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count:,}"


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| spec | status | parameters | tokens | tokens/s | final train loss | final eval loss | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = _parameters(r.get("parameters"))
        lines.append(f"| {r['spec']} | {r['status']} | {params} | {_fmt(r.get('tokens'), ',')} | "
                     f"{_fmt(r.get('tokens_per_s'), ',.0f')} | {_fmt(r.get('final_train_loss'), '.4f')} | "
                     f"{_fmt(r.get('final_eval_loss'), '.4f')} | {r['wall_s']} |")
    return lines


def write_markdown(results: dict, path: Path) -> None:
    meta = results["meta"]
    versions = meta.get("versions", {})
    corpus = meta.get("corpus") or {}
    config = meta["config"]
    lines = [f"# Training benchmark: {meta['device']}", "",
             f"- date: {meta['date']}",
             f"- device: {meta['device']}",
             "- versions: " + ", ".join(f"{k} {versions.get(k) or 'n/a'}" for k in ("torch", "triton", "sla_dsl", "git"))
             + f", python {meta.get('python', '?')}",
             f"- command: `{meta['command']}`",
             f"- model: hidden {config['hidden_size']}, {config['num_layers']} layers, {config['num_heads']} heads, "
             "byte vocabulary 256 (tied embeddings), SwiGLU MLP, each spec's own layer (expand_k, expand_v, "
             "decay form, short conv, output norm and gate)",
             f"- training: {config['token_budget']:,} tokens per spec ({config['batch_size']} x {config['seq_len']} "
             f"tokens a step), AdamW lr {config['lr']} (warm-up, cosine to lr/10), "
             f"{'bf16 autocast' if meta['device'] != 'cpu' else 'fp32'}, "
             f"backend {config['backend']}, torch.compile(fullgraph=True) {'on' if config['compile'] else 'off'}",
             f"- eval: {config['eval_tokens']:,} held-out tokens every {config['eval_every']} steps and at the end",
             f"- corpus: {corpus.get('name', '?')} (Python {corpus.get('python', '?')}; "
             f"{_fmt(corpus.get('train_tokens'), ',')} train / {_fmt(corpus.get('eval_tokens'), ',')} eval bytes)",
             "- tokens/s: the steps after each run's first two (the compile), without evaluation time",
             f"- wall time: {meta.get('wall_s', '?')} s", ""]
    lines += table_lines(results["runs"])
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    for r in failed:
        lines += ["", f"{r['spec']} ({r['status']}):", "", "```", r.get("error", ""), "```"]
    from sla_dsl.autotune.table import write_atomically

    write_atomically(path, "\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    runs = [r for r in results["runs"] if r.get("train_curve")]
    backbones = sorted({r["spec"].removeprefix("sla_") for r in runs})
    for r in runs:  # one colour per backbone; SLA variants solid, baselines dashed
        color = colors[backbones.index(r["spec"].removeprefix("sla_")) % len(colors)]
        style = "-" if r["spec"].startswith("sla_") else "--"
        curve = r["train_curve"]
        points = [curve[j:j + CURVE_SMOOTHING] for j in range(0, len(curve), CURVE_SMOOTHING)]
        ax.plot([p[-1][0] for p in points], [sum(v for _, v in p) / len(p) for p in points], style, color=color,
                alpha=0.45, linewidth=1, label=f"{r['spec']} train")
        if r.get("eval_curve"):
            ax.plot(*zip(*r["eval_curve"]), style, color=color, marker="o" if style == "-" else "s",
                    linewidth=2, label=f"{r['spec']} eval")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"{results['meta']['device']}: train (mean of {CURVE_SMOOTHING} steps) and eval loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, out: Path) -> None:
    from sla_dsl.autotune.table import write_atomically

    write_atomically(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_markdown(results, out / "results.md")
    try:
        write_plot(results, out / "loss_curves.png")
    except ImportError as exc:
        print(f"loss_curves.png not written ({exc}); run `python -m sla_dsl train-bench --replot {out}` where "
              "matplotlib is installed")


# -- the command --------------------------------------------------------------------------------------------
def run_train_bench(args) -> int:
    if args.replot:
        out = Path(args.replot)
        write_reports(json.loads((out / "results.json").read_text()), out)
        print(f"rewrote {out}/results.md and loss_curves.png")
        return 0
    import platform

    import torch

    from sla_dsl.autotune.table import gpu_name, versions
    from sla_dsl.distributed import default_device

    started = time.perf_counter()
    device = args.device or default_device()
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("train-bench: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    try:
        specs = [_spec_path(name) for name in (args.specs or SPECS)]
    except ValueError as exc:
        print(f"train-bench: {exc}")
        return 2
    out = Path(args.out) if args.out else Path("benchmarks") / (gpu_name() if on_gpu else "cpu") / "training"
    out.mkdir(parents=True, exist_ok=True)
    config = {name: getattr(args, name) for name in ("hidden_size", "num_layers", "num_heads", "batch_size",
                                                     "seq_len", "token_budget", "lr", "eval_every", "eval_tokens",
                                                     "backend", "compile", "seed")}
    results = {"meta": {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(), "command": "python -m sla_dsl " + shlex.join(getattr(args, "argv", None)
                                                                              or sys.argv[1:]),
        "config": config, "corpus": None, "wall_s": None}, "runs": []}
    print(f"train-bench on {results['meta']['device']}: {len(specs)} spec(s), {args.token_budget:,} tokens each, "
          f"hidden {args.hidden_size} x {args.num_layers} layers x {args.num_heads} heads; writing {out}/",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as work, open(out / "train-bench.log", "w") as log:
        for index, spec in enumerate(specs, 1):
            name = spec.stem
            left = args.time_limit - (time.perf_counter() - started)
            slowest = max((r["wall_s"] for r in results["runs"]), default=0.0)
            if left < max(slowest, 30.0):
                row = {"spec": name, "status": "skipped", "exit_code": None, "wall_s": 0.0,
                       "error": f"{left:.0f} s of --time-limit {args.time_limit:.0f} s left, less than the slowest "
                                f"run so far ({slowest:.0f} s)"}
            else:
                log_json = Path(work) / f"{name}.json"
                command = train_command(spec, args, log_json)
                log.write(f"\n===== {name}: {shlex.join(command)}\n")
                log.flush()
                begin = time.perf_counter()
                status, code, tail = _run(command, min(args.timeout_per_spec, left), log)
                run_log = json.loads(log_json.read_text()) if log_json.exists() else None
                row = _row(name, status, code, tail, run_log, time.perf_counter() - begin)
                if run_log is not None and results["meta"]["corpus"] is None:
                    results["meta"]["corpus"] = run_log["corpus"]
            results["runs"].append(row)
            results["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
            write_reports(results, out)
            print(f"[{index}/{len(specs)}] {name}: {row['status']}"
                  + (f", {_parameters(row['parameters'])} parameters, {_fmt(row.get('tokens_per_s'), ',.0f')} "
                     f"tokens/s, eval loss {_fmt(row.get('final_eval_loss'), '.4f')}" if row.get("parameters") else "")
                  + f" ({row['wall_s']} s)" + (f"\n{row['error']}" if row["status"] != "ok" else ""), flush=True)
    print("\n".join(["", *table_lines(results["runs"]), "", f"wrote {out}/results.json, results.md, "
                     f"loss_curves.png, train-bench.log ({results['meta']['wall_s']} s)"]))
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


def add_arguments(parser) -> None:
    import argparse

    add = parser.add_argument
    add("--specs", nargs="*", default=None, metavar="SPEC",
        help=f"seed names or spec files (default: {' '.join(SPECS)})")
    for name, value in {**MODEL, **TRAINING}.items():
        add("--" + name.replace("_", "-"), type=type(value), default=value, help="default %(default)s")
    add("--backend", default="auto", help="kernel backend of every run (default auto: triton on CUDA)")
    add("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    add("--seed", type=int, default=0)
    add("--compile", action=argparse.BooleanOptionalAction, default=True)
    add("--timeout-per-spec", type=float, default=150.0, help="seconds one spec's run may take (default 150)")
    add("--time-limit", type=float, default=540.0,
        help="seconds for the whole benchmark (default 540): a spec that would start too late is skipped")
    add("--out", default=None, help="output folder (default benchmarks/<gpu>/training/)")
    add("--replot", default=None, metavar="DIR", help="only rewrite DIR's results.md and loss_curves.png")
