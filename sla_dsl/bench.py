"""`python -m sla_dsl bench`: our kernels against flash-linear-attention (fla) and torch's causal SDPA.

Everything runs in one process on the GPU: for every shape and spec, fla's op doing the same work (see
`sla_dsl.workloads.fla_equivalent`), each of our backends, and SDPA, forward and forward+backward, median
ms by `triton.testing.do_bench`. Every callable runs once (compilation, fla's autotuning, our table lookup)
before it is timed. A failure becomes a row with an error; it never stops the run.

Writes `<out>/bench.json` (rows), `bench.md` (table + environment + command) and `bench.png`.
`bench --merge DIR...` writes the same three files from several runs' folders (`merge_runs`, no GPU).
Speed-ups: `FLA_CACHE_RESULTS=1` (set by default here) with a persisted `TRITON_CACHE_DIR` lets fla skip
its autotuning on later runs; TILELANG_CACHE_DIR does the same for TileLang builds.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

ROW_KEYS = ("spec", "backend", "B", "T", "H", "K", "V", "dtype", "phase", "ms", "baseline", "baseline_ms")
PHASES = ("fwd", "fwdbwd")
SDPA_SPEC = "causal_softmax_attention"
REFERENCE_SHAPE = (4, 8192, 16, 128)


# ---------------------------------------------------------------------------------------------------------
# Rows and writers (no GPU needed)

def make_row(spec: str, backend: str, shape, phase: str, ms: float | None, *, baseline: str = "none",
             baseline_ms: float | None = None, **extra) -> dict:
    """shape: an object with B, T, H, K, V, dtype (a `Shape`) or a tuple (B, T, H, K, V, dtype)."""
    if isinstance(shape, tuple):
        b, t, h, k, v, dtype = shape
    else:
        b, t, h, k, v, dtype = shape.B, shape.T, shape.H, shape.K, shape.V, shape.dtype
    row = {"spec": spec, "backend": backend, "B": b, "T": t, "H": h, "K": k, "V": v, "dtype": dtype,
           "phase": phase, "ms": _round(ms), "baseline": baseline, "baseline_ms": _round(baseline_ms)}
    row.update({key: value for key, value in extra.items() if value is not None})
    return row


def _round(ms):
    return None if ms is None or not math.isfinite(ms) else round(float(ms), 5)


def write_json(rows: list[dict], path: Path) -> None:
    from sla_dsl.autotune.table import write_atomically

    write_atomically(Path(path), json.dumps(rows, indent=1, sort_keys=True, allow_nan=False) + "\n")


def _fmt(ms) -> str:
    return "-" if ms is None else f"{ms:.3f}"


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def table_lines(rows: list[dict]) -> list[str]:
    """Markdown table: one line per row of ours (and fla's rows where none of ours exists), with fla's time,
    ours/fla (below 1: we are faster) and SDPA's time for the same shape and phase."""
    sdpa = {(r["B"], r["T"], r["H"], r["K"], r["V"], r["dtype"], r["phase"]): r.get("ms")
            for r in rows if r["backend"] == "sdpa"}
    ours = [r for r in rows if r["backend"] not in ("fla", "sdpa")]
    have = {(r["spec"], r["B"], r["T"], r["H"], r["K"], r["phase"]) for r in ours}
    shown = ours + [r for r in rows if r["backend"] == "fla"
                    and (r["spec"], r["B"], r["T"], r["H"], r["K"], r["phase"]) not in have]
    shown.sort(key=lambda r: (r["T"], r["B"], r["K"], r["spec"], r["phase"], r["backend"]))
    lines = ["| spec | backend | B x T x H x K x V | phase | ms | fla ms | ours / fla | SDPA ms | notes |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in shown:
        key = (r["B"], r["T"], r["H"], r["K"], r["V"], r["dtype"], r["phase"])
        fla_ms = r["baseline_ms"] if r.get("baseline") == "fla" else (r["ms"] if r["backend"] == "fla" else None)
        notes = "; ".join(x for x in (r.get("error") and f"ERROR: {r['error']}", r.get("tuning"),
                                      r.get("baseline_op") and f"fla op {r['baseline_op']}",
                                      r.get("baseline_note"), r.get("baseline_error") and
                                      f"fla error: {r['baseline_error']}") if x)
        ratio = _ratio(r["ms"], fla_ms) if r["backend"] != "fla" else "-"
        lines.append(f"| {r['spec']} | {r['backend']} | {r['B']}x{r['T']}x{r['H']}x{r['K']}x{r['V']} | "
                     f"{r['phase']} | {_fmt(r['ms'])} | {_fmt(fla_ms)} | {ratio} | {_fmt(sdpa.get(key))} | "
                     f"{notes.replace('|', '/')} |")
    return lines


def _run_lines(meta: dict) -> list[str]:
    """The date, versions, command, timing settings and wall time of one run, as bullets of bench.md."""
    versions = meta.get("versions", {})
    return [f"- date: {meta.get('date', '?')}",
            "- versions: " + ", ".join(f"{k} {versions.get(k) or 'n/a'}"
                                       for k in ("torch", "triton", "tilelang", "fla", "sla_dsl", "git")),
            f"- command: `{meta.get('command', '?')}`",
            f"- timing: median of `triton.testing.do_bench` (warmup {meta.get('warmup_ms', '?')} ms, rep "
            f"{meta.get('rep_ms', '?')} ms); compilation, fla's autotuning and table lookups happen before timing",
            f"- wall time: {meta.get('wall_s', '?')} s"
            + ("" if meta.get("complete", True) else " (incomplete: the run stopped before its last spec)")]


def write_markdown(rows: list[dict], path: Path, meta: dict) -> None:
    """meta: one run's (_meta), or {"device", "command", "runs": {folder: the lines _run_lines wrote}} for a
    merge."""
    from sla_dsl.autotune.table import write_atomically

    if "runs" in meta:
        runs = [f"- merged by `{meta['command']}` from {len(meta['runs'])} runs; each row comes from one run, "
                "timed there side by side with its fla row:"]
        for folder, lines in meta["runs"].items():
            runs += [f"  - `{folder}`:"] + [f"    {line}" for line in lines]
        runs += baseline_spread(rows)
    else:
        runs = _run_lines(meta)
    head = [f"# sla-dsl benchmark: {meta.get('device', '?')}", "",
            f"- device: {meta.get('device', '?')}", *runs,
            "- fwd: forward under no_grad; fwdbwd: forward + backward of o against a fixed random gradient",
            "- fla: the backbone's fla op doing the same work; what fla cannot fuse (the SLA gates, the silu "
            "feature map, the l2 norm when gates follow it) runs in torch around it and is timed with it "
            "(see notes). SDPA: `F.scaled_dot_product_attention(is_causal=True)` on [B, H, T, D].", ""]
    write_atomically(Path(path), "\n".join(head + table_lines(rows)) + "\n")


# fla's times for one workload, as the merged runs measured them, that differ by more than this factor
BASELINE_SPREAD = 1.2


def baseline_spread(rows: list[dict]) -> list[str]:
    """Bullets for a merged bench.md: each workload (spec, shape, dtype, phase) whose fla rows, from different
    runs, differ by more than BASELINE_SPREAD. Each ratio is honest within its own run, but comparing the two
    backends' ratios on that row compares runs as much as backends."""
    fla: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get("baseline") == "fla" and row.get("baseline_ms"):
            key = tuple(row[k] for k in _ROW_IDENTITY if k != "backend")
            fla.setdefault(key, []).append(row["baseline_ms"])
    spread = [(key, min(times), max(times)) for key, times in sorted(fla.items(), key=str)
              if max(times) > BASELINE_SPREAD * min(times)]
    if not spread:
        return []
    return ([f"- fla's time for the same workload differs between the merged runs by more than "
             f"{BASELINE_SPREAD:g}x on {len(spread)} row(s) (their backends' ratios come from different runs):"]
            + [f"  - {spec} {b}x{t}x{h}x{k}x{v} {dtype} {phase}: fla {low:.3f} to {high:.3f} ms"
               for (spec, b, t, h, k, v, dtype, phase), low, high in spread])


def write_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Time against T for each backbone (columns) and phase (rows): ours per backend (SLA variants dashed),
    fla, SDPA. Log-log axes; the shapes' B, H, K are in the tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = sorted({r.get("backbone", r["spec"]) for r in rows if r["backend"] != "sdpa"}) or ["-"]
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)] or ["fwd"]
    fig, axes = plt.subplots(len(phases), len(backbones), figsize=(5 * len(backbones), 3.8 * len(phases)),
                             squeeze=False)
    for i, phase in enumerate(phases):
        for j, backbone in enumerate(backbones):
            ax = axes[i][j]
            series: dict[str, list] = {}
            for r in rows:
                if r["phase"] != phase or r.get("ms") is None:
                    continue
                if r["backend"] == "sdpa":
                    label = "SDPA causal"
                elif r.get("backbone", r["spec"]) == backbone:
                    label = "fla" + (f" ({r['spec']})" if r["spec"] != backbone else "") \
                        if r["backend"] == "fla" else f"{r['spec']} {r['backend']}"
                else:
                    continue
                series.setdefault(label, []).append(r)
            ticks = {}
            for label, points in sorted(series.items()):
                points.sort(key=lambda r: (r["T"], r["B"]))
                xs, ys = [p["T"] for p in points], [p["ms"] for p in points]
                for p in points:
                    ticks[p["T"]] = f"{p['T']}\nB{p['B']} H{p['H']} K{p['K']}"
                style = dict(marker="o")
                if label.startswith("SDPA"):
                    style.update(color="gray", linestyle=":")
                elif label.startswith("fla"):
                    style.update(color="black", linestyle="-." if "(" in label else "-")
                elif label.startswith("sla_"):
                    style.update(linestyle="--")
                ax.plot(xs, ys, label=label, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if ticks:
                ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)], fontsize=7)
                ax.minorticks_off()
            ax.set_title(f"{backbone} {phase}")
            ax.set_xlabel("T")
            ax.set_ylabel("ms (median)")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    os.replace(temporary, path)


