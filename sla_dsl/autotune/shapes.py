"""Problem shapes as the tuner and the tuned tables see them, and their buckets.

A `Shape` names one workload (B, T, H, K, V, dtype, varlen). Tables store one entry per *bucket*:
B, T and H rounded to powers of two (T to the nearest in log space, B and H up), K, V, dtype and varlen
exact. Lookup picks the stored bucket nearest to the caller's bucket among those with the same K, V and
dtype (configs with block sizes depend on them); with none, there is no tuned config for that shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

DTYPES = ("bfloat16", "float16", "float32", "float64")

# The reference workloads of the benchmark and of the default sweep: (B, T, H, K=V), bf16.
REFERENCE_SHAPES_BTHK = ((4, 8192, 16, 128), (8, 2048, 16, 64), (1, 32768, 16, 128))


def _pow2_up(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _pow2_nearest(n: int) -> int:
    return 1 if n <= 1 else 1 << round(math.log2(n))


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16' or 'bf16'."""
    text = str(dtype).removeprefix("torch.")
    return {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
            "fp64": "float64", "double": "float64"}.get(text, text)


@dataclass(frozen=True, order=True)
class Shape:
    """One workload. For varlen inputs (q [1, total, H, K] with cu_seqlens of N + 1 entries), B is the number
    of sequences N and T their mean length, so the bucket tracks both the parallelism and the work."""

    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: str = "bfloat16"
    varlen: bool = False

    def __post_init__(self):
        for name in ("B", "T", "H", "K", "V"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Shape.{name}: expected a positive int, got {value!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.dtype not in DTYPES:
            raise ValueError(f"Shape.dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def of(cls, q, v, cu_seqlens=None) -> Shape:
        """The shape of a call: q [B, T, H, K], v [B, T, H, V], optional cu_seqlens."""
        batch, length, heads, dim_k = (int(x) for x in q.shape)
        if cu_seqlens is not None:
            n = max(int(cu_seqlens.numel()) - 1, 1)
            return cls(n, max(1, round(length / n)), heads, dim_k, int(v.shape[-1]), dtype_name(q.dtype), True)
        return cls(batch, length, heads, dim_k, int(v.shape[-1]), dtype_name(q.dtype), False)

    def bucket(self) -> Shape:
        return bucket(self)

    @property
    def key(self) -> str:
        """'B4_T8192_H16_K128_V128_bfloat16' (+ '_varlen'): a table's entry key."""
        return (f"B{self.B}_T{self.T}_H{self.H}_K{self.K}_V{self.V}_{self.dtype}"
                + ("_varlen" if self.varlen else ""))

    @classmethod
    def from_key(cls, key: str) -> Shape:
        match = re.fullmatch(r"B(\d+)_T(\d+)_H(\d+)_K(\d+)_V(\d+)_([a-z0-9]+)(_varlen)?", key)
        if not match:
            raise ValueError(f"not a shape key: {key!r}")
        b, t, h, k, v, dtype, varlen = match.groups()
        return cls(int(b), int(t), int(h), int(k), int(v), dtype, varlen is not None)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.B}x{self.T}x{self.H}x{self.K}x{self.V} {self.dtype}" + (" varlen" if self.varlen else "")


def bucket(shape: Shape) -> Shape:
    """The bucket a shape falls in: B and H up to a power of two, T to the nearest power of two (>= 16)."""
    return Shape(_pow2_up(shape.B), max(16, _pow2_nearest(shape.T)), _pow2_up(shape.H), shape.K, shape.V,
                 shape.dtype, shape.varlen)


def distance(a: Shape, b: Shape) -> float | None:
    """How far apart two buckets are for reusing a config; None when incompatible (K, V or dtype differ).
    Sequence length counts most (chunk count, state passes), then parallelism B*H, then varlen."""
    if (a.K, a.V, a.dtype) != (b.K, b.V, b.dtype):
        return None
    return (abs(math.log2(a.T) - math.log2(b.T))
            + 0.5 * abs(math.log2(a.B * a.H) - math.log2(b.B * b.H))
            + (1.0 if a.varlen != b.varlen else 0.0))


def nearest(query: Shape, candidates) -> Shape | None:
    """The candidate bucket nearest to query's bucket (ties broken by key, so the choice is deterministic)."""
    target = bucket(query)
    scored = [(d, c.key, c) for c in candidates if (d := distance(target, c)) is not None]
    return min(scored)[2] if scored else None


def reference_shapes(dtype: str = "bfloat16") -> list[Shape]:
    return [Shape(b, t, h, k, k, dtype) for b, t, h, k in REFERENCE_SHAPES_BTHK]


def parse_shape(text: str, dtype: str = "bfloat16") -> Shape:
    """'4x8192x16x128' (K = V) or '4x8192x16x128x256' (K, V), optionally ':bf16' and/or ':varlen'."""
    parts = text.strip().split(":")
    dims = parts[0].lower().split("x")
    varlen = False
    for extra in parts[1:]:
        if extra == "varlen":
            varlen = True
        else:
            dtype = dtype_name(extra)
    if len(dims) not in (4, 5) or not all(d.isdigit() for d in dims):
        raise ValueError(f"shape {text!r}: expected BxTxHxK or BxTxHxKxV (e.g. 4x8192x16x128)")
    b, t, h, k = (int(d) for d in dims[:4])
    v = int(dims[4]) if len(dims) == 5 else k
    return Shape(b, t, h, k, v, dtype, varlen)


def parse_shapes(text: str | None, dtype: str = "bfloat16") -> list[Shape]:
    """A comma-separated list of parse_shape()s; None or '' gives the reference shapes."""
    if not text:
        return reference_shapes(dtype)
    return [parse_shape(part, dtype) for part in text.split(",") if part.strip()]
