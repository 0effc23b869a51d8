"""The TileLang backend: runs the generated chunkwise kernels of `generated/tilelang/<spec>.py`.

Host side only: packs batches into one token axis described by cu_seqlens, builds the chunk tables for
varlen, allocates outputs and the tensors the stages pass on, compiles kernels (TileLang's disk cache, placed
under our cache directory; its key is the kernel's full TIR, so a changed template or spec never reuses a
stale binary) and launches the generated module's `PHASES` in order:

    forward:  [wy | prep ->] states -> output, or states_output alone (the fused schedule; see tuning)
    backward: [wy | bwd_prep ->] states -> [dv_local ->] bwd_dh -> bwd_chunk [-> bwd_delta]

(wy, dv_local and bwd_delta: the delta rule; prep and bwd_prep, which also writes bwd_dh's qe: a vector decay
without it).

CPU tensors run the same kernels compiled by TileLang's C target (`cpu_emulation`): slow, for tests.

Configs are flat dicts per phase (`tuning`: chunk, and block_v, threads, num_stages per stage) and follow the
tuning protocol of `sla_dsl.autotune`: a call without `config` runs the tuned table's config for the running
GPU, else the default. Settings can be fixed for every call with `TileLangKernels(spec, config={...})` or
the environment variable SLA_DSL_TILELANG_CONFIG='{"output_block_v": 32, "bwd_chunk_num_stages": 1}'.
"""

from __future__ import annotations

import json
import os

import torch

from sla_dsl.alloc import new_output
from sla_dsl.autotune import Shape, resolve_config
from sla_dsl.autotune.protocol import override_config
from sla_dsl.backends.tilelang import cpu_emulation, tuning
from sla_dsl.codegen import cache_dir, generated_module
from sla_dsl.launch_tables import chunk_table, log_gammas, scalar
from sla_dsl.spec import Decay, FeatureMap, Spec

os.environ.setdefault("TILELANG_CACHE_DIR", str(cache_dir() / "tilelang"))

EXECUTION_BACKEND = "tvm_ffi"  # compiles device code with nvcc and needs no libcuda at build time
SM90_TARGET = {"kind": "cuda", "arch": "sm_90a"}
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def compile_kernel(module, name: str, heads: int, dim_k: int, dim_v: int, dtype: str, params: dict, target=None):
    """Compiles kernel factory `name` of a generated module with `params` (tuning.kernel_params); target "c"
    compiles it for CPU tensors (`cpu_emulation`)."""
    import tilelang

    if target == cpu_emulation.TARGET:
        with cpu_emulation.emulated():
            func = getattr(module, name)(heads, dim_k, dim_v, dtype, **params)
            return tilelang.compile(func, target=target,
                                    pass_configs={**module.PASS_CONFIGS, **cpu_emulation.PASS_CONFIGS},
                                    execution_backend=cpu_emulation.EXECUTION_BACKEND)
    func = getattr(module, name)(heads, dim_k, dim_v, dtype, **params)
    return tilelang.compile(func, target=target or "auto", pass_configs=dict(module.PASS_CONFIGS),
                            execution_backend=EXECUTION_BACKEND)


