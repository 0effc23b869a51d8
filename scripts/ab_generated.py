"""A/B of a template change on the GPU, in one process: the generated kernels of a git revision ("base"), run by
that revision's host runtime, against the working tree's ("new"), each at the base's tuned config for the shape, forward and backward timed with
triton.testing.do_bench. What to run before a re-sweep: the working tree's kernels have no table yet (their
source hash changed), and timings from two processes or two device calls differ by more than many changes gain.

    # here: snapshot the base's generated kernels and tuned tables (the GPU machine's .git may be older)
    python scripts/ab_generated.py prepare REV DIR [--backend tilelang|triton]
    # on the GPU, from the repository root:
    python scripts/ab_generated.py run DIR SPEC [SPEC ...] [--shape 4x8192x16x128] \
        [--set KEY=VALUE [KEY=VALUE ...]] [--kernels N]

Before anything runs, `run` reads the working tree's generated TileLang modules of the specs for loops that
`loop_layouts` flags (laid out one thread per row: slow, and a test fails on them) and refuses to time them: a
GPU call spent on such a kernel measures a known pathology (2026-11-25-session23, ab-l2-onchip-1.log).

--set overrides a key of the new kernels' config (e.g. states_num_stages=1), for a setting the base's space did
not have; it applies to both phases that have the key. --kernels N also prints each side's N slowest kernels per
phase: which stages a template change moved. Where the base's table for this GPU has no entry with
the shape's K, V and dtype, each side runs its own defaults: the printout says which.
"""

from __future__ import annotations

import argparse
import functools
import contextlib
import importlib.abc
import importlib.util
import subprocess
import sys
from pathlib import Path

from sla_dsl.codegen import SEED_SPECS_DIR, seed_specs
from sla_dsl.kernel_profile import format_rows, kernel_times

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "generated"
# each backend's host side (allocations, launch order, kernel arguments): a change may move work between stages
RUNTIMES = {"tilelang": "sla_dsl/backends/tilelang/__init__.py", "triton": "sla_dsl/backends/triton/runtime.py"}
# the runtime's own package: its template modules hold host-side constants and predicates (which stages split
# keys, block sizes) that a change edits along with the kernels, so the base runs with its own copies
PACKAGES = {"tilelang": "sla_dsl.backends.tilelang", "triton": "sla_dsl.backends.triton"}


def _git_show(rev: str, path: str) -> str | None:
    found = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True)
    return found.stdout if found.returncode == 0 else None


def prepare(rev: str, out: Path, backend: str) -> None:
    """Writes out/<backend>/<spec>.py (the base's generated kernels), out/<backend>/runtime.py (its host runtime)
    and out/<backend>/tables/<gpu>/<spec>.json (its tuned tables, every GPU that had one) for every seed spec,
    and out/REVISION."""
    if backend not in RUNTIMES:
        raise SystemExit(f"--backend: expected one of {', '.join(RUNTIMES)}, got {backend!r}")
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "autotune/"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f"git ls-tree {rev}: {listed.stderr.strip()}")
    written = 0
    for spec in seed_specs():
        source = _git_show(rev, f"generated/{backend}/{spec.name}.py")
        if source is None:
            continue
        (out / backend).mkdir(parents=True, exist_ok=True)
        (out / backend / f"{spec.name}.py").write_text(source)
        written += 1
        for path in listed.stdout.split():
            parts = Path(path).parts  # autotune/<gpu>/<backend>/<spec>.json
            if len(parts) == 4 and parts[2] == backend and parts[3] == f"{spec.name}.json":
                table = out / backend / "tables" / parts[1] / parts[3]
                table.parent.mkdir(parents=True, exist_ok=True)
                table.write_text(_git_show(rev, path))
    if not written:
        raise SystemExit(f"{rev} has no generated {backend} kernels of the seed specs")
    (out / backend / "runtime.py").write_text(_git_show(rev, RUNTIMES[backend]))
    package_dir = PACKAGES[backend].replace(".", "/")
    package_files = subprocess.run(["git", "ls-tree", "--name-only", rev, f"{package_dir}/"], cwd=REPO,
                                   capture_output=True, text=True).stdout.split()
    (out / backend / "package").mkdir(exist_ok=True)
    for path in package_files:
        if path.endswith(".py") and path != RUNTIMES[backend] and not path.endswith("__init__.py"):
            (out / backend / "package" / Path(path).name).write_text(_git_show(rev, path))
    (out / "REVISION").write_text(subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True,
                                                 text=True).stdout)
    print(f"wrote {written} {backend} module(s) of {rev} and their tables under {out}")


