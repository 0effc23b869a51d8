"""Tuned tables: `autotune/<GPU>/<backend>/<spec>.json`, written by `python -m sla_dsl autotune`, read at
call time by `lookup()` (never benchmarks; every file is read once per process and cached).

File format (keys sorted, indent 1):

    {"format": 1, "spec": "gla", "spec_sha256": ..., "backend": "triton", "gpu": "NVIDIA_H100_80GB_HBM3",
     "source_sha256": <sha256 of the generated kernel source>,
     "phase_source_sha256": {"fwd": <sha256 of the source the forward runs>, "bwd": ...},
     "versions": {"torch": ..., "triton": ...,
     "tilelang": ..., "sla_dsl": ..., "git": ...}, "date": "2025-...Z",
     "entries": {"B4_T8192_H16_K128_V128_bfloat16": {"shape": {...},
                 "fwd": {"config": {...}, "ms": 1.23, "default_ms": 1.50, "tried": 40, "verified": {...}},
                 "bwd": {...}}},
     "superseded_entries": {...}}   (optional: the same form; see update_table)

A table whose source hash differs from the current generated kernels is ignored (one warning), but for the
phases whose own source hash still matches (a change to backward kernels only keeps the forward's configs); a
corrupt or
truncated file gives one warning and defaults; a GPU without tables gives one warning naming the command
that tunes it. Writers take a lock file, merge with what is there, and replace the file atomically.
`$SLA_DSL_AUTOTUNE_GPU` names the GPU directory lookups read instead of the running GPU's.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import threading
import tokenize
import warnings
from pathlib import Path

from sla_dsl.autotune.shapes import Shape, nearest

FORMAT = 1
PHASES = ("fwd", "bwd")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


class AutotuneWarning(UserWarning):
    """A tuned table is missing, stale or unreadable: the kernels run with their default configs."""


def table_root() -> Path:
    """`$SLA_DSL_AUTOTUNE_DIR`, else the repository's autotune/."""
    return Path(os.environ.get("SLA_DSL_AUTOTUNE_DIR") or REPO_ROOT / "autotune")


def forced_gpu() -> str | None:
    """`$SLA_DSL_AUTOTUNE_GPU`: read the tables of this GPU directory instead of the running GPU's (another
    GPU's tables, or the `cpu` tables of a `--device cpu` sweep, where lookups otherwise do nothing)."""
    return os.environ.get("SLA_DSL_AUTOTUNE_GPU") or None


def lookups_enabled() -> bool:
    """SLA_DSL_AUTOTUNE=0 turns lookups off (defaults everywhere), e.g. to benchmark the heuristics."""
    return os.environ.get("SLA_DSL_AUTOTUNE", "1") not in ("0", "false", "off", "no")


def sanitize_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (spaces to underscores; '/' and the like too)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.strip().replace(" ", "_")) or "unknown_gpu"


_gpu_names: dict[int, str] = {}


def gpu_name(device=None) -> str:
    """The running GPU's directory name (torch.cuda.get_device_name with spaces to underscores)."""
    import torch

    if isinstance(device, int):
        index = device
    elif device is not None and getattr(device, "index", None) is not None:
        index = device.index
    else:
        index = torch.cuda.current_device()
    if index not in _gpu_names:
        _gpu_names[index] = sanitize_gpu_name(torch.cuda.get_device_name(index))
    return _gpu_names[index]


def table_path(gpu: str, backend: str, spec_name: str, root: Path | None = None) -> Path:
    return (root or table_root()) / gpu / backend / f"{spec_name}.json"


_source_hashes: dict[tuple[str, str, str], dict] = {}


