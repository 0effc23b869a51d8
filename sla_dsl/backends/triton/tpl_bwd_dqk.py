'''Stage "bwd_dqk": per chunk (grid (number of chunks, H), fully parallel), the gradients of q', k' and the
decay. Reads the chunk's entering state S (stage "states") and the gradient dS of its leaving state (stage
"bwd_dh") and loops over V-blocks of BV columns accumulating on chip (q', k' and b are loaded after the
loop, so the loop's live set is only its accumulators):
    d(q' e^b) = do S^T;  d(k' e^{b_C-b}) = v_new dS^T;  dA = do v_new^T (masked, j <= i)
    additive: dv = A^T do + (k' e^{b_C-b}) dS, stored in the loop
    delta:    dw = -dv_new S^T (dv_new from stage "bwd_dh"), for stage "bwd_wy"
then the chain rule through the in-chunk attention, the decay (dg is the reverse in-chunk cumsum of db),
the gates, the L2 norm and the feature maps. For the delta rule, dk' and db are partial here: stage
"bwd_wy" adds the WY form's share and finishes them.'''

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def bwd_dqk_kernel(q, k, gq, gk, q_ws, k_ws, v, b_ws, lg, A_ws, h_ws, dh_ws, vn_ws, dvn_ws, do, dq, dk, dv, dgq,
                   dgk, dg, dk_ws, db_ws, dw_ws, cu_seqlens, chunk_indices, scale, H, K, V, KP: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                   IS_DELTA: tl.constexpr, READ_GATE: tl.constexpr, KEY_GATE: tl.constexpr,
                   L2_NORM: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    tok, valid = _indexed_chunk(cu_seqlens, chunk_indices, i_t, BT)
    cols = tl.arange(0, KP)
    kmask = cols < K
    rows = tl.arange(0, BT)
    km = valid[:, None] & kmask[None, :]
    k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
    ws = (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :]
    state_base = (i_t.to(tl.int64) * H + i_h) * K * V
    b = _chunk_decay(b_ws, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    b_last = _last_row(b, BT)
    if not IS_DELTA:
        qp = tl.load(q_ws + k_off, mask=km, other=0.).to(tl.float32)
        kp = tl.load(k_ws + k_off, mask=km, other=0.).to(tl.float32)
        if DECAY == 3:
            A = tl.load(A_ws + ws)
        else:
            A = _dot(qp, _load_rows_t(k_ws, tok, valid, i_h, H, K, cols, kmask), PREC) * _decay_matrix(b, BT, True)
        kd = kp * tl.exp(b_last[None, :] - b)
    else:
        dw = tl.zeros([BT, KP], dtype=tl.float32)
    dqe = tl.zeros([BT, KP], dtype=tl.float32)
    dkd = tl.zeros([BT, KP], dtype=tl.float32)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    s_ds = tl.zeros([KP], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        vmask = vcols < V
        smask = kmask[:, None] & vmask[None, :]
        # the states transposed, [BV, KP], loaded by their strides (see _load_rows_t)
        st_off = state_base + cols[None, :] * V + vcols[:, None]
        St = tl.load(h_ws + st_off, mask=vmask[:, None] & kmask[None, :], other=0.)
        dSt = tl.load(dh_ws + st_off, mask=vmask[:, None] & kmask[None, :], other=0.)
        vm = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        dob = tl.load(do + v_off, mask=vm, other=0.)
        if IS_DELTA:
            vn = tl.load(vn_ws + v_off, mask=vm, other=0.)
            vnt = _load_rows_t(vn_ws, tok, valid, i_h, H, V, vcols, vmask)
        else:
            vn = tl.load(v + v_off, mask=vm, other=0.)
            vnt = _load_rows_t(v, tok, valid, i_h, H, V, vcols, vmask)
        dqe += _dot(dob, St, PREC)
        dkd += _dot(vn, dSt, PREC)
        dA += _dot(dob, vnt, PREC)
        s_ds += tl.sum(St.to(tl.float32) * dSt.to(tl.float32), 0)
        if IS_DELTA:
            dw -= _dot(tl.load(dvn_ws + v_off, mask=vm, other=0.), St, PREC)
        else:
            dS = tl.load(dh_ws + state_base + cols[:, None] * V + vcols[None, :], mask=smask, other=0.)
            du = _dot(tl.trans(A), dob, PREC) + _dot(kd, dS, PREC)
            tl.store(dv + v_off, du.to(dv.dtype.element_ty), mask=vm)
    if IS_DELTA:
        qp = tl.load(q_ws + k_off, mask=km, other=0.).to(tl.float32)
        kp = tl.load(k_ws + k_off, mask=km, other=0.).to(tl.float32)
        kd = kp * tl.exp(b_last[None, :] - b)
    dA = tl.where(rows[:, None] >= rows[None, :], dA, 0.)
    # q's gradient is finished and stored before k's is built: fewer [BT, KP] tiles live at once
    dqp = dqe * tl.exp(b) + _intra_left(dA, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC,
                                             DECAY, PREC)
    _qk_backward(q, gq, dq, dgq, tok, valid, i_h, H, K, cols, kmask, dqp, scale, True, READ_GATE, L2_NORM, EPS)
    db = qp * dqp
    db_last = tl.sum(kd * dkd, 0) + tl.exp(b_last) * s_ds
    dkp = dkd * tl.exp(b_last[None, :] - b) + _intra_right(dA, qp, q_ws, b, b_ws, tok, valid, i_h, H, K, cols,
                                                                  kmask, BT, BC, DECAY, PREC)
    if DECAY >= 2:
        db = _fold_last(db - kp * dkp, db_last, valid, DECAY, BT)
        if not IS_DELTA:
            _store_decay_grad(dg, db, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
        elif DECAY == 3:
            tl.store(db_ws + k_off, db, mask=km)
        else:
            tl.store(db_ws + tok * H + i_h, db, mask=valid)
    if IS_DELTA:
        tl.store(dk_ws + k_off, dkp, mask=km)
        tl.store(dw_ws + k_off, dw, mask=km)
    else:
        _qk_backward(k, gk, dk, dgk, tok, valid, i_h, H, K, cols, kmask, dkp, 1.0, False, KEY_GATE, L2_NORM, EPS)
'''
