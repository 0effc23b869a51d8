"""Host side of the Triton backend: configs, workspaces and launches of the generated kernels.

Schedule (per call):
    forward:  [intra] (grid (chunks, H); only for the delta rule or a vector decay) -> fwd (grid (cdiv(V, BV), N*H))
    backward: [intra] -> fwd with STORE_H (chunk states) -> bwd_dh (grid (cdiv(V, BV), N*H), reverse)
              -> bwd_main (grid (chunks, H))

A config is a flat dict of JSON scalars for one phase (what the tuner sweeps and the tuned tables store):
    "BT": chunk size, "dot_precision": "ieee" | "tf32" | "input" (16-bit operands in the inputs' dtype),
    "BC": sub-chunk of the vector-decay in-chunk products (vector decay only; divides BT),
    "<stage>_<key>" for every key of the stage template's TUNING_SPACE (BV, num_warps, num_stages), for the
    stages the phase launches: fwd: intra (delta rule or vector decay only), fwd; bwd: intra, bwd_states (the
    fwd template storing the chunk states), bwd_dh, bwd_main.
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
from sla_dsl.backends.triton import tpl_bwd_dh, tpl_bwd_main, tpl_fwd, tpl_intra
from sla_dsl.spec import Decay, Recurrence, WriteRule

STAGE_TEMPLATES = {"intra": tpl_intra, "fwd": tpl_fwd, "bwd_states": tpl_fwd, "bwd_dh": tpl_bwd_dh,
                   "bwd_main": tpl_bwd_main}
PHASE_STAGES = {"fwd": ("intra", "fwd"), "bwd": ("intra", "bwd_states", "bwd_dh", "bwd_main")}
CHUNK_SIZES = (16, 32, 64)
SUB_CHUNKS = (16, 32)
# 16-bit inputs: tf32 keeps fp32 operands' range, "input" runs the tensor cores at 16-bit rate. fp32 and fp64
# inputs need "ieee" to meet their 1e-5 tolerance, so they have nothing else to choose.
PRECISIONS = {"float16": ("tf32", "input"), "bfloat16": ("tf32", "input"), "float32": ("ieee",),
              "float64": ("ieee",)}
# Tried first by the sweep: chunk size, operand precision and the V-blocking change every stage's work most.
SEARCH_ORDER = ("BT", "dot_precision", "fwd_BV", "bwd_states_BV", "bwd_dh_BV", "bwd_main_BV", "fwd_num_warps",
                "bwd_states_num_warps", "bwd_dh_num_warps", "bwd_main_num_warps", "BC")
CONSTRAINTS = ("BC <= BT and BT % BC == 0", "every stage's BV <= padded V (next power of two >= 16)",
               "dot_precision: 'tf32' or 'input' for 16-bit inputs, 'ieee' for fp32 and fp64")


def padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launches_intra(rec: Recurrence) -> bool:
    """The intra stage computes A (vector decay) and T (delta rule); other recurrences build A in registers."""
    return rec.decay is Decay.VECTOR or rec.write is WriteRule.DELTA


def phase_stages(rec: Recurrence, phase: str) -> tuple[str, ...]:
    if phase not in PHASE_STAGES:
        raise ValueError(f"phase: expected 'fwd' or 'bwd', got {phase!r}")
    return tuple(s for s in PHASE_STAGES[phase] if s != "intra" or launches_intra(rec))


def tuning_space(rec: Recurrence, shape: Shape, phase: str) -> Space:
    """Every valid config of `phase` for `shape`: shared settings x each launched stage's template space."""
    shared = [{"BT": bt, "dot_precision": p} for bt in CHUNK_SIZES for p in PRECISIONS[shape.dtype]]
    if rec.decay is Decay.VECTOR:
        shared = [{**s, "BC": bc} for s in shared for bc in SUB_CHUNKS if bc <= s["BT"] and s["BT"] % bc == 0]
    stages = [[{f"{stage}_{k}": v for k, v in setting.items()} for setting in STAGE_TEMPLATES[stage].TUNING_SPACE
               if setting.get("BV", 0) <= padded(shape.V)]
              for stage in phase_stages(rec, phase)]
    return Space(shared, *stages, order=SEARCH_ORDER)


