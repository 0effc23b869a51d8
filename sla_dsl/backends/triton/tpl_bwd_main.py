'''Stage "bwd_main": per chunk (grid (number of chunks, H), fully parallel), every gradient. Reads the
chunk's entering state S (stage "fwd" with STORE_H) and the gradient dS of its leaving state (stage
"bwd_dh"), loops over V-blocks of BV columns accumulating the K- and T-sized partial gradients on chip
(so no per-V-block partials reach HBM), then applies the chain rule back through the decay (dg is the
reverse in-chunk cumsum of db), beta, the gates, the L2 norm and the feature maps, in registers:
    u = T X, X = beta' v - (beta' k' e^b) S (delta; additive: u = v)
    du = A^T do + (k' e^{b_C-b}) dS;  dA = do u^T;  d(q' e^b) = do S^T;  d(k' e^{b_C-b}) = u dS^T
    delta: dX = T^T du, dv = beta' dX, dT = du X^T, dL = -T^T dT T^T, d(beta' k' e^b) = -dX S^T'''

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def bwd_main_kernel(q, k, v, g, beta, gq, gk, lg, do, h_ws, dh_ws, A_ws, T_ws, cu_seqlens, chunk_indices,
                    dq, dk, dv, dg, dbeta, dgq, dgk, scale, H, K, V, KP: tl.constexpr, BT: tl.constexpr,
                    BC: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, IS_DELTA: tl.constexpr,
                    READ_GATE: tl.constexpr, KEY_GATE: tl.constexpr, BETA_GATE: tl.constexpr,
                    L2_NORM: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    n = tl.load(chunk_indices + 2 * i_t)
    c = tl.load(chunk_indices + 2 * i_t + 1)
    tok, valid = _chunk_rows(cu_seqlens, n, c, BT)
    cols = tl.arange(0, KP)
    kmask = cols < K
    rows = tl.arange(0, BT)
    ws = (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :]
    state_base = (i_t.to(tl.int64) * H + i_h) * K * V
    b = _load_decay(g, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    b_last = _last_row(b, BT)
    eb = tl.exp(b)
    eb_tail = tl.exp(tl.minimum(b_last[None, :] - b, 0.))
    qp = _load_qk(q, gq, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM, EPS)
    kp = _load_qk(k, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS)
    kd = kp * eb_tail
    if DECAY == 3:
        A = tl.load(A_ws + ws)
    else:
        A = _dot(qp, tl.trans(kp), PREC) * _decay_matrix(b, BT, True)
    if IS_DELTA:
        bt = _load_beta(beta, gk, tok, valid, i_h, H, BETA_GATE)
        Tm = tl.load(T_ws + ws)
        kbe = bt[:, None] * kp * eb
        dT = tl.zeros([BT, BT], dtype=tl.float32)
        dkbe = tl.zeros([BT, KP], dtype=tl.float32)
        dbt = tl.zeros([BT], dtype=tl.float32)
    dqe = tl.zeros([BT, KP], dtype=tl.float32)
    dkd = tl.zeros([BT, KP], dtype=tl.float32)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    s_ds = tl.zeros([KP], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        vmask = vcols < V
        smask = kmask[:, None] & vmask[None, :]
        s_off = state_base + cols[:, None] * V + vcols[None, :]
        S = tl.load(h_ws + s_off, mask=smask, other=0.)
        dS = tl.load(dh_ws + s_off, mask=smask, other=0.)
        tmask = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        vb = tl.load(v + v_off, mask=tmask, other=0.).to(tl.float32)
        dob = tl.load(do + v_off, mask=tmask, other=0.).to(tl.float32)
        if IS_DELTA:
            x = bt[:, None] * vb - _dot(kbe, S, PREC)
            u = _dot(Tm, x, PREC)
        else:
            u = vb
        du = _dot(tl.trans(A), dob, PREC) + _dot(kd, dS, PREC)
        dqe += _dot(dob, tl.trans(S), PREC)
        dkd += _dot(u, tl.trans(dS), PREC)
        dA += _dot(dob, tl.trans(u), PREC)
        s_ds += tl.sum(S * dS, 1)
        if IS_DELTA:
            dx = _dot(tl.trans(Tm), du, PREC)
            tl.store(dv + v_off, (bt[:, None] * dx).to(dv.dtype.element_ty), mask=tmask)
            dbt += tl.sum(vb * dx, 1)
            dkbe -= _dot(dx, tl.trans(S), PREC)
            dT += _dot(du, tl.trans(x), PREC)
        else:
            tl.store(dv + v_off, du.to(dv.dtype.element_ty), mask=tmask)
    dA = tl.where(rows[:, None] >= rows[None, :], dA, 0.)
    dqp = dqe * eb + _intra_left(dA, kp, b, BT, BC, DECAY, PREC)
    dkp = dkd * eb_tail + _intra_right(dA, qp, b, BT, BC, DECAY, PREC)
    db = qp * dqp - kp * dkp
    db_last = tl.sum(kd * dkd, 0) + tl.exp(b_last) * s_ds
    if IS_DELTA:
        dL = -_dot(_dot(tl.trans(Tm), dT, PREC), tl.trans(Tm), PREC)
        dL = tl.where(rows[:, None] > rows[None, :], dL, 0.)
        M = _intra(kp, kp, b, BT, BC, False, DECAY, PREC)
        dbt += tl.sum(dL * M, 1)
        dM = bt[:, None] * dL
        dk_row = _intra_left(dM, kp, b, BT, BC, DECAY, PREC)
        dk_col = _intra_right(dM, kp, b, BT, BC, DECAY, PREC)
        dkp += dk_row + dk_col + bt[:, None] * eb * dkbe
        db += kp * (dk_row - dk_col) + kbe * dkbe
        dbt += tl.sum(kp * eb * dkbe, 1)
    last = (rows == BT - 1)[:, None]
    if DECAY == 3:
        db = tl.where(last, db + db_last[None, :], db)
        dgb = _prefix_sum_rows(db, BT, True)
        tl.store(dg + (tok * H + i_h)[:, None] * K + cols[None, :], dgb.to(dg.dtype.element_ty),
                 mask=valid[:, None] & kmask[None, :])
    elif DECAY == 2:
        dbs = tl.sum(db, 1) + tl.where(rows == BT - 1, tl.sum(db_last, 0), 0.)
        dgs = _prefix_sum(dbs, BT, True)
        tl.store(dg + tok * H + i_h, dgs.to(dg.dtype.element_ty), mask=valid)
    _qk_backward(q, gq, dq, dgq, tok, valid, i_h, H, K, cols, kmask, dqp, scale, True, READ_GATE, L2_NORM, EPS)
    _qk_backward(k, gk, dk, dgk, tok, valid, i_h, H, K, cols, kmask, dkp, 1.0, False, KEY_GATE, L2_NORM, EPS)
    if IS_DELTA:
        if BETA_GATE:
            gate = tl.load(gk + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
            raw = tl.load(beta + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
            tl.store(dgk + tok * H + i_h, (dbt * raw).to(dgk.dtype.element_ty), mask=valid)
            dbt = dbt * gate
        tl.store(dbeta + tok * H + i_h, dbt.to(dbeta.dtype.element_ty), mask=valid)
'''