class TileLangKernels:
    """The backend object of `sla_dsl.backends`, with the tuning protocol of `sla_dsl.autotune`.

    `config` (optional, flat, keys of either phase; else $SLA_DSL_TILELANG_CONFIG) overrides the settings it
    names in every call; a call's own `config` does the same for that call. The rest come from the default."""

    def __init__(self, spec: Spec, config: dict | None = None):
        from sla_dsl.backends.tilelang.generator import filename

        self.spec = spec
        self.recurrence = spec.recurrence
        self.module = generated_module(spec, "tilelang", filename(spec))
        override = os.environ.get("SLA_DSL_TILELANG_CONFIG")
        self.config = config if config is not None else (json.loads(override) if override else None)
        self._compiled = {}

    # ---- the tuning protocol ----

    def tuning_space(self, shape: Shape, phase: str = "fwd"):
        return tuning.tuning_space(self.module, shape, phase)

    def default_config(self, shape: Shape, phase: str = "fwd") -> dict:
        return tuning.default_config(self.module, shape, phase)

    def _config(self, q, v, cu_seqlens, phase: str, config: dict | None) -> dict:
        shape = Shape.of(q, v, cu_seqlens)
        override = override_config(self, self.spec, "tilelang", shape, phase,
                                   config if config is not None else self.config)
        return resolve_config(self, self.spec, "tilelang", shape, phase, override)

    # ---- compilation ----

    def kernel(self, stage: str, config: dict, heads: int, dim_k: int, dim_v: int, dtype: torch.dtype,
               device: torch.device):
        """The compiled kernel of `stage` (see tuning.phase_stages) with its settings in `config`, for tensors
        on `device`."""
        name, params = tuning.stage_kernel(stage), tuning.kernel_params(config, stage)
        target = cpu_emulation.TARGET if device.type == "cpu" else None
        key = (name, heads, dim_k, dim_v, dtype, tuple(sorted(params.items())), target)
        if key not in self._compiled:
            shape = Shape(1, 1, heads, dim_k, dim_v, dtype)
            if target is None:  # the emulation has no warps to split tiles among, nor a CTA to fit in
                tuning.check_threads(self.module, stage, config, shape)
            compiled = compile_kernel(self.module, name, heads, dim_k, dim_v, _DTYPES[dtype], params, target=target)
            if target is None:
                tuning.check_shared_memory(compiled.get_kernel_source(), self.module, stage, config, shape)
            self._compiled[key] = compiled
        return self._compiled[key]

    def _kernels(self, phase: str, config: dict, q, v) -> dict:
        """The compiled kernels of `phase`, by kernel name."""
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # TileLang's C target fails on bfloat16 buffers deep in its lowering ("variables ... are used, but
            # are not passed in as API arguments"): say so here, in the op's terms
            raise ValueError("q: expected dtype float16 or float32 for CPU tensors with the tilelang backend "
                             "(TileLang's C target, which runs them, has no bfloat16; CUDA tensors take it), got "
                             "dtype torch.bfloat16 on cpu")
        heads, dim_k, dim_v = q.shape[2], tuning.padded(q.shape[3]), tuning.padded(v.shape[3])
        return {tuning.stage_kernel(stage): self.kernel(stage, config, heads, dim_k, dim_v, q.dtype, q.device)
                for stage in tuning.phase_stages(self.module, phase, config)}

    # ---- host-side packing ----

    def _pack(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale):
        """The inputs as the kernels take them: tokens packed along one axis, head dims padded to the kernels'
        (tuning.padded) so that the padded channels contribute nothing."""
        batch, length, heads, dim_k = q.shape
        dim_v = v.shape[-1]
        kp, vp = tuning.padded(dim_k), tuning.padded(dim_v)
        device = q.device
        if cu_seqlens is None:
            cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
        else:
            cu = cu_seqlens.to(torch.int32)
        nt = batch * length
        flat = lambda t: t.reshape(nt, *t.shape[2:]).contiguous()  # noqa: E731
        rec = self.recurrence
        extras = {}
        for name in self.module.INPUTS[3:]:
            if name == "g":
                extras[name] = _pad(flat(g).float(), kp, 0.0) if rec.decay is Decay.VECTOR else flat(g).float()
            elif name in ("beta", "gq", "gk"):
                extras[name] = flat({"beta": beta, "gq": gq, "gk": gk}[name]).float()
            elif name == "log_gamma":
                extras[name] = log_gammas(rec, heads, device)
            elif name == "scale":
                extras[name] = scalar(scale, device)
        num_seq = cu.numel() - 1
        h0 = (_pad(_pad(initial_state.float(), vp, 0.0), kp, 0.0, dim=-2) if initial_state is not None
              else torch.zeros(num_seq, heads, kp, vp, dtype=torch.float32, device=device))
        packed = [_pad(flat(q), kp, VANISHING_INPUT[rec.feature_map_q]),
                  _pad(flat(k), kp, VANISHING_INPUT[rec.feature_map_k]), _pad(flat(v), vp, 0.0),
                  *(extras[n] for n in self.module.INPUTS[3:])]
        return dict(batch=batch, length=length, heads=heads, dim_k=kp, dim_v=vp, real_k=dim_k, real_v=dim_v,
                    nt=nt, cu=cu, cu_seqlens=cu_seqlens, num_seq=num_seq, q=packed[0], v=packed[2], inputs=packed,
                    h0=h0)

    @staticmethod
    def _chunks(p, chunk: int):
        """Each sequence's first chunk (int32), the (sequence, chunk) table of the chunk-parallel kernels, and
        the number of chunks: see sla_dsl.launch_tables (no host sync for equal lengths)."""
        table = chunk_table(p["batch"], p["length"], p["cu_seqlens"], chunk, p["q"].device)
        return table.chunk_offsets[:-1].to(torch.int32), table.chunk_indices, table.num_chunks

    def _run_states(self, p, kernels: dict, chunk: int):
        """Stages wy (delta rule) or prep, and states: the state entering every chunk (hs, in the input dtype,
        float32 for float16), the final state (ht), v_new (delta rule, else v), what wy or prep wrote for the
        backward's bwd_dh (ke, qe, a vector decay's gc) and bwd_delta (w, u and tm, the delta rule's solve), and
        the chunk tables."""
        offsets, table, total = self._chunks(p, chunk)
        heads, dim_k, dim_v, nt = p["heads"], p["dim_k"], p["dim_v"], p["nt"]
        dtype, device = p["q"].dtype, p["q"].device
        state_dtype = getattr(torch, self.module.state_dtype(_DTYPES[dtype]))
        hs = new_output((max(total, 1), heads, dim_k, dim_v), state_dtype, device)
        ht = new_output((p["num_seq"], heads, dim_k, dim_v), torch.float32, device)
        vector = self.recurrence.decay is Decay.VECTOR
        # a vector decay's exp(b_C) per chunk, written by wy or prep
        gc = [new_output((max(total, 1), heads, dim_k), torch.float32, device)] if vector else []
        v_new, wy, tm, prep, extra = p["v"], [], [], [], []
        prep_kernel = next((name for name in ("prep", "bwd_prep") if name in kernels), None)
        if "wy" in kernels:
            wy = [new_output((nt, heads, dim), dtype, device) for dim in (dim_k, dim_v, dim_k)]  # w, u, ke
            tm = [new_output((max(total, 1), heads, chunk, chunk), dtype, device)]  # the solve T, for bwd_delta
            v_new = new_output((nt, heads, dim_v), dtype, device)
            extra = [*wy, v_new, *gc]
        elif prep_kernel:
            outputs = 2 if prep_kernel == "bwd_prep" else 1  # ke, and for the backward's bwd_dh qe
            prep = [new_output((nt, heads, dim_k), dtype, device) for _ in range(outputs)]
            extra = [prep[0], *gc]
        if nt > 0:
            if wy:
                kernels["wy"](*p["inputs"], p["cu"], table, *wy, *tm, *gc)
            if prep:
                kernels[prep_kernel](*p["inputs"], p["cu"], table, *prep, *gc)
            kernels["states"](*p["inputs"], p["cu"], offsets, *extra, p["h0"], hs, ht)
        else:
            ht.copy_(p["h0"])
        w, u, ke = wy or (None, None, prep[0] if prep else None)
        return dict(hs=hs, ht=ht, v_new=v_new, w=w, u=u, ke=ke, tm=tm[0] if tm else None,
                    qe=prep[1] if len(prep) > 1 else None, gc=gc, offsets=offsets, table=table)

    def _run_delta_backward(self, p, kernels: dict, st: dict, dh, do_flat, du, dq, dk, dv, small: dict) -> None:
        """The delta rule's last two backward stages: bwd_chunk (dq, and the parts of dk and dg that read the
        states: dkp, db; and dw) and bwd_delta (the WY form's backward, which finishes dk and dg)."""
        nt, heads, dim_k = p["nt"], p["heads"], p["dim_k"]
        device = p["q"].device
        dkp = new_output((nt, heads, dim_k), torch.float32, device)
        dw = new_output((nt, heads, dim_k), p["q"].dtype, device)
        dbp = [new_output(small["dg"].shape, torch.float32, device)] if "dg" in small else []
        read_gate = [small["dgq"]] if "dgq" in small else []
        kernels["bwd_chunk"](*p["inputs"], p["cu"], st["table"], st["hs"], dh, do_flat, st["v_new"], du, dq, dkp,
                             dw, *dbp, *read_gate)
        rest = [small[name] for name in small if name != "dgq"]  # dg, dbeta, dgk, as GRAD_OUTPUTS orders them
        kernels["bwd_delta"](*p["inputs"], p["cu"], st["table"], st["w"], st["tm"], st["u"], du, dkp, dw, *dbp,
                             dk, dv, *rest)

    # ---- the backend interface ----

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state, config=None,
                compile_only=False):
        """compile_only: compile (or load from TileLang's disk cache) the kernels this call would run, run
        none, return None (the sweep's workers, with the same arguments at a tiny length)."""
        if q.dtype == torch.float64:  # no float64 tensor cores: the float64 path is the reference
            if compile_only:
                return None
            from sla_dsl.backends.reference import ReferenceKernels
            return ReferenceKernels(self.spec).forward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                                       output_final_state)
        cfg = self._config(q, v, cu_seqlens, "fwd", config)
        kernels = self._kernels("fwd", cfg, q, v)
        if compile_only:
            return None
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        o = new_output((p["nt"], p["heads"], p["dim_v"]), v.dtype, q.device)
        if tuning.FUSED_FORWARD in kernels:
            ht = self._run_fused(p, kernels, o)
        else:
            st = self._run_states(p, kernels, cfg["chunk"])
            ht = st["ht"]
            if p["nt"] > 0:
                v_new = [st["v_new"]] if "wy" in kernels else []
                kernels["output"](*p["inputs"], p["cu"], st["table"], st["hs"], *v_new, o)
        o = o[..., :p["real_v"]].reshape(p["batch"], p["length"], p["heads"], p["real_v"])
        return o, (_unpad_state(ht, p) if output_final_state else None)

    @staticmethod
    def _run_fused(p, kernels: dict, o):
        """The fused forward (stage states_output): writes o, returns the final state."""
        ht = new_output((p["num_seq"], p["heads"], p["dim_k"], p["dim_v"]), torch.float32, p["q"].device)
        if p["nt"] > 0:
            kernels[tuning.FUSED_FORWARD](*p["inputs"], p["cu"], p["h0"], o, ht)
        else:
            ht.copy_(p["h0"])
        return ht

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state, config=None,
                 compile_only=False):
        """compile_only: as in forward."""
        if q.dtype == torch.float64:
            if compile_only:
                return None
            from sla_dsl.backends.reference import ReferenceKernels
            return ReferenceKernels(self.spec).backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                                        do, dfinal_state)
        dtype = q.dtype
        cfg = self._config(q, v, cu_seqlens, "bwd", config)
        kernels = self._kernels("bwd", cfg, q, v)
        if compile_only:
            return None
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        nt, num_seq, heads, dim_k, dim_v = p["nt"], p["num_seq"], p["heads"], p["dim_k"], p["dim_v"]
        device = q.device
        st = self._run_states(p, kernels, cfg["chunk"])
        do_flat = _pad(do.reshape(nt, heads, p["real_v"]).to(dtype), dim_v, 0.0)
        dht = (_pad(_pad(dfinal_state.float(), dim_v, 0.0), dim_k, 0.0, dim=-2) if dfinal_state is not None
               else torch.zeros(num_seq, heads, dim_k, dim_v, dtype=torch.float32, device=device))
        dh = new_output(st["hs"].shape, st["hs"].dtype, device)
        dh0 = new_output((num_seq, heads, dim_k, dim_v), torch.float32, device)
        dq = new_output((nt, heads, dim_k), dtype, device)
        dk = new_output((nt, heads, dim_k), dtype, device)
        dv = new_output((nt, heads, dim_v), dtype, device)
        small = {}
        for name in self.module.GRAD_OUTPUTS:
            shape = (nt, heads, dim_k) if name == "dg" and self.recurrence.decay is Decay.VECTOR else (nt, heads)
            small[name] = new_output(shape, torch.float32, device)
        if nt > 0:
            extra, du = ([st["qe"]] if "bwd_prep" in kernels else []), []
            if "dv_local" in kernels:
                dvl = new_output((nt, heads, dim_v), dtype, device)
                qe = new_output((nt, heads, dim_k), dtype, device)
                kernels["dv_local"](*p["inputs"], p["cu"], st["table"], do_flat, dvl, qe)
                extra = [st["w"], dvl, qe, st["ke"]]
                du = [new_output((nt, heads, dim_v), dtype, device)]  # the delta rule's gradient of v_new
            kernels["bwd_dh"](*p["inputs"], p["cu"], st["offsets"], do_flat, *extra, *st["gc"], dht, dh, dh0, *du)
            if "bwd_delta" in kernels:
                self._run_delta_backward(p, kernels, st, dh, do_flat, du[0], dq, dk, dv, small)
            else:
                kernels["bwd_chunk"](*p["inputs"], p["cu"], st["table"], st["hs"], dh, do_flat, dq, dk, dv,
                                     *small.values())
        else:
            dh0.copy_(dht)
        real_k, real_v = p["real_k"], p["real_v"]
        shape = lambda t: t.view(p["batch"], p["length"], *t.shape[1:])  # noqa: E731
        like = lambda t, ref: shape(t).to(ref.dtype) if ref is not None else None  # noqa: E731
        if "dg" in small and self.recurrence.decay is Decay.VECTOR:
            small["dg"] = _unpad(small["dg"], real_k)
        return (shape(_unpad(dq, real_k)), shape(_unpad(dk, real_k)), shape(_unpad(dv, real_v)),
                like(small["dg"], g) if "dg" in small else None,
                like(small["dbeta"], beta) if "dbeta" in small else None,
                like(small["dgq"], gq) if "dgq" in small else None,
                like(small["dgk"], gk) if "dgk" in small else None,
                _unpad_state(dh0, p).to(initial_state.dtype) if initial_state is not None else None)


