"""The TileLang backend: runs the generated chunkwise kernels of `generated/tilelang/<spec>.py`.

Host side only: packs batches into one token axis described by cu_seqlens, builds the chunk tables for
varlen, allocates outputs, compiles kernels (TileLang's disk cache, placed under our cache directory; its
key is the kernel's full TIR, so a changed template or spec never reuses a stale binary) and launches:

    forward:  fwd                                  (one fused kernel)
    backward: fwd(store_states) -> bwd_dh -> bwd_chunk

Configs are flat dicts per phase (`tuning`: chunk, and block_v, threads, num_stages per stage) and follow the
tuning protocol of `sla_dsl.autotune`: a call without `config` runs the tuned table's config for the running
GPU, else the default. Settings can be fixed for every call with `TileLangKernels(spec, config={...})` or
the environment variable SLA_DSL_TILELANG_CONFIG='{"fwd_block_v": 32, "bwd_chunk_num_stages": 1}'.
"""

from __future__ import annotations

import json
import os

import torch

from sla_dsl.alloc import new_output
from sla_dsl.autotune import Shape, resolve_config
from sla_dsl.autotune.protocol import override_config
from sla_dsl.backends.tilelang import tuning
from sla_dsl.codegen import cache_dir, generated_module
from sla_dsl.launch_tables import chunk_table, log_gammas, scalar
from sla_dsl.spec import Decay, Spec

os.environ.setdefault("TILELANG_CACHE_DIR", str(cache_dir() / "tilelang"))

