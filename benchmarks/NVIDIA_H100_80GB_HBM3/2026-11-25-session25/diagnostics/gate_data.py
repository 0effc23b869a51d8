"""Diagnostic: does sla_gla's TileLang backward time depend on the gate values or the config?"""
import functools, sys
import torch, triton
from sla_dsl.autotune.shapes import parse_shape
from sla_dsl.autotune.table import lookup
from sla_dsl.backends import build_backend
from sla_dsl.codegen import SEED_SPECS_DIR
from sla_dsl.loader import load_spec
from sla_dsl.workloads import realistic_inputs

shape = parse_shape("4x8192x16x128")
for name in ("gla", "sla_gla"):
    spec = load_spec(SEED_SPECS_DIR / f"{name}.yaml")
    kernels = build_backend("tilelang", spec)
    inputs = realistic_inputs(spec.recurrence, 4, 8192, 16, 128, 128, dtype=torch.bfloat16)
    do = torch.randn_like(inputs["v"])
    base = lookup(spec, "tilelang", shape, phase="bwd", gpu="NVIDIA_H100_80GB_HBM3") or kernels.default_config(shape, "bwd")
    gate_sets = {"realistic": (inputs.get("gq"), inputs.get("gk"))}
    if name == "sla_gla":
        ones = torch.ones_like(inputs["gq"])
        gate_sets["ones"] = (ones, ones)
        gate_sets["1/16"] = (ones / 16, ones / 16)
    for bv, st in ((32, 0), (64, 1), (64, 0), (32, 1)):
        cfg = {**base, "bwd_chunk_block_v": bv, "bwd_chunk_num_stages": st}
        for label, (gq, gk) in gate_sets.items():
            args = [inputs["q"], inputs["k"], inputs["v"], inputs["g"], None, gq, gk]
            bwd = functools.partial(kernels.backward, *args, None, None, 128 ** -0.5, do, None, config=cfg)
            bwd(); torch.cuda.synchronize()
            ms = triton.testing.do_bench(bwd, warmup=50, rep=300)
            print(f"{name:8s} block_v {bv} stages {st} gates {label:9s}: bwd {ms:.3f} ms", flush=True)
