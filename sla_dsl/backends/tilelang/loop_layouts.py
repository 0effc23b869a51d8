"""Loops of a generated TileLang module whose thread layout a per-row fragment decides.

TileLang lays out a `T.Parallel` loop by the fragments it touches. A loop over a 2-D tile that touches fragments of
one dimension only (one value per row) besides shared memory takes that fragment's layout: one thread per row, the
other threads idle, and each thread walking a row of a row-major shared tile, its lanes on one bank. Scaling dq' and
dk' by the gates was such a loop in every backward kernel; without it, sla_gla's bwd_chunk on the H100 went from
5.318 to 4.441 ms (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session19). The generated Python does not show the
layout; `row_fragment_loops` finds the pattern in it, so a template that brings such a loop back fails a test.
"""

from __future__ import annotations

import dataclasses
import re

_ALLOC = re.compile(r"^\s*(\w+) = T\.alloc_(fragment|shared|local)\(\(([^)]*)\)")
_TILE_LOOP = re.compile(r"^(\s*)for \w+, \w+ in T\.Parallel\(")
_INDEXED = re.compile(r"\b(\w+)\[")


@dataclasses.dataclass(frozen=True)
class RowFragmentLoop:
    line: int  # 1-based, of the loop's `for`
    header: str
    fragments: tuple[str, ...]  # the one-dimensional fragments its body reads or writes

    def __str__(self) -> str:
        return f"line {self.line}: `{self.header}` touches only per-row fragments {', '.join(self.fragments)}"


def row_fragment_loops(source: str) -> list[RowFragmentLoop]:
    """Each 2-D `T.Parallel` loop of `source` whose body touches fragments, all of them one-dimensional. A buffer's
    shape is its latest allocation above the loop (each kernel factory allocates its own)."""
    lines = source.splitlines()
    fragment_ranks: dict[str, int] = {}
    found = []
    for number, line in enumerate(lines):
        alloc = _ALLOC.match(line)
        if alloc:
            name, scope, dims = alloc.groups()
            rank = len([d for d in dims.split(",") if d.strip()])
            if scope == "fragment":
                fragment_ranks[name] = rank
            else:
                fragment_ranks.pop(name, None)
            continue
        loop = _TILE_LOOP.match(line)
        if not loop:
            continue
        indent = len(loop.group(1))
        body = []
        for inner in lines[number + 1:]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= indent:
                break
            body.append(inner)
        touched = {name for name in _INDEXED.findall("\n".join(body)) if name in fragment_ranks}
        if touched and all(fragment_ranks[name] == 1 for name in touched):
            found.append(RowFragmentLoop(number + 1, line.strip(), tuple(sorted(touched))))
    return found
