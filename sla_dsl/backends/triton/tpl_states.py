'''Stage "states": the only sequential pass of the forward. Grid (cdiv(K, BK), cdiv(V, BV), N * H): each program
owns a [BK, BV] block of the state S of one head of one sequence and walks its chunks in order with it in
float32 registers, storing the state entering every chunk (for stage "output" and the backward):
    v_new = v (additive) or u - w S (delta; u, w from stage "prep"), stored for the delta rule
    S <- e^{b_C} S + (k' e^{b_C - b})^T v_new   (b_C: b at the chunk's last row)
With an additive write the rows of S are independent (row k reads only column k of k' and of b), so K is split
into blocks of BK as fla does: [BK, BV] and [BK, BT] tiles are live instead of [KP, BV] and [KP, BT] ones, and
cdiv(K, BK) times as many programs share the pass. The delta rule's v_new reads every row of S: it takes
BK = KP (one block; the runtime's tuning space offers nothing else).
k' is read transposed from memory (FUSED_QK: made from the raw k and gate in registers), and a decay shared by
the key channels is applied to the rows of v_new.
Per chunk that is one or two [BT, BK] x [BK, BV]-sized products; everything parallel over the chunks
(the outputs, the in-chunk attention) is left to the stages around it.'''

# Column blocks of K an additive write may split the state into (the runtime adds the whole padded K and drops
# those not below it: runtime.key_blocks)
K_BLOCKS = (32, 64, 128)

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2, 3)]

SOURCE = '''
@triton.jit
def states_kernel(k_ws, gk, v, b_ws, lg, w_ws, u_ws, h0, ht, h_ws, vn_ws, cu_seqlens, chunk_offsets, H, K, V,
                  KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                  IS_DELTA: tl.constexpr, PREC: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
                  FUSED_QK: tl.constexpr, KEY_GATE: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr):
    tl.static_assert(BK == KP or not IS_DELTA, "the delta rule's v_new = u - w S reads every row of S: BK = KP")
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_h = i_nh // H, i_nh % H
    length = tl.load(cu_seqlens + n + 1) - tl.load(cu_seqlens + n)
    num_chunks = tl.cdiv(length, BT)
    first_chunk = tl.load(chunk_offsets + n).to(tl.int64)
    cols = i_k * BK + tl.arange(0, BK)
    kmask = cols < K
    vcols = i_v * BV + tl.arange(0, BV)
    vmask = vcols < V
    smask = kmask[:, None] & vmask[None, :]
    s_off = cols[:, None] * V + vcols[None, :]
    if HAS_H0:
        S = tl.load(h0 + i_nh.to(tl.int64) * K * V + s_off, mask=smask, other=0.).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(num_chunks):
        i_t = first_chunk + c
        tl.store(h_ws + (i_t * H + i_h) * K * V + s_off, S.to(h_ws.dtype.element_ty), mask=smask)
        tok, valid = _chunk_rows(cu_seqlens, n, c, BT)
        # k'^T loaded by its strides: a register transpose of k' costs a trip through shared memory per chunk
        if FUSED_QK:  # k_ws is the raw k: k' made here
            kT = _load_qk_t(k_ws, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS, KP)
        else:
            kT = _load_rows_t(k_ws, tok, valid, i_h, H, K, cols, kmask)
        vm = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        if IS_DELTA:
            w = tl.load(w_ws + (tok * H + i_h)[:, None] * K + cols[None, :], mask=valid[:, None] & kmask[None, :],
                        other=0.)
            vn = tl.load(u_ws + v_off, mask=vm, other=0.).to(tl.float32) - _dot_tf32(w, S, PREC)
            tl.store(vn_ws + v_off, vn.to(vn_ws.dtype.element_ty), mask=vm)
        else:
            vn = tl.load(v + v_off, mask=vm, other=0.).to(tl.float32)
        if DECAY == 3:
            bT, b_last = _chunk_decay_t(b_ws, tok, valid, i_h, H, K, cols, kmask)
            S = tl.exp(b_last)[:, None] * S + _dot(kT.to(tl.float32) * tl.exp(b_last[:, None] - bT), vn, PREC)
        elif DECAY != 0:
            # a decay shared by the key channels scales the chunk's rows of v_new ([BT, BV]) instead of k'
            b = _chunk_decay(b_ws, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
            b_last = _last_row(b, BT)
            S = tl.exp(b_last)[:, None] * S + _dot(kT, vn * tl.exp(b_last[None, :] - b), PREC)
        else:
            S = S + _dot(kT, vn, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_off, S, mask=smask)
'''