def _load_module(path: Path):
    loader_spec = importlib.util.spec_from_file_location(f"ab_base_{path.stem}", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


class _SnapshotFinder(importlib.abc.MetaPathFinder):
    """Finds `package`'s submodules in a `prepare` snapshot (the base's copies) instead of the working tree."""

    def __init__(self, package: str, folder: Path):
        self.package, self.folder = package, folder

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        source = self.folder / f"{name}.py"
        if parent != self.package or not source.exists():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


@contextlib.contextmanager
def _base_package(backend: str, folder: Path):
    """While loading the base's runtime: its package's submodules resolve to the base's snapshot; afterwards the
    working tree's modules are back in place (the new side imports them as usual)."""
    package_name = PACKAGES[backend]
    package = importlib.import_module(package_name)
    names = [path.stem for path in folder.glob("*.py")] if folder.is_dir() else []
    saved_modules = {name: sys.modules.pop(f"{package_name}.{name}", None) for name in names}
    saved_attributes = {name: package.__dict__.pop(name, None) for name in names}
    finder = _SnapshotFinder(package_name, folder)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in names:
            sys.modules.pop(f"{package_name}.{name}", None)
            package.__dict__.pop(name, None)
            if saved_modules[name] is not None:
                sys.modules[f"{package_name}.{name}"] = saved_modules[name]
            if saved_attributes[name] is not None:
                setattr(package, name, saved_attributes[name])


def _base_kernels(backend: str, runtime, spec, module):
    """The backend object of the base: its host runtime (`runtime`, a loaded runtime.py) running its kernels."""
    if backend == "tilelang":
        kernels = runtime.TileLangKernels(spec)
        kernels.module = module
        return kernels
    return runtime.TritonKernels(spec, module)


def _tuned(base: Path, gpu: str, spec_name: str, shape) -> dict | None:
    """The base table's fwd and bwd configs of the bucket nearest `shape` (none: None)."""
    from sla_dsl.autotune.shapes import Shape, nearest
    from sla_dsl.autotune.table import read_table

    data = read_table(base / "tables" / gpu / f"{spec_name}.json")
    if data is None:
        return None
    entries = data["entries"]
    found = nearest(shape, [Shape.from_key(key) for key in entries])
    return None if found is None else {phase: entries[found.key][phase]["config"] for phase in ("fwd", "bwd")}


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected KEY=VALUE, got {pair!r}")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def row_fragment_problems(backend: str, spec_names: list[str]) -> list[str]:
    """The working tree's generated loops of these specs that `loop_layouts.row_fragment_loops` flags (TileLang
    only: Triton has no such layouts)."""
    if backend != "tilelang":
        return []
    from sla_dsl.backends.tilelang.loop_layouts import row_fragment_loops

    return [f"generated/tilelang/{name}.py {loop}" for name in spec_names
            for loop in row_fragment_loops((GENERATED / "tilelang" / f"{name}.py").read_text())]


def run(base_dir: Path, spec_names: list[str], shape_text: str, sets: dict, kernels_top: int = 0) -> None:
    import torch
    import triton

    from sla_dsl.autotune.shapes import parse_shape
    from sla_dsl.autotune.table import gpu_name
    from sla_dsl.backends import build_backend
    from sla_dsl.loader import load_spec
    from sla_dsl.workloads import realistic_inputs

    backends = [d.name for d in base_dir.iterdir() if d.is_dir()]
    if len(backends) != 1:
        raise SystemExit(f"{base_dir}: expected one backend folder from `prepare`, found {backends}")
    problems = row_fragment_problems(backends[0], spec_names)
    if problems:
        raise SystemExit("run: the working tree's kernels have loops laid out one thread per row "
                         "(sla_dsl/backends/tilelang/loop_layouts.py); not timing them:\n  " + "\n  ".join(problems))
    if not torch.cuda.is_available():
        raise SystemExit("run: needs a GPU")
    backend, shape, gpu = backends[0], parse_shape(shape_text), gpu_name()
    base = base_dir / backend
    with _base_package(backend, base / "package"):
        base_runtime = _load_module(base / "runtime.py")
    revision = (base_dir / "REVISION").read_text().strip()[:12] if (base_dir / "REVISION").exists() else "?"
    print(f"A/B on {gpu}, {backend}, {shape}: base {revision} against the working tree")
    for name in spec_names:
        spec = load_spec(SEED_SPECS_DIR / f"{name}.yaml")
        tuned = _tuned(base, gpu, spec.name, shape)
        inputs = realistic_inputs(spec.recurrence, shape.B, shape.T, shape.H, shape.K, shape.V,
                                  dtype=getattr(torch, shape.dtype))
        args = [inputs.get(key) for key in ("q", "k", "v", "g", "beta", "gq", "gk")]
        do = torch.randn_like(inputs["v"])
        scale = shape.K ** -0.5
        for side in ("base", "new"):
            kernels = (_base_kernels(backend, base_runtime, spec, _load_module(base / f"{spec.name}.py"))
                       if side == "base" else build_backend(backend, spec))
            configs = {}
            for phase in ("fwd", "bwd"):
                # each side's own keys (a change may add or remove a stage), at the base's tuned values
                config = kernels.default_config(shape, phase)
                if tuned:
                    config.update({key: value for key, value in tuned[phase].items() if key in config})
                if side == "new":
                    config.update({key: value for key, value in sets.items() if key in config})
                configs[phase] = config
            # bound now (a closure would time the last loop iteration's kernels)
            forward = functools.partial(kernels.forward, *args, None, None, scale, False, config=configs["fwd"])
            backward = functools.partial(kernels.backward, *args, None, None, scale, do, None,
                                         config=configs["bwd"])
            forward(), backward()
            torch.cuda.synchronize()
            fwd_ms = triton.testing.do_bench(forward, warmup=50, rep=300)
            bwd_ms = triton.testing.do_bench(backward, warmup=50, rep=300)
            where = "base's tuned config" if tuned else "defaults: no base table entry for this GPU and shape"
            print(f"{spec.name:12s} {side:4s}: fwd {fwd_ms:.3f} ms  bwd {bwd_ms:.3f} ms  fwd+bwd {fwd_ms + bwd_ms:.3f} ms"
                  f"  [{where}]", flush=True)
            if kernels_top:
                for phase, call in (("fwd", forward), ("bwd", backward)):
                    print(f"  {phase} per kernel:\n{format_rows(kernel_times(call), kernels_top)}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="snapshot a revision's generated kernels and tables into DIR")
    p.add_argument("rev")
    p.add_argument("dir", type=Path)
    p.add_argument("--backend", default="tilelang")
    r = sub.add_parser("run", help="time DIR's kernels against the working tree's (GPU)")
    r.add_argument("dir", type=Path)
    r.add_argument("specs", nargs="+", help="seed spec names")
    r.add_argument("--shape", default="4x8192x16x128")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="one or more KEY=VALUE (the flag may also repeat)")
    r.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also print each side's N slowest kernels per phase (torch profiler)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.rev, args.dir, args.backend)
    else:
        run(args.dir, args.specs, args.shape, _parse_sets(args.set), args.kernels)


if __name__ == "__main__":
    main(sys.argv[1:])
