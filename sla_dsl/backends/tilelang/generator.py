"""Generates the TileLang kernels of a spec: one file `generated/tilelang/<spec>.py` per spec.

The file holds one kernel factory per chunkwise stage, each written from templates shared by every spec and
specialised by the recurrence's features (decay kind, write rule, gates, feature maps, L2 norm). All take
(H, K, V, dtype, chunk, block_v, threads, num_stages), bwd_chunk and bwd_delta also min_blocks (their
occupancy: `tuning` says why they alone). The two sequential stages walk a sequence's chunks
and do only what the recurrence needs there; everything else is chunk-parallel (grid: chunks x H):

    wy          (delta rule) the chunk's triangular solve T = (I + beta M)^-1: w = T (beta k' exp(b)), u = T (beta v)
    states      sequential, grid (V / block_v, N * H): the state S[K, block_v] in an fp32 fragment,
                S <- exp(b_C) S + ke^T u (u = v, or v_new = u - w S); writes the state entering every chunk
    output      o = qe S + A u, with the chunk's C x C attention A computed once for all blocks of V
    dv_local    (delta rule) A^T dO, the in-chunk part of du
    bwd_dh      sequential, reverse: dS <- exp(b_C) dS + qe^T dO (- w^T du); writes dS at every chunk's end
                (and the delta rule's du = A^T dO + ke dS, which bwd_chunk and bwd_delta read)
    bwd_chunk   every input gradient of one chunk: loops over V-blocks accumulating the K-side gradients in
                fp32 fragments, then chains through decay cumsum, gates, L2 norm and feature maps. With the delta
                rule only what reads the states: dq, dw, and parts of dk and dg that bwd_delta finishes
    bwd_delta   (delta rule) the backward through the WY form: dv, dbeta, the write gate's gradient, dk and dg

Preprocessing (feature map, L2 norm, scale, head gates, chunk-local cumulative decay) is fused into each
kernel that reads q or k; `PHASES` in the generated file lists the kernels of the forward and the backward.

Every T.gemm of the templates is emitted as `compensated_gemm` (`tf32x3`): the plain T.gemm for 16-bit
dtypes, and for float32 an error-compensated product (3xTF32) that keeps fp32 accuracy on tf32 tensor cores.

Tokens are packed ([total tokens, H, D]); sequences are described by cu_seqlens and a host-built chunk table,
so batches and varlen share one code path. Rows of a partial chunk past the sequence's end are zero (q', k',
v, beta; their decay adds nothing to b). Every exp() whose value is used has an argument <= 0 (relative decays
b_i - b_j with j <= i, b_C - b_i, b_i); masked entries of a scalar decay's C x C products compute exp(b_i -
b_j) for j > i and drop it in a select, and a vector decay's clamp it at 0.
"""

from __future__ import annotations

import enum
import functools
import re
import textwrap

from sla_dsl.backends.tilelang.tf32x3 import MACROS, compensate
from sla_dsl.codegen import header
from sla_dsl.feature_maps import L2_NORM_EPS
from sla_dsl.spec import Decay, FeatureMap, Spec, WriteRule


def filename(spec: Spec) -> str:
    return f"{spec.name}.py"


# ---- feature maps: value and derivative as TileLang expressions of x (a buffer load, safe to repeat) ----

def _sigmoid(x: str) -> str:
    # one exp and one reciprocal, both the hardware's approximations (__expf, rcp.approx: a few ulp, far inside
    # the fp32 bound): the stages run at one or two CTAs per SM, where every instruction is paid in latency, and
    # expf and an IEEE division are ~10 each. At x < -88, exp(-x) is inf and its reciprocal the right limit, 0.
    # (A branch on the sign, to keep exp's argument negative, cost three exps, two divisions and divergent warps:
    # gdn's output stage issued five times the instructions of retnet's.)
    return f"T.fast_rcp(1.0 + T.__exp(-({x})))"


def _phi(fm: FeatureMap, x: str) -> str:
    if fm is FeatureMap.IDENTITY:
        return x
    if fm is FeatureMap.RELU:
        return f"T.max({x}, 0.0)"
    if fm is FeatureMap.ELU_PLUS_ONE:
        return f"T.if_then_else({x} > 0.0, {x} + 1.0, T.__exp(T.min({x}, 0.0)))"
    if fm is FeatureMap.SILU:
        return f"({x}) * {_sigmoid(x)}"
    if fm is FeatureMap.SIGMOID:
        return _sigmoid(x)
    raise AssertionError(fm)


def _dphi(fm: FeatureMap, x: str) -> str:
    if fm is FeatureMap.IDENTITY:
        return "1.0"
    if fm is FeatureMap.RELU:
        return f"T.if_then_else({x} > 0.0, 1.0, 0.0)"
    if fm is FeatureMap.ELU_PLUS_ONE:
        return f"T.if_then_else({x} > 0.0, 1.0, T.__exp(T.min({x}, 0.0)))"
    s = _sigmoid(x)
    if fm is FeatureMap.SILU:
        return f"({s}) * (1.0 + ({x}) * (1.0 - ({s})))"
    if fm is FeatureMap.SIGMOID:
        return f"({s}) * (1.0 - ({s}))"
    raise AssertionError(fm)


class _Features:
    def __init__(self, spec: Spec):
        rec = spec.recurrence
        self.decay = rec.decay
        self.delta = rec.write is WriteRule.DELTA
        self.read = rec.gates.read
        self.key_gate = rec.write_gate_scales_key
        self.beta_gate = rec.write_gate_scales_beta
        self.gk = rec.gates.write
        self.fq, self.fk = rec.feature_map_q, rec.feature_map_k
        self.l2 = rec.qk_l2_norm
        self.vector = rec.decay is Decay.VECTOR
        self.has_b = rec.decay is not Decay.NONE
        self.dg = rec.decay in (Decay.SCALAR, Decay.VECTOR)

    # b (in-chunk cumulative log decay) of row `i` as an expression; `d` is the key channel (vector decay)
    def b(self, i: str, d: str = "d") -> str:
        return f"b_s[{i}, {d}]" if self.vector else f"b_s[{i}]"

    def exp_b(self, i: str, d: str = "d") -> str:  # exp(b_i) <= 1
        return f"T.exp({self.b(i, d)})" if self.has_b else "1.0"

    def exp_rest(self, i: str, d: str = "d") -> str:  # exp(b_C - b_i) <= 1
        return f"T.exp({self.b('C - 1', d)} - {self.b(i, d)})" if self.has_b else "1.0"

    def exp_rel(self, i: str, j: str, d: str = "d") -> str:  # exp(b_i - b_j), j <= i
        return f"T.exp({self.b(i, d)} - {self.b(j, d)})" if self.has_b else "1.0"


_DOCSTRING = re.compile(r'^(    )"""(.*?)"""', re.M | re.S)


def _wrap_docstring(factory: str) -> str:
    """The factory's docstring, whose substituted parts vary in length, refilled to lines of 116 characters."""
    def fill(m: re.Match) -> str:
        text = textwrap.fill(" ".join(m[2].split()), width=116, initial_indent=m[1] + '"""',
                             subsequent_indent=m[1])
        return text + '"""'
    return _DOCSTRING.sub(fill, factory, count=1)


def _ind(text: str, n: int) -> str:
    body = textwrap.dedent(text).strip("\n")
    return textwrap.indent(body, " " * n) + "\n" if body else ""


# ---- template pieces (bodies at the indentation of the chunk loop: 12 spaces) ----

def _params(f: _Features) -> str:
    """The kernel's input tensors after q, k, v (the host passes them in this order)."""
    out = []
    if f.decay is Decay.SCALAR:
        out.append('G: T.Tensor((NT, H), "float32")')
    if f.decay is Decay.VECTOR:
        out.append('G: T.Tensor((NT, H, K), "float32")')
    if f.delta:
        out.append('BETA: T.Tensor((NT, H), "float32")')
    if f.read:
        out.append('GQ: T.Tensor((NT, H), "float32")')
    if f.gk:
        out.append('GK: T.Tensor((NT, H), "float32")')
    if f.decay is Decay.CONSTANT:
        out.append('LG: T.Tensor((H,), "float32")')
    out.append('SC: T.Tensor((1,), "float32")')
    return "".join(f"        {p},\n" for p in out)


def _input_names(f: _Features) -> list[str]:
    names = ["q", "k", "v"]
    if f.has_b and f.decay is not Decay.CONSTANT:
        names.append("g")
    if f.delta:
        names.append("beta")
    if f.read:
        names.append("gq")
    if f.gk:
        names.append("gk")
    if f.decay is Decay.CONSTANT:
        names.append("log_gamma")
    names.append("scale")
    return names


def _row_gate(f: _Features, side: str) -> str | None:
    """The [NT, H] gate tensor that scales q' (the read gate) or k' (the write gate on the key), if any."""
    return "GQ" if side == "q" and f.read else "GK" if side == "k" and f.key_gate else None


class _Copy(enum.Enum):
    """What a stage's shared fp32 copy of q' (k') holds (`_prep`), and so what its readers multiply in
    (`_copy_row`)."""
    FULL = "q' itself"  # the forward's stages
    UNGATED = "q' without its gate, where _gate_kept_out"  # bwd_chunk
    NORMALISED = "under the L2 norm y = phi(x) / ||phi(x)|| alone, its inverse norms kept; else q'"  # bwd_delta


def _gate_kept_out(f: _Features, side: str) -> bool:
    """Whether bwd_chunk's shared copy of q' (k') holds it without its gate, which every reader of that copy
    multiplies in (`_copy_row`): then the gate's gradient reduces dq' against the copy on chip. With the gate in
    the copy, it reloaded q and k from global memory for that (sla_retnet's bwd_chunk on the H100 at 4x8192:
    1.028 -> 0.934 ms without the reload, 2026-11-24-session19). Not under the L2 norm, whose backward rebuilds y
    and its norm in a [C, K] fragment either way (bwd_chunk; bwd_delta's copy is _Copy.NORMALISED). Not under a
    vector decay: its sub-block products read the copies many times over, and multiplying the gate in at each
    read made sla_gla's bwd_chunk slower than the reload (4.925 -> 5.126 ms)."""
    return _row_gate(f, side) is not None and not f.l2 and not f.vector


def _normalised(f: _Features, side: str, copy: _Copy) -> bool:
    """Whether the copy is y alone (_Copy.NORMALISED under the L2 norm, but for a vector decay: see
    _gate_kept_out): its readers multiply in the gate and the scale, and the L2 norm's backward reads y and the
    inverse norms (inv_norm_{side}_s) from it, where bwd_chunk reloads x, rebuilds phi(x) and sums its squares
    again. In gdn's bwd_delta at its tuned config on the H100 (4x8192x16x128), with x prefetched for phi'(x)
    (_input_gradients): 1.135 -> 1.038 ms. The same in bwd_chunk made it slower, 1.264 -> 1.286
    (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-25-session23)."""
    return copy is _Copy.NORMALISED and f.l2 and not f.vector


def _kept_out(f: _Features, side: str, copy: _Copy, row: str = "i") -> str:
    """What the copy leaves out of q' (k') at `row`, which its readers multiply in; "1.0" when nothing."""
    if _normalised(f, side, copy):
        return _gate_scale(f, side, row=row)
    if copy is _Copy.UNGATED and _gate_kept_out(f, side):
        return f"g{side}_s[{row}]"
    return "1.0"


def _gate_scale(f: _Features, side: str, gate: bool = True, row: str = "i") -> str:
    """The gate and scale of q' = phi(x) * gate * scale (k' = phi(x) * gate) at `row`; "1.0" when nothing scales
    the side. The gates as _prep loaded them (g{side}_s); `gate` False leaves the gate out."""
    factors = [f"g{side}_s[{row}]"] if gate and _row_gate(f, side) else []
    if side == "q":
        factors.append("SC[0]")
    return " * ".join(factors) or "1.0"


def _row_factor(f: _Features, side: str, copy: _Copy = _Copy.FULL) -> str:
    """What scales each row of phi(x) into the copy (`copy`): the L2 norm's 1/||phi(x)||, then _gate_scale, less
    what the copy leaves out (_kept_out); "1.0" when nothing does."""
    factors = [f"T.rsqrt({side}n[i] + EPS)"] if f.l2 else []
    if _normalised(f, side, copy):
        gate_scale = "1.0"
    else:
        gate_scale = _gate_scale(f, side, gate=not (copy is _Copy.UNGATED and _gate_kept_out(f, side)))
    if gate_scale != "1.0":
        factors.append(gate_scale)
    return " * ".join(factors) or "1.0"


def _scaled(f: _Features, side: str, copy: _Copy = _Copy.FULL) -> str:
    """q' or k' at [i, d] from the registers _prep leaves (before or instead of its shared copy), as `copy`
    holds it (_row_factor)."""
    return f"{side}x[i, d]" if _row_factor(f, side, copy) == "1.0" else f"{side}x[i, d] * {side}r[i]"


def _copy_row(f: _Features, side: str, row: str = "i", copy: _Copy = _Copy.FULL) -> str:
    """q' (k') at [row, d] from its shared fp32 copy, which holds it as `copy` says: what the copy leaves out is
    multiplied in here."""
    value = f"{side}p_s[{row}, d]"
    kept_out = _kept_out(f, side, copy, row)
    return value if kept_out == "1.0" else f"{value} * {kept_out}"


def _qk_value(f: _Features, side: str, shared: bool, copy: _Copy = _Copy.FULL) -> str:
    """q' or k' at [i, d]: its shared fp32 copy (`copy` as in _copy_row), or _scaled's registers (`shared` as
    passed to _prep)."""
    return _copy_row(f, side, copy=copy) if shared else _scaled(f, side)


def _prep_allocs(f: _Features, q: bool = True, k: bool = True, beta: bool = True, shared: bool = True,
                 decay: bool = True, staged: bool = False, copy: _Copy = _Copy.FULL) -> str:
    """The buffers of `_prep` for what it computes (q', k', beta', b)."""
    lines = []
    if f.has_b and decay:
        lines.append(f'b_s = T.alloc_shared(({"C, K" if f.vector else "C,"}), "float32")')
        if staged and f.decay is Decay.SCALAR:
            lines.append('g_s = T.alloc_shared((C,), "float32")')
    for side, on in (("q", q), ("k", k)):
        if not on:
            continue
        if staged:
            lines.append(f'{side}raw_m = T.alloc_shared((C, K), dtype)')
        if _row_gate(f, side):
            lines.append(f'g{side}_s = T.alloc_shared((C,), "float32")')
        lines.append(f'{side}x = T.alloc_fragment((C, K), "float32")')
        if f.l2:
            lines.append(f'{side}n = T.alloc_fragment((C,), "float32")')
        if _row_factor(f, side, copy) != "1.0":
            lines.append(f'{side}r = T.alloc_fragment((C,), "float32")')
        if shared:
            lines.append(f'{side}p_s = T.alloc_shared((C, K), "float32")')
        if shared and _normalised(f, side, copy):
            lines.append(f'inv_norm_{side}_s = T.alloc_shared((C,), "float32")')
    if f.l2 and (q or k):
        lines.append('sq = T.alloc_fragment((C, K), "float32")')
    if f.delta and beta:
        lines.append('bt_s = T.alloc_shared((C,), "float32")')
    return "".join(line + "\n" for line in lines)