def default_config(rec: Recurrence, shape: Shape, phase: str) -> dict:
    """Heuristic settings for head dims K, V and the input dtype (a member of tuning_space)."""
    KP, VP = padded(shape.K), padded(shape.V)
    # the interpreter runs every tile element by element in numpy: small chunks keep CPU tests fast
    BT = 16 if interpreting() else (64 if KP <= 128 else 32)
    if phase == "bwd" and rec.write is WriteRule.DELTA and KP >= 128 and not interpreting():
        BT = 32  # the delta rule's bwd_main at chunk 64 needs 319488 bytes of shared memory; an H100 CTA has 232448
    BV = min(VP, 64 if KP <= 64 else 32)
    main_warps = (4 if KP <= 64 else 8) if launches_intra(rec) else 4
    stage_defaults = {"intra": {"num_warps": 4, "num_stages": 1},
                      "fwd": {"BV": BV, "num_warps": 4, "num_stages": 2},
                      "bwd_states": {"BV": BV, "num_warps": 4, "num_stages": 2},
                      "bwd_dh": {"BV": BV, "num_warps": 4, "num_stages": 2},
                      "bwd_main": {"BV": BV, "num_warps": main_warps, "num_stages": 1}}
    config = {"BT": BT, "dot_precision": PRECISIONS[shape.dtype][0]}
    if rec.decay is Decay.VECTOR:
        config["BC"] = 16
    for stage in phase_stages(rec, phase):
        config.update({f"{stage}_{k}": v for k, v in stage_defaults[stage].items()})
    return config


def stage_options(config: dict, stage: str) -> dict:
    """The launch options of one stage (BV, num_warps, num_stages) from a flat config."""
    prefix = f"{stage}_"
    return {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)}


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


