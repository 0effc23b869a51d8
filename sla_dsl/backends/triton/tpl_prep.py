'''Stage "prep": per chunk (grid (number of chunks, H), fully parallel), everything the sequential state pass
would otherwise recompute per V-block, written once to workspaces:
    q' = scale * gate_q * l2(phi_q(q)), k' = gate_k * l2(phi_k(k))      [tokens, H, K] (workspace dtype)
    b  = the in-chunk cumulative log decay                               [tokens, H] or [tokens, H, K] fp32
    A  = (q' k'^T) with the vector decay's relative factors, j <= i       [chunks, H, BT, BT] fp32 (vector)
    delta rule: T = (I + L)^-1, L[i, j] = beta'_i sum_k k'_ik k'_jk e^{b_ik - b_jk} (j < i),
                w = T (beta' k' e^b), u = T (beta' v) (the WY form: the chunk's new values are u - w S);
                T is solved blockwise (_solve_unit_lower): the 16 x 16 diagonal blocks by forward substitution,
                all at once, then doubled up to BT with dots; stored to T_ws for stage "bwd_wy" (STORE_T)
The workspace dtype is float32, or the inputs' 16-bit dtype when the dots run on 16-bit operands anyway.
A vector decay with an additive write works on K by column blocks of BK (K_BLOCK, or KP if narrower): A is a
sum over the key channels, so it accumulates block by block and the kernel holds [BT, BK] tiles, not [BT, KP].'''

# Compiled for sm_90 (gla, K = 128, bf16, chunk 64), prep takes 196 registers and no stack on 8 warps with
# BK 32 (BK 16: 130, 64: 244, whole rows: 254); on 4 warps 255 and 24 B of stack (BK 16: 230 and none; whole
# rows: 1368 B). BK 32 halves BK 16's sequential steps of the diagonal sub-blocks (BC per column block).
K_BLOCK = 32

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def prep_kernel(q, k, v, g, beta, gq, gk, lg, q_ws, k_ws, b_ws, A_ws, T_ws, w_ws, u_ws, cu_seqlens, chunk_indices,
                scale, H, K, V, KP: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                BV: tl.constexpr, DECAY: tl.constexpr, IS_DELTA: tl.constexpr, READ_GATE: tl.constexpr,
                KEY_GATE: tl.constexpr, BETA_GATE: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr,
                PREC: tl.constexpr, STORE_T: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    tok, valid = _indexed_chunk(cu_seqlens, chunk_indices, i_t, BT)
    rows = tl.arange(0, BT)
    ws = (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :]
    if DECAY == 3 and not IS_DELTA:
        # A is a sum over the key channels: accumulated over column blocks of BK, so that [BT, BK] tiles are
        # live instead of [BT, KP] ones (whole rows of K = 128 took all 255 registers at chunk 64, and spilled
        # on 4 warps). The delta rule needs the whole k' and b again after its solve (w = T (beta' k' e^b)) and
        # keeps the unblocked path below.
        if L2_NORM:  # l2() divides by the norm of the whole row: one pass over the column blocks first
            q_norm = _qk_inv_norm(q, tok, valid, i_h, H, K, True, EPS, KP, BK)
            k_norm = _qk_inv_norm(k, tok, valid, i_h, H, K, False, EPS, KP, BK)
        else:
            q_norm = tl.zeros([BT], dtype=tl.float32)  # unread
            k_norm = q_norm
        A = tl.zeros([BT, BT], dtype=tl.float32)
        for k0 in range(0, KP, BK):
            cols = k0 + tl.arange(0, BK)
            kmask = cols < K
            m = valid[:, None] & kmask[None, :]
            k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
            b = _vec_cumulative_decay(g, tok, valid, i_h, H, K, cols, kmask, BT)
            qp = _load_qk_cols(q, gq, q_norm, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM)
            kp = _load_qk_cols(k, gk, k_norm, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM)
            tl.store(b_ws + k_off, b, mask=m)
            tl.store(q_ws + k_off, qp.to(q_ws.dtype.element_ty), mask=m)
            tl.store(k_ws + k_off, kp.to(k_ws.dtype.element_ty), mask=m)
            tl.debug_barrier()  # the diagonal sub-blocks read rows of this block's k' and b back from memory
            A += _vec_rel(qp, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, True, PREC)
        tl.store(A_ws + ws, A)
    else:
        cols = tl.arange(0, KP)
        kmask = cols < K
        m = valid[:, None] & kmask[None, :]
        k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
        b = _cumulative_decay(g, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
        if DECAY == 3:
            tl.store(b_ws + k_off, b, mask=m)
        elif DECAY == 2:
            tl.store(b_ws + tok * H + i_h, tl.sum(b, 1), mask=valid)
        qp = _load_qk(q, gq, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM, EPS)
        kp = _load_qk(k, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS)
        tl.store(q_ws + k_off, qp.to(q_ws.dtype.element_ty), mask=m)
        tl.store(k_ws + k_off, kp.to(k_ws.dtype.element_ty), mask=m)
        if DECAY == 3:
            tl.debug_barrier()  # the in-chunk products read rows of k' and b back from the workspaces just written
            A = _vec_rel(qp, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, True, PREC)
            tl.store(A_ws + ws, A)
        if IS_DELTA:
            bt = _load_beta(beta, gk, tok, valid, i_h, H, BETA_GATE)
            L = bt[:, None] * _intra(kp, kp, k_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, False, DECAY,
                                     PREC)
            Tm = _solve_unit_lower(L, BT, PREC)
            if STORE_T:
                tl.store(T_ws + ws, Tm)
            tl.store(w_ws + k_off, _dot_tf32(Tm, bt[:, None] * kp * tl.exp(b), PREC).to(w_ws.dtype.element_ty),
                     mask=m)
            for v0 in range(0, V, BV):
                vcols = v0 + tl.arange(0, BV)
                vm = valid[:, None] & (vcols < V)[None, :]
                v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
                vb = tl.load(v + v_off, mask=vm, other=0.).to(tl.float32)
                tl.store(u_ws + v_off, _dot_tf32(Tm, bt[:, None] * vb, PREC).to(u_ws.dtype.element_ty), mask=vm)
'''
