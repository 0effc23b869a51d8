"""Host side of the Triton backend: configs, workspaces and launches of the generated kernels.

Schedule (per call):
    forward:  [intra] (grid (chunks, H); only for the delta rule or a vector decay) -> fwd (grid (cdiv(V, BV), N*H))
    backward: [intra] -> fwd with STORE_H (chunk states) -> bwd_dh (grid (cdiv(V, BV), N*H), reverse)
              -> bwd_main (grid (chunks, H))

Config (a plain dict; `default_config` gives the heuristic, an autotuner may pass its own):
    {"BT": chunk size, "BC": sub-chunk of the vector-decay in-chunk products (divides BT),
     "dot_precision": "ieee" | "tf32" | "input" (16-bit operands in the inputs' dtype),
     "intra": {"num_warps", "num_stages"},
     "fwd": {"BV", "num_warps", "num_stages"}, "bwd_states": {...same keys as fwd...},
     "bwd_dh": {"BV", "num_warps", "num_stages"}, "bwd_main": {"BV", "num_warps", "num_stages"}}
"""

from __future__ import annotations

import copy
import os

import torch
import triton

from sla_dsl.alloc import new_output
from sla_dsl.backends.triton import tpl_bwd_dh, tpl_bwd_main, tpl_fwd, tpl_intra
from sla_dsl.spec import Decay, Recurrence, WriteRule

STAGE_NAMES = ("intra", "fwd", "bwd_states", "bwd_dh", "bwd_main")
TUNING_SPACE = {"BT": (16, 32, 64), "BC": (16, 32), "dot_precision": ("ieee", "tf32", "input"),
                "intra": tpl_intra.TUNING_SPACE, "fwd": tpl_fwd.TUNING_SPACE, "bwd_states": tpl_fwd.TUNING_SPACE,
                "bwd_dh": tpl_bwd_dh.TUNING_SPACE, "bwd_main": tpl_bwd_main.TUNING_SPACE}
CONSTRAINTS = ("BC <= BT and BT % BC == 0", "BV <= padded V (next power of two >= 16)",
               "dot_precision 'input' only for 16-bit inputs; fp32 inputs need 'ieee' to reach 1e-5")


def padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(rec: Recurrence, K: int, V: int, dtype: torch.dtype) -> dict:
    """Heuristic block sizes for head dims K, V and input dtype."""
    KP, VP = padded(K), padded(V)
    if interpreting():
        BT = 16
    else:
        BT = 64 if KP <= 128 else 32
    BC = 16
    vector = rec.decay is Decay.VECTOR
    delta = rec.write is WriteRule.DELTA
    fwd_bv = min(VP, 64 if KP <= 64 else 32)
    main_bv = min(VP, 64 if KP <= 64 else 32)
    warps = 4 if KP <= 64 else 8
    return {
        "BT": BT, "BC": BC,
        "dot_precision": "ieee" if dtype == torch.float32 else "tf32",
        "intra": {"num_warps": 4, "num_stages": 1},
        "fwd": {"BV": fwd_bv, "num_warps": 4, "num_stages": 2},
        "bwd_states": {"BV": fwd_bv, "num_warps": 4, "num_stages": 2},
        "bwd_dh": {"BV": fwd_bv, "num_warps": 4, "num_stages": 2},
        "bwd_main": {"BV": main_bv, "num_warps": warps if (vector or delta) else 4, "num_stages": 1},
    }


