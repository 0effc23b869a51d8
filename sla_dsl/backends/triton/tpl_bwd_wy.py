'''Stage "bwd_wy" (delta rule only): per chunk (grid (number of chunks, H), fully parallel), the gradient
through the WY form of stage "prep" (u = T (beta' v), w = T (beta' k' e^b), T = (I + L)^-1), from
dv_new (= du, stage "bwd_dh") and dw (stage "bwd_dqk"):
    dy = T^T du, dv = beta' dy;  dT = du (beta' v)^T + dw (beta' k' e^b)^T;  d(beta' k' e^b) = T^T dw
    dL = -T^T dT T^T (j < i);  dM = beta' dL with M[i, j] = sum_k k'_ik k'_jk e^{b_ik - b_jk}
then finishes dk' and db (adding the partial sums of stage "bwd_dqk"), and applies the chain rule through
beta, the write gate, the L2 norm and the key's feature map.'''

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def bwd_wy_kernel(k, v, beta, gk, lg, k_ws, b_ws, T_ws, dvn_ws, dw_ws, dk_ws, db_ws, dk, dv, dbeta, dgk, dg,
                  cu_seqlens, chunk_indices, H, K, V, KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  BV: tl.constexpr, DECAY: tl.constexpr, KEY_GATE: tl.constexpr, BETA_GATE: tl.constexpr,
                  L2_NORM: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    tok, valid = _indexed_chunk(cu_seqlens, chunk_indices, i_t, BT)
    cols = tl.arange(0, KP)
    kmask = cols < K
    rows = tl.arange(0, BT)
    km = valid[:, None] & kmask[None, :]
    k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
    # only T^T is used: loaded by its strides (see _load_rows_t)
    TmT = tl.load(T_ws + (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[None, :] * BT + rows[:, None])
    bt = _load_beta(beta, gk, tok, valid, i_h, H, BETA_GATE)
    dT = tl.zeros([BT, BT], dtype=tl.float32)
    dbt = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        vm = valid[:, None] & (vcols < V)[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        vb = tl.load(v + v_off, mask=vm, other=0.).to(tl.float32)
        du = tl.load(dvn_ws + v_off, mask=vm, other=0.)
        dy = _dot(TmT, du, PREC)
        tl.store(dv + v_off, (bt[:, None] * dy).to(dv.dtype.element_ty), mask=vm)
        dbt += tl.sum(vb * dy, 1)
        dT += _dot(du, tl.trans(bt[:, None] * vb), PREC)
    b = _chunk_decay(b_ws, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    eb = tl.exp(b)
    kp = _load_qk(k, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS)
    kbe = bt[:, None] * kp * eb
    dw = tl.load(dw_ws + k_off, mask=km, other=0.)
    dT += _dot(dw, tl.trans(kbe), PREC)
    dkbe = _dot(TmT, dw, PREC)
    dL = -_dot(_dot(TmT, dT, PREC), TmT, PREC)
    dL = tl.where(rows[:, None] > rows[None, :], dL, 0.)
    dbt += tl.sum(dL * _intra(kp, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, False, DECAY,
                           PREC), 1) + tl.sum(kp * eb * dkbe, 1)
    dM = bt[:, None] * dL
    dk_row = _intra_left(dM, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, DECAY, PREC)
    dk_col = _intra_right(dM, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, DECAY, PREC)
    dkp = tl.load(dk_ws + k_off, mask=km, other=0.) + dk_row + dk_col + bt[:, None] * eb * dkbe
    if DECAY == 3:
        db = tl.load(db_ws + k_off, mask=km, other=0.) + kp * (dk_row - dk_col) + kbe * dkbe
        _store_decay_grad(dg, db, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    elif DECAY == 2:
        db = tl.load(db_ws + tok * H + i_h, mask=valid, other=0.) + tl.sum(kp * (dk_row - dk_col) + kbe * dkbe, 1)
        _store_decay_grad(dg, db, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    dgk_rows = _qk_backward(k, gk, dk, tok, valid, i_h, H, K, cols, kmask, dkp, 1.0, False, KEY_GATE, L2_NORM, EPS)
    if KEY_GATE:
        _store_gate_grad(dgk, dgk_rows, tok, valid, i_h, H)
    if BETA_GATE:
        gate = tl.load(gk + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
        raw = tl.load(beta + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
        tl.store(dgk + tok * H + i_h, (dbt * raw).to(dgk.dtype.element_ty), mask=valid)
        dbt = dbt * gate
    tl.store(dbeta + tok * H + i_h, dbt.to(dbeta.dtype.element_ty), mask=valid)
'''
