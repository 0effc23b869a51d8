"""Host side of the Triton backend: configs, workspaces and launches of the generated kernels.

Schedule (per call); only "states" and "bwd_dh" walk the chunks in sequence, each program with one
[BK, BV] block of the state of one sequence and head; everything else is parallel over chunks x heads
(x V-blocks):
    forward:  prep (grid (chunks, H)) -> states (grid (cdiv(K, BK), cdiv(V, BV), N*H))
              -> output (grid (cdiv(V, BV), chunks, H))
    backward: prep -> states (recomputed: chunk states, the delta rule's new values) -> bwd_dh (reverse,
              grid (cdiv(K, BK), cdiv(V, BV), N*H)) -> bwd_dqk (grid (chunks, H, key blocks): one key block
              unless tpl_bwd_dqk.splits_keys) -> bwd_wy (delta rule only, grid (chunks, H))
The forward of an additive write with no decay workspace (generator.fused_qk: RetNet and its SLA variant)
launches no prep: states and output make q' and k' from the raw q, k and gates in registers.

Workspaces between the stages (q', k', w, u, the chunk states and their gradients) are float32, or the
inputs' 16-bit dtype when the dots take 16-bit operands anyway (dot_precision "input"), as fla stores them.

A config is a flat dict of JSON scalars for one phase (what the tuner sweeps and the tuned tables store):
    "BT": chunk size, "dot_precision": "ieee" | "tf32" | "input" (16-bit operands in the inputs' dtype),
    "BC": sub-chunk of the vector-decay in-chunk products (vector decay only; divides BT),
    "<stage>_<key>" for every key of the stage template's TUNING_SPACE (BV, num_warps, num_stages), for the
    stages the phase launches: fwd: prep (unless fused_qk), states, output; bwd: prep, bwd_states (the states template),
    bwd_dh, bwd_dqk, bwd_wy (delta rule only); the sequential passes (states, bwd_states, bwd_dh) also have
    "<stage>_BK", their block of K (`key_blocks`), and so has bwd_dqk where it works by key blocks
    (tpl_bwd_dqk.splits_keys: a vector decay with an additive write and no L2 norm).
The space is the product of the shared settings and the stages' spaces (`tuning_space`); `default_config`
is the heuristic, and a tuned table replaces it at call time (sla_dsl.autotune.resolve_config).
"""

from __future__ import annotations

import os

import torch
import triton

from sla_dsl.alloc import new_output
from sla_dsl.autotune import Shape, resolve_config
from sla_dsl.autotune.protocol import override_config
from sla_dsl.autotune.space import Space
from sla_dsl.backends import sequential_block
from sla_dsl.backends.triton.generator import fused_qk
from sla_dsl.backends.triton import tpl_bwd_dh, tpl_bwd_dqk, tpl_bwd_wy, tpl_output, tpl_prep, tpl_states
from sla_dsl.launch_tables import chunk_table, log_gammas, scalar
from sla_dsl.spec import Decay, Recurrence, WriteRule

STAGE_TEMPLATES = {"prep": tpl_prep, "states": tpl_states, "output": tpl_output, "bwd_states": tpl_states,
                   "bwd_dh": tpl_bwd_dh, "bwd_dqk": tpl_bwd_dqk, "bwd_wy": tpl_bwd_wy}
PHASE_STAGES = {"fwd": ("prep", "states", "output"), "bwd": ("prep", "bwd_states", "bwd_dh", "bwd_dqk", "bwd_wy")}
CHUNK_SIZES = (16, 32, 64)
SUB_CHUNKS = (16, 32)
# 16-bit inputs: tf32 keeps fp32 operands' range, "input" runs the tensor cores at 16-bit rate. fp32 and fp64
# inputs need "ieee" to meet their 1e-5 tolerance, so they have nothing else to choose.
PRECISIONS = {"float16": ("input", "tf32"), "bfloat16": ("input", "tf32"), "float32": ("ieee",),
              "float64": ("ieee",)}
