"""The TileLang backend: runs the generated chunkwise kernels of `generated/tilelang/<spec>.py`.

Host side only: packs batches into one token axis described by cu_seqlens, builds the chunk tables for
varlen, allocates outputs, compiles kernels (TileLang's disk cache, placed under our cache directory; its
key is the kernel's full TIR, so a changed template or spec never reuses a stale binary) and launches:

    forward:  fwd                                  (one fused kernel)
    backward: fwd(store_states) -> bwd_dh -> bwd_chunk

Tuning parameters (per kernel, see `TileLangKernels.config`): chunk, block_v, threads, num_stages.
They can be overridden with `kernels.config.update(...)` or the environment variable
SLA_DSL_TILELANG_CONFIG='{"fwd": {"block_v": 32}, "bwd_chunk": {"num_stages": 0}}'.
"""

from __future__ import annotations

import json
import os

import torch

from sla_dsl.alloc import new_output
from sla_dsl.codegen import cache_dir, generated_module
from sla_dsl.spec import Decay, Spec

os.environ.setdefault("TILELANG_CACHE_DIR", str(cache_dir() / "tilelang"))

KERNELS = ("fwd", "bwd_dh", "bwd_chunk")
EXECUTION_BACKEND = "tvm_ffi"  # compiles device code with nvcc and needs no libcuda at build time
SM90_TARGET = {"kind": "cuda", "arch": "sm_90a"}
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def default_config(name: str, dim_k: int, dim_v: int) -> dict:
    """Tuning parameters of one kernel for head dimensions K, V (multiples of 16)."""
    block_v = next(b for b in (64, 32, 16) if dim_v % b == 0)
    chunk = 64 if dim_k <= 128 else 32
    if name == "bwd_chunk":
        chunk = 32 if dim_k > 64 else 64
    # num_stages=0: the chunk loop is not software-pipelined until the pipelined variants are checked on
    # the GPU (sweep num_stages in {0, 1, 2}).
    return {"chunk": chunk, "block_v": block_v, "threads": 128, "num_stages": 0}


def compile_kernel(module, name: str, heads: int, dim_k: int, dim_v: int, dtype: str, config: dict, target=None,
                   **extra):
    import tilelang

    func = getattr(module, name)(heads, dim_k, dim_v, dtype, **config, **extra)
    return tilelang.compile(func, target=target or "auto", pass_configs=dict(module.PASS_CONFIGS),
                            execution_backend=EXECUTION_BACKEND)


class TileLangKernels:
    def __init__(self, spec: Spec):
        from sla_dsl.backends.tilelang.generator import filename

        self.spec = spec
        self.recurrence = spec.recurrence
        self.module = generated_module(spec, "tilelang", filename(spec))
        self.config: dict[str, dict] = {}
        override = os.environ.get("SLA_DSL_TILELANG_CONFIG")
        self._override = json.loads(override) if override else {}
        self._compiled = {}

    # ---- compilation ----

    def kernel_config(self, name: str, dim_k: int, dim_v: int) -> dict:
        config = default_config(name, dim_k, dim_v)
        if name == "bwd_dh":  # must walk the same chunks as the states that fwd stored for bwd_chunk
            config["chunk"] = self.kernel_config("bwd_chunk", dim_k, dim_v)["chunk"]
        config.update(self._override.get(name, {}))
        config.update(self.config.get(name, {}))
        return config

    def kernel(self, name: str, heads: int, dim_k: int, dim_v: int, dtype: torch.dtype, chunk=None, **extra):
        config = self.kernel_config(name, dim_k, dim_v)
        if chunk is not None:
            config["chunk"] = chunk
        key = (name, heads, dim_k, dim_v, dtype, tuple(sorted(config.items())), tuple(sorted(extra.items())))
        if key not in self._compiled:
            self._compiled[key] = compile_kernel(self.module, name, heads, dim_k, dim_v, _DTYPES[dtype], config,
                                                 **extra)
        return self._compiled[key], config

    # ---- host-side packing ----

    def _pack(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale):
        batch, length, heads, dim_k = q.shape
        dim_v = v.shape[-1]
        if dim_k % 16 or dim_v % 16:
            raise ValueError(f"tilelang backend: K and V must be multiples of 16, got K={dim_k}, V={dim_v}")
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
                extras[name] = torch.tensor(self.recurrence.log_gammas(heads), dtype=torch.float32, device=device)
            elif name == "scale":
                extras[name] = torch.tensor([scale], dtype=torch.float32, device=device)
        num_seq = cu.numel() - 1
        h0 = (initial_state.float().contiguous() if initial_state is not None
              else torch.zeros(num_seq, heads, dim_k, dim_v, dtype=torch.float32, device=device))
        return dict(batch=batch, length=length, heads=heads, dim_k=dim_k, dim_v=dim_v, nt=nt, cu=cu,
                    num_seq=num_seq, q=flat(q), k=flat(k), v=flat(v), extras=[extras[n] for n in self.module.INPUTS[3:]],
                    h0=h0)

    @staticmethod
    def _chunks(cu: torch.Tensor, chunk: int):
        lengths = (cu[1:] - cu[:-1]).long()
        per_seq = (lengths + chunk - 1) // chunk
        offsets = torch.cumsum(per_seq, 0) - per_seq
        total = int(per_seq.sum().item())
        seq = torch.repeat_interleave(torch.arange(per_seq.numel(), device=cu.device), per_seq)
        within = torch.arange(total, device=cu.device) - offsets[seq]
        table = torch.stack([seq, within], 1).to(torch.int32).contiguous()
        return offsets.to(torch.int32).contiguous(), table, total

    def _run_fwd(self, p, dtype, store_states, out_dtype, chunk=None):
        kern, config = self.kernel("fwd", p["heads"], p["dim_k"], p["dim_v"], dtype, chunk=chunk,
                                   store_states=store_states)
        offsets, table, total = self._chunks(p["cu"], config["chunk"])
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

    def forward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, output_final_state):
        if q.dtype == torch.float64:  # no float64 tensor cores: the float64 path is the reference
            from sla_dsl.backends.reference import ReferenceKernels
            return ReferenceKernels(self.spec).forward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                                       output_final_state)
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        o, ht, _, _, _, _ = self._run_fwd(p, q.dtype, False, v.dtype)
        o = o.view(p["batch"], p["length"], p["heads"], p["dim_v"])
        return o, (ht if output_final_state else None)

    def backward(self, q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale, do, dfinal_state):
        if q.dtype == torch.float64:
            from sla_dsl.backends.reference import ReferenceKernels
            return ReferenceKernels(self.spec).backward(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale,
                                                        do, dfinal_state)
        dtype = q.dtype
        p = self._pack(q, k, v, g, beta, gq, gk, initial_state, cu_seqlens, scale)
        heads, dim_k, dim_v, nt, num_seq = p["heads"], p["dim_k"], p["dim_v"], p["nt"], p["num_seq"]
        device = q.device
        # the stored states follow bwd_chunk's chunking
        chunk = self.kernel_config("bwd_chunk", dim_k, dim_v)["chunk"]
        _, _, hs, offsets, table, total = self._run_fwd(p, dtype, True, dtype, chunk=chunk)
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
            kern_dh, _ = self.kernel("bwd_dh", heads, dim_k, dim_v, dtype)
            kern_dh(p["q"], p["k"], p["v"], *p["extras"], p["cu"], offsets, do_flat, dht, dh, dh0)
            kern_chunk, _ = self.kernel("bwd_chunk", heads, dim_k, dim_v, dtype)
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