def write_all(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    write_json(rows, paths[0])
    write_markdown(rows, paths[1], meta)
    try:
        write_plot(rows, paths[2], title=f"{meta.get('device', '')} {meta.get('date', '')}")
    except Exception as exc:  # noqa: BLE001 -- the numbers matter more than the picture
        print(f"bench: plot failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        paths.pop()
    return paths


_RUN_BULLETS = ("- date: ", "- versions: ", "- command: ", "- timing: ", "- wall time: ")
_ROW_IDENTITY = ("spec", "backend", "B", "T", "H", "K", "V", "dtype", "phase")


def merge_runs(folders: list[str], out: Path, command: str) -> list[Path]:
    """bench.json, bench.md and bench.png in `out` from the folders of several runs (one benchmark split over
    calls with a time limit, e.g. one shape per call). A folder given as DIR:SPEC,SPEC contributes those specs'
    rows only (SDPA's spec is causal_softmax_attention). A row is identified by spec, backend, shape, dtype and
    phase; a later folder's row replaces an earlier one's. Rows keep the times and fla baselines their own run
    measured side by side; bench.md lists each run's date, versions, command and wall time."""
    rows: dict[tuple, dict] = {}
    runs: dict[str, list[str]] = {}
    device = "?"
    for given in map(str, folders):
        name, _, only = given.partition(":")
        folder, specs = Path(name), set(filter(None, only.split(",")))
        table, notes = folder / "bench.json", folder / "bench.md"
        if not table.is_file():
            raise FileNotFoundError(f"--merge: {folder} has no bench.json (a folder `bench --out` wrote)")
        for row in json.loads(table.read_text()):
            if not specs or row["spec"] in specs:
                rows[tuple(row.get(key) for key in _ROW_IDENTITY)] = row
        lines = notes.read_text().splitlines() if notes.is_file() else []
        device = next((line.split(": ", 1)[1] for line in lines if line.startswith("# sla-dsl benchmark: ")), device)
        runs[given] = [line for line in lines if line.startswith(_RUN_BULLETS)] or ["- (no bench.md)"]
    return write_all(list(rows.values()), out, {"device": device, "command": command, "runs": runs})


# ---------------------------------------------------------------------------------------------------------
# Timing (GPU)

def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


class Timer:
    def __init__(self, warmup_ms: float, rep_ms: float, device: str = "cuda"):
        self.warmup_ms, self.rep_ms, self.device = warmup_ms, rep_ms, device

    def __call__(self, forward, phase: str, leaves, out_grad) -> float:
        """Median ms of forward() (phase fwd, under no_grad) or forward().backward(out_grad) (fwdbwd)."""
        import torch
        import triton.testing

        if phase == "fwd":
            def run():
                with torch.no_grad():
                    forward()
        else:
            def run():
                forward().backward(out_grad)
        run()  # compilation, autotuning and table lookups: outside the timed region
        for t in leaves:
            t.grad = None
        if self.device != "cuda":  # CPU smoke runs: a plain median of a few runs
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
                for t in leaves:
                    t.grad = None
            return sorted(times)[1]
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(run, warmup=self.warmup_ms, rep=self.rep_ms,
                                             grad_to_none=list(leaves) or None, return_mode="median"))


def _measure(timer, forward, phase, leaves, out_grad):
    """(ms, None) or (None, error text)."""
    import torch

    try:
        return timer(forward, phase, leaves, out_grad), None
    except Exception as exc:  # noqa: BLE001 -- a failure is a row, never the end of the run
        if os.environ.get("SLA_DSL_BENCH_TRACEBACK"):
            traceback.print_exc()
        return None, _error_text(exc)
    finally:
        for t in leaves:
            t.grad = None
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 -- a dead context shows in the next rows' errors
            pass


def run_bench(args) -> int:
    if args.merge:
        if not args.out:
            print("--merge needs --out (the folder to write)")
            return 2
        command = "python -m sla_dsl " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
        try:
            paths = merge_runs(args.merge, Path(args.out), command)
        except (OSError, ValueError, KeyError) as exc:  # a missing folder, a bench.json of another format
            print(f"bench --merge: {type(exc).__name__}: {exc}")
            return 2
        print("wrote " + ", ".join(map(str, paths)))
        return 0
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench needs a CUDA GPU (torch.cuda.is_available() is False); run it on the GPU machine.")
        return 2
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")
    import sla_dsl
    from sla_dsl.autotune.runner import TORCH_DTYPES, resolve_specs
    from sla_dsl.autotune.shapes import Shape, parse_shapes
    from sla_dsl.autotune.table import describe, forced_gpu, gpu_name
    from sla_dsl.workloads import backbone_name, fla_equivalent, realistic_inputs, sdpa, sdpa_inputs

    started = time.time()
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    gpu = gpu_name() if device == "cuda" else "cpu"
    out = Path(args.out) if args.out else Path("benchmarks") / gpu
    if args.quick:
        b, t, h, k = REFERENCE_SHAPE
        shapes = [Shape(b, t, h, k, k, args.dtype)]
    else:
        shapes = parse_shapes(args.shapes, args.dtype)
    specs = resolve_specs(args.specs)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    for phase in phases:
        if phase not in PHASES:
            print(f"--phases: expected fwd and/or fwdbwd, got {phase!r}")
            return 2
    timer = Timer(args.warmup_ms, args.rep_ms, device)
    rows: list[dict] = []
    command = "python -m sla_dsl " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    print(f"bench on {device_name}: {len(specs)} spec(s) x {len(shapes)} shape(s) x {len(phases)} phase(s); "
          f"backends {', '.join(backends)}; fla {'off' if args.no_fla else 'on'}; "
          f"SDPA {'off' if args.no_sdpa else 'on'}", flush=True)
    # the tables our kernels read (sla_dsl.autotune.lookup): the running GPU's, or $SLA_DSL_AUTOTUNE_GPU's,
    # the only ones a CPU run reads
    table_gpu = forced_gpu() or (gpu if device == "cuda" else None)
    ops = {}
    for spec in specs:
        for backend in backends:
            try:
                ops[(spec.name, backend)] = (sla_dsl.compile(spec, backend), None,
                                             describe(spec, backend, table_gpu) if table_gpu else None)
            except Exception as exc:  # noqa: BLE001
                ops[(spec.name, backend)] = (None, _error_text(exc), None)

    if device == "cuda":
        from sla_dsl.autotune.precompile import compile_ahead

        kernel_phases = ["fwd"] + (["bwd"] if "fwdbwd" in phases else [])
        failures = compile_ahead([(backend, spec, shape, phase) for spec in specs for backend in backends
                                  if ops[(spec.name, backend)][0] is not None
                                  for shape in shapes for phase in kernel_phases])
        for line in failures:
            print(f"  compile ahead failed: {line}", file=sys.stderr, flush=True)

    for shape in shapes:
        dtype = TORCH_DTYPES[shape.dtype]
        sdpa_ms = {}
        if not args.no_sdpa:
            try:
                q, k, v = sdpa_inputs(shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype, device=device,
                                      requires_grad=True)
                grad = torch.randn(shape.B, shape.H, shape.T, shape.V, device=device, dtype=dtype)
            except Exception as exc:  # noqa: BLE001
                q = k = v = grad = None
                error = _error_text(exc)
            for phase in phases:
                if q is None:
                    ms = None
                else:
                    ms, error = _measure(timer, lambda: sdpa(q, k, v), phase, (q, k, v), grad)
                sdpa_ms[phase] = ms
                rows.append(make_row(SDPA_SPEC, "sdpa", shape, phase, ms, error=error, backbone="sdpa"))
                _progress(rows[-1])
            del q, k, v, grad
        for spec in specs:
            rec = spec.recurrence
            backbone = backbone_name(rec)
            backbone = {"simple_gla": "gla_scalar"}.get(backbone, backbone)
            try:
                args_in = realistic_inputs(rec, shape.B, shape.T, shape.H, shape.K, shape.V, dtype=dtype,
                                           device=device, requires_grad=True)
                grad = torch.randn(shape.B, shape.T, shape.H, shape.V, device=device, dtype=dtype)
            except Exception as exc:  # noqa: BLE001
                for phase in phases:
                    for backend in backends:
                        rows.append(make_row(spec.name, backend, shape, phase, None, error=_error_text(exc),
                                             backbone=backbone))
                continue
            leaves = tuple(args_in.values())
            fla = {phase: (None, None) for phase in phases}
            fla_op = fla_note = fla_error = None
            if not args.no_fla:
                try:
                    found = fla_equivalent(rec, shape.H)
                except Exception as exc:  # noqa: BLE001 -- e.g. fla not installed
                    found, fla_error = None, _error_text(exc)
                else:
                    if found is None:
                        fla_error = "fla has no op for this recurrence"
                if found is not None:
                    fla_op, fla_fn, fla_note = found
                    for phase in phases:
                        fla[phase] = _measure(timer, lambda: fla_fn(**args_in), phase, leaves, grad)
                        rows.append(make_row(spec.name, "fla", shape, phase, fla[phase][0], error=fla[phase][1],
                                             baseline_op=fla_op, baseline_note=fla_note or None,
                                             backbone=backbone))
                        _progress(rows[-1])
            for backend in backends:
                op, build_error, tuning = ops[(spec.name, backend)]
                for phase in phases:
                    if op is None:
                        ms, error = None, build_error
                    else:
                        ms, error = _measure(timer, lambda: op(**args_in)[0], phase, leaves, grad)
                    fla_ms, fla_err = fla[phase]
                    if fla_op is not None:
                        baseline, baseline_ms = "fla", fla_ms
                    elif sdpa_ms.get(phase) is not None:
                        baseline, baseline_ms = "sdpa", sdpa_ms[phase]
                    else:
                        baseline, baseline_ms = "none", None
                    rows.append(make_row(spec.name, backend, shape, phase, ms, baseline=baseline,
                                         baseline_ms=baseline_ms, error=error, tuning=tuning,
                                         baseline_op=fla_op, baseline_note=fla_note or None,
                                         baseline_error=fla_err or fla_error, sdpa_ms=_round(sdpa_ms.get(phase)),
                                         backbone=backbone))
                    _progress(rows[-1])
            del args_in, leaves, grad
            if device == "cuda":
                torch.cuda.empty_cache()
            # after every spec, so that a run stopped by a time limit still leaves what it measured
            paths = write_all(rows, out, _meta(device_name, command, args, started, complete=False))

    meta = _meta(device_name, command, args, started, complete=True)
    paths = write_all(rows, out, meta)
    print("\n".join(table_lines(rows)))
    errors = sum(1 for r in rows if r.get("error"))
    print(f"\n{len(rows)} rows ({errors} with errors) in {meta['wall_s']} s; wrote " + ", ".join(map(str, paths)))
    return 0 if any(r.get("ms") is not None for r in rows) else 1


def _meta(device_name: str, command: str, args, started: float, complete: bool) -> dict:
    from sla_dsl.autotune.table import versions

    return {"device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), "versions": versions(), "command": command, "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms, "wall_s": round(time.time() - started, 1), "complete": complete}


def _progress(row: dict) -> None:
    what = f"{row['ms']:.3f} ms" if row.get("ms") is not None else f"ERROR {row.get('error')}"
    extra = f" (fla {row['baseline_ms']:.3f} ms)" if row.get("baseline") == "fla" and row.get("baseline_ms") else ""
    print(f"  {row['spec']:>24} {row['backend']:>8} {row['B']}x{row['T']}x{row['H']}x{row['K']} "
          f"{row['phase']:>6}: {what}{extra}", file=sys.stderr, flush=True)


def add_arguments(parser) -> None:
    parser.add_argument("--backends", default="triton,tilelang", help="comma-separated (default triton,tilelang)")
    parser.add_argument("--specs", nargs="*", default=None, metavar="PATH|NAME",
                        help="spec files or seed names (default: every seed spec)")
    parser.add_argument("--shapes", default=None, metavar="BxTxHxK[xV],...",
                        help="default 4x8192x16x128,8x2048x16x64,1x32768x16x128")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--phases", default="fwd,fwdbwd", help="fwd and/or fwdbwd (default both)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/<gpu>/)")
    parser.add_argument("--quick", action="store_true", help="one shape: 4x8192x16x128")
    parser.add_argument("--no-fla", action="store_true", help="leave out flash-linear-attention")
    parser.add_argument("--no-sdpa", action="store_true", help="leave out torch SDPA")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of the harness (e.g. with --backends reference); no real timings")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR[:SPEC,...]",
                        help="time nothing: write --out's bench.json, .md and .png from these runs' folders (a "
                             "later folder's row replaces an earlier one's; :SPEC,... takes those specs' rows only)")