def _column_scan(buf: str, reverse: bool) -> str:
    """Prefix (suffix if reverse) sums down the C rows of a shared [C, K] fp32 tile, one thread per column, in
    place. Not T.cumsum: its 2-D form scans each column with the 32 lanes of a warp, one row per lane, so every
    read and write of a [C, K] tile hits one shared-memory bank 32 times (a vector decay's b and db; the
    sequential stages paid it once per chunk)."""
    if reverse:
        return f"""
    for d in T.Parallel(K):
        for i in T.serial(C - 1):
            {buf}[C - 2 - i, d] = {buf}[C - 2 - i, d] + {buf}[C - 1 - i, d]
    """
    return f"""
    for d in T.Parallel(K):
        for i in T.serial(C - 1):
            {buf}[i + 1, d] = {buf}[i + 1, d] + {buf}[i, d]
    """


def _prep(f: _Features, q: bool = True, k: bool = True, beta: bool = True, shared: bool = True,
          decay: bool = True, staged: bool = False, copy: _Copy = _Copy.FULL) -> str:
    """For the chunk at t0, each where asked for: the in-chunk cumulative log decay b (`decay`), phi(x) and its
    row factors in registers (`_scaled` reads q' and k' from them), q' and k' in shared fp32 (`shared`), and
    beta'. Rows past the sequence's end are zero. `staged` (the sequential stages): the inputs are read by
    T.copy's into shared memory first, which their pipelined loop issues a chunk ahead (_copy_rows). Otherwise
    the per-row inputs (g, the gates, beta) are loaded first, in one loop: loaded where first used, after
    q's and k's feature maps and norms, each was a global load the CTA waited for. On the H100 the kernels that
    read the SLA gates so took 14-29% longer than gdn's (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session14).
    `copy`: what the shared copies hold (_Copy)."""
    s = ""
    rows = []  # (shared [C] buffer, value of row i) loaded first
    if decay and f.decay is Decay.SCALAR:
        rows.append(("b_s", "g_s[i]" if staged else "G[t0 + i, h]"))
    if not staged:
        rows += [(f"g{side}_s", f"{_row_gate(f, side)}[t0 + i, h]") for side, on in (("q", q), ("k", k))
                 if on and _row_gate(f, side)]
    if f.delta and beta:
        rows.append(("bt_s", "BETA[t0 + i, h]" + (" * GK[t0 + i, h]" if f.beta_gate else "")))
    if decay and f.decay is Decay.CONSTANT:
        s += """
    for i in T.Parallel(C):
        b_s[i] = LG[h] * T.cast(T.min(i, eos - t0 - 1) + 1, "float32")
    """
    if staged and decay and f.decay is Decay.SCALAR:
        s += """
    T.copy(G[t0:t0 + C, h], g_s)
    """
    if rows:
        s += """
    for i in T.Parallel(C):""" + "".join(f"""
        {buf}[i] = T.if_then_else(t0 + i < eos, {value}, 0.0)""" for buf, value in rows) + """
    """
    if decay and f.decay is Decay.SCALAR:
        s += """
    T.cumsum(b_s, dim=0)
    """
    elif decay and f.decay is Decay.VECTOR:
        s += """
    for i, d in T.Parallel(C, K):
        b_s[i, d] = T.if_then_else(t0 + i < eos, G[t0 + i, h, d], 0.0)
    """ + _column_scan("b_s", reverse=False)
    for side, src, fm, on in (("q", "Q", f.fq, q), ("k", "KK", f.fk, k)):
        if not on:
            continue
        x = f"{src}[t0 + i, h, d]"
        if staged:
            x = f"{side}raw_m[i, d]"
            s += f"""
    T.copy({src}[t0:t0 + C, h, :], {side}raw_m)
    """
            if _row_gate(f, side):
                s += f"""
    T.copy({_row_gate(f, side)}[t0:t0 + C, h], g{side}_s)
    """
        s += f"""
    for i, d in T.Parallel(C, K):
        {side}x[i, d] = T.if_then_else(t0 + i < eos, T.cast({x}, "float32"), 0.0)
    """
        if fm is not FeatureMap.IDENTITY:  # rows past the end stay zero (phi(0) is 1 for elu + 1, 1/2 for sigmoid)
            s += f"""
    for i, d in T.Parallel(C, K):
        {side}x[i, d] = T.if_then_else(t0 + i < eos, {_phi(fm, f"{side}x[i, d]")}, 0.0)
    """
        if f.l2:
            s += f"""
    for i, d in T.Parallel(C, K):
        sq[i, d] = {side}x[i, d] * {side}x[i, d]
    T.reduce_sum(sq, {side}n, dim=1)
    """
        factor = _row_factor(f, side, copy)
        if factor != "1.0":
            keep = f"""
        inv_norm_{side}_s[i] = {side}r[i]""" if shared and _normalised(f, side, copy) else ""
            s += f"""
    for i in T.Parallel(C):
        {side}r[i] = T.if_then_else(t0 + i < eos, {factor}, 0.0){keep}
    """
        if shared:
            s += f"""
    for i, d in T.Parallel(C, K):
        {side}p_s[i, d] = {_scaled(f, side, copy)}
    """
    return _ind(s, 0)


# ---- intra-chunk terms: qe = q' exp(b), ke = k' exp(b_C - b), A, and the delta rule's WY form ----

def _qe(f: _Features, q: str = "qp_s[i, d]", decay: str | None = None) -> str:
    """qe = q' exp(b) in dtype; `q`: q' at [i, d] (the shared copy, or _scaled's registers); `decay`: exp(b_i) as
    _row_decays computed it, else computed here."""
    return _ind(f"""
    for i, d in T.Parallel(C, K):
        qe_m[i, d] = T.cast({q} * {decay or f.exp_b("i")}, dtype)
    """, 0)


def _ke(f: _Features, k: str = "kp_s[i, d]", decay: str | None = None) -> str:
    """ke = k' exp(b_C - b) in dtype; `k` and `decay` (exp(b_C - b_i)) as in _qe."""
    return _ind(f"""
    for i, d in T.Parallel(C, K):
        ke_m[i, d] = T.cast({k} * {decay or f.exp_rest("i")}, dtype)
    """, 0)


def _row_decays(f: _Features, side: str) -> tuple[str, str, str | None]:
    """(allocation, computation, expression at row i) of the decay factor of qe (side "q": exp(b_i)) or ke ("k":
    exp(b_C - b_i)) per row, for the sequential stages that form them: one exp per row of a [C] buffer, where
    the [C, K] product took one per element on their critical path (a scalar or constant decay; empty strings
    and None without one, or with a vector decay, whose factor differs per column)."""
    if not f.has_b or f.vector:
        return "", "", None
    value = f.exp_b("i") if side == "q" else f.exp_rest("i")
    return (f'{side}d_s = T.alloc_shared((C,), "float32")\n', _ind(f"""
    for i in T.Parallel(C):
        {side}d_s[i] = {value}
    """, 0), f"{side}d_s[i]")


def _store_rows(dst: str, value: str) -> str:
    """`value` at [i, d] of every row of the chunk at t0 to the token tensor `dst` [NT, H, K], in dtype."""
    return _ind(f"""
    for i, d in T.Parallel(C, K):
        if t0 + i < eos:
            {dst}[t0 + i, h, d] = T.cast({value}, dtype)
    """, 0)


def _store_ke(f: _Features, k: str) -> str:
    """ke = k' exp(b_C - b) to KE (`k`: k' at [i, d]). A chunk-parallel stage (wy, prep) writes it so that the
    sequential stages read it instead of recomputing k' (feature map, l2 norm, gates) on their critical path."""
    return _store_rows("KE", f"{k} * {f.exp_rest('i')}")


def _store_qe(f: _Features, q: str) -> str:
    """qe = q' exp(b) to QE (`q`: q' at [i, d]), for bwd_dh as _store_ke is for states (dv_local, prep)."""
    return _store_rows("QE", f"{q} * {f.exp_b('i')}")


def _cast_qk(f: _Features, q: bool = True, shared: bool = True, copy: _Copy = _Copy.FULL) -> str:
    """q' and k' in dtype (operands of the C x C gemms of a scalar or constant decay); `shared` and `copy` as
    in _qk_value."""
    if f.vector:
        return ""
    s = f"""
    for i, d in T.Parallel(C, K):
        km_m[i, d] = T.cast({_qk_value(f, "k", shared, copy)}, dtype)
    """
    if q:
        s += f"""
    for i, d in T.Parallel(C, K):
        qm_m[i, d] = T.cast({_qk_value(f, "q", shared, copy)}, dtype)
    """
    return _ind(s, 0)


def _cast_qk_allocs(f: _Features, q: bool = True) -> str:
    if f.vector:
        return ""
    return _ind("""
    km_m = T.alloc_shared((C, K), dtype)
    """ + ("""
    qm_m = T.alloc_shared((C, K), dtype)
    """ if q else ""), 0)


def _decayed_products(X, Y, out: str, strict: bool, compact: bool = False) -> str:
    """Vector decay: out[i, j] = sum_d X_id Y_jd exp(b_id - b_jd) for j <= i (j < i if strict), else 0, into
    the shared fp32 C x C buffer `out`; X and Y give a row's value at [row, d] (_copy_row). Below the diagonal
    sub-blocks (SB rows) it runs on tensor cores: for rows in sub-block r the decay splits at the row before it,
    exp(b_i - b_j) = exp(b_i - b_r) exp(b_r - b_j), both exponents <= 0 (sub-block 0 has no columns before it).
    The diagonal sub-blocks take the exact elementwise form (SB x SB x K per sub-block instead of C x C x K per
    chunk): one column of every diagonal sub-block at a time, as the row sums of a [C, K] tile. Threads run along
    K there, so a warp reads one row of X, Y and step_s, contiguous in shared memory; with threads along the
    sub-block's columns instead (a [C, SB] tile summed over K serially) each read of Y hit one shared-memory bank
    from 16 rows, and that loop took most of gla's forward on the H100. _diagonal_decay gives the columns'
    decays, right to left. `compact`: step_s loaded by row blocks (_by_row_blocks)."""
    mask = "SB - 1 - jj < i % SB" if strict else "SB - 1 - jj <= i % SB"
    return f"""
    for i, j in T.Parallel(SB, C):
        {out}[i, j] = 0.0
    for r in T.serial(1, C // SB):
        for i, d in T.Parallel(SB, K):
            xg_m[i, d] = T.cast({X("r * SB + i")} * T.exp(b_s[r * SB + i, d] - b_s[r * SB - 1, d]), dtype)
        for j, d in T.Parallel(C, K):
            cg_m[j, d] = T.cast(T.if_then_else(
                j < r * SB, {Y("j")} * T.exp(T.min(b_s[r * SB - 1, d] - b_s[j, d], 0.0)), 0.0), dtype)
        T.gemm(xg_m, cg_m, rows_f, transpose_B=True, clear_accum=True)
        for i, j in T.Parallel(SB, C):
            {out}[r * SB + i, j] = rows_f[i, j]
    {_load_steps(compact)}
    for i, d in T.Parallel(C, K):
        diag_decay_f[i, d] = 0.0
    for jj in T.serial(SB):
        for i, d in T.Parallel(C, K):
            {_diagonal_decay("i", "SB - 1 - jj", "T.min(SB - jj, SB - 1)")}
            diag_terms_f[i, d] = T.if_then_else(
                {mask}, {X("i")} * {Y("i - i % SB + SB - 1 - jj")} * diag_decay_f[i, d], 0.0)
        T.reduce_sum(diag_terms_f, diag_column_f, dim=1)
        for i in T.Parallel(C):
            {out}[i, i - i % SB + SB - 1 - jj] = diag_column_f[i]
    """


def _load_steps(compact: bool = False) -> str:
    """step_s = exp(g) of every row of the chunk (1 past the sequence's end), for _diagonal_decay: from g itself
    rather than from differences of b, whose rounding grows with |b|; loaded where the diagonal sub-blocks start
    rather than with b, so that in the forward's output stage step_s takes the shared memory b_s had (the
    off-diagonal part is b_s's last use there), and the stage keeps three CTAs per SM on the H100. `compact`:
    by row blocks (_by_row_blocks)."""
    def load(row: str) -> str:
        return f"step_s[{row}, d] = T.exp(T.if_then_else(t0 + {row} < eos, G[t0 + {row}, h, d], 0.0))"
    if compact:
        return _ind(_by_row_blocks(load), 4).strip()
    return f"""for i, d in T.Parallel(C, K):
        {load("i")}"""


def _by_row_blocks(statement) -> str:
    """A loop over the chunk's [C, K] tile whose body (`statement(row)`, at row expression `row` and channel d)
    reads and writes shared and global memory only, as one loop over SB-row blocks that nvcc leaves rolled
    (`#pragma unroll 1`). A T.Parallel loop compiles to every element a thread takes, unrolled; by blocks of rows
    its code is SB / C of that. For the backward's chunk kernel of a vector decay (`compact`), whose compiled code
    otherwise outgrows the SM's 128 KB instruction cache: there each CTA fetches its code again from L2, and
    sla_gla's took 1.45 ms more at the same config than gla's, whose code fitted (2026-11-25-session25). A
    fragment must not appear in the body: indexed by the block, it would go to local memory. A statement of several
    lines indents its later lines relative to its first."""
    body = statement("rb * SB + ib").replace("\n", "\n" + " " * 12)
    return f"""
    for rb in T.unroll(C // SB, unroll_factor=1):
        for ib, d in T.Parallel(SB, K):
            {body}
    """


def _diagonal_decay(row: str, reset: str, step: str) -> str:
    """The update of diag_decay_f[row, d] = exp(b_i - b_j) for the next pair (i, j) of a diagonal sub-block that
    its loop visits: 1 where j = i (the sub-block offset `reset`), else the last one times one step decay, exp(g)
    of sub-block row `step`. A loop walks j right to left (row i fixed) or i down (column j fixed), so each
    step is one factor exp(g_{j+1}) or exp(g_i), each <= 1, and no product overflows: the diagonal
    sub-blocks take SB x K exps each (step_s) instead of SB x SB x K. Before j reaches i the value is 0
    (diag_decay_f starts at 0) and the loop masks it out."""
    return (f"diag_decay_f[{row}, d] = T.if_then_else({row} % SB == {reset}, 1.0, "
            f"diag_decay_f[{row}, d] * step_s[{row} - {row} % SB + {step}, d])")


