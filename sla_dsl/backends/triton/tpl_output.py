'''Stage "output": per chunk and V-block (grid (cdiv(V, BV), number of chunks, H), fully parallel), the
outputs from the state entering the chunk (stage "states") and the in-chunk attention:
    o = (q' e^b) S + A v_new,   A[i, j] = sum_k q'_ik k'_jk e^{b_ik - b_jk} on j <= i
(A from stage "prep" for a vector decay, else built here from q' k'^T and the decay matrix). FUSED_QK (no prep
in the forward): q' and k' are made here from the raw q, k and gates.'''

TUNING_SPACE = [{"BV": bv, "num_warps": w, "num_stages": s}
                for bv in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2, 3)]

SOURCE = '''
@triton.jit
def output_kernel(q_ws, k_ws, gq, gk, v, b_ws, lg, A_ws, h_ws, vn_ws, o, cu_seqlens, chunk_indices, scale, H, K, V,
                  KP: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
                  IS_DELTA: tl.constexpr, PREC: tl.constexpr, FUSED_QK: tl.constexpr, READ_GATE: tl.constexpr,
                  KEY_GATE: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr):
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok, valid = _indexed_chunk(cu_seqlens, chunk_indices, i_t, BT)
    cols = tl.arange(0, KP)
    kmask = cols < K
    rows = tl.arange(0, BT)
    vcols = i_v * BV + tl.arange(0, BV)
    vmask = vcols < V
    km = valid[:, None] & kmask[None, :]
    k_off = (tok * H + i_h)[:, None] * K + cols[None, :]
    b = _chunk_decay(b_ws, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    if FUSED_QK:  # q_ws, k_ws are the raw q, k: q' and k' made here
        qp = _load_qk(q_ws, gq, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM, EPS)
    else:
        qp = tl.load(q_ws + k_off, mask=km, other=0.).to(tl.float32)
    if DECAY == 3:
        A = tl.load(A_ws + (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :])
    else:
        if FUSED_QK:
            kT = _load_qk_t(k_ws, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS,
                            KP)
        else:
            kT = _load_rows_t(k_ws, tok, valid, i_h, H, K, cols, kmask)
        A = _dot(qp, kT, PREC) * _decay_matrix(b, BT, True)
    S = tl.load(h_ws + (i_t.to(tl.int64) * H + i_h) * K * V + cols[:, None] * V + vcols[None, :],
                mask=kmask[:, None] & vmask[None, :], other=0.)
    vm = valid[:, None] & vmask[None, :]
    v_off = (tok * H + i_h)[:, None] * V + vcols[None, :]
    if IS_DELTA:
        vn = tl.load(vn_ws + v_off, mask=vm, other=0.)
    else:
        vn = tl.load(v + v_off, mask=vm, other=0.)
    ob = _dot(qp * tl.exp(b), S, PREC) + _dot(A, vn, PREC)
    tl.store(o + v_off, ob.to(o.dtype.element_ty), mask=vm)
'''