# An input whose feature map is 0, for the padded channels of q and k: 0 where phi(0) = 0, -inf for elu + 1 and
# sigmoid (phi(0) = 1 and 1/2; both reach 0 at -inf, and so do their derivatives).
VANISHING_INPUT = {FeatureMap.IDENTITY: 0.0, FeatureMap.RELU: 0.0, FeatureMap.SILU: 0.0,
                   FeatureMap.ELU_PLUS_ONE: float("-inf"), FeatureMap.SIGMOID: float("-inf")}


def _pad(t: torch.Tensor, size: int, value: float, dim: int = -1) -> torch.Tensor:
    """t (contiguous) with axis `dim` padded with `value` up to `size` (t itself when it has that size)."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t.contiguous()
    fill = t.new_full((*t.shape[:dim % t.dim()], missing, *t.shape[dim % t.dim() + 1:]), value)
    return torch.cat([t, fill], dim=dim).contiguous()


def _unpad(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else t[..., :size].contiguous()


def _unpad_state(t: torch.Tensor, p: dict) -> torch.Tensor:
    """A [N, H, K, V] state of the padded kernels cut to the real head dims."""
    if t.shape[-2:] == (p["real_k"], p["real_v"]):
        return t
    return t[..., :p["real_k"], :p["real_v"]].contiguous()


def build(spec: Spec) -> TileLangKernels:
    return TileLangKernels(spec)