def _subblock_allocs(f: _Features) -> str:
    """The scratch of _decayed_products and _pair_terms' diagonal sub-blocks (step_s: _load_steps; cg_m is also
    _pair_terms', whose other buffers bwd_chunk allocates)."""
    if not f.vector:
        return ""
    return _ind("""
    step_s = T.alloc_shared((C, K), "float32")
    xg_m = T.alloc_shared((SB, K), dtype)
    cg_m = T.alloc_shared((C, K), dtype)
    rows_f = T.alloc_fragment((SB, C), "float32")
    diag_decay_f = T.alloc_fragment((C, K), "float32")
    diag_terms_f = T.alloc_fragment((C, K), "float32")
    diag_column_f = T.alloc_fragment((C,), "float32")
    """, 0)


def _attention(f: _Features, copy: _Copy = _Copy.FULL, compact: bool = False) -> str:
    """A[i, j] = sum_d q'_id k'_jd exp(b_i - b_j) for j <= i, else 0, into A_m (dtype); `copy` as in
    _copy_row (a scalar or constant decay reads q' and k' as _cast_qk cast them); `compact` as in
    _decayed_products."""
    if f.vector:
        rows = {side: functools.partial(_copy_row, f, side, copy=copy) for side in "qk"}
        return _ind(_decayed_products(rows["q"], rows["k"], "A_s", strict=False, compact=compact) + """
    T.copy(A_s, A_m)
    """, 0)
    return _ind(f"""
    T.gemm(qm_m, km_m, A_f, transpose_B=True, clear_accum=True)
    for i, j in T.Parallel(C, C):
        A_f[i, j] = T.if_then_else(j <= i, A_f[i, j] * {f.exp_rel("i", "j")}, 0.0)
    T.copy(A_f, A_m)
    """, 0)


def _attention_allocs(f: _Features) -> str:
    acc = ('A_s = T.alloc_shared((C, C), "float32")' if f.vector else 'A_f = T.alloc_fragment((C, C), "float32")')
    return _ind(f"""
    {acc}
    A_m = T.alloc_shared((C, C), dtype)
    """, 0)


def _wy_gram(f: _Features) -> str:
    """M = strict(decayed k' k'^T) into M_s, the matrix the delta rule's triangular solve inverts I + beta M of."""
    if f.vector:
        k_row = functools.partial(_copy_row, f, "k")
        return _ind(_decayed_products(k_row, k_row, "M_s", strict=True), 0)
    return _ind(f"""
    T.gemm(km_m, km_m, M_f, transpose_B=True, clear_accum=True)
    for i, j in T.Parallel(C, C):
        M_f[i, j] = T.if_then_else(j < i, M_f[i, j] * {f.exp_rel("i", "j")}, 0.0)
    T.copy(M_f, M_s)
    """, 0)


def _wy(f: _Features, shared: bool = True) -> str:
    """The delta rule's WY form (stage wy): M (_wy_gram), L = beta M, T = (I + L)^-1 and w = T (beta k' exp(b)),
    into Tm_m, W_f and w_m. `shared` as in _qk_value (a vector decay's M needs k' in shared memory).

    The solve is blocked: a serial forward substitution over all C rows takes C - 1 steps, each a pass over a C
    x C tile with a barrier (on the H100 at 4x8192x16x128, gdn's wy took 0.56 ms per call with it at chunk 32,
    0.48 blocked). The SOLVE_BLOCK x SOLVE_BLOCK diagonal blocks of T,
    D = (I + L_D)^-1, come from SOLVE_BLOCK - 1 substitution steps taken by all blocks at once. With L_O the part
    of L below the diagonal blocks, I + L = (I + L_D)(I + N) for N = D L_O, strictly block-lower, so N^(C /
    SOLVE_BLOCK) = 0 and T = (I + N)^-1 D with (I + N)^-1 = I - N at two blocks, (I - N)(I + N^2) = I - N + N^2 -
    N^3 at four: at most four C x C gemms. Their operands are fp32 (tf32 products in 16-bit kernels, whose T is
    rounded to 16 bits after; 3xTF32 in float32 ones)."""
    return _wy_gram(f) + _ind(f"""
    for i, j in T.Parallel(C, C):
        L_s[i, j] = bt_s[i] * M_s[i, j]
        Tm_s[i, j] = T.if_then_else(i == j, 1.0, 0.0)
    for j in T.serial(SOLVE_BLOCK - 1):
        for i, c2 in T.Parallel(C, SOLVE_BLOCK):
            if i % SOLVE_BLOCK > j and c2 <= j:
                Tm_s[i, i - i % SOLVE_BLOCK + c2] = Tm_s[i, i - i % SOLVE_BLOCK + c2] - L_s[i, i - i % SOLVE_BLOCK + j] * Tm_s[i - i % SOLVE_BLOCK + j, i - i % SOLVE_BLOCK + c2]
    if C == SOLVE_BLOCK:
        T.copy(Tm_s, Tm_m)
    else:
        for i, j in T.Parallel(C, C):
            L_s[i, j] = T.if_then_else(i // SOLVE_BLOCK > j // SOLVE_BLOCK, L_s[i, j], 0.0)
        T.gemm(Tm_s, L_s, Ts_f, clear_accum=True)
        T.copy(Ts_f, N_s)
        if C == 2 * SOLVE_BLOCK:
            for i, j in T.Parallel(C, C):
                L_s[i, j] = T.if_then_else(i == j, 1.0, 0.0) - N_s[i, j]
        else:
            T.gemm(N_s, N_s, Ts_f, clear_accum=True)
            T.copy(Ts_f, N2_s)
            T.gemm(N_s, N2_s, Ts_f, clear_accum=True)
            for i, j in T.Parallel(C, C):
                L_s[i, j] = T.if_then_else(i == j, 1.0, 0.0) - N_s[i, j] + N2_s[i, j] - Ts_f[i, j]
        T.gemm(L_s, Tm_s, Ts_f, clear_accum=True)
        T.copy(Ts_f, Tm_m)
    for i, d in T.Parallel(C, K):
        kb_m[i, d] = T.cast(bt_s[i] * {_qk_value(f, "k", shared)} * {f.exp_b("i")}, dtype)
    T.gemm(Tm_m, kb_m, W_f, clear_accum=True)
    T.copy(W_f, w_m)
    """, 0)


def _wy_loaded() -> str:
    """The WY form as stage wy stored it, for bwd_delta: T (TM) and w (W, zero past the sequence's end). Reading
    them keeps the solve, and w's gemm, out of the backward's heaviest kernel."""
    return _ind("""
    T.copy(TM[ci, h, :, :], Tm_m)
    for i, d in T.Parallel(C, K):
        w_m[i, d] = T.if_then_else(t0 + i < eos, W[t0 + i, h, d], T.cast(0.0, dtype))
    """, 0)


def _wy_allocs(f: _Features, solve: bool = True) -> str:
    """The buffers of _wy (solve) or of _wy_gram and _wy_loaded."""
    gram = ("" if f.vector else """
    M_f = T.alloc_fragment((C, C), "float32")
    """) + """
    M_s = T.alloc_shared((C, C), "float32")
    """
    solved = """
    L_s = T.alloc_shared((C, C), "float32")
    Tm_s = T.alloc_shared((C, C), "float32")
    N_s = T.alloc_shared((C, C), "float32")
    N2_s = T.alloc_shared((C, C), "float32")
    Ts_f = T.alloc_fragment((C, C), "float32")
    Tm_m = T.alloc_shared((C, C), dtype)
    kb_m = T.alloc_shared((C, K), dtype)
    W_f = T.alloc_fragment((C, K), "float32")
    w_m = T.alloc_shared((C, K), dtype)
    """ if solve else """
    Tm_m = T.alloc_shared((C, C), dtype)
    w_m = T.alloc_shared((C, K), dtype)
    """
    return _ind(gram + solved, 0)


def _state_decay(f: _Features, target: str) -> str:
    if not f.has_b:
        return ""
    # a vector decay's exp(b_C) comes from a chunk-parallel stage (gc), so that the sequential stages do no
    # column scan of the chunk's decays; _load_chunk_decay reads it into gc_s
    e = "gc_s[a]" if f.vector else "T.exp(b_s[C - 1])"
    return _ind(f"""
    for a, e2 in T.Parallel(K, BV):
        {target}[a, e2] = {target}[a, e2] * {e}
    """, 0)


def _load_rows(src: str, dst: str) -> str:
    """Rows t0.. of token tensor `src` (the V-block at v0) into `dst`, zero past the sequence's end."""
    return _ind(f"""
    for i, e2 in T.Parallel(C, BV):
        {dst}[i, e2] = T.if_then_else(t0 + i < eos, {src}[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
    """, 0)


def _copy_rows(src: str, dst: str, width: str) -> str:
    """Rows t0.. of token tensor `src` into shared `dst` (all K columns, or the V-block at v0) as stored, for
    the sequential stages: a T.copy is what their T.Pipelined issues ahead (cp.async), so the next chunk's loads
    overlap this chunk's math on the critical path, where an element-wise masked load (_load_rows) is waited
    for where it stands. T.copy zero-fills past NT only: rows past eos hold the next packed sequence's tokens,
    and the stage zeroes them in the other operand of each product: one it computes (`_masked`), or one it
    still loads masked (`_load_rows`). The copy's buffer itself stays as loaded: the pipeline planner rejects
    a second write to it."""
    cols = ":" if width == "K" else "v0:v0 + BV"
    return _ind(f"""
    T.copy({src}[t0:t0 + C, h, {cols}], {dst})
    """, 0)


def _masked(dst: str, value: str) -> str:
    """`dst`[i, e2] = `value` (at [i, e2]) in dtype, zero past the sequence's end (a [C, BV] tile)."""
    return _ind(f"""
    for i, e2 in T.Parallel(C, BV):
        {dst}[i, e2] = T.if_then_else(t0 + i < eos, T.cast({value}, dtype), T.cast(0.0, dtype))
    """, 0)


def _store_state(f: _Features, frag: str, copy: str, dst: str) -> str:
    """The sequential stages' store of the state (or state gradient) fragment `frag` [K, BV] entering chunk c
    to `dst`: through the shared buffer `copy`, then as whole rows of the V-block, where a fragment's layout
    would store a few bytes per thread at a time. On the H100 this made the states and bwd_dh stages of gdn and
    retnet 12 to 16% faster, and gla's 16% (states, with its chunk decay read through shared memory too,
    `_load_chunk_decay`) and 7% (bwd_dh) (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session18/). `copy` is
    the delta rule's gemm operand (in dtype, which float16's float32 states cannot go through: they keep the
    fragment store), else a buffer of the state's own dtype (`_state_copy_alloc`)."""
    rows_store = f"T.copy({copy}, {dst}[CO[n] + c, h, :, v0:v0 + BV])\n"
    if not f.delta:
        return f"T.copy({frag}, {copy})\n" + rows_store
    fragment_store = _ind(f"""
    for a, e2 in T.Parallel(K, BV):
        {dst}[CO[n] + c, h, a, v0 + e2] = T.cast({frag}[a, e2], state_dt)
    """, 0)
    return f"T.copy({frag}, {copy})\nif state_dt == dtype:\n" + _ind(rows_store, 4) + "else:\n" + _ind(
        fragment_store, 4)


def _state_copy_alloc(f: _Features, copy: str) -> str:
    """The shared buffers of `_store_state` and `_load_chunk_decay` that the stage does not have already (the
    delta rule's state copy is a gemm operand)."""
    return (("" if f.delta else f"{copy} = T.alloc_shared((K, BV), state_dt)\n")
            + ('gc_s = T.alloc_shared((K,), "float32")\n' if f.vector else ""))


def _load_chunk_decay(f: _Features) -> str:
    """A vector decay's exp(b_C) of chunk c (stage wy's or prep's gc) into shared memory, first in the
    sequential stages' loop body: a T.copy, which their pipelined loop issues a chunk ahead, where reading gc
    in the decay's element-wise product waited for a global load on the critical path."""
    return "T.copy(GC[CO[n] + c, h, :], gc_s)\n" if f.vector else ""


# ---- kernel templates. Each is one stage; the host (`sla_dsl.backends.tilelang`) runs them in order:
#      forward:  [wy|prep] -> states -> output
#      backward: [wy|prep] -> states -> [dv_local] -> bwd_dh -> bwd_chunk [-> bwd_delta]
#      (wy, dv_local, bwd_delta: delta rule only; prep: a vector decay without it). Chunk-parallel stages have grid
#      (chunks, H) and read the chunk table; the two sequential ones (states, bwd_dh) have grid
#      (V / block_v, N * H) and do only what the recurrence needs. ----

SIGNATURE = '''{block_sizes}{state_dt}\
    # NB = N + 1 sequence boundaries: a dynamic of its own, since TileLang's C host wrapper (the CPU tests)
    # cannot solve N + 1 for N
    NT, N, NC, NB = T.dynamic("NT"), T.dynamic("N"), T.dynamic("NC"), T.dynamic("NB")

    @T.prim_func
    def {spec_name}_{stage}(
        Q: T.Tensor((NT, H, K), dtype),
        KK: T.Tensor((NT, H, K), dtype),
        VV: T.Tensor((NT, H, V), dtype),
{params}        CU: T.Tensor((NB,), "int32"),
'''

SEQUENTIAL_PROLOGUE = '''        with T.Kernel(V // BV, N * H, threads=threads) as (iv, nh):
            n = nh // H
            h = nh % H
            v0 = iv * BV
            bos = CU[n]
            eos = CU[n + 1]
'''

CHUNK_PROLOGUE = '''        with T.Kernel(NC, H, threads=threads) as (ci, h):
            n = CI[ci, 0]
            bos = CU[n]
            eos = CU[n + 1]
            t0 = bos + CI[ci, 1] * C
'''

WY = '''
def wy(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """The delta rule's WY form of every chunk (chunk-parallel). Inputs {inputs}, cu_seqlens, chunk_table
    [NC, 2] int32 (sequence, chunk within it); outputs w [NT, H, K] = T (beta k' exp(b)), u [NT, H, V] =
    T (beta v), ke [NT, H, K] = k' exp(b_C - b) and tm [NC, H, C, C] = T in dtype, T = (I + beta M)^-1 the
    chunk's triangular solve (tm: for bwd_delta){gc_doc}."""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        W: T.Tensor((NT, H, K), dtype),
        U: T.Tensor((NT, H, V), dtype),
        KE: T.Tensor((NT, H, K), dtype),
        TM: T.Tensor((NC, H, C, C), dtype),
{gc_param}    ):
''' + CHUNK_PROLOGUE + '''{allocs}            vb_m = T.alloc_shared((C, BV), dtype)
            U_f = T.alloc_fragment((C, BV), "float32")
{body}            for i, d in T.Parallel(C, K):
                if t0 + i < eos:
                    W[t0 + i, h, d] = w_m[i, d]
            T.copy(Tm_m, TM[ci, h, :, :])
            for iv in T.Pipelined(V // BV, num_stages=num_stages):
                v0 = iv * BV
                for i, e2 in T.Parallel(C, BV):
                    vb_m[i, e2] = T.cast(
                        bt_s[i] * T.if_then_else(t0 + i < eos, T.cast(VV[t0 + i, h, v0 + e2], "float32"), 0.0), dtype)
                T.gemm(Tm_m, vb_m, U_f, clear_accum=True)
                for i, e2 in T.Parallel(C, BV):
                    if t0 + i < eos:
                        U[t0 + i, h, v0 + e2] = T.cast(U_f[i, e2], dtype)

    return {spec_name}_{stage}
'''

