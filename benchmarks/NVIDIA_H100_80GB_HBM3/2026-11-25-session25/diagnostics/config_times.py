"""Diagnostic: the working tree's TileLang backward (bwd_chunk per kernel) at several bwd_chunk configs, over the
tuned table entry even where its hash is stale."""
import functools, json, sys
from pathlib import Path
import torch, triton
from sla_dsl.autotune.shapes import parse_shape
from sla_dsl.autotune.table import read_table
from sla_dsl.backends import build_backend
from sla_dsl.codegen import SEED_SPECS_DIR
from sla_dsl.kernel_profile import format_rows, kernel_times
from sla_dsl.loader import load_spec
from sla_dsl.workloads import realistic_inputs

shape = parse_shape("4x8192x16x128")
for name in sys.argv[1].split(","):
    spec = load_spec(SEED_SPECS_DIR / f"{name}.yaml")
    kernels = build_backend("tilelang", spec)
    inputs = realistic_inputs(spec.recurrence, 4, 8192, 16, 128, 128, dtype=torch.bfloat16)
    do = torch.randn_like(inputs["v"])
    entry = read_table(Path(f"autotune/NVIDIA_H100_80GB_HBM3/tilelang/{name}.json"))["entries"]["B4_T8192_H16_K128_V128_bfloat16"]
    args = [inputs.get(key) for key in ("q", "k", "v", "g", "beta", "gq", "gk")]
    for text in sys.argv[2:]:
        cfg = {**entry["bwd"]["config"], **json.loads(text)}
        bwd = functools.partial(kernels.backward, *args, None, None, 128 ** -0.5, do, None, config=cfg)
        bwd(); torch.cuda.synchronize()
        ms = triton.testing.do_bench(bwd, warmup=50, rep=300)
        print(f"{name:8s} {text:60s}: bwd {ms:.3f} ms\n{format_rows(kernel_times(bwd), 1)}", flush=True)