class Launch:
    """Shapes, sequence bounds and chunk tables of one call."""

    def __init__(self, rec: Recurrence, q, v, cu_seqlens, BT: int):
        B, T, H, K = q.shape
        self.B, self.T, self.H, self.K, self.V = B, T, H, K, v.shape[-1]
        self.KP = padded(K)
        device = q.device
        if cu_seqlens is None:
            self.cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int64, device=device)[:B + 1]
        else:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int64).contiguous()
        self.N = self.cu.numel() - 1
        lengths = self.cu[1:] - self.cu[:-1]
        counts = (lengths + BT - 1) // BT
        self.chunk_offsets = torch.zeros(self.N + 1, dtype=torch.int64, device=device)
        self.chunk_offsets[1:] = counts.cumsum(0)
        self.num_chunks = int(self.chunk_offsets[-1].item())
        seq = torch.repeat_interleave(torch.arange(self.N, device=device), counts)
        local = torch.arange(self.num_chunks, device=device) - self.chunk_offsets[seq]
        self.chunk_indices = torch.stack([seq, local], 1).to(torch.int32).contiguous()
        if rec.decay is Decay.CONSTANT:
            self.lg = torch.tensor(rec.log_gammas(H), dtype=torch.float32, device=device)
        else:
            self.lg = torch.zeros(1, dtype=torch.float32, device=device)


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

    def _common(self, launch: Launch, cfg: dict, dtype: torch.dtype) -> dict:
        BT = cfg["BT"]
        return dict(KP=launch.KP, BT=BT, BC=min(cfg.get("BC", 16), BT), PREC=_precision(cfg["dot_precision"], dtype),
                    **self.module.FLAGS)

    def _intra(self, run, launch, cfg, common, q, k, g, beta, gq, gk, scale):
        rec = self.recurrence
        if not launches_intra(rec) or launch.num_chunks == 0:
            return q, q
        shape = (max(launch.num_chunks, 1), launch.H, cfg["BT"], cfg["BT"])
        A_ws = torch.empty(shape, dtype=torch.float32, device=q.device) if rec.decay is Decay.VECTOR else q
        T_ws = torch.empty(shape, dtype=torch.float32, device=q.device) if rec.write is WriteRule.DELTA else q
        run(self.module.intra_kernel, (launch.num_chunks, launch.H),
            q, k, g, beta, gq, gk, launch.lg, A_ws, T_ws, launch.cu, launch.chunk_indices, scale,
            launch.H, launch.K, **common, **stage_options(cfg, "intra"))
        return A_ws, T_ws

    def _fwd(self, run, launch, cfg, stage, common, q, k, v, g, beta, gq, gk, h0, o, ht, h_ws, A_ws, T_ws, scale,
             store_o, store_h):
        st = stage_options(cfg, stage)
        BV = min(st.pop("BV"), padded(launch.V))
        run(self.module.fwd_kernel, (triton.cdiv(launch.V, BV), launch.N * launch.H),
            q, k, v, g, beta, gq, gk, launch.lg, h0 if h0 is not None else q, o if o is not None else q,
            ht if ht is not None else q, h_ws if h_ws is not None else q, A_ws, T_ws, launch.cu,
            launch.chunk_offsets, scale, launch.H, launch.K, launch.V, BV=BV, HAS_H0=h0 is not None,
            STORE_HT=ht is not None, STORE_O=store_o, STORE_H=store_h, **common, **st)

    @staticmethod
    def _inputs(q, k, v, g, beta, gq, gk, initial_state):
        fix = lambda t: t.contiguous() if t is not None else None  # noqa: E731
        q, k, v = fix(q), fix(k), fix(v)
        return q, k, v, fix(g), fix(beta), fix(gq), fix(gk), fix(initial_state)

    @staticmethod
    def _dummies(q, g, beta, gq, gk):
        pick = lambda t: t if t is not None else q  # noqa: E731
        return pick(g), pick(beta), pick(gq), pick(gk)

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state, config=None,
                compile_only=False):
        """compile_only: compile (or load from Triton's disk cache) every kernel this call would launch, launch
        none, return None (the sweep's workers, with the same arguments at a tiny length)."""
        run = _compile_only if compile_only else _launch
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        cfg = self._config(q, v, cu_seqlens, "fwd", config)
        launch = Launch(self.recurrence, q, v, cu_seqlens, cfg["BT"])
        common = self._common(launch, cfg, q.dtype)
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        o = new_output(v.shape, v.dtype, v.device)
        ht = new_output((launch.N, launch.H, launch.K, launch.V), torch.float32, q.device) \
            if output_final_state else None
        A_ws, T_ws = self._intra(run, launch, cfg, common, q, k, g_, beta_, gq_, gk_, scale)
        self._fwd(run, launch, cfg, "fwd", common, q, k, v, g_, beta_, gq_, gk_, initial_state, o, ht, None,
                  A_ws, T_ws, scale, True, False)
        return None if compile_only else (o, ht)

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state, config=None,
                 compile_only=False):
        """compile_only: as in forward."""
        run = _compile_only if compile_only else _launch
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        do = do.contiguous()
        dfinal_state = dfinal_state.contiguous() if dfinal_state is not None else None
        cfg = self._config(q, v, cu_seqlens, "bwd", config)
        launch = Launch(self.recurrence, q, v, cu_seqlens, cfg["BT"])
        common = self._common(launch, cfg, q.dtype)
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        out = lambda t: new_output(t.shape, t.dtype, t.device) if t is not None else None  # noqa: E731
        dq, dk, dv, dg, dbeta, dgq, dgk, dh0 = (out(t) for t in (q, k, v, g, beta, gq, gk, initial_state))
        H, K, V = launch.H, launch.K, launch.V
        ws_shape = (max(launch.num_chunks, 1), H, K, V)
        h_ws = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        dh_ws = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        A_ws, T_ws = self._intra(run, launch, cfg, common, q, k, g_, beta_, gq_, gk_, scale)
        self._fwd(run, launch, cfg, "bwd_states", common, q, k, v, g_, beta_, gq_, gk_, initial_state, None, None,
                  h_ws, A_ws, T_ws, scale, False, True)
        st = stage_options(cfg, "bwd_dh")
        BV = min(st.pop("BV"), padded(V))
        run(self.module.bwd_dh_kernel, (triton.cdiv(V, BV), launch.N * H),
            q, k, g_, beta_, gq_, gk_, launch.lg, do, dfinal_state if dfinal_state is not None else q,
            dh0 if dh0 is not None else q, dh_ws, A_ws, T_ws, launch.cu, launch.chunk_offsets, scale, H, K, V,
            BV=BV, HAS_DHT=dfinal_state is not None, HAS_H0=dh0 is not None, **common, **st)
        if launch.num_chunks > 0:
            st = stage_options(cfg, "bwd_main")
            BV = min(st.pop("BV"), padded(V))
            pick = lambda t: t if t is not None else dq  # noqa: E731
            run(self.module.bwd_main_kernel, (launch.num_chunks, H),
                q, k, v, g_, beta_, gq_, gk_, launch.lg, do, h_ws, dh_ws, A_ws, T_ws, launch.cu,
                launch.chunk_indices, dq, dk, dv, pick(dg), pick(dbeta), pick(dgq), pick(dgk), scale, H, K, V,
                BV=BV, **common, **st)
        return None if compile_only else (dq, dk, dv, dg, dbeta, dgq, dgk, dh0)