PREP = '''
def {stage}(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """What the sequential stages of a vector decay read per chunk, computed chunk-parallel so that its column
    scan of the chunk's decays and {prepared} stay off their critical path. Inputs {inputs}, cu_seqlens,
    chunk_table [NC, 2] int32; outputs ke [NT, H, K] = k' exp(b_C - b) (for states){qe_doc} in dtype, gc [NC,
    H, K] = exp(b_C) fp32 (the chunk's decay of the state).{phase_doc}"""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        KE: T.Tensor((NT, H, K), dtype),
{qe_param}        GC: T.Tensor((NC, H, K), "float32"),
    ):
''' + CHUNK_PROLOGUE + '''{allocs}{body}
    return {spec_name}_{stage}
'''

STATES = '''
def states(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """The inter-chunk state pass, the only sequential stage of the forward: each CTA carries the state
    S[K, block_v] of one (sequence, head, V-block) in an fp32 fragment through the sequence's chunks,
    S <- exp(b_C) S + ke^T u. Inputs {inputs}, cu_seqlens, chunk_offsets [N] int32 (first global chunk of each
    sequence), h0 [N, H, K, V] fp32{delta_inputs}; outputs hs [NC, H, K, V] (the state entering every chunk,
    in dtype: the operand of the chunk-parallel stages' gemms), ht [N, H, K, V] fp32{delta_outputs}."""
''' + SIGNATURE + '''        CO: T.Tensor((N,), "int32"),
{delta_params}        H0: T.Tensor((N, H, K, V), "float32"),
        HS: T.Tensor((NC, H, K, V), state_dt),
        HT: T.Tensor((N, H, K, V), "float32"),
    ):
''' + SEQUENTIAL_PROLOGUE + '''{allocs}            ke_m = T.alloc_shared((C, K), dtype)
            S = T.alloc_fragment((K, BV), "float32")
            u_m = T.alloc_shared((C, BV), dtype)
            for a, e2 in T.Parallel(K, BV):
                S[a, e2] = H0[n, h, a, v0 + e2]
            for c in T.Pipelined(T.ceildiv(eos - bos, C), num_stages=num_stages):
                t0 = bos + c * C
{prep}{ke}{store_hs}{u}{state_decay}                T.gemm(ke_m, u_m, S, transpose_A=True)
            for a, e2 in T.Parallel(K, BV):
                HT[n, h, a, v0 + e2] = S[a, e2]

    return {spec_name}_{stage}
'''


def _states_u(f: _Features) -> dict:
    """u of the state update: v (additive), or v_new = u - w S for the delta rule (S entering the chunk,
    written to vn for the output and read back by nothing else)."""
    if not f.delta:
        # ke^T u needs the rows past eos zero in one operand: ke is, where this stage computes it (_prep); a
        # vector decay's ke is a copy of prep's, so u keeps its masked load. (Copying v and masking it in a
        # second pass made gla's forward 5% slower on the H100: benchmarks/NVIDIA_H100_80GB_HBM3/
        # 2026-11-23-session10/ab-5.log.)
        u = _copy_rows("VV", "u_m", "BV") if not f.vector else _load_rows("VV", "u_m")
        return {"u": u, "delta_params": "", "delta_allocs": "", "delta_inputs": "", "delta_outputs": ""}
    u = _copy_rows("W", "w_m", "K") + _copy_rows("U", "us_m", "BV") + _ind("""
    T.gemm(w_m, S_m, WS_f, clear_accum=True)
    """, 0) + _masked("u_m", 'T.cast(us_m[i, e2], "float32") - WS_f[i, e2]') + _ind("""
    for i, e2 in T.Parallel(C, BV):
        if t0 + i < eos:
            VN[t0 + i, h, v0 + e2] = u_m[i, e2]
    """, 0)
    return {"u": u,
            "delta_params": ('        W: T.Tensor((NT, H, K), dtype),\n        U: T.Tensor((NT, H, V), dtype),\n'
                             '        KE: T.Tensor((NT, H, K), dtype),\n        VN: T.Tensor((NT, H, V), dtype),\n'),
            "delta_allocs": _ind("""
    S_m = T.alloc_shared((K, BV), dtype)
    w_m = T.alloc_shared((C, K), dtype)
    us_m = T.alloc_shared((C, BV), dtype)
    WS_f = T.alloc_fragment((C, BV), "float32")
    """, 0),
            "delta_inputs": ", w [NT, H, K], u [NT, H, V] and ke [NT, H, K] from stage wy",
            "delta_outputs": " and v_new = u - w S [NT, H, V] in dtype (vn, before hs and ht in the arguments)"}


OUTPUT = '''
def output(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """o = qe S + A u of every chunk (chunk-parallel; A once per chunk, then block_v columns of V at a time).
    Inputs {inputs}, cu_seqlens, chunk_table [NC, 2] int32, hs [NC, H, K, V] (state entering each chunk){u_doc};
    output o [NT, H, V]."""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        HS: T.Tensor((NC, H, K, V), state_dt),
{u_param}        O: T.Tensor((NT, H, V), dtype),
    ):
''' + CHUNK_PROLOGUE + '''{allocs}            qe_m = T.alloc_shared((C, K), dtype)
{attention_allocs}            S_m = T.alloc_shared((K, BV), dtype)
            u_m = T.alloc_shared((C, BV), dtype)
            O_f = T.alloc_fragment((C, BV), "float32")
{prep}{cast_qk}{qe}{attention}            for iv in T.Pipelined(V // BV, num_stages=num_stages):
                v0 = iv * BV
{load_u}                for a, e2 in T.Parallel(K, BV):
                    S_m[a, e2] = T.cast(HS[ci, h, a, v0 + e2], dtype)
                T.gemm(qe_m, S_m, O_f, clear_accum=True)
                T.gemm(A_m, u_m, O_f)
                for i, e2 in T.Parallel(C, BV):
                    if t0 + i < eos:
                        O[t0 + i, h, v0 + e2] = T.cast(O_f[i, e2], dtype)

    return {spec_name}_{stage}
'''

STATES_OUTPUT = '''
def states_output(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """The whole forward in one sequential pass (the fused schedule): each CTA carries the state S[K, block_v] of
    one (sequence, head, V-block) through the sequence's chunks as stage states does, and computes each chunk's
    o = qe S + A v with the state it holds, so the per-chunk states never go through global memory (states
    writes them and output reads them back: twice the bytes of q at chunk 64). A is recomputed by each of the
    V / block_v CTAs of a head.{raw_doc} Inputs {inputs}, cu_seqlens, h0 [N, H, K, V] fp32; outputs o [NT, H, V]
    and ht [N, H, K, V] fp32."""
''' + SIGNATURE + '''        H0: T.Tensor((N, H, K, V), "float32"),
        O: T.Tensor((NT, H, V), dtype),
        HT: T.Tensor((N, H, K, V), "float32"),
    ):
''' + SEQUENTIAL_PROLOGUE + '''{allocs}            ke_m = T.alloc_shared((C, K), dtype)
{attention_allocs}            S = T.alloc_fragment((K, BV), "float32")
            S_m = T.alloc_shared((K, BV), dtype)
            u_m = T.alloc_shared((C, BV), dtype)
            O_f = T.alloc_fragment((C, BV), "float32")
            for a, e2 in T.Parallel(K, BV):
                S[a, e2] = H0[n, h, a, v0 + e2]
            for c in T.Pipelined(T.ceildiv(eos - bos, C), num_stages=num_stages):
                t0 = bos + c * C
{prep}{u}{body}                for i, e2 in T.Parallel(C, BV):
                    if t0 + i < eos:
                        O[t0 + i, h, v0 + e2] = T.cast(O_f[i, e2], dtype)
{state_decay}                T.gemm(ke_m, u_m, S, transpose_A=True)
            for a, e2 in T.Parallel(K, BV):
                HT[n, h, a, v0 + e2] = S[a, e2]

    return {spec_name}_{stage}
'''


def _raw_operands(f: _Features) -> bool:
    """Whether q' and k' are the inputs times one factor per row (gate, scale: identity feature maps, no L2
    norm). Then states_output's gemms read q and k as its T.copy's loaded them, and the row factors and decays
    scale the products' rows and columns, where forming q' and k' took four element-wise passes over [C, K]
    tiles per chunk (on the H100, retnet's forward at 4x8192: 0.529 -> 0.496 ms, benchmarks/
    NVIDIA_H100_80GB_HBM3/2026-11-24-session20/fused-v5-ab.log)."""
    return f.fq is FeatureMap.IDENTITY and f.fk is FeatureMap.IDENTITY and not f.l2


def _states_output_pieces(f: _Features) -> dict:
    """The parts of STATES_OUTPUT that depend on how q' and k' are formed (_raw_operands): its buffers, the
    chunk's loads, and its body up to o = qe S + A v in O_f."""
    if not _raw_operands(f):
        return {"allocs": _prep_allocs(f, beta=False, shared=False, staged=True) + _cast_qk_allocs(f)
                + "qe_m = T.alloc_shared((C, K), dtype)\n",
                "prep": _prep(f, beta=False, shared=False, staged=True),
                "body": _cast_qk(f, shared=False) + _qe(f, _scaled(f, "q")) + _ke(f, _scaled(f, "k"))
                + _attention(f) + _ind("""
    T.copy(S, S_m)
    T.gemm(qe_m, S_m, O_f, clear_accum=True)
    T.gemm(A_m, u_m, O_f)
    """, 0),
                "raw_doc": ""}
    # the row factors (_gate_scale), read from shared memory: rows past the sequence's end hold the next
    # sequence's tokens, which no stored row of o reads (A[i, j] for j <= i < eos) and ke zeroes
    allocs = _prep_allocs(f, q=False, k=False, beta=False, shared=False, staged=True) + "".join(
        f"{side}raw_m = T.alloc_shared((C, K), dtype)\n"
        + (f'g{side}_s = T.alloc_shared((C,), "float32")\n' if _row_gate(f, side) else "") for side in "qk")
    # k is copied first, q last, and q k^T is the last reader of both: TileLang issues the next chunk's copies
    # after it in that order and puts its barrier before the first (k's, which ke reads element-wise). It
    # places none for a buffer only gemms read, so with the copy of q first, or its last reader q S, one
    # warpgroup overwrote q while the other's gemm still read it (copy_hazards; a race seen on the H100,
    # fused-diag.log in the same folder)
    copies = "".join(f"T.copy({src}[t0:t0 + C, h, :], {side}raw_m)\n"
                     + (f"T.copy({_row_gate(f, side)}[t0:t0 + C, h], g{side}_s)\n" if _row_gate(f, side) else "")
                     for side, src in (("k", "KK"), ("q", "Q")))
    q_decay, k_decay = _row_decays(f, "q"), _row_decays(f, "k")
    product = lambda *factors: " * ".join(x for x in factors if x and x != "1.0")  # noqa: E731
    pair = product(_gate_scale(f, "q"), _gate_scale(f, "k", row="j"), f.exp_rel("i", "j"))
    q_row = product(_gate_scale(f, "q"), q_decay[2])
    k_row = product("kraw_m[i, d]", _gate_scale(f, "k"), k_decay[2])
    body = q_decay[1] + k_decay[1] + _ind(f'''
    for i, d in T.Parallel(C, K):
        ke_m[i, d] = T.if_then_else(
            t0 + i < eos, T.cast({k_row}, dtype), T.cast(0.0, dtype))
    T.copy(S, S_m)
    T.gemm(qraw_m, S_m, O_f, clear_accum=True)
    for i, e2 in T.Parallel(C, BV):
        O_f[i, e2] = O_f[i, e2] * {q_row}
    T.gemm(qraw_m, kraw_m, A_f, transpose_B=True, clear_accum=True)
    for i, j in T.Parallel(C, C):
        A_f[i, j] = T.if_then_else(
            j <= i, A_f[i, j] * {pair}, 0.0)
    T.copy(A_f, A_m)
    T.gemm(A_m, u_m, O_f)
    ''', 0)
    return {"allocs": allocs + q_decay[0] + k_decay[0],
            "prep": _prep(f, q=False, k=False, beta=False, shared=False, staged=True) + copies,
            "body": body,
            "raw_doc": (" q and k are the gemms' operands as loaded; the row factors and decays scale q S, the"
                        " rows and columns of q k^T, and ke.")}


DV_LOCAL = '''
def dv_local(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """The delta rule's in-chunk part of du, A^T dO (chunk-parallel), so that the sequential bwd_dh needs no
    C x C product. Inputs {inputs}, cu_seqlens, chunk_table [NC, 2] int32, do [NT, H, V]; outputs
    dvl [NT, H, V] and qe [NT, H, K] = q' exp(b) in dtype (for bwd_dh)."""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        DO: T.Tensor((NT, H, V), dtype),
        DVL: T.Tensor((NT, H, V), dtype),
        QE: T.Tensor((NT, H, K), dtype),
    ):
''' + CHUNK_PROLOGUE + '''{allocs}{attention_allocs}            do_m = T.alloc_shared((C, BV), dtype)
            du_f = T.alloc_fragment((C, BV), "float32")
{prep}{store_qe}{cast_qk}{attention}            for iv in T.Pipelined(V // BV, num_stages=num_stages):
                v0 = iv * BV
{load_do}                T.gemm(A_m, do_m, du_f, transpose_A=True, clear_accum=True)
                for i, e2 in T.Parallel(C, BV):
                    if t0 + i < eos:
                        DVL[t0 + i, h, v0 + e2] = T.cast(du_f[i, e2], dtype)

    return {spec_name}_{stage}
'''