# Tried first by the sweep: chunk size, operand precision and the V- and K-blocking change every stage's work most.
SEARCH_ORDER = ("BT", "dot_precision", "states_BV", "bwd_states_BV", "bwd_dh_BV", "states_BK", "bwd_states_BK",
                "bwd_dh_BK", "output_BV", "bwd_dqk_BV", "bwd_dqk_BK", "states_num_warps", "bwd_states_num_warps",
                "bwd_dh_num_warps", "output_num_warps", "bwd_dqk_num_warps", "prep_num_warps", "bwd_wy_BV",
                "bwd_wy_num_warps", "prep_BV", "BC")
# Measured on the H100 (Triton 3.6, 16-bit operands, chunk 64): the output stage with V-blocks of 16 or 32 narrower
# than V computes wrong outputs (retnet o 7.4e-1, gdn 1.6e-1; sometimes an illegal memory access), while the
# interpreter and compute-sanitizer find nothing: a compiler fault. Its V-block is kept at least this wide.
MIN_BV = {"output": 64}
# Measured on the H100 (Triton 3.6, 2026-11-23): the delta rule at chunk 64 computes wrongly (gdn bf16/fp16 o 2.9e-1,
# final_state 1.2) while chunk 32 passes and the interpreter is right at every chunk size: a compiler fault at that
# tile size. With prep on 2 or 4 warps it raises a CUDA error; on 8 warps the backward, whose prep runs the same
# blocked (I + L)^-1, is right and only the forward is wrong (states or output; benchmarks/NVIDIA_H100_80GB_HBM3/
# 2026-11-23-session4/delta-chunk64.txt). Chunk 64 was also slower there. The delta rule's chunk stays <= 32.
MAX_DELTA_BT = 32
CONSTRAINTS = ("BC <= BT and BT % BC == 0", "every stage's BV <= padded V (next power of two >= 16)",
               "output_BV >= min(64, padded V) (MIN_BV)", "delta rule: BT <= 32 (MAX_DELTA_BT)",
               "states_BK, bwd_states_BK, bwd_dh_BK: padded K (next power of two >= 16) or, for an additive write,"
               " a template K_BLOCKS value below it; the delta rule's v_new = u - w S reads every row of the state,"
               " so it keeps BK = padded K (key_blocks)",
               "bwd_dqk_BK: as the sequential passes', for a vector decay with an additive write and no L2 norm only"
               " (tpl_bwd_dqk.splits_keys)",
               "dot_precision: 'tf32' or 'input' for 16-bit inputs, 'ieee' for fp32 and fp64")


def padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def phase_stages(rec: Recurrence, phase: str) -> tuple[str, ...]:
    if phase not in PHASE_STAGES:
        raise ValueError(f"phase: expected 'fwd' or 'bwd', got {phase!r}")
    return tuple(s for s in PHASE_STAGES[phase] if (s != "bwd_wy" or rec.write is WriteRule.DELTA)
                 and (s != "prep" or phase == "bwd" or not fused_qk(rec)))


