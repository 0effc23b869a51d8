"""Shared-memory bank conflicts of a compiled TileLang kernel, read from the CUDA source TileLang emits.

A shared-memory request of one warp is served in wavefronts: 32 banks of 4-byte words, one word per bank per
wavefront (lanes reading the same word share it). 4-byte accesses are served for the whole warp at once, 8-byte
ones per half warp and 16-byte ones per quarter warp, so a conflict-free access of w bytes per lane takes w / 4
wavefronts. An access whose lanes hit one bank at n different words takes n times that.

`hot_spots(source)` evaluates the address of every shared-memory load and store in the source for the 32 lanes of
the first warp, at every value of the constant-bound loops around it (the lowered T.Parallel, T.serial and
unrolled loops; a loop with a runtime bound counts once), and reports the accesses that take at least
`min_factor` times their conflict-free wavefronts, with the number of times one thread runs them. Tensor-core
operand moves (ldmatrix, stmatrix, cp.async, wgmma descriptors) are TileLang's own swizzled layouts and are not
evaluated; TileLang's scan template (T.cumsum of a 2-D tile down its rows) is, from its call's arguments.
Why it exists: gla's forward spent most of its time on the H100 in one loop that read 16 rows of a
shared fp32 buffer at once, all from one bank; the generated Python gave no hint of it, the CUDA does.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

from sla_dsl.backends.tilelang.tuning import shared_buffer_offsets

BANKS = 32
WARP = 32
_ELEMENT_BYTES = {"float": 4, "bfloat16_t": 2, "half_t": 2, "int": 4}
_VECTOR_BYTES = {"float4": 16, "float2": 8, "uint4": 16, "uint2": 8, "uint1": 4, "float": 4, "int": 4}
# (*(vector*)( ((element*)NAME) + ... ) or ((element*)NAME)[ ...
_ACCESS = re.compile(r"(?:\*\((?P<vector>\w+)\*\)\()?\(\((?P<element>float|bfloat16_t|half_t|int)\*\)(?P<name>\w+)\)"
                     r"\s*(?P<kind>\[|\+)")
_LOOP = re.compile(r"for \(int (\w+) = (-?\d+); \1 < (-?\d+); \+\+\1\)")
_RUNTIME_LOOP = re.compile(r"for \(int (\w+) = ")
_TENSOR_CORE_MOVES = ("ldmatrix", "stmatrix", "cp_async", "wgmma", "GmmaDescriptor")
# T.cumsum of a 2-D tile down its rows: the warp's lanes take consecutive rows of one column, src_stride apart
_COLUMN_SCAN = re.compile(r"tl::CumSum2D<(\d+), 0, \w+>::run\(\(&\(\(\((\w+)\*\)(\w+)\)\[0\]\)\), .*?, "
                          r"(\d+), (\d+), (\d+), \d+\);")
MAX_POINTS = 64  # loop-variable combinations evaluated per access


@dataclasses.dataclass(frozen=True)
class HotSpot:
    line: int
    buffer: str
    bytes_per_lane: int
    factor: float  # wavefronts / conflict-free wavefronts, worst over the loop values evaluated
    runs: int  # times one thread runs the access per kernel invocation (loops with runtime bounds count once)
    address: str

    @property
    def excess(self) -> float:
        """Wavefronts a warp spends on it beyond conflict-free ones, per conflict-free wavefront."""
        return (self.factor - 1) * self.runs

    def __str__(self) -> str:
        return (f"line {self.line}: {self.buffer} ({self.bytes_per_lane} B per lane) {self.factor:g}x its "
                f"conflict-free wavefronts, run {self.runs}x per thread: [{self.address[:120]}]")


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at text[start]."""
    pairs = {"[": "]", "(": ")"}
    opening, depth = text[start], 0
    for index in range(start, len(text)):
        if text[index] == opening:
            depth += 1
        elif text[index] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opening!r} in {text[start:start + 80]!r}")


def _python(expression: str) -> str:
    expression = re.sub(r"\((?:int|int64_t|uint|unsigned)\)", "", expression)
    return expression.replace("/", "//").replace("&&", " and ").replace("||", " or ").replace("threadIdx.x", "lane")


