'''Stage "fwd": the fused chunkwise forward. Grid (cdiv(V, BV), N * H): each program owns a V-block of
one head of one sequence and walks its chunks in order, keeping the state S [KP, BV] in float32 registers:
    u = v (additive) or T (beta' v - (beta' k' e^b) S) (delta; T from stage "intra")
    o = (q' e^b) S + A u                  (A from "intra" for a vector decay, else built here)
    S <- e^{b_C} S + (k' e^{b_C - b})^T u
No per-chunk state reaches HBM unless STORE_H (the backward's recomputation of the chunk states, which
then skips the output: STORE_O=False).'''

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)]

SOURCE = '''
@triton.jit
def fwd_kernel(q, k, v, g, beta, gq, gk, lg, h0, o, ht, h_ws, A_ws, T_ws, cu_seqlens, chunk_offsets, scale,
               H, K, V, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
               DECAY: tl.constexpr, IS_DELTA: tl.constexpr, READ_GATE: tl.constexpr, KEY_GATE: tl.constexpr,
               BETA_GATE: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
               HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_O: tl.constexpr, STORE_H: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // H, i_nh % H
    length = tl.load(cu_seqlens + n + 1) - tl.load(cu_seqlens + n)
    num_chunks = tl.cdiv(length, BT)
    first_chunk = tl.load(chunk_offsets + n).to(tl.int64)
    cols = tl.arange(0, KP)
    kmask = cols < K
    vcols = i_v * BV + tl.arange(0, BV)
    vmask = vcols < V
    rows = tl.arange(0, BT)
    smask = kmask[:, None] & vmask[None, :]
    s_off = cols[:, None] * V + vcols[None, :]
    if HAS_H0:
        S = tl.load(h0 + i_nh.to(tl.int64) * K * V + s_off, mask=smask, other=0.).to(tl.float32)
    else:
        S = tl.zeros([KP, BV], dtype=tl.float32)
    for c in range(num_chunks):
        i_t = first_chunk + c
        if STORE_H:
            tl.store(h_ws + (i_t * H + i_h) * K * V + s_off, S, mask=smask)
        tok, valid = _chunk_rows(cu_seqlens, n, c, BT)
        ws = (i_t * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :]
        b = _load_decay(g, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
        b_last = _last_row(b, BT)
        kp = _load_qk(k, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS)
        vmask2 = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        vb = tl.load(v + v_off, mask=vmask2, other=0.).to(tl.float32)
        if IS_DELTA:
            bt = _load_beta(beta, gk, tok, valid, i_h, H, BETA_GATE)
            Tm = tl.load(T_ws + ws)
            x = bt[:, None] * vb - _dot(bt[:, None] * kp * tl.exp(b), S, PREC)
            u = _dot(Tm, x, PREC)
        else:
            u = vb
        if STORE_O:
            qp = _load_qk(q, gq, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM, EPS)
            if DECAY == 3:
                A = tl.load(A_ws + ws)
            else:
                A = _dot(qp, tl.trans(kp), PREC) * _decay_matrix(b, BT, True)
            ob = _dot(qp * tl.exp(b), S, PREC) + _dot(A, u, PREC)
            tl.store(o + v_off, ob.to(o.dtype.element_ty), mask=vmask2)
        kd = kp * tl.exp(tl.minimum(b_last[None, :] - b, 0.))
        S = tl.exp(b_last)[:, None] * S + _dot(tl.trans(kd), u, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_off, S, mask=smask)
'''