BWD_DH = '''
def bwd_dh(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1):
    """Reverse state-gradient recurrence, the only sequential stage of the backward: dS <- exp(b_C) dS +
    qe^T dO{delta_doc}. Inputs {inputs}, cu_seqlens, chunk_offsets, do [NT, H, V]{delta_inputs}, dht [N, H, K, V]
    fp32 (zeros when the final state has no gradient); outputs dh [NC, H, K, V] in dtype (the gradient of
    the state at the end of every chunk) and dh0 [N, H, K, V] fp32{delta_outputs}."""
''' + SIGNATURE + '''        CO: T.Tensor((N,), "int32"),
        DO: T.Tensor((NT, H, V), dtype),
{delta_params}        DHT: T.Tensor((N, H, K, V), "float32"),
        DH: T.Tensor((NC, H, K, V), state_dt),
        DH0: T.Tensor((N, H, K, V), "float32"),
{delta_out_params}    ):
''' + SEQUENTIAL_PROLOGUE + '''{allocs}            qe_m = T.alloc_shared((C, K), dtype)
            dS = T.alloc_fragment((K, BV), "float32")
            do_m = T.alloc_shared((C, BV), dtype)
{delta_allocs}            for a, e2 in T.Parallel(K, BV):
                dS[a, e2] = DHT[n, h, a, v0 + e2]
            nchunks = T.ceildiv(eos - bos, C)
            for cc in T.Pipelined(nchunks, num_stages=num_stages):
                c = nchunks - 1 - cc
                t0 = bos + c * C
{prep}{qe}{store_dh}{load_do}{du}{state_decay}                T.gemm(qe_m, do_m, dS, transpose_A=True)
{dw}            for a, e2 in T.Parallel(K, BV):
                DH0[n, h, a, v0 + e2] = dS[a, e2]

    return {spec_name}_{stage}
'''


def _bwd_dh_pieces(f: _Features) -> dict:
    if not f.delta:
        return {"delta_allocs": "", "du": "", "dw": "", "delta_params": "", "delta_doc": "", "delta_inputs": "",
                "delta_outputs": "", "delta_out_params": ""}
    delta_allocs = _ind("""
    ke_m = T.alloc_shared((C, K), dtype)
    dS_m = T.alloc_shared((K, BV), dtype)
    du_f = T.alloc_fragment((C, BV), "float32")
    dvl_s = T.alloc_shared((C, BV), dtype)
    ndu_m = T.alloc_shared((C, BV), dtype)
    w_m = T.alloc_shared((C, K), dtype)
    """, 0)
    # du = A^T dO + ke dS_end (A^T dO from dv_local);  dS_in = gC dS_end + qe^T dO - w^T du, added as
    # w^T (-du) so that w is read as stored (a plain copy). du is also stored for bwd_chunk, which would
    # otherwise recompute it per V-block with two more gemms and the chunk's C x C attention.
    du = _copy_rows("DVL", "dvl_s", "BV") + _ind("""
    T.copy(dvl_s, du_f)
    T.gemm(ke_m, dS_m, du_f)
    for i, e2 in T.Parallel(C, BV):
        if t0 + i < eos:
            DU[t0 + i, h, v0 + e2] = T.cast(du_f[i, e2], dtype)
    """, 0) + _masked("ndu_m", "-du_f[i, e2]") + _copy_rows("W", "w_m", "K")
    return {"delta_allocs": delta_allocs, "du": du, "dw": _ind("""
    T.gemm(w_m, ndu_m, dS, transpose_A=True)
    """, 0), "delta_params": ('        W: T.Tensor((NT, H, K), dtype),\n'
                             '        DVL: T.Tensor((NT, H, V), dtype),\n'
                             '        QE: T.Tensor((NT, H, K), dtype),\n        KE: T.Tensor((NT, H, K), dtype),\n'),
            "delta_doc": " - w^T du, du = A^T dO + ke dS",
            "delta_inputs": ", w and ke [NT, H, K] (stage wy), dvl [NT, H, V] and qe [NT, H, K] (stage dv_local)",
            "delta_outputs": ", and du [NT, H, V] in dtype (the gradient of v_new, for bwd_chunk)",
            "delta_out_params": '        DU: T.Tensor((NT, H, V), dtype),\n'}


BWD_CHUNK = '''
def bwd_chunk(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1, min_blocks=1):
    """{summary} Inputs {inputs}, cu_seqlens, chunk_table [NC, 2]
    int32 (sequence, chunk within it), hs [NC, H, K, V] (state entering each chunk), dh [NC, H, K, V]
    (gradient of the state leaving it), do [NT, H, V]{delta_doc}; outputs {outputs_doc}. min_blocks: the CTAs
    per SM nvcc must leave registers for (__launch_bounds__), so that a CTA's latency-bound steps overlap
    another's."""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        HS: T.Tensor((NC, H, K, V), state_dt),
        DH: T.Tensor((NC, H, K, V), state_dt),
        DO: T.Tensor((NT, H, V), dtype),
{delta_params}        DQ: T.Tensor((NT, H, K), dtype),
{out_params}{grad_params}    ):
''' + CHUNK_PROLOGUE + '''            T.annotate_min_blocks_per_sm(min_blocks)
{prep_allocs}{chunk_allocs}{allocs}
{prep}{common}{pre_loop}            for iv in T.Pipelined(V // BV, num_stages=num_stages):
                v0 = iv * BV
{vloop}
{post}
    return {spec_name}_{stage}
'''

BWD_DELTA = '''
def bwd_delta(H, K, V, dtype, chunk=64, block_v=64, threads=128, num_stages=1, min_blocks=1):
    """The delta rule's backward through its WY form, one chunk per CTA (chunk-parallel): dv, dbeta, and dk and
    dg finished from the parts bwd_chunk stored{gate_doc}. Inputs {inputs}, cu_seqlens, chunk_table [NC, 2]
    int32, w [NT, H, K], tm [NC, H, C, C] and u [NT, H, V] (stage wy), du [NT, H, V] (the gradient of v_new,
    stage bwd_dh), dkp [NT, H, K] fp32, dw [NT, H, K]{dbp_doc} (stage bwd_chunk); outputs dk [NT, H, K] and
    dv [NT, H, V] in dtype, {grads_doc} fp32. min_blocks as in bwd_chunk."""
''' + SIGNATURE + '''        CI: T.Tensor((NC, 2), "int32"),
        W: T.Tensor((NT, H, K), dtype),
        TM: T.Tensor((NC, H, C, C), dtype),
        U: T.Tensor((NT, H, V), dtype),
        DU: T.Tensor((NT, H, V), dtype),
        DKP: T.Tensor((NT, H, K), "float32"),
        DW: T.Tensor((NT, H, K), dtype),
{dbp_param}        DK: T.Tensor((NT, H, K), dtype),
        DV: T.Tensor((NT, H, V), dtype),
{grad_params}    ):
''' + CHUNK_PROLOGUE + '''            T.annotate_min_blocks_per_sm(min_blocks)
{allocs}
{prep}            for iv in T.Pipelined(V // BV, num_stages=num_stages):
                v0 = iv * BV
{vloop}
{post}
    return {spec_name}_{stage}
'''


def _dg_param(f: _Features, name: str) -> str:
    """A [NT, H(, K)] fp32 tensor parameter shaped like the decay's gradient (per channel for a vector decay)."""
    return f'{name}: T.Tensor((NT, H, K), "float32")' if f.vector else f'{name}: T.Tensor((NT, H), "float32")'


def _bwd_chunk_pieces(f: _Features) -> dict:
    """bwd_chunk: everything that reads the states and their gradients (per V-block of hs, dh, do and u). Without
    the delta rule that is every input gradient. With it, dq and the parts of dk (as the gradient of k', dkp)
    and of the log decay's gradient (db, with b_C's terms at the chunk's last row) that do not go through the
    WY form, and dw = du S^T: bwd_delta reads them back and finishes. One kernel doing both kept gdn's at one or
    two CTAs per SM, by registers and shared memory (2026-11-24-session16, offline-occupancy.txt). Split, each
    tuned, and paying for storing dkp, dw and db and reading them back: on the H100 at 4x8192x16x128, gdn's
    backward 5.09 -> 4.98 ms, sla_gdn's 5.34 -> 5.35 (2026-11-24-session17, ab-split-tuned.log)."""
    gp = []
    if f.delta:
        gp += ['DKP: T.Tensor((NT, H, K), "float32")', 'DW: T.Tensor((NT, H, K), dtype)']
        if f.dg:
            gp.append(_dg_param(f, "DBP"))
    else:
        if f.dg:
            gp.append(_dg_param(f, "DG"))
    if f.read:
        gp.append('DGQ: T.Tensor((NT, H), "float32")')
    if f.gk and not f.delta:
        gp.append('DGK: T.Tensor((NT, H), "float32")')
    grad_params = "".join(f"        {p},\n" for p in gp)
    out_params = ("" if f.delta else
                  "        DK: T.Tensor((NT, H, K), dtype),\n        DV: T.Tensor((NT, H, V), dtype),\n")
    a = ("" if f.delta else """
    v_m = T.alloc_shared((C, BV), dtype)
    """) + """
    do_m = T.alloc_shared((C, BV), dtype)
    S_m = T.alloc_shared((K, BV), dtype)
    dS_m = T.alloc_shared((K, BV), dtype)
    dqe_f = T.alloc_fragment((C, K), "float32")
    dke_f = T.alloc_fragment((C, K), "float32")
    dA_f = T.alloc_fragment((C, C), "float32")
    dA_s = T.alloc_shared((C, C), "float32")
    dqA_f = T.alloc_fragment((C, K), "float32")
    dkA_f = T.alloc_fragment((C, K), "float32")
    dqp_s = T.alloc_shared((C, K), "float32")
    dkp_s = T.alloc_shared((C, K), "float32")
    """
    if f.dg:
        a += """
    sd_f = T.alloc_fragment((K, BV), "float32")
    sdr_f = T.alloc_fragment((K,), "float32")
    """
    if f.vector:
        a += """
    bl_f = T.alloc_fragment((K,), "float32")
    dgc_s = T.alloc_shared((K,), "float32")
    db_s = T.alloc_shared((C, K), "float32")
    """
    elif f.dg:
        a += """
    dgc_s = T.alloc_shared((K,), "float32")
    db_terms_f = T.alloc_fragment((C, K), "float32")
    db_rows_f = T.alloc_fragment((C,), "float32")
    dbr_f = T.alloc_fragment((C,), "float32")
    dbr_s = T.alloc_shared((C,), "float32")
    dbl_s = T.alloc_shared((C,), "float32")
    """
    a += _pair_terms_allocs(f)
    if not f.delta:  # du, which the delta rule reads as bwd_dh stored it
        a += """
    du_f = T.alloc_fragment((C, BV), "float32")
    """
    else:
        a += """
    u_m = T.alloc_shared((C, BV), dtype)
    du_m = T.alloc_shared((C, BV), dtype)
    dws_f = T.alloc_fragment((C, K), "float32")
    """
    a += """
    terms_f = T.alloc_fragment((C, K), "float32")
    dgq_f = T.alloc_fragment((C,), "float32")
    """
    if not f.delta:
        a += """
    dgk_f = T.alloc_fragment((C,), "float32")
    """
    a += _row_terms_alloc(f, ("q",) if f.delta else ("q", "k"))
    # y = phi(x), reloaded for the L2 norm's backward and for a gate's gradient unless _gate_kept_out
    if f.l2 or (f.read and not _gate_kept_out(f, "q")):
        a += """
    yq_f = T.alloc_fragment((C, K), "float32")
    """
    if (f.l2 or (f.key_gate and not _gate_kept_out(f, "k"))) and not f.delta:
        a += """
    yk_f = T.alloc_fragment((C, K), "float32")
    """
    if f.l2:
        a += """
    inv_norm_q_f = T.alloc_fragment((C,), "float32")
    """ + ("" if f.delta else """
    inv_norm_k_f = T.alloc_fragment((C,), "float32")
    """) + """
    dot_q_f = T.alloc_fragment((C,), "float32")
    """ + ("" if f.delta else """
    dot_k_f = T.alloc_fragment((C,), "float32")
    """)
    allocs = _ind(a, 0)

    pre = """
    T.clear(dqe_f)
    T.clear(dke_f)
    T.clear(dA_f)
    """
    if f.dg:
        pre += """
    for d in T.Parallel(K):
        dgc_s[d] = 0.0
    """
    if f.delta:
        pre += """
    T.clear(dws_f)
    """
    pre_loop = _ind(pre, 0)

    v = ("" if f.delta else """
    for i, e2 in T.Parallel(C, BV):
        v_m[i, e2] = T.if_then_else(t0 + i < eos, VV[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
        do_m[i, e2] = T.if_then_else(t0 + i < eos, DO[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
    """) + """
    for a, e2 in T.Parallel(K, BV):
        S_m[a, e2] = T.cast(HS[ci, h, a, v0 + e2], dtype)
        dS_m[a, e2] = T.cast(DH[ci, h, a, v0 + e2], dtype)
    """
    if f.dg:
        v += """
    for a, e2 in T.Parallel(K, BV):
        sd_f[a, e2] = T.cast(HS[ci, h, a, v0 + e2], "float32") * T.cast(DH[ci, h, a, v0 + e2], "float32")
    T.reduce_sum(sd_f, sdr_f, dim=1)
    for a in T.Parallel(K):
        dgc_s[a] = dgc_s[a] + sdr_f[a]
    """
    u_name = "v_m"
    if f.delta:
        u_name = "u_m"
        # v_new (u_m) and du as stages states and bwd_dh stored them
        v += """
    for i, e2 in T.Parallel(C, BV):
        do_m[i, e2] = T.if_then_else(t0 + i < eos, DO[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
        u_m[i, e2] = T.if_then_else(t0 + i < eos, VN[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
        du_m[i, e2] = T.if_then_else(t0 + i < eos, DU[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
    """
    else:
        v += """
    T.gemm(A_m, do_m, du_f, transpose_A=True, clear_accum=True)
    T.gemm(ke_m, dS_m, du_f)
    """
    v += f"""
    T.gemm(do_m, S_m, dqe_f, transpose_B=True)
    T.gemm(do_m, {u_name}, dA_f, transpose_B=True)
    T.gemm({u_name}, dS_m, dke_f, transpose_B=True)
    """
    if not f.delta:
        v += """
    for i, e2 in T.Parallel(C, BV):
        if t0 + i < eos:
            DV[t0 + i, h, v0 + e2] = T.cast(du_f[i, e2], dtype)
    """
    else:  # dw = -du S^T, accumulated as +du S^T (bwd_delta subtracts)
        v += """
    T.gemm(du_m, S_m, dws_f, transpose_B=True)
    """
    vloop = _ind(v, 0)

    # ---- after the V loop: the gradients of q' and k' through the intra-chunk attention and the states ----
    p = """
    for i, j in T.Parallel(C, C):
        dA_s[i, j] = T.if_then_else(j <= i, dA_f[i, j], 0.0)
    """
    q_row, k_row = (functools.partial(_copy_row, f, side, copy=_Copy.UNGATED) for side in "qk")
    p += _pair_terms(f, "dA_s", q_row, k_row, "dqA_f", "dkA_f", strict=False)
    # a vector decay's terms of b_C (_dg_chunk_end) share dk's exponential: in one loop, before the stores to shared
    # memory (after one, nvcc cannot tell that b_s did not change), it is computed once (the instruction cache)
    chunk_end_terms = f.vector and not f.delta
    statements = [f"dqp_s[i, d] = {f.exp_b('i')} * dqe_f[i, d] + dqA_f[i, d]",
                  f"dkp_s[i, d] = {f.exp_rest('i')} * dke_f[i, d] + dkA_f[i, d]"]
    if chunk_end_terms:
        statements = [f"terms_f[i, d] = {_copy_row(f, 'k', copy=_Copy.UNGATED)} * {f.exp_rest('i')} * dke_f[i, d]",
                      statements[1], statements[0]]
    p += """
    for i, d in T.Parallel(C, K):""" + "".join(f"""
        {statement}""" for statement in statements) + """
    """
    if f.dg:
        # from the shared copies just stored: for a scalar decay so that the terms' layout keeps each row within a
        # warp; for a vector one because recomputing their exponentials grew gla's compiled kernel past the SM's
        # 128 KB instruction cache, where every CTA fetches its code again (2026-11-25-session25)
        p += _db_terms(f, f"{q_row('i')} * dqp_s[i, d] - {k_row('i')} * dkp_s[i, d]", first=True,
                       **({} if f.vector else {"terms": "db_terms_f", "rows": "db_rows_f"}))
    if f.delta:
        p += _input_gradients(f, ("q",), copy=_Copy.UNGATED, compact=f.vector)
        if f.dg:
            # b_C's terms at the last row of the sequence in the chunk: the rows past it are not stored, and the
            # suffix sums bwd_delta takes carry it to every row before as from row C - 1 (b is constant past it)
            p += _dg_chunk_end(f, "T.min(C - 1, eos - t0 - 1)")
            db = "db_s[i, d]" if f.vector else "dbr_s[i]"
            p += f"""
    for i{", d" if f.vector else ""} in T.Parallel(C{", K" if f.vector else ""}):
        if t0 + i < eos:
            DBP[t0 + i, h{", d" if f.vector else ""}] = {db}
    """
        p += """
    for i, d in T.Parallel(C, K):
        if t0 + i < eos:
            DKP[t0 + i, h, d] = dkp_s[i, d]
            DW[t0 + i, h, d] = T.cast(dws_f[i, d], dtype)
    """
    else:
        if f.dg:
            p += _dg_chunk_end(f, "C - 1", terms_ready=chunk_end_terms) + _dg_suffix_store(f)
        p += _input_gradients(f, ("q", "k"), copy=_Copy.UNGATED, compact=f.vector)
    post = _ind(p, 0)
    delta_params = ('        VN: T.Tensor((NT, H, V), dtype),\n        DU: T.Tensor((NT, H, V), dtype),\n'
                    if f.delta else "")
    delta_doc = (", vn [NT, H, V] (v_new, stage states), du [NT, H, V] (the gradient of v_new, stage bwd_dh)"
                 if f.delta else "")
    if f.delta:
        summary = ("The gradients of one chunk that read the states (chunk-parallel): dq, and what bwd_delta "
                   "finishes dk and dg from.")
        outputs = ["dq [NT, H, K] in dtype", "dkp [NT, H, K] fp32 (the gradient of k' but for the WY form's terms)",
                   "dw [NT, H, K] in dtype (minus the gradient of w)"]
        if f.dg:
            outputs.append(f"dbp [NT, H{', K' if f.vector else ''}] fp32 (the log decay's gradient but for the WY "
                           "form's terms, before its suffix sum)")
        if f.read:
            outputs.append("dgq [NT, H] fp32")
        outputs_doc = ", ".join(outputs)
    else:
        summary = "Every input gradient of one chunk (chunk-parallel)."
        outputs_doc = "dq, dk [NT, H, K], dv [NT, H, V] in dtype, dg [NT, H(, K)], dbeta, dgq, dgk [NT, H] fp32"
    return {"grad_params": grad_params, "out_params": out_params, "allocs": allocs, "pre_loop": pre_loop,
            "vloop": vloop, "post": post, "delta_params": delta_params, "delta_doc": delta_doc, "summary": summary,
            "outputs_doc": outputs_doc}


