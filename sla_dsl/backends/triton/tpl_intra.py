'''Stage "intra": per chunk (grid (number of chunks, H), fully parallel), the in-chunk matrices that the
sequential stages would otherwise recompute per V-block: A_qk with a vector decay, and for the delta rule
the WY/UT inverse T = (I + L)^-1 with L[i, j] = beta'_i sum_k k'_ik k'_jk exp(b_ik - b_jk) (j < i).
Both are written in float32 to workspaces [chunks, H, BT, BT]. Not launched for additive rules without a
vector decay (their A is cheap enough to build in registers where it is used).'''

# Tuning space of this stage: BT and BC are shared by all stages (see runtime.default_config).
TUNING_SPACE = [{"num_warps": w, "num_stages": s} for w in (2, 4, 8) for s in (1, 2)]

SOURCE = '''
@triton.jit
def intra_kernel(q, k, g, beta, gq, gk, lg, A_ws, T_ws, cu_seqlens, chunk_indices, scale, H, K,
                 KP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, DECAY: tl.constexpr,
                 IS_DELTA: tl.constexpr, READ_GATE: tl.constexpr, KEY_GATE: tl.constexpr,
                 BETA_GATE: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    n = tl.load(chunk_indices + 2 * i_t)
    c = tl.load(chunk_indices + 2 * i_t + 1)
    tok, valid = _chunk_rows(cu_seqlens, n, c, BT)
    cols = tl.arange(0, KP)
    kmask = cols < K
    rows = tl.arange(0, BT)
    ws = (i_t.to(tl.int64) * H + i_h) * BT * BT + rows[:, None] * BT + rows[None, :]
    b = _load_decay(g, lg, tok, valid, i_h, H, K, cols, kmask, DECAY, BT)
    kp = _load_qk(k, gk, tok, valid, i_h, H, K, cols, kmask, 1.0, False, KEY_GATE, L2_NORM, EPS)
    if DECAY == 3:
        qp = _load_qk(q, gq, tok, valid, i_h, H, K, cols, kmask, scale, True, READ_GATE, L2_NORM, EPS)
        tl.store(A_ws + ws, _vec_rel(qp, kp, b, BT, BC, True, PREC))
    if IS_DELTA:
        bt = _load_beta(beta, gk, tok, valid, i_h, H, BETA_GATE)
        M = _intra(kp, kp, b, BT, BC, False, DECAY, PREC)
        tl.store(T_ws + ws, _solve_unit_lower(bt[:, None] * M, BT))
'''
