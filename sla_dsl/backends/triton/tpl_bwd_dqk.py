'''Stage "bwd_dqk": per chunk (grid (number of chunks, H), fully parallel), the gradients of q', k' and the
decay. Reads the chunk's entering state S (stage "states") and the gradient dS of its leaving state (stage
"bwd_dh") and loops over V-blocks of BV columns accumulating on chip (q', k' and b are loaded after the
loop, so the loop's live set is only its accumulators):
    d(q' e^b) = do S^T;  d(k' e^{b_C-b}) = v_new dS^T;  dA = do v_new^T (masked, j <= i)
    additive: dv = A^T do + (k' e^{b_C-b}) dS, stored in the loop
    delta:    dw = -dv_new S^T (dv_new from stage "bwd_dh"), for stage "bwd_wy"
then the chain rule through the in-chunk attention, the decay (dg is the reverse in-chunk cumsum of db),
the gates, the L2 norm and the feature maps. For the delta rule, dk' and db are partial here: stage
"bwd_wy" adds the WY form's share and finishes them.
A vector decay with an additive write and no L2 norm runs one program per column block of BK keys (a K_BLOCKS
value, or KP), grid (number of chunks, H, cdiv(K, BK)); _dqk_by_key_blocks: every term of its dq', dk' and db
is per key channel but dA, and dA needs no K, so each program holds [BT, BK] tiles, not [BT, KP] ones. Other
recurrences take BK = KP, one program per chunk and head.'''

from sla_dsl.spec import Decay, Recurrence, WriteRule

# Compiled for sm_90 (gla, K = 128, bf16), whole rows of K took all 255 registers and spilled 40 B of stack per
# thread at chunk 16 on 4 warps, 1560 B at chunk 32 and 5768 B at chunk 64. One program per key block, on 4
# warps: chunk 16 takes 96 registers (BK 32), chunk 32 241; chunk 64 spills (72 B with BK 16, 904 with BK 32).
# On the H100 at (4, 8192, 16, 128), chunk 16 (2026-11-25-session24/ab-dqk-*.log, ab-gla_*.log): this stage took
# 5.27 ms on whole rows, 4.70 by blocks of 32 on 4 warps, 4.57 on 2 warps, 9.70 by blocks of 16. The same key
# blocks looped over inside one program (126 registers) were slower than whole rows, 5.66 ms, for reasons not
# established (that folder's README): hence a program per block.
K_BLOCKS = (16, 32, 64)


def splits_keys(rec: Recurrence) -> bool:
    """Whether the kernel works by key blocks (BK) for `rec`: the condition of _dqk_by_key_blocks."""
    return rec.decay is Decay.VECTOR and rec.write is WriteRule.ADDITIVE and not rec.qk_l2_norm

