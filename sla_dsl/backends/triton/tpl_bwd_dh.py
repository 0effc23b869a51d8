'''Stage "bwd_dh": the reverse pass over the chunks carrying dS (gradient of the state leaving the current chunk)
in float32 registers. Grid (cdiv(K, BK), cdiv(V, BV), N * H): each program owns a [BK, BV] block of dS. Stores
dS per chunk for stage "bwd_dqk", and dinitial_state at the end:
    additive: dS_in = (q' e^b)^T do + e^{b_C} dS
    delta:    dv_new = A^T do + (k' e^{b_C - b}) dS (stored: the gradient of the chunk's new values)
              dS_in = (q' e^b)^T do + e^{b_C} dS - w^T dv_new
The V columns of dS are independent. So are its rows for an additive write (row k reads only column k of q' and
of b; the gates are in q' already), and K is split into blocks of BK as in stage "states". The delta rule's
dv_new sums over every row of dS: it takes BK = KP (one block).'''

# Column blocks of K an additive write may split dS into (the runtime adds the whole padded K and drops those
# not below it: runtime.key_blocks)
K_BLOCKS = (32, 64, 128)

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2, 3)]

SOURCE = '''
@triton.jit
def bwd_dh_kernel(q_ws, k_ws, b_ws, lg, w_ws, A_ws, do, dht, dh0, dh_ws, dvn_ws, cu_seqlens, chunk_offsets,
                  H, K, V, KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                  DECAY: tl.constexpr, IS_DELTA: tl.constexpr, PREC: tl.constexpr, HAS_DHT: tl.constexpr,
                  HAS_H0: tl.constexpr):
    tl.static_assert(BK == KP or not IS_DELTA, "the delta rule's dv_new sums over every row of dS: BK = KP")
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_h = i_nh // H, i_nh % H
    length = tl.load(cu_seqlens + n + 1) - tl.load(cu_seqlens + n)
    num_chunks = tl.cdiv(length, BT)
    first_chunk = tl.load(chunk_offsets + n).to(tl.int64)
    cols = i_k * BK + tl.arange(0, BK)
    kmask = cols < K
    vcols = i_v * BV + tl.arange(0, BV)
    vmask = vcols < V
    rows = tl.arange(0, BT)
    smask = kmask[:, None] & vmask[None, :]
    s_off = cols[:, None] * V + vcols[None, :]
    if HAS_DHT:
        dS = tl.load(dht + i_nh.to(tl.int64) * K * V + s_off, mask=smask, other=0.).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for r in range(num_chunks):
        c = num_chunks - 1 - r
        i_t = first_chunk + c
        tl.store(dh_ws + (i_t * H + i_h) * K * V + s_off, dS.to(dh_ws.dtype.element_ty), mask=smask)
        tok, valid = _chunk_rows(cu_seqlens, n, c, BT)
        vm = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        dob = tl.load(do + v_off, mask=vm, other=0.)
        # q'^T loaded by its strides (no register transpose); a decay shared by the key channels scales do's rows
        qT = _load_rows_t(q_ws, tok, valid, i_h, H, K, cols, kmask)
        b = _chunk_decay(b_ws, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
        if DECAY == 3:
            bT, b_last = _chunk_decay_t(b_ws, tok, valid, i_h, H, K, cols, kmask)
            dS_in = _dot(qT.to(tl.float32) * tl.exp(bT), dob, PREC) + tl.exp(b_last)[:, None] * dS
        else:
            b_last = _last_row(b, BT)
            dS_in = _dot(qT, dob.to(tl.float32) * tl.exp(b), PREC) + tl.exp(b_last)[:, None] * dS
        if IS_DELTA:
            km = valid[:, None] & kmask[None, :]
            kp = tl.load(k_ws + (tok * H + i_h)[:, None] * K + cols[None, :], mask=km, other=0.).to(tl.float32)
            if DECAY == 3:  # A^T by its strides
                AT = tl.load(A_ws + (i_t * H + i_h) * BT * BT + rows[None, :] * BT + rows[:, None])
            else:
                AT = _dot(kp, qT, PREC) * _decay_matrix_t(b, BT)
            dvn = _dot(AT, dob, PREC) + _dot(kp * tl.exp(b_last[None, :] - b), dS, PREC)
            tl.store(dvn_ws + v_off, dvn, mask=vm)
            dS_in -= _dot(_load_rows_t(w_ws, tok, valid, i_h, H, K, cols, kmask), dvn, PREC)
        dS = dS_in
    if HAS_H0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + s_off, dS.to(dh0.dtype.element_ty), mask=smask)
'''