EXECUTION_BACKEND = "tvm_ffi"  # compiles device code with nvcc and needs no libcuda at build time
SM90_TARGET = {"kind": "cuda", "arch": "sm_90a"}
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def compile_kernel(module, name: str, heads: int, dim_k: int, dim_v: int, dtype: str, params: dict, target=None,
                   **extra):
    """Compiles kernel factory `name` of a generated module with `params` (tuning.kernel_params)."""
    import tilelang

    func = getattr(module, name)(heads, dim_k, dim_v, dtype, **params, **extra)
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
        return tuning.tuning_space(shape, phase)

    def default_config(self, shape: Shape, phase: str = "fwd") -> dict:
        return tuning.default_config(self.module, shape, phase)

    def _config(self, q, v, cu_seqlens, phase: str, config: dict | None) -> dict:
        shape = Shape.of(q, v, cu_seqlens)
        override = override_config(self, self.spec, "tilelang", shape, phase,
                                   config if config is not None else self.config)
        return resolve_config(self, self.spec, "tilelang", shape, phase, override)

    # ---- compilation ----

    def kernel(self, stage: str, config: dict, heads: int, dim_k: int, dim_v: int, dtype: torch.dtype, **extra):
        """The compiled kernel of `stage` (a key of tuning.STAGE_KERNELS) with its settings in `config`."""
        name, params = tuning.STAGE_KERNELS[stage], tuning.kernel_params(config, stage)
        key = (name, heads, dim_k, dim_v, dtype, tuple(sorted(params.items())), tuple(sorted(extra.items())))
        if key not in self._compiled:
            tuning.check_fits(self.module, stage, config, Shape(1, 1, heads, dim_k, dim_v, dtype))
            self._compiled[key] = compile_kernel(self.module, name, heads, dim_k, dim_v, _DTYPES[dtype], params,
                                                 **extra)
        return self._compiled[key]

    # ---- host-side packing ----

    def _pack(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale):
        batch, length, heads, dim_k = q.shape
        dim_v = v.shape[-1]
        device = q.device
        if cu_seqlens is None:
            cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * length
        else:
            cu = cu_seqlens.to(torch.int32)
        nt = batch * length
        flat = lambda t: t.reshape(nt, *t.shape[2:]).contiguous()  # noqa: E731
        extras = {}
        for name in self.module.INPUTS[3:]:
            if name == "g":
                extras[name] = flat(g).float()
            elif name in ("beta", "gq", "gk"):
                extras[name] = flat({"beta": beta, "gq": gq, "gk": gk}[name]).float()
            elif name == "log_gamma":
                extras[name] = log_gammas(self.recurrence, heads, device)
            elif name == "scale":
                extras[name] = scalar(scale, device)
        num_seq = cu.numel() - 1
        h0 = (initial_state.float().contiguous() if initial_state is not None
              else torch.zeros(num_seq, heads, dim_k, dim_v, dtype=torch.float32, device=device))
        return dict(batch=batch, length=length, heads=heads, dim_k=dim_k, dim_v=dim_v, nt=nt, cu=cu,
                    cu_seqlens=cu_seqlens, num_seq=num_seq, q=flat(q), k=flat(k), v=flat(v),
                    extras=[extras[n] for n in self.module.INPUTS[3:]], h0=h0)

    @staticmethod
    def _chunks(p, chunk: int):
        """Each sequence's first chunk (int32), the (sequence, chunk) table of the chunk-parallel kernels, and
        the number of chunks: see sla_dsl.launch_tables (no host sync for equal lengths)."""
        table = chunk_table(p["batch"], p["length"], p["cu_seqlens"], chunk, p["q"].device)
        return table.chunk_offsets[:-1].to(torch.int32), table.chunk_indices, table.num_chunks

    def _run_fwd(self, p, kern, chunk: int, store_states: bool, out_dtype):
        offsets, table, total = self._chunks(p, chunk)
        heads, dim_k, dim_v = p["heads"], p["dim_k"], p["dim_v"]
        device = p["q"].device
        o = new_output((p["nt"], heads, dim_v), out_dtype, device)
        ht = new_output((p["num_seq"], heads, dim_k, dim_v), torch.float32, device)
        hs = (torch.empty((max(total, 1), heads, dim_k, dim_v), dtype=torch.float32, device=device) if store_states
              else torch.empty((1, heads, dim_k, dim_v), dtype=torch.float32, device=device))
        if p["nt"] > 0:
            kern(p["q"], p["k"], p["v"], *p["extras"], p["cu"], offsets, p["h0"], o, ht, hs)
        else:
            ht.copy_(p["h0"])
        return o, ht, hs, offsets, table, total

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
        heads, dim_k, dim_v = q.shape[2], q.shape[3], v.shape[3]
        kern = self.kernel("fwd", cfg, heads, dim_k, dim_v, q.dtype, store_states=False)
        if compile_only:
            return None
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        o, ht, _, _, _, _ = self._run_fwd(p, kern, cfg["chunk"], False, v.dtype)
        o = o.view(p["batch"], p["length"], p["heads"], p["dim_v"])
        return o, (ht if output_final_state else None)

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
        heads, dim_k, dim_v = q.shape[2], q.shape[3], v.shape[3]
        kern_states = self.kernel("bwd_states", cfg, heads, dim_k, dim_v, dtype, store_states=True)
        kern_dh = self.kernel("bwd_dh", cfg, heads, dim_k, dim_v, dtype)
        kern_chunk = self.kernel("bwd_chunk", cfg, heads, dim_k, dim_v, dtype)
        if compile_only:
            return None
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        nt, num_seq = p["nt"], p["num_seq"]
        device = q.device
        _, _, hs, offsets, table, total = self._run_fwd(p, kern_states, cfg["chunk"], True, dtype)
        do_flat = do.reshape(nt, heads, dim_v).to(dtype).contiguous()
        dht = (dfinal_state.float().contiguous() if dfinal_state is not None
               else torch.zeros(num_seq, heads, dim_k, dim_v, dtype=torch.float32, device=device))
        dh = torch.empty((max(total, 1), heads, dim_k, dim_v), dtype=torch.float32, device=device)
        dh0 = new_output((num_seq, heads, dim_k, dim_v), torch.float32, device)
        dq = new_output((nt, heads, dim_k), dtype, device)
        dk = new_output((nt, heads, dim_k), dtype, device)
        dv = new_output((nt, heads, dim_v), dtype, device)
        small = {}
        for name in self.module.GRAD_OUTPUTS:
            shape = (nt, heads, dim_k) if name == "dg" and self.recurrence.decay is Decay.VECTOR else (nt, heads)
            small[name] = new_output(shape, torch.float32, device)
        if nt > 0:
            kern_dh(p["q"], p["k"], p["v"], *p["extras"], p["cu"], offsets, do_flat, dht, dh, dh0)
            kern_chunk(p["q"], p["k"], p["v"], *p["extras"], p["cu"], table, hs, dh, do_flat, dq, dk, dv,
                       *small.values())
        else:
            dh0.copy_(dht)
        shape = lambda t: t.view(p["batch"], p["length"], *t.shape[1:])  # noqa: E731
        like = lambda t, ref: shape(t).to(ref.dtype) if ref is not None else None  # noqa: E731
        return (shape(dq), shape(dk), shape(dv), like(small["dg"], g) if "dg" in small else None,
                like(small["dbeta"], beta) if "dbeta" in small else None,
                like(small["dgq"], gq) if "dgq" in small else None,
                like(small["dgk"], gk) if "dgk" in small else None,
                dh0.to(initial_state.dtype) if initial_state is not None else None)


def build(spec: Spec) -> TileLangKernels:
    return TileLangKernels(spec)