def source_digest(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return digest.hexdigest()


def without_functions(text: str, names: set[str]) -> str:
    """Python source `text` without its top-level functions named in `names` (decorators included)."""
    lines = text.splitlines(keepends=True)
    dropped = set()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            dropped.update(range(first - 1, node.end_lineno))
    return "".join(line for number, line in enumerate(lines) if number not in dropped)


# The top-level assignment of a generated file that lists each phase's kernels (the TileLang backend's `PHASES`)
PHASE_LIST = "PHASES"


def with_one_phase_listed(text: str, phase: str, own: tuple[str, ...]) -> str:
    """Python source `text` with its top-level PHASE_LIST assignment, if any, listing `phase`'s kernels only: what
    the other phases run is no part of this one (a backward stage added leaves the forward's tuning valid)."""
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [PHASE_LIST]:
            listed = f"{PHASE_LIST} = {{{phase!r}: {tuple(own)!r}}}\n"
            return "".join(lines[:node.lineno - 1]) + listed + "".join(lines[node.end_lineno:])
    return text


def code_only(text: str) -> str:
    """Python source `text` without comments, docstrings, trailing spaces or blank lines: what it computes, whatever
    its documentation says (a generated file's can change and leave its tuning valid). Text, not a dump of the
    syntax tree, whose form changes between Python versions: a table written on one must stay valid on another."""
    docstrings = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    comment_at = {token.start[0]: token.start[1] for token in tokenize.generate_tokens(io.StringIO(text).readline)
                  if token.type == tokenize.COMMENT}
    kept = (line[:comment_at.get(number, len(line))].rstrip()
            for number, line in enumerate(text.splitlines(), 1) if number not in docstrings)
    return "\n".join(line for line in kept if line)


def phase_digests(files: dict[str, str], kernels: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Per phase, the sha256 of the code (code_only) of the generated files without the kernels only other phases
    run (`kernels`: the generator's phase_kernels) and with only this phase's entry of their list of kernels
    (with_one_phase_listed). Helpers the phases share count for every phase."""
    every = set().union(*kernels.values())
    return {phase: source_digest({name: code_only(with_one_phase_listed(without_functions(text, every - set(own)),
                                                                         phase, own))
                                  for name, text in files.items()})
            for phase, own in kernels.items()}


def _hashes(spec, backend: str) -> dict:
    key = (backend, spec.name, spec.source_sha256)
    if key not in _source_hashes:
        from sla_dsl.codegen import generator

        files = generator(backend).generate(spec)
        _source_hashes[key] = {"all": source_digest(files),
                               "phases": phase_digests(files, generator(backend).phase_kernels(spec))}
    return _source_hashes[key]


def source_hash(spec, backend: str) -> str:
    """sha256 of the generated source of `spec` for `backend` (every generated file, by name)."""
    return _hashes(spec, backend)["all"]


def phase_source_hashes(spec, backend: str) -> dict[str, str]:
    """Per phase, the sha256 of the generated source that phase runs (phase_digests)."""
    return dict(_hashes(spec, backend)["phases"])


def matching_phases(data: dict, source_sha256: str, phase_source_sha256: dict[str, str] | None) -> tuple[str, ...]:
    """The phases of table `data` tuned for the kernels with these hashes: all of them when its source hash is
    `source_sha256`, else those whose phase source hash matches (a template change that left their kernels as
    they were)."""
    if data["source_sha256"] == source_sha256:
        return PHASES
    stored, current = data.get("phase_source_sha256") or {}, phase_source_sha256 or {}
    return tuple(phase for phase in PHASES if stored.get(phase) is not None and stored.get(phase) == current.get(phase))


def valid_phases(data: dict, spec, backend: str) -> tuple[str, ...]:
    """The phases of a table tuned for the kernels generated now (matching_phases)."""
    if data["spec"] != spec.name or data["backend"] != backend:
        return ()
    return matching_phases(data, source_hash(spec, backend), phase_source_hashes(spec, backend))


def versions() -> dict[str, str | None]:
    """Versions recorded with a table (read from package metadata: nothing heavy is imported)."""
    from importlib import metadata

    found = {}
    for key, dist in (("torch", "torch"), ("triton", "triton"), ("tilelang", "tilelang"),
                      ("sla_dsl", "sla-dsl"), ("fla", "flash-linear-attention")):
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[key] = None
    found["git"] = git_revision(REPO_ROOT)
    return found


def git_revision(root: Path) -> str | None:
    """HEAD of the checkout at `root`, with "+dirty" when tracked files differ from it (a copy of a working tree
    carried to another machine keeps whatever .git it finds there, so HEAD alone may name an older commit)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = head and git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------
# Reading

class TableError(ValueError):
    pass


def _check_config(config, where: str) -> None:
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise TableError(f"{where}: config is not an object")
    for name, value in config.items():
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise TableError(f"{where}: config value {name!r} is not a number, string or bool")


def parse_table(text: str) -> dict:
    """The table in `text`, checked; raises TableError (or json.JSONDecodeError) when malformed."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise TableError("top level is not an object")
    if data.get("format") != FORMAT:
        raise TableError(f"format {data.get('format')!r}, expected {FORMAT}")
    for key in ("spec", "backend", "source_sha256"):
        if not isinstance(data.get(key), str):
            raise TableError(f"missing {key!r}")
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise TableError("missing 'entries'")
    phase_hashes = data.get("phase_source_sha256", {})
    if not isinstance(phase_hashes, dict) or not all(isinstance(v, str) for v in phase_hashes.values()):
        raise TableError("'phase_source_sha256' is not an object of strings")
    superseded = data.get("superseded_entries", {})
    if not isinstance(superseded, dict):
        raise TableError("'superseded_entries' is not an object")
    for key, entry in [*entries.items(), *superseded.items()]:
        try:
            Shape.from_key(key)
        except ValueError as exc:
            raise TableError(str(exc)) from None
        if not isinstance(entry, dict):
            raise TableError(f"entry {key}: not an object")
        for phase in PHASES:
            if phase in entry:
                if not isinstance(entry[phase], dict) or "config" not in entry[phase]:
                    raise TableError(f"entry {key}.{phase}: no config")
                _check_config(entry[phase]["config"], f"entry {key}.{phase}")
    return data


def read_table(path: Path) -> dict | None:
    """The parsed table at `path`; None when absent. Raises TableError / JSONDecodeError / OSError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_table(text)


def readable_table(path: Path) -> dict | None:
    """The parsed table at `path`; None when absent, unreadable or corrupt (for writers and seeds, which
    replace or skip such a table; lookups warn about it)."""
    try:
        return read_table(path)
    except (OSError, ValueError):  # JSONDecodeError is a ValueError, as is TableError
        return None


class _Loaded:
    """One table file as lookup() uses it: buckets per phase, or nothing (missing/stale/corrupt)."""

    def __init__(self, data: dict | None, phases: tuple[str, ...] = PHASES):
        self.data = data
        self.buckets = {phase: {} for phase in PHASES}
        for key, entry in (data or {}).get("entries", {}).items():
            for phase in phases:
                if phase in entry:
                    self.buckets[phase][Shape.from_key(key)] = entry[phase]["config"]
        self.resolved: dict[tuple[str, Shape], dict | None] = {}


_lock = threading.Lock()
_tables: dict[Path, _Loaded] = {}
_warned: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, AutotuneWarning, stacklevel=4)


def tune_command(spec, backend: str) -> str:
    path = getattr(spec, "source_path", None) or f"specs/{spec.name}.yaml"
    try:
        path = Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        pass
    return f"python -m sla_dsl autotune --spec {path} --backend {backend}"


def _load(spec, backend: str, gpu: str, root: Path) -> _Loaded:
    path = table_path(gpu, backend, spec.name, root)
    if path in _tables:
        return _tables[path]
    data, phases = None, PHASES
    try:
        data = read_table(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError, as is TableError
        _warn_once(("corrupt", path), f"sla_dsl: ignoring the unreadable tuned table {path} "
                   f"({type(exc).__name__}: {exc}); using default configs. Re-create it with "
                   f"`{tune_command(spec, backend)}`.")
        data = None
    else:
        if data is None:
            if not (root / gpu).is_dir():
                _warn_once(("no-gpu", root, gpu), f"sla_dsl: no tuned tables for GPU {gpu} under {root}; "
                           f"using default configs. Tune this GPU with `{tune_command(spec, backend)}` "
                           f"(or `python -m sla_dsl autotune --backend all` for every seed spec).")
            else:
                _warn_once(("no-table", path), f"sla_dsl: no tuned table {path}; using default configs. "
                           f"Tune it with `{tune_command(spec, backend)}`.")
        else:
            try:
                current, phases = source_hash(spec, backend), valid_phases(data, spec, backend)
            except Exception as exc:  # noqa: BLE001 -- a generator that fails must not break the call
                current, phases = f"unavailable ({type(exc).__name__}: {exc})", ()
            if phases != PHASES:
                stale = ", ".join(phase for phase in PHASES if phase not in phases)
                _warn_once(("stale", path), f"sla_dsl: ignoring the {stale} configs of the tuned table {path}: "
                           f"they were tuned for other generated kernels (source sha256 "
                           f"{data['source_sha256'][:12]}, now {current[:12]}); using default configs there. "
                           f"Re-tune with `{tune_command(spec, backend)}`.")
            if not phases:
                data = None
    loaded = _Loaded(data, phases)
    _tables[path] = loaded
    return loaded


def lookup(spec, backend: str, shape: Shape, *, phase: str = "fwd", gpu: str | None = None,
           root: Path | None = None) -> dict | None:
    """The tuned config for `shape` (nearest stored bucket with the same K, V, dtype) on the running GPU, or
    None (no usable table, or nothing compatible: use the backend's default_config). Cached; never times."""
    if phase not in PHASES:
        raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
    if not lookups_enabled():
        return None
    if gpu is None:
        import torch

        gpu = forced_gpu()
        if gpu is None and not torch.cuda.is_available():  # CPU runs (interpreter, reference): nothing to look up
            return None
    with _lock:
        try:
            loaded = _load(spec, backend, gpu or gpu_name(), Path(root) if root else table_root())
        except Exception as exc:  # noqa: BLE001 -- lookup must never crash a forward pass
            _warn_once(("internal", spec.name, backend), f"sla_dsl: tuned-table lookup failed "
                       f"({type(exc).__name__}: {exc}); using default configs")
            return None
        cache_key = (phase, shape)
        if cache_key not in loaded.resolved:
            buckets = loaded.buckets[phase]
            found = nearest(shape, buckets)
            loaded.resolved[cache_key] = dict(buckets[found]) if found is not None else None
        config = loaded.resolved[cache_key]
    return dict(config) if config is not None else None


def clear_cache() -> None:
    """Forgets every table read and every warning given (tests; after re-tuning in-process)."""
    with _lock:
        _tables.clear()
        _warned.clear()
        _source_hashes.clear()
        _gpu_names.clear()


def describe(spec, backend: str, gpu: str | None = None, root: Path | None = None) -> str:
    """One line on the table lookups will use, for reports: 'tuned (3 buckets)', 'no table', 'stale', ..."""
    path = table_path(gpu or forced_gpu() or gpu_name(), backend, spec.name, Path(root) if root else None)
    try:
        data = read_table(path)
    except (OSError, ValueError):
        return "corrupt table: defaults"
    if data is None:
        return "no table: defaults"
    try:
        phases = valid_phases(data, spec, backend)
    except Exception:  # noqa: BLE001
        return "table (hash unavailable)"
    if not phases:
        return "stale table: defaults"
    if phases != PHASES:
        return f"tuned ({len(data['entries'])} buckets; {', '.join(phases)} only, the rest stale: defaults)"
    return f"tuned ({len(data['entries'])} buckets)"


# ---------------------------------------------------------------------------------------------------------
# Writing

def dumps(data: dict) -> str:
    """The canonical text of a table: keys sorted, so a re-tune diffs cleanly."""
    return json.dumps(data, sort_keys=True, indent=1, allow_nan=False) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Writes a temporary file next to `path`, fsyncs it and renames it over `path`: a reader sees the old
    file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path`.lock (POSIX flock; a no-op where unavailable)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover -- Windows: atomic replace still prevents torn files
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _merged_entries(older: dict[str, dict], newer: dict[str, dict]) -> dict[str, dict]:
    """Bucket by bucket and phase by phase, `newer`'s over `older`'s."""
    merged = {key: dict(entry) for key, entry in older.items()}
    for key, entry in newer.items():
        merged.setdefault(key, {}).update(entry)
    return merged


def update_table(path: Path, *, spec_name: str, spec_sha256: str, backend: str, gpu: str, source_sha256: str,
                 entries: dict[str, dict], phase_source_sha256: dict[str, str] | None = None,
                 extra: dict | None = None) -> dict:
    """Merges `entries` (bucket key -> {"shape", "fwd"?, "bwd"?}) into the table at `path` under its lock and
    writes it atomically. Returns the table written.

    Entries of an existing table for other kernels (another source hash, and for their phase another phase
    source hash, `phase_source_sha256`) move to "superseded_entries": lookups
    never read them, but they seed the re-tuning (runner.table_seeds) until each bucket's phase is tuned for the
    current kernels, when its superseded one is dropped. So a re-sweep after a template change that is cut
    short, or that tunes one phase or shape at a time, loses no previous winner. An unreadable table is
    replaced."""
    path = Path(path)
    with file_lock(path):
        old = readable_table(path)
        merged: dict[str, dict] = {}
        superseded: dict[str, dict] = {}
        if old is not None and old["backend"] == backend:
            superseded = old.get("superseded_entries", {})
            kept = matching_phases(old, source_sha256, phase_source_sha256)
            for key, entry in old["entries"].items():
                for phase in PHASES:
                    if phase in entry:
                        target = merged if phase in kept else superseded
                        target.setdefault(key, {"shape": entry.get("shape")})[phase] = entry[phase]
        merged = _merged_entries(merged, entries)
        still_superseded = {}
        for key, entry in superseded.items():
            phases = {phase: entry[phase] for phase in PHASES if phase in entry and phase not in merged.get(key, {})}
            if phases:
                still_superseded[key] = {**{k: v for k, v in entry.items() if k not in PHASES}, **phases}
        data = {"format": FORMAT, "spec": spec_name, "spec_sha256": spec_sha256, "backend": backend,
                "gpu": gpu, "source_sha256": source_sha256, "versions": versions(), "date": utc_now(),
                "entries": merged}
        if phase_source_sha256:
            data["phase_source_sha256"] = dict(phase_source_sha256)
        if still_superseded:
            data["superseded_entries"] = still_superseded
        if extra:
            data.update(extra)
        write_atomically(path, dumps(data))
    with _lock:
        _tables.pop(path, None)
    return data
