'''Shared @triton.jit helpers of every chunkwise stage (pasted into each generated file).

They read the spec's features only through constexpr flags (DECAY, L2_NORM, gates) and the feature-map
functions `phi_q`, `dphi_q`, `phi_k`, `dphi_k` that the generator emits per spec. Conventions: a chunk
holds BT tokens, rows past the sequence end are masked to zero (q = k = v = 0, g = 0, beta = 0); the key
dimension K is padded to KP (a power of two) with masks; `b` is the in-chunk cumulative log decay, [BT, KP]
for a vector decay and [BT, 1] otherwise; every exp() argument is <= 0.
'''

SOURCE = '''
@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC 0: fp32 operands (ieee), 1: tf32, 2: fp16 operands, 3: bf16."""
    if PREC == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif PREC == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def _dot_tf32(a, b, PREC: tl.constexpr):
    """a @ b with at least tf32 operands, for the float32 values whose rounding to 16 bits the delta rule
    amplifies: the running state S in u - w S (which cancels) and the WY solve's T = (I + L)^-1. With 16-bit
    operands there the H100 gave bf16 o 5.4e-3 for a delta rule without decay (the bound is 5e-3)."""
    if PREC >= 2:
        return _dot(a, b, 1)
    else:
        return _dot(a, b, PREC)


@triton.jit
def _phi_cols(x_ptr, tok, valid, i_h, H, K, cols, kmask, IS_Q: tl.constexpr):
    """phi_q(q) (IS_Q) or phi_k(k) on the columns `cols` of one chunk of a [tokens, H, K] input:
    [BT, len(cols)] float32, 0 past the sequence end and past K."""
    m = valid[:, None] & kmask[None, :]
    x = tl.load(x_ptr + (tok * H + i_h)[:, None] * K + cols[None, :], mask=m, other=0.).to(tl.float32)
    if IS_Q:
        y = tl.where(m, phi_q(x), 0.)
    else:
        y = tl.where(m, phi_k(x), 0.)
    return y


@triton.jit
def _load_qk(x_ptr, gate_ptr, tok, valid, i_h, H, K, cols, kmask, scale, IS_Q: tl.constexpr,
             GATED: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr):
    """q' = scale * gate * l2(phi_q(q)) or k' = gate * l2(phi_k(k)) of one chunk: [BT, KP] float32."""
    y = _phi_cols(x_ptr, tok, valid, i_h, H, K, cols, kmask, IS_Q)
    if L2_NORM:
        y = y * tl.rsqrt(tl.sum(y * y, 1) + EPS)[:, None]
    if GATED:
        y = y * tl.load(gate_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)[:, None]
    return y * scale


@triton.jit
def _qk_inv_norm(x_ptr, tok, valid, i_h, H, K, IS_Q: tl.constexpr, EPS: tl.constexpr, KP: tl.constexpr,
                 BK: tl.constexpr):
    """l2()'s factor 1 / sqrt(sum_k phi(x)_k^2 + EPS) for each row of one chunk, the sum over the whole key
    row taken by column blocks of BK (for _load_qk_cols): [BT]."""
    ss = tl.zeros([tok.shape[0]], dtype=tl.float32)
    for k0 in range(0, KP, BK):
        cols = k0 + tl.arange(0, BK)
        y = _phi_cols(x_ptr, tok, valid, i_h, H, K, cols, cols < K, IS_Q)
        ss += tl.sum(y * y, 1)
    return tl.rsqrt(ss + EPS)


@triton.jit
def _load_qk_cols(x_ptr, gate_ptr, inv_norm, tok, valid, i_h, H, K, cols, kmask, scale, IS_Q: tl.constexpr,
                  GATED: tl.constexpr, L2_NORM: tl.constexpr):
    """_load_qk on the columns `cols` only: [BT, len(cols)] float32. l2() needs the whole row, so its factor
    comes in as inv_norm ([BT], from _qk_inv_norm; unread without L2_NORM)."""
    y = _phi_cols(x_ptr, tok, valid, i_h, H, K, cols, kmask, IS_Q)
    if L2_NORM:
        y = y * inv_norm[:, None]
    if GATED:
        y = y * tl.load(gate_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)[:, None]
    return y * scale


@triton.jit
def _load_qk_t(x_ptr, gate_ptr, tok, valid, i_h, H, K, cols, kmask, scale, IS_Q: tl.constexpr,
               GATED: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr, KP: tl.constexpr):
    """_load_qk transposed on the columns `cols` (all KP of them, or a column block), [len(cols), BT] float32,
    loaded by its strides (no register transpose). l2() divides by the norm of the whole row: a column block
    takes it from a pass over all of K first."""
    m = kmask[:, None] & valid[None, :]
    x = tl.load(x_ptr + (tok * H + i_h)[None, :] * K + cols[:, None], mask=m, other=0.).to(tl.float32)
    if IS_Q:
        y = tl.where(m, phi_q(x), 0.)
    else:
        y = tl.where(m, phi_k(x), 0.)
    if L2_NORM:
        if cols.shape[0] == KP:
            inv_norm = tl.rsqrt(tl.sum(y * y, 0) + EPS)
        else:
            inv_norm = _qk_inv_norm(x_ptr, tok, valid, i_h, H, K, IS_Q, EPS, KP, cols.shape[0])
        y = y * inv_norm[None, :]
    if GATED:
        y = y * tl.load(gate_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)[None, :]
    return y * scale


@triton.jit
def _qk_backward(x_ptr, gate_ptr, dx_ptr, tok, valid, i_h, H, K, cols, kmask, dy, scale,
                 IS_Q: tl.constexpr, GATED: tl.constexpr, L2_NORM: tl.constexpr, EPS: tl.constexpr):
    """From the gradient of q' (or k') on the columns `cols` to the raw input's, which it stores, and to the
    gate's: returns its row sums sum_k dq'_k n_k ([BT]; zero without GATED) for _store_gate_grad, so that a
    caller working by column blocks adds them up first. L2_NORM needs whole rows (cols = all KP)."""
    m = valid[:, None] & kmask[None, :]
    x = tl.load(x_ptr + (tok * H + i_h)[:, None] * K + cols[None, :], mask=m, other=0.).to(tl.float32)
    if IS_Q:
        y = tl.where(m, phi_q(x), 0.)
        dphi = dphi_q(x)
    else:
        y = tl.where(m, phi_k(x), 0.)
        dphi = dphi_k(x)
    dy = dy * scale
    if L2_NORM:
        r = tl.rsqrt(tl.sum(y * y, 1) + EPS)
        n = y * r[:, None]
    else:
        n = y
    dgate = tl.zeros([tok.shape[0]], dtype=tl.float32)
    if GATED:
        dgate = tl.sum(dy * n, 1)
        dy = dy * tl.load(gate_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)[:, None]
    if L2_NORM:
        dy = r[:, None] * dy - y * (r * r * r * tl.sum(y * dy, 1))[:, None]
    dx = tl.where(m, dy * dphi, 0.)
    tl.store(dx_ptr + (tok * H + i_h)[:, None] * K + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    return dgate


@triton.jit
def _store_gate_grad(dgate_ptr, dgate, tok, valid, i_h, H):
    """Stores a gate's gradient ([BT] row sums from _qk_backward) in the gate's dtype."""
    tl.store(dgate_ptr + tok * H + i_h, dgate.to(dgate_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _load_beta(beta_ptr, gate_ptr, tok, valid, i_h, H, BETA_GATE: tl.constexpr):
    """beta' = beta (* the write gate when it scales beta): [BT] float32, 0 past the sequence end."""
    beta = tl.load(beta_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
    if BETA_GATE:
        beta = beta * tl.load(gate_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)
    return beta


@triton.jit
def _cumulative_decay(g_ptr, lg_ptr, tok, valid, i_h, H, K, cols, kmask, DECAY: tl.constexpr, BT: tl.constexpr):
    """In-chunk cumulative log decay b (<= 0) from the raw decay input: [BT, KP] for a vector decay, else
    [BT, 1]. Rows past the sequence end repeat the last valid row (their g is 0).
    DECAY 0: none, 1: constant per head (lg[h] = log gamma_h), 2: scalar g[B, T, H], 3: vector g[B, T, H, K]."""
    if DECAY == 3:
        g = tl.load(g_ptr + (tok * H + i_h)[:, None] * K + cols[None, :], mask=valid[:, None] & kmask[None, :],
                    other=0.).to(tl.float32)
    elif DECAY == 2:
        g = tl.load(g_ptr + tok * H + i_h, mask=valid, other=0.).to(tl.float32)[:, None]
    elif DECAY == 1:
        g = tl.where(valid, tl.load(lg_ptr + i_h), 0.)[:, None]
    else:
        g = tl.zeros([BT, 1], dtype=tl.float32)
    # one return: Triton type-checks every return of a function, also those in branches a constexpr removed
    if DECAY == 3:
        b = _prefix_sum_rows(g, BT, False)
    else:
        b = _prefix_sum(tl.sum(g, 1), BT, False)[:, None]
    return b


@triton.jit
def _vec_cumulative_decay(g_ptr, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr):
    """_cumulative_decay of a vector decay on the columns `cols` only: [BT, len(cols)], the same prefix-sum dot
    chained through its accumulator 16 rows of g at a time (read from memory). A float32 dot runs on the FMA
    units with each thread holding its whole slice of both operands: over all BT rows at once, at chunk 64,
    that alone took stage "prep" at K = 128 from 179 registers to 255 and a spill (sm_90, 8 warps, BK 32)."""
    rows = tl.arange(0, BT)
    first = tl.min(tok, 0)
    n = tl.sum(valid.to(tl.int32), 0)
    b = tl.zeros([BT, cols.shape[0]], dtype=tl.float32)
    for j0 in range(0, BT, 16):
        r = j0 + tl.arange(0, 16)
        g = tl.load(g_ptr + ((first + r) * H + i_h)[:, None] * K + cols[None, :],
                    mask=(r < n)[:, None] & kmask[None, :], other=0.).to(tl.float32)
        b = tl.dot((r[None, :] <= rows[:, None]).to(tl.float32), g, b, input_precision="ieee")
    return b


@triton.jit
def _chunk_decay(b_ws, lg_ptr, tok, valid, i_h, H, K, cols, kmask, DECAY: tl.constexpr, BT: tl.constexpr):
    """b of one chunk as stage "prep" stored it (scalar and vector decays) or as computed from the constant:
    [BT, len(cols)] or [BT, 1]. Rows past the sequence end read the last valid row, so the last row is the decay
    over the whole chunk (see _last_row)."""
    last_tok = tl.max(tl.where(valid, tok, 0), 0)
    tok_c = tl.minimum(tok, last_tok)
    if DECAY == 3:
        b = tl.load(b_ws + (tok_c * H + i_h)[:, None] * K + cols[None, :], mask=kmask[None, :], other=0.)
    elif DECAY == 2:
        b = tl.load(b_ws + tok_c * H + i_h)[:, None]
    elif DECAY == 1:
        steps = tl.minimum(tl.arange(0, BT) + 1, tl.sum(valid.to(tl.int32), 0))
        b = (tl.load(lg_ptr + i_h) * steps.to(tl.float32))[:, None]
    else:
        b = tl.zeros([BT, 1], dtype=tl.float32)
    return b


@triton.jit
def _chunk_decay_t(b_ws, tok, valid, i_h, H, K, cols, kmask):
    """A vector decay's b of one chunk on the columns `cols`, transposed, [len(cols), BT], and its last valid
    row b_C, [len(cols)], both loaded by their strides from stage "prep"'s workspace (rows past the sequence end
    read the last valid row)."""
    last_tok = tl.max(tl.where(valid, tok, 0), 0)
    tok_c = tl.minimum(tok, last_tok)
    bT = tl.load(b_ws + (tok_c * H + i_h)[None, :] * K + cols[:, None], mask=kmask[:, None], other=0.)
    b_last = tl.load(b_ws + (last_tok * H + i_h) * K + cols, mask=kmask, other=0.)
    return bT, b_last


@triton.jit
def _fold_last(db, db_last, valid, DECAY: tl.constexpr, BT: tl.constexpr):
    """db with the gradient of the whole-chunk decay (db_last, [KP]) added at the last valid row: what the
    reverse cumsum of _store_decay_grad spreads over the chunk. [BT, KP] (vector decay) or [BT] (scalar)."""
    last = tl.arange(0, BT) == tl.sum(valid.to(tl.int32), 0) - 1
    if DECAY == 3:
        out = tl.where(last[:, None], db + db_last[None, :], db)
    else:
        out = tl.sum(db, 1) + tl.where(last, tl.sum(db_last, 0), 0.)
    return out


@triton.jit
def _store_decay_grad(dg_ptr, db, tok, valid, i_h, H, K, cols, kmask, DECAY: tl.constexpr, BT: tl.constexpr):
    """dg from db (folded by _fold_last): b is the in-chunk cumsum of g, so dg is the reverse cumsum of db."""
    if DECAY == 3:
        dgb = _prefix_sum_rows(db, BT, True)
        tl.store(dg_ptr + (tok * H + i_h)[:, None] * K + cols[None, :], dgb.to(dg_ptr.dtype.element_ty),
                 mask=valid[:, None] & kmask[None, :])
    elif DECAY == 2:
        tl.store(dg_ptr + tok * H + i_h, _prefix_sum(db, BT, True).to(dg_ptr.dtype.element_ty), mask=valid)


# Prefix sums along the chunk are written as masked sums and products rather than tl.cumsum: Triton
# 3.6's scan lowering asserts (ScanOpToLLVM AddPartialReduce) on some of these layouts on sm_90.
@triton.jit
def _prefix_sum(x, BT: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive sum of the [BT] vector x over rows j <= i (j >= i if REVERSE): [BT]."""
    rows = tl.arange(0, BT)
    if REVERSE:
        keep = rows[None, :] >= rows[:, None]
    else:
        keep = rows[None, :] <= rows[:, None]
    return tl.sum(tl.where(keep, x[None, :], 0.), 1)


@triton.jit
def _prefix_sum_rows(x, BT: tl.constexpr, REVERSE: tl.constexpr):
    """Inclusive sum of the rows of x [BT, N] (N >= 16) over j <= i (j >= i if REVERSE), exact in fp32."""
    rows = tl.arange(0, BT)
    if REVERSE:
        keep = rows[None, :] >= rows[:, None]
    else:
        keep = rows[None, :] <= rows[:, None]
    return tl.dot(keep.to(tl.float32), x, input_precision="ieee")


@triton.jit
def _last_row(b, BT: tl.constexpr):
    """b at the chunk's last row (the decay over the whole chunk): [KP] or [1]."""
    return tl.sum(tl.where((tl.arange(0, BT) == BT - 1)[:, None], b, 0.), 0)


@triton.jit
def _decay_matrix(b, BT: tl.constexpr, INCLUSIVE: tl.constexpr):
    """exp(b_i - b_j) on j <= i (j < i unless INCLUSIVE), 0 above, for a decay shared by the key channels."""
    rows = tl.arange(0, BT)
    bb = tl.sum(b, 1)
    if INCLUSIVE:
        keep = rows[:, None] >= rows[None, :]
    else:
        keep = rows[:, None] > rows[None, :]
    return tl.where(keep, tl.exp(tl.minimum(bb[:, None] - bb[None, :], 0.)), 0.)


@triton.jit
def _decay_matrix_t(b, BT: tl.constexpr):
    """The transpose of _decay_matrix(b, BT, True), built as such: exp(b_j - b_i) on j >= i, 0 below."""
    rows = tl.arange(0, BT)
    bb = tl.sum(b, 1)
    return tl.where(rows[:, None] <= rows[None, :], tl.exp(tl.minimum(bb[None, :] - bb[:, None], 0.)), 0.)


@triton.jit
def _blocks(x, BT: tl.constexpr, BC: tl.constexpr):
    """The rows of x [BT, N] as BT // BC sub-chunks: [BT // BC, BC, N]."""
    return tl.reshape(x, [BT // BC, BC, x.shape[1]])


@triton.jit
def _diagonal_blocks(D, BT: tl.constexpr, BC: tl.constexpr):
    """The BC x BC diagonal blocks of D [BT, BT]: [BT // BC, BC, BC]."""
    D4 = tl.reshape(D, [BT // BC, BC, BT // BC, BC])
    c = tl.arange(0, BT // BC)
    return tl.sum(tl.where(c[:, None, None, None] == c[None, None, :, None], D4, 0.), 2)


@triton.jit
def _block_diagonal(R3, BT: tl.constexpr, BC: tl.constexpr):
    """The [BT, BT] matrix with the blocks R3 [BT // BC, BC, BC] on its diagonal and zeros elsewhere."""
    c = tl.arange(0, BT // BC)
    R4 = tl.where(c[:, None, None, None] == c[None, None, :, None], R3[:, :, None, :], 0.)
    return tl.reshape(R4, [BT, BT])


@triton.jit
def _block_rows(ptr, tok, valid, j, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr):
    """Row j of each sub-chunk of one chunk of a [tokens, H, K] tensor: [BT // BC, KP] float32, zero past the
    sequence end. Loaded from memory: pulling a row out of a register tile takes a reduction over the tile."""
    first = tl.min(tok, 0)
    n = tl.sum(valid.to(tl.int32), 0)
    r = tl.arange(0, BT // BC) * BC + j
    return tl.load(ptr + ((first + r) * H + i_h)[:, None] * K + cols[None, :],
                   mask=(r < n)[:, None] & kmask[None, :], other=0.).to(tl.float32)


@triton.jit
def _block_decay_rows(b_ws, tok, valid, j, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr):
    """Row j of each sub-chunk of the vector decay b (stage "prep"'s workspace): [BT // BC, KP]; rows past the
    sequence end read the last valid row, as _chunk_decay does."""
    first = tl.min(tok, 0)
    n = tl.sum(valid.to(tl.int32), 0)
    r = tl.minimum(tl.arange(0, BT // BC) * BC + j, n - 1)
    return tl.load(b_ws + ((first + r) * H + i_h)[:, None] * K + cols[None, :], mask=kmask[None, :], other=0.)


@triton.jit
def _vec_rel(x, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
             INCLUSIVE: tl.constexpr, PREC: tl.constexpr):
    """R[i, j] = sum_k x[i, k] y[j, k] exp(b[i, k] - b[j, k]) on j <= i (j < i unless INCLUSIVE), vector decay.
    Off-diagonal sub-blocks (BC x BC) go through the tensor cores with the column block's last position as
    reference (both factors <= 1); diagonal sub-blocks are masked elementwise products (no common reference
    keeps both factors of exp(b_i - b_j) bounded there), one column per step for all sub-chunks at once, its
    y and b rows read from memory (y_ws, b_ws hold this chunk's y and b)."""
    rows = tl.arange(0, BT)
    blk = rows // BC
    R = tl.zeros([BT, BT], dtype=tl.float32)
    for c in tl.static_range(BT // BC - 1):
        ref = tl.sum(tl.where((rows == (c + 1) * BC - 1)[:, None], b, 0.), 0)
        xr = x * tl.exp(tl.minimum(b - ref[None, :], 0.))
        yr = tl.where((blk == c)[:, None], y * tl.exp(tl.minimum(ref[None, :] - b, 0.)), 0.)
        part = _dot(xr, tl.trans(yr), PREC)
        R += tl.where((blk[:, None] > c) & (blk[None, :] == c), part, 0.)
    x3, b3 = _blocks(x, BT, BC), _blocks(b, BT, BC)
    sub = tl.arange(0, BC)
    R3 = tl.zeros([BT // BC, BC, BC], dtype=tl.float32)
    for j in range(BC):
        yj = _block_rows(y_ws, tok, valid, j, i_h, H, K, cols, kmask, BT, BC)
        bj = _block_decay_rows(b_ws, tok, valid, j, i_h, H, K, cols, kmask, BT, BC)
        col = tl.sum(x3 * yj[:, None, :] * tl.exp(tl.minimum(b3 - bj[:, None, :], 0.)), 2)
        if INCLUSIVE:
            keep = sub >= j
        else:
            keep = sub > j
        R3 += tl.where(keep[None, :, None] & (sub == j)[None, None, :], col[:, :, None], 0.)
    R += _block_diagonal(R3, BT, BC)
    return R


@triton.jit
def _vec_left(D, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
              PREC: tl.constexpr):
    """out[i, k] = sum_j D[i, j] y[j, k] exp(b[i, k] - b[j, k]); D is zero above the diagonal. The diagonal
    sub-blocks as in _vec_rel (y and b rows from y_ws, b_ws)."""
    rows = tl.arange(0, BT)
    blk = rows // BC
    out = tl.zeros(y.shape, dtype=tl.float32)
    for c in tl.static_range(BT // BC - 1):
        ref = tl.sum(tl.where((rows == (c + 1) * BC - 1)[:, None], b, 0.), 0)
        Dc = tl.where((blk[:, None] > c) & (blk[None, :] == c), D, 0.)
        yr = tl.where((blk == c)[:, None], y * tl.exp(tl.minimum(ref[None, :] - b, 0.)), 0.)
        out += tl.exp(tl.minimum(b - ref[None, :], 0.)) * _dot(Dc, yr, PREC)
    b3, Dd = _blocks(b, BT, BC), _diagonal_blocks(D, BT, BC)
    sub = tl.arange(0, BC)
    out3 = tl.zeros([BT // BC, BC, y.shape[1]], dtype=tl.float32)
    for j in range(BC):
        yj = _block_rows(y_ws, tok, valid, j, i_h, H, K, cols, kmask, BT, BC)
        bj = _block_decay_rows(b_ws, tok, valid, j, i_h, H, K, cols, kmask, BT, BC)
        dcol = tl.sum(tl.where((sub == j)[None, None, :], Dd, 0.), 2)
        out3 += dcol[:, :, None] * yj[:, None, :] * tl.exp(tl.minimum(b3 - bj[:, None, :], 0.))
    return out + tl.reshape(out3, [BT, y.shape[1]])


@triton.jit
def _vec_right(D, x, x_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
               PREC: tl.constexpr):
    """out[j, k] = sum_i D[i, j] x[i, k] exp(b[i, k] - b[j, k]); D is zero above the diagonal. The diagonal
    sub-blocks as in _vec_rel (x and b rows from x_ws, b_ws)."""
    rows = tl.arange(0, BT)
    blk = rows // BC
    out = tl.zeros(x.shape, dtype=tl.float32)
    for c in tl.static_range(BT // BC - 1):
        ref = tl.sum(tl.where((rows == (c + 1) * BC - 1)[:, None], b, 0.), 0)
        Dc = tl.where((blk[:, None] > c) & (blk[None, :] == c), D, 0.)
        xr = x * tl.exp(tl.minimum(b - ref[None, :], 0.))
        scale_j = tl.where((blk == c)[:, None], tl.exp(tl.minimum(ref[None, :] - b, 0.)), 0.)
        out += scale_j * _dot(tl.trans(Dc), xr, PREC)
    b3, Dd = _blocks(b, BT, BC), _diagonal_blocks(D, BT, BC)
    sub = tl.arange(0, BC)
    out3 = tl.zeros([BT // BC, BC, x.shape[1]], dtype=tl.float32)
    for i in range(BC):
        xi = _block_rows(x_ws, tok, valid, i, i_h, H, K, cols, kmask, BT, BC)
        bi = _block_decay_rows(b_ws, tok, valid, i, i_h, H, K, cols, kmask, BT, BC)
        drow = tl.sum(tl.where((sub == i)[None, :, None], Dd, 0.), 1)
        out3 += drow[:, :, None] * xi[:, None, :] * tl.exp(tl.minimum(bi[:, None, :] - b3, 0.))
    return out + tl.reshape(out3, [BT, x.shape[1]])


@triton.jit
def _intra(x, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
           INCLUSIVE: tl.constexpr, DECAY: tl.constexpr, PREC: tl.constexpr):
    """The in-chunk matrix sum_k x_ik y_jk exp(b_ik - b_jk), lower triangular. y_ws and b_ws hold y and b of
    this chunk in memory (read by the vector decay's diagonal sub-blocks only)."""
    if DECAY == 3:
        return _vec_rel(x, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, INCLUSIVE, PREC)
    else:
        return _dot(x, tl.trans(y), PREC) * _decay_matrix(b, BT, INCLUSIVE)


@triton.jit
def _intra_left(D, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
                DECAY: tl.constexpr, PREC: tl.constexpr):
    """Gradient of the in-chunk matrix towards x: sum_j D_ij y_jk exp(b_ik - b_jk)."""
    if DECAY == 3:
        return _vec_left(D, y, y_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, PREC)
    else:
        return _dot(D * _decay_matrix(b, BT, True), y, PREC)


@triton.jit
def _intra_right(D, x, x_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT: tl.constexpr, BC: tl.constexpr,
                 DECAY: tl.constexpr, PREC: tl.constexpr):
    """Gradient of the in-chunk matrix towards y: sum_i D_ij x_ik exp(b_ik - b_jk)."""
    if DECAY == 3:
        return _vec_right(D, x, x_ws, b, b_ws, tok, valid, i_h, H, K, cols, kmask, BT, BC, PREC)
    else:
        return _dot(tl.trans(D * _decay_matrix(b, BT, True)), x, PREC)


@triton.jit
def _solve_unit_lower(L, BT: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^-1 for a strictly lower triangular L [BT, BT] (BT = 16, 32 or 64), blocked by 16 rows.
    Forward substitution over the whole tile takes BT - 1 dependent steps, each a reduction across the tile in
    which the warps meet in shared memory. Here it only inverts the 16 x 16 diagonal blocks, all at once on
    [BT // 16, 16, 16] tiles: 15 steps. They are kept transposed (X[b, c, r] = T[b, r, c]) so that each step's
    dependent reduction runs along the last axis: compiled for sm_90 at chunk 64, the loop is then warp
    shuffles with no barrier (the row of L a step reads does not depend on the step before).
    Dots then double the blocks up to BT: with T the inverse of (I + L)'s diagonal blocks of s rows and C the
    part of L coupling two of them inside a block of 2s rows ([A 0; C B] there), T - T C T is the inverse of
    (I + L)'s diagonal blocks of 2s rows ([A^-1 0; -B^-1 C A^-1 B^-1]). The dots take at least tf32 operands
    (fp32 ones for PREC 0): the delta rule amplifies 16-bit rounding of T."""
    sub = tl.arange(0, 16)
    L3 = _diagonal_blocks(L, BT, 16)
    eye = tl.where(sub[:, None] == sub[None, :], 1., 0.)
    X = tl.zeros([BT // 16, 16, 16], dtype=tl.float32) + eye[None, :, :]
    for i in range(1, 16):
        l_i = tl.sum(tl.where((sub == i)[None, :, None], L3, 0.), 1)
        t_i = -tl.sum(l_i[:, None, :] * X, 2)
        X = tl.where((sub == i)[None, None, :], t_i[:, :, None] + tl.where(sub == i, 1., 0.)[None, :, None], X)
    T = _block_diagonal(tl.permute(X, (0, 2, 1)), BT, 16)
    rows = tl.arange(0, BT)
    # block sizes s = 16, 32, ... below BT, log2(BT // 16) of them: static_range takes a count, not a log
    for level in tl.static_range(BT // 16 - 1):
        s = 16 << level
        if s < BT:
            C = tl.where((rows[:, None] // (2 * s) == rows[None, :] // (2 * s))
                         & (rows[:, None] // s > rows[None, :] // s), L, 0.)
            T -= _dot_tf32(T, _dot_tf32(C, T, PREC), PREC)
    return T


# Triton 3.6 on sm_90 miscompiles tl.trans of a loaded 16-bit tile that feeds a dot (illegal memory accesses on
# an H100, depending on the tile sizes): transposed operands that come from memory are loaded by their strides.
@triton.jit
def _load_rows_t(x_ptr, tok, valid, i_h, H, D, cols, cmask):
    """x^T of one chunk's rows of a [tokens, H, D] tensor: [DP, BT], zero past the sequence end and past D."""
    return tl.load(x_ptr + (tok * H + i_h)[None, :] * D + cols[:, None], mask=cmask[:, None] & valid[None, :], other=0.)


@triton.jit
def _indexed_chunk(cu_seqlens, chunk_indices, i_t, BT: tl.constexpr):
    """Token indices and validity of the i_t-th chunk of the whole batch (chunk_indices: its sequence and
    the chunk's position in it), for the stages parallel over chunks."""
    n = tl.load(chunk_indices + 2 * i_t)
    c = tl.load(chunk_indices + 2 * i_t + 1)
    return _chunk_rows(cu_seqlens, n, c, BT)


@triton.jit
def _chunk_rows(cu_seqlens, n, c, BT: tl.constexpr):
    """Token indices (int64) and validity of chunk c of sequence n."""
    bos = tl.load(cu_seqlens + n).to(tl.int64)
    eos = tl.load(cu_seqlens + n + 1).to(tl.int64)
    tok = bos + c * BT + tl.arange(0, BT)
    return tok, tok < eos
'''