def key_blocks(rec: Recurrence, K: int, candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The blocks of K (BK) a sequential pass may split its state into across programs: the whole padded K, and
    for an additive write, whose state rows are independent, every candidate below it. The delta rule's
    v_new = u - w S (and its gradient) reads every row of the state, so it keeps one block."""
    KP = padded(K)
    if rec.write is WriteRule.DELTA:
        return (KP,)
    return (*(bk for bk in candidates if bk < KP), KP)


def _stage_settings(rec: Recurrence, shape: Shape, stage: str) -> list[dict]:
    """The settings of a stage template's TUNING_SPACE valid for `shape`, each with every K-block of key_blocks
    where the template splits K (K_BLOCKS)."""
    template = STAGE_TEMPLATES[stage]
    VP = padded(shape.V)
    settings = [s for s in template.TUNING_SPACE if min(MIN_BV.get(stage, 0), VP) <= s.get("BV", 0) <= VP]
    if hasattr(template, "K_BLOCKS") and (not hasattr(template, "splits_keys") or template.splits_keys(rec)):
        settings = [{"BK": bk, **s} for bk in key_blocks(rec, shape.K, template.K_BLOCKS) for s in settings]
    return settings


def tuning_space(rec: Recurrence, shape: Shape, phase: str) -> Space:
    """Every valid config of `phase` for `shape`: shared settings x each launched stage's template space."""
    shared = [{"BT": bt, "dot_precision": p} for bt in CHUNK_SIZES for p in PRECISIONS[shape.dtype]
              if rec.write is not WriteRule.DELTA or bt <= MAX_DELTA_BT]
    if rec.decay is Decay.VECTOR:
        shared = [{**s, "BC": bc} for s in shared for bc in SUB_CHUNKS if bc <= s["BT"] and s["BT"] % bc == 0]
    stages = [[{f"{stage}_{k}": v for k, v in setting.items()} for setting in _stage_settings(rec, shape, stage)]
              for stage in phase_stages(rec, phase)]
    return Space(shared, *stages, order=SEARCH_ORDER)


def default_config(rec: Recurrence, shape: Shape, phase: str) -> dict:
    """Heuristic settings for head dims K, V and the input dtype (a member of tuning_space)."""
    KP, VP = padded(shape.K), padded(shape.V)
    # the interpreter runs every tile element by element in numpy: small chunks keep CPU tests fast
    BT = 16 if interpreting() else (64 if KP <= 128 else 32)
    if rec.write is WriteRule.DELTA:
        BT = min(BT, MAX_DELTA_BT)
    key_blocked = tpl_bwd_dqk.splits_keys(rec)
    if rec.decay is Decay.VECTOR and KP >= 128 and not interpreting():
        # measured offline: gla's bwd_dqk on whole key rows spilled 3744 B of stack per thread at chunk 64, 504 at 32.
        # By key blocks, on the H100 at (4, 8192, 16, 128) bf16 (2026-11-25-session24/ab-gla_*.log): chunk 16
        # 10.08 ms fwd+bwd, chunk 32 12.52 (its in-chunk products in prep and bwd_dqk grow faster than the
        # sequential passes shrink)
        BT = 16 if key_blocked else 32
    precision = PRECISIONS[shape.dtype][0]
    if interpreting() and shape.dtype == "bfloat16":
        precision = "tf32"  # the interpreter computes bf16 arithmetic wrongly; bf16 operands only run on GPUs
    if phase == "fwd" and rec.write is WriteRule.DELTA and rec.decay is Decay.NONE \
            and "tf32" in PRECISIONS[shape.dtype]:
        # measured on the H100 (K = V = 64, T = 1000): without a decay the state never forgets, and the 16-bit
        # workspaces' rounding gave bf16 o 5.0e-3-5.4e-3 against the 5e-3 bound
        precision = "tf32"
    if phase == "bwd" and rec.write is WriteRule.DELTA and "tf32" in PRECISIONS[shape.dtype]:
        # measured on the H100 (gdn, T=4096, fp16 and bf16 alike): with 16-bit operands the delta rule's
        # dinitial_state misses the 1e-2 gradient bound (2.1e-2); tf32 with float32 workspaces meets it
        precision = "tf32"
        if KP >= 128 and not interpreting():
            BT = 32  # bwd_wy's float32 [64, 128] tiles need 233472 bytes of shared memory; an H100 CTA has 232448
    # the sequential passes: an additive write splits K into blocks of 64 from K = 128 on, as fla does (stage
    # "states" holding [KP, BV] and [KP, BT] tiles per program was 2-3x slower than fla's on the H100 at
    # (4, 8192, 16, 128)); the interpreter keeps one block, fewer programs to run one by one
    seq_BK = 64 if rec.write is WriteRule.ADDITIVE and KP >= 128 and not interpreting() else KP
    # V-blocks small enough for many programs, large enough for the tensor cores
    seq_BV = min(VP, 64 if KP <= 64 else 32)
    # ... and narrower where B * H * cdiv(K, BK) * cdiv(V, BV) programs would leave SMs idle. On the H100 at
    # (1, 32768, 16, 128) the sweep chose BV 16 for every sequential pass of all six specs, with one K-block
    # (retnet fwd 1.05 ms; 1.47 with BV 32-64)
    if not interpreting():
        seq_BV = sequential_block(seq_BV, shape.V, shape.B * shape.H * triton.cdiv(shape.K, seq_BK))
    # the delta rule's solve and the vector decay's in-chunk products keep [BT, BT] and [BT, KP] tiles live
    heavy_warps = 8 if KP > 64 and (rec.write is WriteRule.DELTA or rec.decay is Decay.VECTOR) else 4
    # ... except at chunk 16 by key blocks, whose tiles are small: prep and bwd_dqk on 2 warps took gla's backward
    # from 8.09 to 7.36 ms on the H100 at (4, 8192, 16, 128) (bwd_dqk 4.70 -> 4.57, prep 1.75 -> 1.11)
    light = key_blocked and BT == 16
    stage_defaults = {"prep": {"BV": min(VP, 64), "num_warps": 2 if light else heavy_warps, "num_stages": 1},
                      "states": {"BK": seq_BK, "BV": seq_BV, "num_warps": 4, "num_stages": 2},
                      "output": {"BV": min(VP, 64), "num_warps": 4, "num_stages": 2},
                      "bwd_states": {"BK": seq_BK, "BV": seq_BV, "num_warps": 4, "num_stages": 2},
                      "bwd_dh": {"BK": seq_BK, "BV": seq_BV, "num_warps": 4, "num_stages": 2},
                      "bwd_dqk": {"BV": min(VP, 64), "num_warps": 2 if light else 4 if KP <= 64 else 8,
                                  "num_stages": 1, **({"BK": min(KP, 32)} if key_blocked else {})},
                      "bwd_wy": {"BV": min(VP, 64), "num_warps": heavy_warps, "num_stages": 1}}
    config = {"BT": BT, "dot_precision": precision}
    if rec.decay is Decay.VECTOR:
        config["BC"] = 16
    for stage in phase_stages(rec, phase):
        config.update({f"{stage}_{k}": v for k, v in stage_defaults[stage].items()})
    return config


def stage_options(config: dict, stage: str) -> dict:
    """The launch options of one stage (BV, num_warps, num_stages; BK of the sequential passes) from a flat
    config."""
    prefix = f"{stage}_"
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


def _launch_options(config: dict, stage: str, launch: Launch) -> dict:
    """stage_options with BV no wider than the padded V and BK than the padded K (a given BV or BK may exceed a
    smaller head's)."""
    options = stage_options(config, stage)
    options["BV"] = min(options["BV"], padded(launch.V))
    if "BK" in options:
        options["BK"] = min(options["BK"], launch.KP)
    return options


def _precision(name: str, dtype: torch.dtype) -> int:
    if name == "ieee" or dtype == torch.float32:
        return 0 if name != "tf32" else 1
    if name == "tf32":
        return 1
    return 2 if dtype == torch.float16 else 3


def _launch(kernel, grid, *args, **kwargs):
    kernel[grid](*args, **kwargs)


def _compile_only(kernel, grid, *args, **kwargs):
    # warmup compiles (or loads from Triton's disk cache) exactly what this launch would run, and launches nothing
    kernel.warmup(*args, grid=grid, **kwargs)


def work_dtype(prec: int, dtype: torch.dtype) -> torch.dtype:
    """Workspaces hold 16-bit values only where the dots read 16-bit operands anyway."""
    return dtype if prec in (2, 3) else torch.float32


class Launch:
    """Shapes, sequence bounds and chunk tables of one call."""

    def __init__(self, rec: Recurrence, q, v, cu_seqlens, BT: int):
        B, T, H, K = q.shape
        self.B, self.T, self.H, self.K, self.V = B, T, H, K, v.shape[-1]
        self.KP = padded(K)
        table = chunk_table(B, T, cu_seqlens, BT, q.device)
        self.cu, self.chunk_offsets, self.chunk_indices = table.cu_seqlens, table.chunk_offsets, table.chunk_indices
        self.N, self.num_chunks = table.num_sequences, table.num_chunks
        # kernels without a constant decay get a placeholder they never read
        self.lg = log_gammas(rec, H, q.device) if rec.decay is Decay.CONSTANT else scalar(0.0, q.device)


class Prepared:
    """The workspaces of stages "prep" and "states": what "output" and the backward stages read."""

    def __init__(self, rec: Recurrence, launch: Launch, q, k, v, BT: int, wdtype: torch.dtype, store_t: bool,
                 with_prep: bool):
        device, H, K, V = q.device, launch.H, launch.K, launch.V
        delta = rec.write is WriteRule.DELTA
        blocks = (max(launch.num_chunks, 1), H, BT, BT)
        # without stage "prep" (a fused_qk forward) the stages read the raw q and k in place of q' and k'
        self.fused_qk = not with_prep
        self.q = torch.empty(q.shape, dtype=wdtype, device=device) if with_prep else q
        self.k = torch.empty(q.shape, dtype=wdtype, device=device) if with_prep else k
        if rec.decay is Decay.VECTOR:
            self.b = torch.empty(q.shape, dtype=torch.float32, device=device)
        elif rec.decay is Decay.SCALAR:
            self.b = torch.empty(q.shape[:-1], dtype=torch.float32, device=device)
        else:
            self.b = launch.lg  # no decay workspace: the kernels compute b from the constant (or none)
        self.A = torch.empty(blocks, dtype=torch.float32, device=device) if rec.decay is Decay.VECTOR else self.q
        self.T = torch.empty(blocks, dtype=torch.float32, device=device) if delta and store_t else self.q
        self.w = torch.empty(q.shape, dtype=wdtype, device=device) if delta else self.q
        self.u = torch.empty(v.shape, dtype=wdtype, device=device) if delta else self.q
        self.vn = torch.empty(v.shape, dtype=wdtype, device=device) if delta else self.q
        self.h = torch.empty((max(launch.num_chunks, 1), H, K, V), dtype=wdtype, device=device)


class TritonKernels:
    """The backend object of `sla_dsl.backends`: forward/backward through the spec's generated kernels, and
    the tuning protocol of `sla_dsl.autotune` (tuning_space, default_config, config=..., compile_only=...).

    `config` (optional, flat, keys of either phase) overrides the settings it names in every call; a call's
    own `config` does the same for that call. Settings it leaves out come from default_config."""

    def __init__(self, spec, module, config: dict | None = None):
        self.spec = spec
        self.recurrence = spec.recurrence
        self.module = module
        self.config = config

    # -- the tuning protocol --------------------------------------------------------------------------

    def tuning_space(self, shape: Shape, phase: str = "fwd") -> Space:
        return tuning_space(self.recurrence, shape, phase)

    def default_config(self, shape: Shape, phase: str = "fwd") -> dict:
        return default_config(self.recurrence, shape, phase)

    def _config(self, q, v, cu_seqlens, phase: str, config: dict | None) -> dict:
        shape = Shape.of(q, v, cu_seqlens)
        override = override_config(self, self.spec, "triton", shape, phase,
                                   config if config is not None else self.config)
        return resolve_config(self, self.spec, "triton", shape, phase, override)

    # -- launches ---------------------------------------------------------------------------------

    def _common(self, launch: Launch, cfg: dict) -> dict:
        return dict(KP=launch.KP, BT=cfg["BT"], DECAY=self.module.FLAGS["DECAY"], PREC=cfg["PREC"])

    def _prepare(self, run, launch, cfg, phase, q, k, v, g, beta, gq, gk, h0, ht, scale) -> Prepared:
        """Stages "prep" and "states" (the latter as "bwd_states" in the backward)."""
        flags, V = self.module.FLAGS, launch.V
        with_prep = "prep" in phase_stages(self.recurrence, phase)
        ws = Prepared(self.recurrence, launch, q, k, v, cfg["BT"], work_dtype(cfg["PREC"], q.dtype), phase == "bwd",
                      with_prep)
        common = self._common(launch, cfg)
        if launch.num_chunks > 0 and with_prep:
            run(self.module.prep_kernel, (launch.num_chunks, launch.H),
                q, k, v, g, beta, gq, gk, launch.lg, ws.q, ws.k, ws.b, ws.A, ws.T, ws.w, ws.u, launch.cu,
                launch.chunk_indices, scale, launch.H, launch.K, V, BK=min(launch.KP, tpl_prep.K_BLOCK),
                BC=cfg["BC"], STORE_T=phase == "bwd",
                **common, **{name: value for name, value in flags.items() if name not in ("DECAY", "FUSED_QK")},
                **_launch_options(cfg, "prep", launch))
        st = _launch_options(cfg, "states" if phase == "fwd" else "bwd_states", launch)
        grid = (triton.cdiv(launch.K, st["BK"]), triton.cdiv(V, st["BV"]), launch.N * launch.H)
        run(self.module.states_kernel, grid,
            ws.k, gk, v, ws.b, launch.lg, ws.w, ws.u, h0 if h0 is not None else q, ht if ht is not None else q,
            ws.h, ws.vn, launch.cu, launch.chunk_offsets, launch.H, launch.K, V, IS_DELTA=flags["IS_DELTA"],
            HAS_H0=h0 is not None, STORE_HT=ht is not None, FUSED_QK=ws.fused_qk, KEY_GATE=flags["KEY_GATE"],
            L2_NORM=flags["L2_NORM"], EPS=flags["EPS"], **common, **st)
        return ws

    @staticmethod
    def _inputs(q, k, v, g, beta, gq, gk, initial_state):
        fix = lambda t: t.contiguous() if t is not None else None  # noqa: E731
        q, k, v = fix(q), fix(k), fix(v)
        return q, k, v, fix(g), fix(beta), fix(gq), fix(gk), fix(initial_state)

    @staticmethod
    def _dummies(q, g, beta, gq, gk):
        pick = lambda t: t if t is not None else q  # noqa: E731
        return pick(g), pick(beta), pick(gq), pick(gk)

    def _resolved(self, q, v, cu_seqlens, phase, config) -> tuple[dict, Launch]:
        cfg = self._config(q, v, cu_seqlens, phase, config)
        launch = Launch(self.recurrence, q, v, cu_seqlens, cfg["BT"])
        # BC, the vector decay's sub-chunk, is a constexpr of every kernel with in-chunk products: 16 otherwise
        return {**cfg, "BC": min(cfg.get("BC", 16), cfg["BT"]), "PREC": _precision(cfg["dot_precision"], q.dtype)}, \
            launch

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state, config=None,
                compile_only=False):
        """compile_only: compile (or load from Triton's disk cache) every kernel this call would launch, launch
        none, return None (the sweep's workers, with the same arguments at a tiny length)."""
        run = _compile_only if compile_only else _launch
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        cfg, launch = self._resolved(q, v, cu_seqlens, "fwd", config)
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        o = new_output(v.shape, v.dtype, v.device)
        ht = new_output((launch.N, launch.H, launch.K, launch.V), torch.float32, q.device) \
            if output_final_state else None
        ws = self._prepare(run, launch, cfg, "fwd", q, k, v, g_, beta_, gq_, gk_, initial_state, ht, scale)
        if launch.num_chunks > 0:
            st = _launch_options(cfg, "output", launch)
            flags = self.module.FLAGS
            run(self.module.output_kernel, (triton.cdiv(launch.V, st["BV"]), launch.num_chunks, launch.H),
                ws.q, ws.k, gq_, gk_, v, ws.b, launch.lg, ws.A, ws.h, ws.vn, o, launch.cu, launch.chunk_indices,
                scale, launch.H, launch.K, launch.V, IS_DELTA=flags["IS_DELTA"],
                FUSED_QK=ws.fused_qk, READ_GATE=flags["READ_GATE"],
                KEY_GATE=flags["KEY_GATE"], L2_NORM=flags["L2_NORM"], EPS=flags["EPS"],
                **self._common(launch, cfg), **st)
        return None if compile_only else (o, ht)

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state, config=None,
                 compile_only=False):
        """compile_only: as in forward."""
        run = _compile_only if compile_only else _launch
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        do = do.contiguous()
        dfinal_state = dfinal_state.contiguous() if dfinal_state is not None else None
        cfg, launch = self._resolved(q, v, cu_seqlens, "bwd", config)
        flags, common = self.module.FLAGS, self._common(launch, cfg)
        rec, H, K, V = self.recurrence, launch.H, launch.K, launch.V
        delta = rec.write is WriteRule.DELTA
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        out = lambda t: new_output(t.shape, t.dtype, t.device) if t is not None else None  # noqa: E731
        dq, dk, dv, dg, dbeta, dgq, dgk, dh0 = (out(t) for t in (q, k, v, g, beta, gq, gk, initial_state))
        ws = self._prepare(run, launch, cfg, "bwd", q, k, v, g_, beta_, gq_, gk_, initial_state, None, scale)
        dh_ws = torch.empty_like(ws.h)
        f32 = lambda shape: torch.empty(shape, dtype=torch.float32, device=q.device)  # noqa: E731
        dvn_ws = f32(v.shape) if delta else q
        dk_ws, dw_ws = (f32(q.shape), f32(q.shape)) if delta else (q, q)
        db_ws = f32(q.shape if rec.decay is Decay.VECTOR else q.shape[:-1]) \
            if delta and rec.decay in (Decay.SCALAR, Decay.VECTOR) else q
        st = _launch_options(cfg, "bwd_dh", launch)
        run(self.module.bwd_dh_kernel, (triton.cdiv(K, st["BK"]), triton.cdiv(V, st["BV"]), launch.N * H),
            ws.q, ws.k, ws.b, launch.lg, ws.w, ws.A, do, dfinal_state if dfinal_state is not None else q,
            dh0 if dh0 is not None else q, dh_ws, dvn_ws, launch.cu, launch.chunk_offsets, H, K, V,
            IS_DELTA=delta, HAS_DHT=dfinal_state is not None, HAS_H0=dh0 is not None, **common, **st)
        if launch.num_chunks > 0:
            pick = lambda t: t if t is not None else dq  # noqa: E731
            dqk = _launch_options(cfg, "bwd_dqk", launch)
            if not tpl_bwd_dqk.splits_keys(rec):
                dqk["BK"] = launch.KP
            # by key blocks, one program per block: the gates' gradients come as one float32 partial sum per
            # block, added up here (poisoned like outputs in tests: an unwritten partial shows as NaN)
            key_blocks = triton.cdiv(K, dqk["BK"])
            gate_parts = lambda t: new_output((key_blocks, *t.shape), torch.float32, t.device) \
                if t is not None and key_blocks > 1 else t  # noqa: E731
            dgq_parts, dgk_parts = gate_parts(dgq), gate_parts(dgk)
            run(self.module.bwd_dqk_kernel, (launch.num_chunks, H, key_blocks),
                q, k, gq_, gk_, ws.q, ws.k, v, ws.b, launch.lg, ws.A, ws.h, dh_ws, ws.vn, dvn_ws, do, dq, dk, dv,
                pick(dgq_parts), pick(dgk_parts), pick(dg), dk_ws, db_ws, dw_ws, launch.cu, launch.chunk_indices,
                scale, H, K, V, launch.B * launch.T * H, BC=cfg["BC"], IS_DELTA=delta,
                READ_GATE=flags["READ_GATE"], KEY_GATE=flags["KEY_GATE"], L2_NORM=flags["L2_NORM"], EPS=flags["EPS"],
                **common, **dqk)
            if key_blocks > 1 and not compile_only:
                if dgq is not None:
                    dgq.copy_(dgq_parts.sum(0))
                if dgk is not None:
                    dgk.copy_(dgk_parts.sum(0))
            if delta:
                run(self.module.bwd_wy_kernel, (launch.num_chunks, H),
                    k, v, beta_, gk_, launch.lg, ws.k, ws.b, ws.T, dvn_ws, dw_ws, dk_ws, db_ws, dk, dv, dbeta,
                    pick(dgk), pick(dg), launch.cu, launch.chunk_indices, H, K, V, BC=cfg["BC"],
                    KEY_GATE=flags["KEY_GATE"], BETA_GATE=flags["BETA_GATE"],
                    L2_NORM=flags["L2_NORM"], EPS=flags["EPS"], **common, **_launch_options(cfg, "bwd_wy", launch))
        return None if compile_only else (dq, dk, dv, dg, dbeta, dgq, dgk, dh0)
