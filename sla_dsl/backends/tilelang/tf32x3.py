"""3xTF32: near-fp32 accuracy for the float32 inputs of the generated TileLang kernels.

T.gemm on float32 operands runs tf32 tensor cores, which read 10 of fp32's 23 mantissa bits (the mma drops
the rest): each operand is off by up to 2^-10 relative, and outputs that sum the chunk state over thousands
of chunks end 1.5e-3 from the float64 reference. Splitting each operand into its tf32 rounding and the fp32 remainder, a = a_hi + a_lo,
and summing the three largest products a_hi b_hi + a_hi b_lo + a_lo b_hi in fp32 leaves about 2^-21 per
product (the dropped a_lo b_lo, and the tf32 reading of the low parts), within the fp32 bound of 1e-5.

`compensate(factory)` rewrites every `T.gemm(A, B, ...)` of a generated kernel factory into
`compensated_gemm(A, B, ..., A_part, B_part)`, a macro emitted next to the kernels (MACROS). With float32
operands it writes one part of each operand at a time into a scratch buffer of the operand's shape, and
runs the three products in an order that needs four such writes, two per operand: (A_hi, B_lo), (A_hi, B_hi),
(A_lo, B_hi). The operands themselves are only read. Splitting them in place instead (the operand keeping
its high part until a restore) needs the same shared memory, but TileLang cannot prove an in-place update of
a swizzled shared buffer thread-private and puts a barrier in every iteration of such a loop.

The scratch exists only for float32 inputs (`FP32_ONLY`; tuning's shared-memory accounting counts it for
float32 only): 16-bit operands get None and the plain T.gemm, so their kernels are unchanged. An operand
declared float32 in every dtype (the WY solve's blocks) is compensated in float32 kernels too; in 16-bit ones
its plain T.gemm runs on tf32 tensor cores, more precise than the 16-bit result the kernel rounds it to. It is
shared by every gemm of a kernel: one buffer per operand shape, and a second one of a shape for a gemm whose two
operands have that shape (k k^T included: its two parts are live together).
"""

from __future__ import annotations

import re

# The condition that makes an allocation float32-only: the allocation evaluates to None for other dtypes.
FP32_ONLY = ' if dtype == "float32" else None'

MACROS = '''
# 3xTF32 (sla_dsl/backends/tilelang/tf32x3.py): fp32 accuracy from tf32 tensor cores for float32 operands.
@T.macro
def compensated_gemm(A, B, C, A_part, B_part, transpose_A=False, transpose_B=False, clear_accum=False):
    """T.gemm(A, B, C) for 16-bit operands (A_part, B_part None). For float32 operands, with scratch A_part and
    B_part of their shapes: C (+)= A_hi B_lo + A_hi B_hi + A_lo B_hi, accumulated in fp32."""
    if A_part is None:
        T.gemm(A, B, C, transpose_A=transpose_A, transpose_B=transpose_B, clear_accum=clear_accum)
    else:
        tf32_hi(A, A_part)
        tf32_lo(B, B_part)
        T.gemm(A_part, B_part, C, transpose_A=transpose_A, transpose_B=transpose_B, clear_accum=clear_accum)
        tf32_hi(B, B_part)
        T.gemm(A_part, B_part, C, transpose_A=transpose_A, transpose_B=transpose_B)
        tf32_lo(A, A_part)
        T.gemm(A_part, B_part, C, transpose_A=transpose_A, transpose_B=transpose_B)


def tf32_round(x):
    """x rounded to tf32's 10 mantissa bits, to nearest with ties away from zero: half a tf32 ulp added to the
    bit pattern, the 13 low bits cleared (a carry into the exponent is the right rounding)."""
    return T.reinterpret(T.bitwise_and(T.reinterpret(x, "uint32") + T.uint32(0x1000), T.uint32(0xFFFFE000)),
                         "float32")


@T.macro
def tf32_hi(x, part):
    """part = x_hi, exact in tf32: the tensor cores read all of it."""
    for i, j in T.Parallel(*x.shape):
        part[i, j] = tf32_round(x[i, j])


@T.macro
def tf32_lo(x, part):
    """part = x_lo = x - x_hi, exact in fp32 (x_hi is within a factor of 2 of x), at most half a tf32 ulp of x."""
    for i, j in T.Parallel(*x.shape):
        part[i, j] = x[i, j] - tf32_round(x[i, j])
'''

_GEMM = re.compile(r"^(?P<indent> *)T\.gemm\((?P<a>\w+), (?P<b>\w+), (?P<c>\w+)(?P<flags>(?:, \w+=\w+)*)\)$", re.M)
_OPERAND = re.compile(r'^ *(?P<name>\w+) = T\.alloc_shared\(\((?P<dims>[^)]*)\), (?:dtype|"float32")\)$', re.M)
_ALLOC = re.compile(r"^(?P<indent> *)\w+ = T\.alloc_\w+\(.*\n", re.M)


def compensate(factory: str) -> str:
    """The kernel factory `factory` (source text) with every T.gemm made a compensated_gemm and the scratch
    it needs allocated after the factory's last allocation."""
    shapes = {m["name"]: m["dims"] for m in _OPERAND.finditer(factory)}
    scratch: dict[str, str] = {}  # name -> dims, in order of first use

    def part(dims: str, second: bool) -> str:
        name = "tf32_" + "_".join(d.strip() for d in dims.split(",")) + ("_2" if second else "")
        scratch.setdefault(name, dims)
        return name

    def rewrite(m: re.Match) -> str:
        a, b = m["a"], m["b"]
        for operand in (a, b):
            if operand not in shapes:
                raise ValueError(f"tf32x3: gemm operand {operand} is not a shared buffer of the kernel's dtype "
                                 "or of float32")
        a_part, b_part = part(shapes[a], second=False), part(shapes[b], second=shapes[b] == shapes[a])
        return f"{m['indent']}compensated_gemm({a}, {b}, {m['c']}, {a_part}, {b_part}{m['flags']})"

    body = _GEMM.sub(rewrite, factory)
    if not scratch:
        return body
    last = list(_ALLOC.finditer(body))[-1]
    allocs = f"{last['indent']}# 3xTF32 scratch: one part of a float32 gemm operand at a time, per operand shape\n"
    allocs += "".join(f"{last['indent']}{name} = T.alloc_shared(({dims}), dtype){FP32_ONLY}\n"
                      for name, dims in scratch.items())
    return body[:last.end()] + allocs + body[last.end():]