# 2 warps for the key blocks' small tiles (see K_BLOCKS)
TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def _dqk_by_key_blocks(q, k, gq, gk, q_ws, k_ws, v, b_ws, A_ws, h_ws, dh_ws, do, dq, dk, dv, dgq, dgk, dg, tok,
                       valid, i_h, ws, state_base, scale, H, K, V, gate_block, KP: tl.constexpr, BK: tl.constexpr,
                       BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, READ_GATE: tl.constexpr,
                       KEY_GATE: tl.constexpr, PREC: tl.constexpr):
    """bwd_dqk of a vector decay with an additive write and no L2 norm for the key block program_id(2) of one
    chunk: dA = do v^T (each key block's program makes its own: it needs no K), that block's columns of dq', dk'
    and db, and the gates' row sums over its columns, stored as one of cdiv(K, BK) partial sums (gate_block
    apart; the host adds them up). dv = A^T do + (k' e^{b_C-b}) dS sums over all of K: its V-blocks are dealt out
    across the key blocks' programs, each looping over every key block for its own."""
    i_k, n_k = tl.program_id(2), tl.num_programs(2)
    rows = tl.arange(0, BT)
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        vmask = vcols < V
        dob = tl.load(do + (tok * H + i_h)[:, None] * V + vcols[None, :], mask=valid[:, None] & vmask[None, :],
                      other=0.)
        dA += _dot(dob, _load_rows_t(v, tok, valid, i_h, H, V, vcols, vmask), PREC)
    dA = tl.where(rows[:, None] >= rows[None, :], dA, 0.)
    A = tl.load(A_ws + ws)
    for v0 in range(i_k * BV, V, n_k * BV):
        vcols = v0 + tl.arange(0, BV)
        vmask = vcols < V
        vm = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        du = _dot(tl.trans(A), tl.load(do + v_off, mask=vm, other=0.), PREC)
        for k0 in range(0, KP, BK):
            cols = k0 + tl.arange(0, BK)
            kmask = cols < K
            b = _chunk_decay(b_ws, b_ws, tok, valid, i_h, H, K, cols, kmask, 3, BT)
            kp = tl.load(k_ws + (tok * H + i_h)[:, None] * K + cols[None, :], mask=valid[:, None] & kmask[None, :],
                         other=0.).to(tl.float32)
            dS = tl.load(dh_ws + state_base + cols[:, None] * V + vcols[None, :],
                         mask=kmask[:, None] & vmask[None, :], other=0.)
            du += _dot(kp * tl.exp(_last_row(b, BT)[None, :] - b), dS, PREC)
        tl.store(dv + v_off, du.to(dv.dtype.element_ty), mask=vm)
    cols = i_k * BK + tl.arange(0, BK)
    kmask = cols < K
    km = valid[:, None] & kmask[None, :]
    k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
    dqe = tl.zeros([BT, BK], dtype=tl.float32)
    dkd = tl.zeros([BT, BK], dtype=tl.float32)
    s_ds = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vcols = v0 + tl.arange(0, BV)
        vmask = vcols < V
        vm = valid[:, None] & vmask[None, :]
        v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
        st_off = state_base + cols[None, :] * V + vcols[:, None]
        St = tl.load(h_ws + st_off, mask=vmask[:, None] & kmask[None, :], other=0.)
        dSt = tl.load(dh_ws + st_off, mask=vmask[:, None] & kmask[None, :], other=0.)
        dqe += _dot(tl.load(do + v_off, mask=vm, other=0.), St, PREC)
        dkd += _dot(tl.load(v + v_off, mask=vm, other=0.), dSt, PREC)
        s_ds += tl.sum(St.to(tl.float32) * dSt.to(tl.float32), 0)
    b = _chunk_decay(b_ws, b_ws, tok, valid, i_h, H, K, cols, kmask, 3, BT)
    b_last = _last_row(b, BT)
    qp = tl.load(q_ws + k_off, mask=km, other=0.).to(tl.float32)
    kp = tl.load(k_ws + k_off, mask=km, other=0.).to(tl.float32)
    dqp = dqe * tl.exp(b) + _vec_left(dA, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, PREC)
    dgq_rows = _qk_backward(q, gq, dq, tok, valid, i_h, H, K, cols, kmask, dqp, scale, True, READ_GATE, False, 0.)
    db_last = tl.sum(kp * tl.exp(b_last[None, :] - b) * dkd, 0) + tl.exp(b_last) * s_ds
    dkp = dkd * tl.exp(b_last[None, :] - b) + _vec_right(dA, qp, q_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask,
                                                           BT, BC, PREC)
    _store_decay_grad(dg, _fold_last(qp * dqp - kp * dkp, db_last, valid, 3, BT), tok, valid, i_h, H, K, cols, kmask,
                      3, BT)
    dgk_rows = _qk_backward(k, gk, dk, tok, valid, i_h, H, K, cols, kmask, dkp, 1.0, False, KEY_GATE, False, 0.)
    if READ_GATE:
        _store_gate_grad(dgq + i_k * gate_block, dgq_rows, tok, valid, i_h, H)
    if KEY_GATE:
        _store_gate_grad(dgk + i_k * gate_block, dgk_rows, tok, valid, i_h, H)


@triton.jit
def bwd_dqk_kernel(q, k, gq, gk, q_ws, k_ws, v, b_ws, lg, A_ws, h_ws, dh_ws, vn_ws, dvn_ws, do, dq, dk, dv, dgq,
                   dgk, dg, dk_ws, db_ws, dw_ws, cu_seqlens, chunk_indices, scale, H, K, V, gate_block,
                   KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr,
                   DECAY: tl.constexpr, IS_DELTA: tl.constexpr, READ_GATE: tl.constexpr, KEY_GATE: tl.constexpr,
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
    if DECAY == 3 and not IS_DELTA and not L2_NORM:
        _dqk_by_key_blocks(q, k, gq, gk, q_ws, k_ws, v, b_ws, A_ws, h_ws, dh_ws, do, dq, dk, dv, dgq, dgk, dg, tok,
                           valid, i_h, ws, state_base, scale, H, K, V, gate_block, KP, BK, BT, BC, BV, READ_GATE,
                           KEY_GATE, PREC)
    else:
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
        dgq_rows = _qk_backward(q, gq, dq, tok, valid, i_h, H, K, cols, kmask, dqp, scale, True, READ_GATE, L2_NORM,
                                EPS)
        if READ_GATE:
            _store_gate_grad(dgq, dgq_rows, tok, valid, i_h, H)
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
            dgk_rows = _qk_backward(k, gk, dk, tok, valid, i_h, H, K, cols, kmask, dkp, 1.0, False, KEY_GATE, L2_NORM,
                                    EPS)
            if KEY_GATE:
                _store_gate_grad(dgk, dgk_rows, tok, valid, i_h, H)
'''