def _pair_terms_allocs(f: _Features) -> str:
    """The scratch of _pair_terms."""
    if f.vector:
        return """
    pr_m = T.alloc_shared((SB, C), dtype)
    pc_m = T.alloc_shared((C, SB), dtype)
    part_f = T.alloc_fragment((SB, K), "float32")
    pair_s = T.alloc_shared((C, K), "float32")
    """
    return """
    P_m = T.alloc_shared((C, C), dtype)
    """


def _bwd_delta_pieces(f: _Features) -> dict:
    """bwd_delta: the delta rule's backward through the WY form w = T (beta k' exp(b)), u = T (beta v) with T =
    (I + strict(beta M))^-1, M = strict(decayed k' k'^T): dv, dbeta and the write gate's gradient, and dk and dg
    finished from what bwd_chunk stored."""
    gp = []
    if f.dg:
        gp.append(_dg_param(f, "DG"))
    gp.append('DBETA: T.Tensor((NT, H), "float32")')
    if f.gk:
        gp.append('DGK: T.Tensor((NT, H), "float32")')
    grad_params = "".join(f"        {p},\n" for p in gp)
    a = """
    v_m = T.alloc_shared((C, BV), dtype)
    U1_m = T.alloc_shared((C, BV), dtype)
    du_m = T.alloc_shared((C, BV), dtype)
    dkp_s = T.alloc_shared((C, K), "float32")
    dws_m = T.alloc_shared((C, K), dtype)
    dvb_f = T.alloc_fragment((C, BV), "float32")
    dvb_m = T.alloc_shared((C, BV), dtype)
    dL_f = T.alloc_fragment((C, C), "float32")
    X_f = T.alloc_fragment((C, C), "float32")
    dL_s = T.alloc_shared((C, C), "float32")
    dkb_f = T.alloc_fragment((C, K), "float32")
    dkb_m = T.alloc_shared((C, K), dtype)
    tv_f = T.alloc_fragment((C, BV), "float32")
    tvr_f = T.alloc_fragment((C,), "float32")
    dbt_s = T.alloc_shared((C,), "float32")
    Pd_f = T.alloc_fragment((C, K), "float32")
    Pt_f = T.alloc_fragment((C, K), "float32")
    rkr_f = T.alloc_fragment((C,), "float32")
    xm_f = T.alloc_fragment((C, C), "float32")
    xr_f = T.alloc_fragment((C,), "float32")
    terms_f = T.alloc_fragment((C, K), "float32")
    """ + _pair_terms_allocs(f)
    if f.vector:
        a += """
    db_s = T.alloc_shared((C, K), "float32")
    """
    elif f.dg:
        a += """
    dbr_f = T.alloc_fragment((C,), "float32")
    dbr_s = T.alloc_shared((C,), "float32")
    """
    normalised = _normalised(f, "k", _Copy.NORMALISED)
    if f.gk and not (f.key_gate and normalised):  # else the gate's gradient is the L2 step's row sum
        a += """
    dgk_f = T.alloc_fragment((C,), "float32")
    """
    a += _row_terms_alloc(f, ("k",))
    if f.l2 or f.key_gate:
        a += """
    yk_f = T.alloc_fragment((C, K), "float32")
    """
    if normalised and f.fk is not FeatureMap.IDENTITY:
        a += """
    xk_f = T.alloc_fragment((C, K), "float32")
    """
    if f.l2:
        a += ("" if normalised else """
    inv_norm_k_f = T.alloc_fragment((C,), "float32")
    """) + """
    dot_k_f = T.alloc_fragment((C,), "float32")
    """
    # k', M and the WY form as stage wy stored it; then bwd_chunk's parts
    pre = """
    for i, d in T.Parallel(C, K):
        dkp_s[i, d] = T.if_then_else(t0 + i < eos, DKP[t0 + i, h, d], 0.0)
        dws_m[i, d] = T.if_then_else(t0 + i < eos, DW[t0 + i, h, d], T.cast(0.0, dtype))
    """
    if f.vector:
        pre += """
    for i, d in T.Parallel(C, K):
        db_s[i, d] = T.if_then_else(t0 + i < eos, DBP[t0 + i, h, d], 0.0)
    """
    elif f.dg:
        pre += """
    for i in T.Parallel(C):
        dbr_s[i] = T.if_then_else(t0 + i < eos, DBP[t0 + i, h], 0.0)
    """
    pre += """
    T.clear(dL_f)
    T.clear(tv_f)
    """
    # dvb = T^T du, dv = beta dvb, dL part dvb U1^T, dbeta part sum_v dvb v: tv_f sums dvb v over the V-blocks
    # and is summed over its columns once, after the loop (its rows are split across warps, as dvb_f's)
    v = """
    for i, e2 in T.Parallel(C, BV):
        v_m[i, e2] = T.if_then_else(t0 + i < eos, VV[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
        U1_m[i, e2] = T.if_then_else(t0 + i < eos, U[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
        du_m[i, e2] = T.if_then_else(t0 + i < eos, DU[t0 + i, h, v0 + e2], T.cast(0.0, dtype))
    T.gemm(Tm_m, du_m, dvb_f, transpose_A=True, clear_accum=True)
    T.copy(dvb_f, dvb_m)
    T.gemm(dvb_m, U1_m, dL_f, transpose_B=True)
    for i, e2 in T.Parallel(C, BV):
        if t0 + i < eos:
            DV[t0 + i, h, v0 + e2] = T.cast(bt_s[i] * dvb_f[i, e2], dtype)
    for i, e2 in T.Parallel(C, BV):
        tv_f[i, e2] = tv_f[i, e2] + dvb_f[i, e2] * T.cast(v_m[i, e2], "float32")
    """
    # dkb = -T^T (du S^T), used while in registers (dkb_f holds -dkb); dL = -strict(dvb U1^T + dkb w^T) =
    # strict((T^T dws) w^T - dL_acc). At chunk 64 and 256 threads, TileLang's ThreadSync pass warns that the
    # guarded `dbt_s[i] = ...` keeps a race: a false positive. After a reduction one thread of each row's
    # replicas writes that row, and no two writers share a row (all 256 threads enumerated, session 11).
    k_row = functools.partial(_copy_row, f, "k", copy=_Copy.NORMALISED)  # k' from the copy, as the copy holds it
    p = f"""
    T.reduce_sum(tv_f, tvr_f, dim=1)
    T.gemm(Tm_m, dws_m, dkb_f, transpose_A=True, clear_accum=True)
    T.copy(dkb_f, dkb_m)
    for i, d in T.Parallel(C, K):
        terms_f[i, d] = dkb_f[i, d] * {k_row("i")} * {f.exp_b("i")}
    T.reduce_sum(terms_f, rkr_f, dim=1)
    for i in T.Parallel(C):
        dbt_s[i] = tvr_f[i] - rkr_f[i]
    for i, d in T.Parallel(C, K):
        dkp_s[i, d] = dkp_s[i, d] - bt_s[i] * {f.exp_b("i")} * dkb_f[i, d]
    """
    if f.vector:
        p += _db_terms(f, f"-bt_s[i] * {k_row('i')} * {f.exp_b('i')} * dkb_f[i, d]")
    elif f.dg:  # the same terms as rkr's, times -beta: no second row sum
        p += """
    for i in T.Parallel(C):
        dbr_s[i] = dbr_s[i] - bt_s[i] * rkr_f[i]
    """
    # xm_f reads only shared buffers, so its layout keeps each row within a warp
    p += """
    T.gemm(dkb_m, w_m, X_f, transpose_B=True, clear_accum=True)
    for i, j in T.Parallel(C, C):
        dL_s[i, j] = T.if_then_else(j < i, X_f[i, j] - dL_f[i, j], 0.0)
    for i, j in T.Parallel(C, C):
        xm_f[i, j] = dL_s[i, j] * M_s[i, j]
    T.reduce_sum(xm_f, xr_f, dim=1)
    for i in T.Parallel(C):
        dbt_s[i] = dbt_s[i] + xr_f[i]
    for i, j in T.Parallel(C, C):
        dL_s[i, j] = dL_s[i, j] * bt_s[i]
    """
    p += _pair_terms(f, "dL_s", k_row, k_row, "Pd_f", "Pt_f", strict=True)
    p += """
    for i, d in T.Parallel(C, K):
        dkp_s[i, d] = dkp_s[i, d] + Pd_f[i, d] + Pt_f[i, d]
    """
    if f.dg:
        p += _db_terms(f, f"{k_row('i')} * (Pd_f[i, d] - Pt_f[i, d])") + _dg_suffix_store(f)
    p += _input_gradients(f, ("k",), copy=_Copy.NORMALISED)
    grads = ([f"dg [NT, H{', K' if f.vector else ''}]"] if f.dg else []) + ["dbeta [NT, H]"] + (
        ["dgk [NT, H]"] if f.gk else [])
    shared_allocs = (_prep_allocs(f, q=False, copy=_Copy.NORMALISED) + _cast_qk_allocs(f, q=False)
                     + _wy_allocs(f, solve=False) + _subblock_allocs(f))
    loaded = (_prep(f, q=False, copy=_Copy.NORMALISED) + _cast_qk(f, q=False, copy=_Copy.NORMALISED) + _wy_gram(f)
              + _wy_loaded())
    return {"grad_params": grad_params, "allocs": shared_allocs + _ind(a, 0), "prep": loaded + _ind(pre, 0),
            "vloop": _ind(v, 0), "post": _ind(p, 0),
            "dbp_param": f"        {_dg_param(f, 'DBP')},\n" if f.dg else "",
            "dbp_doc": f", dbp [NT, H{', K' if f.vector else ''}] fp32" if f.dg else "",
            "gate_doc": "" if not f.gk else ", with the write gate's gradient",
            "grads_doc": ", ".join(grads)}


def _db_terms(f: _Features, expr: str, first: bool = False, terms: str = "terms_f", rows: str = "dbr_f") -> str:
    """Adds `expr` (of row i, key channel d) to the gradient of the in-chunk cumulative log decay b: per channel
    in db_s [C, K] for a vector decay, summed over the channels into dbr_s [C] for a scalar one (which then
    keeps no [C, K] tile for it), through the fragments `terms` [C, K] and `rows` [C] (a reduction's output
    takes its input's layout, so fragments of different layouts need rows of their own). `first` sets it
    instead."""
    if f.vector:
        total = expr if first else f"db_s[i, d] + {expr}"
        return f"""
    for i, d in T.Parallel(C, K):
        db_s[i, d] = {total}
    """
    total = f"{rows}[i]" if first else f"dbr_s[i] + {rows}[i]"
    return f"""
    for i, d in T.Parallel(C, K):
        {terms}[i, d] = {expr}
    T.reduce_sum({terms}, {rows}, dim=1)
    for i in T.Parallel(C):
        dbr_s[i] = {total}
    """