def merge_config(base: dict, override: dict | None) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def _precision(name: str, dtype: torch.dtype) -> int:
    if name == "ieee" or dtype == torch.float32:
        return 0 if name != "tf32" else 1
    if name == "tf32":
        return 1
    return 2 if dtype == torch.float16 else 3


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
    """The backend object of `sla_dsl.backends`: forward/backward through the spec's generated kernels.

    `config` (optional dict, merged over `default_config`) fixes block sizes for every call."""

    def __init__(self, spec, module, config: dict | None = None):
        self.spec = spec
        self.recurrence = spec.recurrence
        self.module = module
        self.config = config

    def resolve_config(self, K: int, V: int, dtype: torch.dtype) -> dict:
        return merge_config(default_config(self.recurrence, K, V, dtype), self.config)

    # -- launches ---------------------------------------------------------------------------------

    def _common(self, launch: Launch, cfg: dict, dtype: torch.dtype) -> dict:
        return dict(KP=launch.KP, BT=cfg["BT"], BC=min(cfg["BC"], cfg["BT"]),
                    PREC=_precision(cfg["dot_precision"], dtype), **self.module.FLAGS)

    def _intra(self, launch, cfg, common, q, k, g, beta, gq, gk, scale):
        rec = self.recurrence
        need_a = rec.decay is Decay.VECTOR
        need_t = rec.write is WriteRule.DELTA
        if not (need_a or need_t) or launch.num_chunks == 0:
            return q, q
        shape = (max(launch.num_chunks, 1), launch.H, cfg["BT"], cfg["BT"])
        A_ws = torch.empty(shape, dtype=torch.float32, device=q.device) if need_a else q
        T_ws = torch.empty(shape, dtype=torch.float32, device=q.device) if need_t else q
        self.module.intra_kernel[(launch.num_chunks, launch.H)](
            q, k, g, beta, gq, gk, launch.lg, A_ws, T_ws, launch.cu, launch.chunk_indices, scale,
            launch.H, launch.K, **common, **cfg["intra"])
        return A_ws, T_ws

    def _fwd(self, launch, cfg, stage, common, q, k, v, g, beta, gq, gk, h0, o, ht, h_ws, A_ws, T_ws, scale,
             store_o, store_h):
        st = dict(cfg[stage])
        BV = min(st.pop("BV"), padded(launch.V))
        grid = (triton.cdiv(launch.V, BV), launch.N * launch.H)
        self.module.fwd_kernel[grid](
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

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        cfg = self.resolve_config(q.shape[-1], v.shape[-1], q.dtype)
        launch = Launch(self.recurrence, q, v, cu_seqlens, cfg["BT"])
        common = self._common(launch, cfg, q.dtype)
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        o = new_output(v.shape, v.dtype, v.device)
        ht = new_output((launch.N, launch.H, launch.K, launch.V), torch.float32, q.device) \
            if output_final_state else None
        A_ws, T_ws = self._intra(launch, cfg, common, q, k, g_, beta_, gq_, gk_, scale)
        self._fwd(launch, cfg, "fwd", common, q, k, v, g_, beta_, gq_, gk_, initial_state, o, ht, None,
                  A_ws, T_ws, scale, True, False)
        return o, ht

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state):
        q, k, v, g, beta, gq, gk, initial_state = self._inputs(q, k, v, g, beta, gq, gk, initial_state)
        do = do.contiguous()
        dfinal_state = dfinal_state.contiguous() if dfinal_state is not None else None
        cfg = self.resolve_config(q.shape[-1], v.shape[-1], q.dtype)
        launch = Launch(self.recurrence, q, v, cu_seqlens, cfg["BT"])
        common = self._common(launch, cfg, q.dtype)
        g_, beta_, gq_, gk_ = self._dummies(q, g, beta, gq, gk)
        out = lambda t: new_output(t.shape, t.dtype, t.device) if t is not None else None  # noqa: E731
        dq, dk, dv, dg, dbeta, dgq, dgk, dh0 = (out(t) for t in (q, k, v, g, beta, gq, gk, initial_state))
        H, K, V = launch.H, launch.K, launch.V
        ws_shape = (max(launch.num_chunks, 1), H, K, V)
        h_ws = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        dh_ws = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        A_ws, T_ws = self._intra(launch, cfg, common, q, k, g_, beta_, gq_, gk_, scale)
        self._fwd(launch, cfg, "bwd_states", common, q, k, v, g_, beta_, gq_, gk_, initial_state, None, None,
                  h_ws, A_ws, T_ws, scale, False, True)
        st = dict(cfg["bwd_dh"])
        BV = min(st.pop("BV"), padded(V))
        self.module.bwd_dh_kernel[(triton.cdiv(V, BV), launch.N * H)](
            q, k, g_, beta_, gq_, gk_, launch.lg, do, dfinal_state if dfinal_state is not None else q,
            dh0 if dh0 is not None else q, dh_ws, A_ws, T_ws, launch.cu, launch.chunk_offsets, scale, H, K, V,
            BV=BV, HAS_DHT=dfinal_state is not None, HAS_H0=dh0 is not None, **common, **st)
        if launch.num_chunks > 0:
            st = dict(cfg["bwd_main"])
            BV = min(st.pop("BV"), padded(V))
            pick = lambda t: t if t is not None else dq  # noqa: E731
            self.module.bwd_main_kernel[(launch.num_chunks, H)](
                q, k, v, g_, beta_, gq_, gk_, launch.lg, do, h_ws, dh_ws, A_ws, T_ws, launch.cu,
                launch.chunk_indices, dq, dk, dv, pick(dg), pick(dbeta), pick(dgq), pick(dgk), scale, H, K, V,
                BV=BV, **common, **st)
        return dq, dk, dv, dg, dbeta, dgq, dgk, dh0