def _wavefronts(addresses: list[int], width: int) -> int:
    """Wavefronts of one warp's request: lanes in groups of 128 / width bytes, each group's worst bank."""
    group = max(1, 128 // width)
    total = 0
    for first in range(0, WARP, group):
        words_per_bank: dict[int, set[int]] = {}
        for address in addresses[first:first + group]:
            for offset in range(0, width, 4):
                word = (address + offset) // 4
                words_per_bank.setdefault(word % BANKS, set()).add(word)
        total += max(len(words) for words in words_per_bank.values())
    return total


def _factor(addresses: list[int], width: int) -> float:
    """Wavefronts of the request over those of a conflict-free one (width / 4)."""
    return _wavefronts(addresses, width) / max(1, width // 4)


def _points(loops: list[tuple[str, int]]):
    """Up to MAX_POINTS assignments of the loop variables, spread over their ranges."""
    ranges = [range(trips) for _, trips in loops]
    count = math.prod(len(r) for r in ranges)
    combos = itertools.product(*ranges)
    step = max(1, count // MAX_POINTS)
    for index, values in enumerate(combos):
        if index % step == 0:
            yield dict(zip((name for name, _ in loops), values))


def hot_spots(source: str, min_factor: float = 4.0) -> list[HotSpot]:
    shared = set(shared_buffer_offsets(source))
    found, loops, depth = [], [], 0  # loops: (name, trips, brace depth inside it)
    for number, line in enumerate(source.splitlines(), 1):
        loop = _LOOP.search(line)
        runtime = _RUNTIME_LOOP.search(line) if loop is None else None
        if not any(move in line for move in _TENSOR_CORE_MOVES):
            found += _line_hot_spots(line, number, shared, loops, min_factor)
        found += _column_scan_hot_spots(line, number, shared, loops, min_factor)
        depth += line.count("{")
        if loop is not None:
            loops.append((loop.group(1), int(loop.group(3)) - int(loop.group(2)), depth))
        elif runtime is not None:
            loops.append((runtime.group(1), 1, depth))
        depth -= line.count("}")
        while loops and depth < loops[-1][2]:
            loops.pop()
    return found


def _column_scan_hot_spots(line: str, number: int, shared: set[str], loops, min_factor: float) -> list[HotSpot]:
    """TileLang's scan template (tl_templates/cuda/scan.h) gives each warp whole columns, one row per lane, and
    reads then writes every element once."""
    out = []
    for match in _COLUMN_SCAN.finditer(line):
        threads, element, name, rows, columns, stride = match.groups()
        if name not in shared:
            continue
        width = _ELEMENT_BYTES[element]
        factor = _factor([lane * int(stride) * width for lane in range(WARP)], width)
        per_lane = math.ceil(int(columns) / (int(threads) // WARP)) * math.ceil(int(rows) / WARP) * 2
        if factor >= min_factor:
            runs = per_lane * math.prod(trips for _, trips, _ in loops)
            out.append(HotSpot(number, name, width, factor, runs, f"T.cumsum down {rows} rows, stride {stride}"))
    return out


def _line_hot_spots(line: str, number: int, shared: set[str], loops, min_factor: float) -> list[HotSpot]:
    out = []
    for match in _ACCESS.finditer(line):
        if match.group("name") not in shared:
            continue
        element = _ELEMENT_BYTES[match.group("element")]
        if match.group("kind") == "[":
            start = match.end() - 1
            index = line[start + 1:_closing(line, start)]
            width = element
        else:
            start = match.end()
            while line[start] == " ":
                start += 1
            if line[start] != "(":
                continue
            index = line[start:_closing(line, start) + 1]
            width = _VECTOR_BYTES.get(match.group("vector") or "", element)
        try:
            code = compile(_python(index), "<address>", "eval")
        except SyntaxError as exc:
            raise ValueError(f"line {number}: cannot read the shared-memory address {index!r}") from exc
        names = set(code.co_names) - {"lane", "max", "min"}
        loop_vars = [(name, trips) for name, trips, _ in loops if name in names]
        worst = 0.0
        for point in _points(loop_vars):
            values = {name: point.get(name, 0) for name in names}
            addresses = [eval(code, {"max": max, "min": min}, {**values, "lane": lane}) * element  # noqa: S307
                         for lane in range(WARP)]
            worst = max(worst, _factor(addresses, width))
        if worst >= min_factor:
            runs = math.prod(trips for _, trips, _ in loops)
            out.append(HotSpot(number, match.group("name"), width, worst, runs, index))
    return out