def _dg_chunk_end(f: _Features, row: str, terms_ready: bool = False) -> str:
    """The terms of b_C (through the state decay exp(b_C) and ke = k' exp(b_C - b)), added to db at `row` (an
    expression): C - 1, or the sequence's last row in the chunk, past which b is constant and nothing is added.
    bwd_chunk's (k' from its _Copy.UNGATED copy). `terms_ready`: a vector decay's terms_f are already computed
    (with dkp_s, in bwd_chunk)."""
    k = _copy_row(f, "k", copy=_Copy.UNGATED)
    if f.vector:
        terms = "" if terms_ready else f"""
    for i, d in T.Parallel(C, K):
        terms_f[i, d] = {k} * {f.exp_rest("i")} * dke_f[i, d]"""
        return f"""{terms}
    T.reduce_sum(terms_f, bl_f, dim=0)
    for d in T.Parallel(K):
        db_s[{row}, d] = db_s[{row}, d] + bl_f[d] + dgc_s[d] * T.exp(b_s[C - 1, d])
    """
    # b_C's total, summed over rows and channels, is the first entry of the suffix sums of its row sums
    return f"""
    for i, d in T.Parallel(C, K):
        terms_f[i, d] = {k} * {f.exp_rest("i")} * dke_f[i, d] + T.if_then_else(
            i == C - 1, dgc_s[d] * T.exp(b_s[C - 1]), 0.0)
    T.reduce_sum(terms_f, dbr_f, dim=1)
    T.copy(dbr_f, dbl_s)
    T.cumsum(dbl_s, dim=0, reverse=True)
    for i in T.Parallel(C):
        dbr_s[i] = dbr_s[i] + T.if_then_else(i == {row}, dbl_s[0], 0.0)
    """


def _dg_suffix_store(f: _Features) -> str:
    """dg: the reverse cumulative sum of db over the chunk's rows, since b is the cumulative sum of g."""
    if f.vector:
        return _column_scan("db_s", reverse=True) + """
    for i, d in T.Parallel(C, K):
        if t0 + i < eos:
            DG[t0 + i, h, d] = db_s[i, d]
    """
    return """
    T.cumsum(dbr_s, dim=0, reverse=True)
    for i in T.Parallel(C):
        if t0 + i < eos:
            DG[t0 + i, h] = dbr_s[i]
    """


def _row_terms_alloc(f: _Features, sides: tuple[str, ...]) -> str:
    """The [C, K] fragment of the row sums of _input_gradients(f, sides), where it has any: an L2 norm, or a gate
    on a side it finishes."""
    used = f.l2 or ("q" in sides and f.read) or ("k" in sides and f.key_gate)
    return """
    row_terms_f = T.alloc_fragment((C, K), "float32")
    """ if used else ""


def _input_gradients(f: _Features, sides: tuple[str, ...], copy: _Copy = _Copy.FULL,
                     compact: bool = False) -> str:
    """dq (side "q") and/or dk ("k") from the gradients of q' and k' in dqp_s / dkp_s, through the gates, the
    scale, the L2 norm and the feature maps, with the gates' gradients: dy = dx' * gate * scale; L2: dx = r (dy -
    y sum(dy y)) with r the inverse norm; then phi'. y = phi(x) (L2-normalised) is what the gates and the L2 norm
    scale. The steps of both sides share their loops; the k side also stores the delta rule's dbeta.
    The L2 step is linear in dy and the gate and scale are one number per row, so both multiply in at the final
    store, from shared memory. Scaled in place in dqp_s / dkp_s through a [C] fragment, the rows went to one
    thread each: a quarter of the threads, each row's reads on one bank (bwd_chunk at 4x8192 on the H100: retnet
    0.924 -> 0.810 ms, sla_retnet 1.243 -> 1.024, sla_gla 5.318 -> 4.441); `loop_layouts` finds such loops.
    `copy` (_Copy): a side whose shared copy leaves the gate out (UNGATED, _gate_kept_out) reads y (times the
    scale) from that copy; one whose copy is y (NORMALISED, _normalised) reads y and its inverse norms from
    there, and its L2 step's row sums serve as its gate's gradient; the others reload x from global memory and
    rebuild y. The row sums read row_terms_f (_row_terms_alloc), not the stage's terms_f, whose layout is a gemm
    accumulator's where it meets dke_f: with that one each row's sum crossed warpgroups through shared memory,
    and the loops that fill it read dqp_s / dkp_s 8 rows to a bank. `compact`: the final stores by row blocks
    (_by_row_blocks) where they read no fragment."""
    # per side: the input tensor, its feature map, its output tensor and whether a gate scales it
    names = {"q": ("Q", f.fq, "DQ", f.read), "k": ("KK", f.fk, "DK", f.key_gate)}
    on_chip = {side: copy is _Copy.UNGATED and _gate_kept_out(f, side) for side in sides}
    normalised = {side: _normalised(f, side, copy) for side in sides}
    rebuilt = [side for side in sides if not normalised[side]]
    # phi'(x) at the store: from a fragment loaded before the L2 step where the copy is y (x is not reloaded for
    # y there). Read from global memory in the store's loop, each load waits for the loop's earlier stores (the
    # pointers may alias): gdn's bwd_delta 1.038 ms against 1.167 (2026-11-25-session23, versions 3 and 4)
    x_frag = {side: normalised[side] and names[side][1] is not FeatureMap.IDENTITY for side in sides}
    inv_norm = {side: f"inv_norm_{side}_s[i]" if normalised[side] else f"inv_norm_{side}_f[i]" for side in sides}

    def loop(body, among) -> str:  # one loop over the chunk's [C, K] tile, a statement per side
        lines = "".join(f"\n        {body(side)}" for side in among)
        return f"""
    for i, d in T.Parallel(C, K):{lines}
    """ if among else ""

    def dot_sums(among) -> str:  # the L2 step's sum(dy y) per row
        return "".join(f"""
    for i, d in T.Parallel(C, K):
        row_terms_f[i, d] = d{side}p_s[i, d] * y{side}_f[i, d]
    T.reduce_sum(row_terms_f, dot_{side}_f, dim=1)
    """ for side in among)

    s = ""
    for side in sides:
        x, fm, _, gated = names[side]
        if normalised[side]:
            s += f"""
    for i, d in T.Parallel(C, K):
        y{side}_f[i, d] = {side}p_s[i, d]
    """
            if x_frag[side]:
                s += f"""
    for i, d in T.Parallel(C, K):
        x{side}_f[i, d] = T.cast({x}[T.min(t0 + i, NT - 1), h, d], 'float32')
    """
        elif f.l2 or (gated and not on_chip[side]):
            s += f"""
    for i, d in T.Parallel(C, K):
        y{side}_f[i, d] = {_phi(fm, f"T.cast({x}[T.min(t0 + i, NT - 1), h, d], 'float32')")}
    """
    if f.l2 and rebuilt:
        for side in rebuilt:
            s += f"""
    for i, d in T.Parallel(C, K):
        row_terms_f[i, d] = y{side}_f[i, d] * y{side}_f[i, d]
    T.reduce_sum(row_terms_f, inv_norm_{side}_f, dim=1)
    """
        s += """
    for i in T.Parallel(C):""" + "".join(f"""
        inv_norm_{side}_f[i] = T.rsqrt(inv_norm_{side}_f[i] + EPS)""" for side in rebuilt) + """
    """
        s += loop(lambda side: f"y{side}_f[i, d] = y{side}_f[i, d] * inv_norm_{side}_f[i]", rebuilt)
    # where the copy is y, the L2 step's sums come first: they are the gates' gradients too (times the scale)
    s += dot_sums([side for side in sides if normalised[side]])
    if "q" in sides and f.read:
        if normalised["q"]:
            dgq = "dot_q_f[i] * SC[0]"
        else:
            y_scaled = "qp_s[i, d]" if on_chip["q"] else "yq_f[i, d] * SC[0]"
            dgq = "dgq_f[i]"
            s += f"""
    for i, d in T.Parallel(C, K):
        row_terms_f[i, d] = dqp_s[i, d] * {y_scaled}
    T.reduce_sum(row_terms_f, dgq_f, dim=1)
    """
        s += f"""
    for i in T.Parallel(C):
        if t0 + i < eos:
            DGQ[t0 + i, h] = {dgq}
    """
    if "k" in sides:
        dgk = "dgk_f[i]"
        if f.key_gate and normalised["k"]:
            dgk = "dot_k_f[i]"
        elif f.key_gate:
            s += f"""
    for i, d in T.Parallel(C, K):
        row_terms_f[i, d] = dkp_s[i, d] * {"kp_s[i, d]" if on_chip["k"] else "yk_f[i, d]"}
    T.reduce_sum(row_terms_f, dgk_f, dim=1)
    """
        if f.beta_gate:
            s += """
    for i in T.Parallel(C):
        dgk_f[i] = dbt_s[i] * BETA[T.min(t0 + i, NT - 1), h]
    """
        if f.gk:
            s += f"""
    for i in T.Parallel(C):
        if t0 + i < eos:
            DGK[t0 + i, h] = {dgk}
    """
        if f.delta:
            bgate = " * GK[t0 + i, h]" if f.beta_gate else ""
            s += f"""
    for i in T.Parallel(C):
        if t0 + i < eos:
            DBETA[t0 + i, h] = dbt_s[i]{bgate}
    """
    if f.l2:
        s += dot_sums(rebuilt)
        s += loop(lambda side: f"d{side}p_s[i, d] = {inv_norm[side]} * (d{side}p_s[i, d] - y{side}_f[i, d] * "
                               f"dot_{side}_f[i])", sides)
    def stores(row: str) -> str:
        lines = ""
        for side in sides:
            x, fm, out, _ = names[side]
            x_value = f"x{side}_f[{row}, d]" if x_frag[side] else f"T.cast({x}[t0 + {row}, h, d], 'float32')"
            factors = [f"d{side}p_s[{row}, d]", _gate_scale(f, side, row=row), _dphi(fm, x_value)]
            lines += f"""
    {out}[t0 + {row}, h, d] = T.cast({" * ".join(term for term in factors if term != "1.0")}, dtype)"""
        return f"if t0 + {row} < eos:{lines}"

    if compact and not any(x_frag.values()):
        return s + _by_row_blocks(stores)
    return s + f"""
    for i, d in T.Parallel(C, K):
        {_ind(stores("i"), 8).strip()}
    """


def _pair_terms(f: _Features, P: str, X, Y, outx: str, outy: str, strict: bool) -> str:
    """For a masked C x C matrix P (shared fp32) and rows X, Y ([C, K], a row's value at [row, d] as _copy_row
    gives it; a scalar or constant decay reads them as _cast_qk cast them):
        outx[i, d] = sum_j P[i, j] Y[j, d] exp(b_id - b_jd)      outy[j, d] = sum_i P[i, j] X[i, d] exp(b_id - b_jd)
    (the gradients of sum_ij P_ij sum_d X_id Y_jd exp(b_id - b_jd) w.r.t. X and Y)."""
    if f.vector:
        # Below the diagonal sub-blocks on tensor cores, the decay split at a reference row as in
        # _decayed_products: rows of sub-block r against the columns before it (reference: the row before the
        # sub-block), columns of sub-block r against the rows after it (reference: its last row); none before the
        # first sub-block's rows or after the last one's columns. The diagonal
        # sub-blocks take the exact elementwise form, summed in diag_terms_f (threads along K, one row per warp)
        # and handed to outx / outy through shared memory. Summed in outx / outy themselves, or copied to them
        # from registers (which gives diag_terms_f their layout: 8 rows per warp), the reads of P hit one bank
        # from 8 rows at a time. outx is done before outy's off-diagonal part starts, so one shared buffer
        # (pair_s) takes both in turn: with two, gla's bwd_chunk at chunk 64 needed more shared memory than an
        # SM has once the diagonal sub-blocks read step_s.
        xmask, ymask = (("SB - 1 - jj < i % SB", "ii > j % SB") if strict
                        else ("SB - 1 - jj <= i % SB", "ii >= j % SB"))
        return f"""
    for i, d in T.Parallel(SB, K):
        pair_s[i, d] = 0.0
    for r in T.serial(1, C // SB):
        for i, j in T.Parallel(SB, C):
            pr_m[i, j] = T.cast(T.if_then_else(j < r * SB, {P}[r * SB + i, j], 0.0), dtype)
        for j, d in T.Parallel(C, K):
            cg_m[j, d] = T.cast(T.if_then_else(
                j < r * SB, {Y("j")} * T.exp(T.min(b_s[r * SB - 1, d] - b_s[j, d], 0.0)), 0.0), dtype)
        T.gemm(pr_m, cg_m, part_f, clear_accum=True)
        for i, d in T.Parallel(SB, K):
            pair_s[r * SB + i, d] = part_f[i, d] * T.exp(b_s[r * SB + i, d] - b_s[r * SB - 1, d])
    {_load_steps(compact=True)}
    for i, d in T.Parallel(C, K):
        diag_terms_f[i, d] = pair_s[i, d]
        diag_decay_f[i, d] = 0.0
    for jj in T.serial(SB):
        for i, d in T.Parallel(C, K):
            {_diagonal_decay("i", "SB - 1 - jj", "T.min(SB - jj, SB - 1)")}
            diag_terms_f[i, d] += T.if_then_else(
                {xmask},
                {P}[i, i - i % SB + SB - 1 - jj] * {Y("i - i % SB + SB - 1 - jj")} * diag_decay_f[i, d], 0.0)
    for i, d in T.Parallel(C, K):
        pair_s[i, d] = diag_terms_f[i, d]
    for i, d in T.Parallel(C, K):
        {outx}[i, d] = pair_s[i, d]
    for j, d in T.Parallel(SB, K):
        pair_s[C - SB + j, d] = 0.0
    for r in T.serial(C // SB - 1):
        for i, j in T.Parallel(C, SB):
            pc_m[i, j] = T.cast(T.if_then_else(i >= r * SB + SB, {P}[i, r * SB + j], 0.0), dtype)
        for i, d in T.Parallel(C, K):
            cg_m[i, d] = T.cast(T.if_then_else(
                i >= r * SB + SB, {X("i")} * T.exp(T.min(b_s[i, d] - b_s[r * SB + SB - 1, d], 0.0)), 0.0), dtype)
        T.gemm(pc_m, cg_m, part_f, transpose_A=True, clear_accum=True)
        for j, d in T.Parallel(SB, K):
            pair_s[r * SB + j, d] = part_f[j, d] * T.exp(b_s[r * SB + SB - 1, d] - b_s[r * SB + j, d])
    for j, d in T.Parallel(C, K):
        diag_terms_f[j, d] = pair_s[j, d]
        diag_decay_f[j, d] = 0.0
    for ii in T.serial(SB):
        for j, d in T.Parallel(C, K):
            {_diagonal_decay("j", "ii", "ii")}
            diag_terms_f[j, d] += T.if_then_else(
                {ymask}, {P}[j - j % SB + ii, j] * {X("j - j % SB + ii")} * diag_decay_f[j, d], 0.0)
    for j, d in T.Parallel(C, K):
        pair_s[j, d] = diag_terms_f[j, d]
    for j, d in T.Parallel(C, K):
        {outy}[j, d] = pair_s[j, d]
    """
    mask = "j < i" if strict else "j <= i"
    xm = "km_m" if strict else "qm_m"
    ym = "km_m"
    s = f"""
    for i, j in T.Parallel(C, C):
        P_m[i, j] = T.cast(T.if_then_else({mask}, {P}[i, j] * {f.exp_rel("i", "j")}, 0.0), dtype)
    """
    s += f"""
    T.gemm(P_m, {ym}, {outx}, clear_accum=True)
    T.gemm(P_m, {xm}, {outy}, transpose_A=True, clear_accum=True)
    """
    return s


def fusable(spec: Spec) -> bool:
    """Whether the spec's forward has the fused schedule (stage states_output): an additive write without a
    vector decay, whose chunk's output needs only q', k', v, the scalar decay and the state."""
    f = _Features(spec)
    return not (f.delta or f.vector)


def phase_kernels(spec: Spec) -> dict[str, tuple[str, ...]]:
    """The kernel factories each phase runs, in order (named by stage; `PHASES` of the generated file), and last
    in the forward, where the spec is `fusable`, states_output: the fused schedule, which runs it alone."""
    f = _Features(spec)
    first = ("wy",) if f.delta else ("prep",) if f.vector else ()
    bwd_first = ("wy",) if f.delta else ("bwd_prep",) if f.vector else ()
    return {"fwd": (*first, "states", "output", *(("states_output",) if fusable(spec) else ())),
            "bwd": (*bwd_first, "states", *(("dv_local",) if f.delta else ()), "bwd_dh", "bwd_chunk",
                    *(("bwd_delta",) if f.delta else ()))}


def generate(spec: Spec) -> dict[str, str]:
    f = _Features(spec)
    # each prim_func is named <spec>_<stage>, so profiles and compiled CUDA name the stage (<spec>_<stage>_kernel)
    common = {"spec_name": spec.name, "params": _params(f), "inputs": "(" + ", ".join(_input_names(f)) + ")",
              "state_dt": "",
              "block_sizes": ("    C, BV, SB = chunk, block_v, SUB_BLOCK\n" if f.vector
                              else "    C, BV = chunk, block_v\n")}
    # the kernels that store or read the per-chunk states and state gradients
    with_states = {**common, "state_dt": "    state_dt = state_dtype(dtype)\n"}
    at = lambda text, n: _ind("\n".join(line for line in text.splitlines() if line.strip()), n)  # noqa: E731
    factories = []
    # the chunk-parallel forward stages keep q' and k' in registers, but a vector decay's C x C products read
    # them from shared memory
    shared = f.vector
    # The sequential stages (states, bwd_dh) read what a chunk-parallel stage wrote where computing it per chunk
    # would sit on their critical path: the delta rule's ke (wy) and qe (dv_local); a vector decay's exp(b_C)
    # (gc: wy, or prep without the delta rule), and without the delta rule its ke and qe too (prep).
    gc_param = '        GC: T.Tensor((NC, H, K), "float32"),\n' if f.vector else ""
    store_gc = _ind("""
    for d in T.Parallel(K):
        GC[ci, h, d] = T.exp(b_s[C - 1, d])
    """, 0) if f.vector else ""
    if f.delta:
        factories.append(WY.format(
            stage="wy", allocs=at(_prep_allocs(f, q=False, shared=shared) + _cast_qk_allocs(f, q=False) + _wy_allocs(f)
                      + _subblock_allocs(f), 12),
            body=at(_prep(f, q=False, shared=shared)
                    + _store_ke(f, _qk_value(f, "k", shared)) + store_gc
                    + _cast_qk(f, q=False, shared=shared) + _wy(f, shared), 12),
            gc_param=gc_param, gc_doc=", and gc [NC, H, K] = exp(b_C) fp32" if f.vector else "", **common))
    prep_stage = f.vector and not f.delta
    if prep_stage:
        # the forward's prep leaves qe out (only bwd_dh reads it): a third less memory traffic
        for stage, q in (("prep", False), ("bwd_prep", True)):
            factories.append(PREP.format(
                stage=stage, prepared="q' and k'" if q else "k'",
                qe_doc=" and qe [NT, H, K] = q' exp(b) (for bwd_dh)" if q else "",
                qe_param="        QE: T.Tensor((NT, H, K), dtype),\n" if q else "",
                phase_doc=(" The backward's; the forward's (prep) leaves qe out." if q
                           else " The forward's; the backward's (bwd_prep) also writes qe."),
                allocs=at(_prep_allocs(f, q=q, beta=False, shared=False), 12),
                body=at(_prep(f, q=q, beta=False, shared=False) + _store_ke(f, _scaled(f, "k"))
                        + (_store_qe(f, _scaled(f, "q")) if q else "") + store_gc, 12),
                **common))
    st = _states_u(f)
    k_prep = not (f.delta or prep_stage)
    k_decay = _row_decays(f, "k") if k_prep else ("", "", None)
    states_params = st["delta_params"] + ('        KE: T.Tensor((NT, H, K), dtype),\n' if prep_stage else "") + gc_param
    states_inputs = st["delta_inputs"] + (", ke [NT, H, K] and gc [NC, H, K] from stage prep (bwd_prep in the "
                                          "backward)" if prep_stage
                                          else ", gc [NC, H, K] from stage wy" if f.vector else "")
    factories.append(STATES.format(
        stage="states",
        allocs=at(_prep_allocs(f, q=False, k=k_prep, beta=False, shared=False, decay=not f.vector, staged=True)
                  + k_decay[0] + st["delta_allocs"] + _state_copy_alloc(f, "S_m"), 12),
        prep=at(_load_chunk_decay(f)
                + _prep(f, q=False, k=k_prep, beta=False, shared=False, decay=not f.vector, staged=True), 16),
        ke=at(k_decay[1] + _ke(f, _scaled(f, "k"), k_decay[2]) if k_prep else _copy_rows("KE", "ke_m", "K"), 16),
        store_hs=at(_store_state(f, "S", "S_m", "HS"), 16), u=at(st["u"], 16),
        state_decay=at(_state_decay(f, "S"), 16), delta_params=states_params,
        delta_inputs=states_inputs, delta_outputs=st["delta_outputs"], **with_states))
    qk = dict(allocs=at(_prep_allocs(f, beta=False, shared=shared) + _cast_qk_allocs(f) + _subblock_allocs(f), 12),
              prep=at(_prep(f, beta=False, shared=shared), 12),
              cast_qk=at(_cast_qk(f, shared=shared), 12), attention_allocs=at(_attention_allocs(f), 12),
              attention=at(_attention(f), 12))
    factories.append(OUTPUT.format(
        stage="output", qe=at(_qe(f, _qk_value(f, "q", shared)), 12),
        u_param='        VN: T.Tensor((NT, H, V), dtype),\n' if f.delta else "",
        load_u=at(_load_rows("VN" if f.delta else "VV", "u_m"), 16),
        u_doc=", vn [NT, H, V] (v_new, stage states)" if f.delta else "", **qk, **with_states))
    if fusable(spec):
        fused = _states_output_pieces(f)
        factories.append(STATES_OUTPUT.format(
            stage="states_output", allocs=at(fused["allocs"], 12), prep=at(fused["prep"], 16),
            u=at(_copy_rows("VV", "u_m", "BV"), 16), body=at(fused["body"], 16),
            raw_doc=fused["raw_doc"],
            attention_allocs=at(_attention_allocs(f), 12), state_decay=at(_state_decay(f, "S"), 16), **common))
    if f.delta:
        factories.append(DV_LOCAL.format(
            stage="dv_local", load_do=at(_load_rows("DO", "do_m"), 16),
            store_qe=at(_store_qe(f, _qk_value(f, "q", shared)), 12), **qk, **common))
    dh = _bwd_dh_pieces(f)
    q_prep = not (f.delta or prep_stage)
    q_decay = _row_decays(f, "q") if q_prep else ("", "", None)
    dh_params = dh["delta_params"] + ('        QE: T.Tensor((NT, H, K), dtype),\n' if prep_stage else "") + gc_param
    dh_inputs = dh["delta_inputs"] + (", qe [NT, H, K] and gc [NC, H, K] from stage bwd_prep" if prep_stage
                                      else ", gc [NC, H, K] from stage wy" if f.vector else "")
    factories.append(BWD_DH.format(
        stage="bwd_dh",
        allocs=at(_prep_allocs(f, q=q_prep, k=False, beta=False, shared=False, decay=not f.vector, staged=True)
                  + q_decay[0], 12),
        prep=at(_load_chunk_decay(f)
                + _prep(f, q=q_prep, k=False, beta=False, shared=False, decay=not f.vector, staged=True), 16),
        qe=at(q_decay[1] + _qe(f, _scaled(f, "q"), q_decay[2]) if q_prep else _copy_rows("QE", "qe_m", "K")
              + (_copy_rows("KE", "ke_m", "K") if f.delta else ""), 16),
        # qe^T dO needs the rows past eos zero in one operand: qe is where this stage computes it. Where qe is
        # a copy, dO is masked: loaded masked for a vector decay (as u in states), copied and masked in a
        # second pass for the delta rule, whose backward that made 6% faster on the H100 (ab-5.log against
        # ab-6.log, same directory).
        load_do=at(_copy_rows("DO", "do_m", "BV") if q_prep
                   else _copy_rows("DO", "dor_m", "BV") + _masked("do_m", "dor_m[i, e2]") if f.delta
                   else _load_rows("DO", "do_m"), 16),
        store_dh=at(_store_state(f, "dS", "dS_m", "DH"), 16), du=at(dh["du"], 16), dw=at(dh["dw"], 16),
        state_decay=at(_state_decay(f, "dS"), 16),
        delta_allocs=at(dh["delta_allocs"] + ("dor_m = T.alloc_shared((C, BV), dtype)\n" if f.delta else "")
                        + _state_copy_alloc(f, "dS_m"), 12),
        delta_params=dh_params, delta_doc=dh["delta_doc"],
        delta_inputs=dh_inputs, delta_outputs=dh["delta_outputs"], delta_out_params=dh["delta_out_params"],
        **with_states))
    pieces = _bwd_chunk_pieces(f)
    # du = A^T dO + ke dS: the delta rule reads it as bwd_dh stored it; an additive write computes it per V-block
    du_operands = "" if f.delta else "ke_m = T.alloc_shared((C, K), dtype)\n" + _attention_allocs(f)
    chunk_allocs = du_operands + _cast_qk_allocs(f) + _subblock_allocs(f)
    chunk_common = _cast_qk(f, copy=_Copy.UNGATED)
    if not f.delta and f.vector:  # compact (_by_row_blocks): the kernel's code is at the instruction cache's size
        def ke_row(row: str) -> str:
            return f"ke_m[{row}, d] = T.cast({_copy_row(f, 'k', row, _Copy.UNGATED)} * {f.exp_rest(row)}, dtype)"
        chunk_common += _ind(_by_row_blocks(ke_row), 0) + _attention(f, copy=_Copy.UNGATED, compact=True)
    elif not f.delta:
        chunk_common += _ke(f, _copy_row(f, "k", copy=_Copy.UNGATED)) + _attention(f, copy=_Copy.UNGATED)
    factories.append(BWD_CHUNK.format(
        stage="bwd_chunk", prep_allocs=at(_prep_allocs(f, beta=False, copy=_Copy.UNGATED), 12),
        chunk_allocs=at(chunk_allocs, 12), prep=at(_prep(f, beta=False, copy=_Copy.UNGATED), 12),
        common=at(chunk_common, 12), grad_params=pieces["grad_params"], out_params=pieces["out_params"],
        allocs=at(pieces["allocs"], 12), delta_params=pieces["delta_params"], delta_doc=pieces["delta_doc"],
        summary=pieces["summary"], outputs_doc=pieces["outputs_doc"],
        pre_loop=at(pieces["pre_loop"], 12), vloop=at(pieces["vloop"], 16), post=at(pieces["post"], 12),
        **with_states))
    if f.delta:
        wy_pieces = _bwd_delta_pieces(f)
        factories.append(BWD_DELTA.format(
            stage="bwd_delta", allocs=at(wy_pieces["allocs"], 12), prep=at(wy_pieces["prep"], 12),
            vloop=at(wy_pieces["vloop"], 16), post=at(wy_pieces["post"], 12),
            **{key: wy_pieces[key] for key in ("grad_params", "dbp_param", "dbp_doc", "gate_doc", "grads_doc")},
            **common))
    phases = phase_kernels(spec)
    block_constants = ("# Rows of the sub-blocks of a vector decay's C x C products (generator._decayed_products).\n"
                       "SUB_BLOCK = 16\n" if f.vector else "")
    block_constants += ("# Rows of the diagonal blocks of the WY solve (generator._wy); chunks of 1, 2 or 4 such "
                        "blocks.\n"
                        "SOLVE_BLOCK = 16\n" if f.delta else "")
    rec = spec.recurrence
    meta = f'''
import tilelang
import tilelang.language as T

SPEC = {spec.name!r}
FEATURES = {{"decay": {rec.decay.value!r}, "write": {rec.write.value!r}, "gates": {rec.gates.value!r},
            "write_gate_on": {rec.write_gate_on.value!r}, "feature_map_q": {rec.feature_map_q.value!r},
            "feature_map_k": {rec.feature_map_k.value!r}, "qk_l2_norm": {rec.qk_l2_norm!r}}}
# The inputs every kernel takes after q, k, v, in this order (the host runtime passes them by these names).
INPUTS = {tuple(_input_names(f))!r}
# dg / dbeta / dgq / dgk outputs{', in order: dgq of bwd_chunk, the others of bwd_delta' if f.delta else ' of bwd_chunk, in order'}.
GRAD_OUTPUTS = {tuple(n for n, on in (("dg", f.has_b and f.decay is not Decay.CONSTANT), ("dbeta", f.delta),
                                        ("dgq", f.read), ("dgk", f.gk)) if on)!r}
EPS = {L2_NORM_EPS!r}
{block_constants}

def state_dtype(dtype):
    """The dtype of the stored per-chunk states and state gradients: the input dtype (the operand of the gemms
    that read them), but float32 for float16 inputs, whose range a state with little decay outgrows."""
    return "float32" if dtype == "float16" else dtype


# The kernels each phase runs, in order (the host runtime and the tuning space follow it). A forward that
# lists states_output has two schedules, which the tuning key fwd_schedule picks between: split (the kernels
# before it) and fused (states_output alone).
PHASES = {phases!r}
# Warp specialisation and TMA lowering are disabled: both have known miscompilation bugs on sm_90 in this
# TileLang version for kernels of this shape (loop-carried fragments, masked element-wise loads).
PASS_CONFIGS = {{
    tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED: True,
    tilelang.PassConfigKey.TL_DISABLE_TMA_LOWER: True,
}}
''' + MACROS
    text = (header(spec, "tilelang", "chunkwise forward and backward kernels") + meta
            + "".join(compensate(_wrap_docstring(factory)) for factory in factories))
    return {filename(spec): text}
