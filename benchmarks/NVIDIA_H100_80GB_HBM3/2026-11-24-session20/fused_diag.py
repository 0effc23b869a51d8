"""Scratch: where the fused forward's output differs from the split one's (per row of the chunk, column, chunk)."""
import json
import os
import sys

import torch

from sla_dsl.autotune.runner import resolve_specs
from sla_dsl.backends.tilelang import TileLangKernels, compile_kernel
from sla_dsl.workloads import realistic_inputs

spec_name = sys.argv[1]
B, T, H, K = map(int, sys.argv[2].split("x"))
configs = json.loads(sys.argv[3])
spec = resolve_specs([spec_name])[0]
kern = TileLangKernels(spec)
a = realistic_inputs(spec.recurrence, B, T, H, K, K, dtype=torch.bfloat16, device="cuda")
args = (a["q"], a["k"], a["v"], a.get("g"), a.get("beta"), a.get("gq"), a.get("gk"))
cfg = dict(kern.default_config(__import__("sla_dsl.autotune", fromlist=["Shape"]).Shape(B, T, H, K, K, "bfloat16"), "fwd"))
cfg["fwd_schedule"] = "split"
with torch.no_grad():
    o_ref, ht_ref = kern.forward(*args, None, None, K ** -0.5, True, config=cfg)
p = kern._pack(*args, None, None, K ** -0.5)
ref = o_ref.float().reshape(B * T, H, K)
for c, bv, th, st in configs:
    fk = compile_kernel(kern.module, "states_output", H, K, K, "bfloat16", dict(chunk=c, block_v=bv, threads=th, num_stages=st))
    for rep in range(2):
        o = torch.full((p["nt"], H, K), float("nan"), dtype=torch.bfloat16, device="cuda")
        ht = torch.full((B, H, K, K), float("nan"), dtype=torch.float32, device="cuda")
        fk(*p["inputs"], p["cu"], p["h0"], o, ht)
        torch.cuda.synchronize()
        d = (o.float() - ref).abs()
        rel = (d.norm() / ref.norm()).item()
        print(f"{spec_name} {sys.argv[2]} C{c} BV{bv} T{th} S{st} rep{rep}: rel {rel:.2e} nan {torch.isnan(o).any().item()}", flush=True)
        # by row within the chunk, by column within the V-block, by V-block, by chunk index, by head
        rows = d.reshape(B, T // c, c, H, K)
        print("  row in chunk:", [round(x, 3) for x in rows.mean(dim=(0, 1, 3, 4)).tolist()])
        print("  col in block:", [round(x, 3) for x in d.reshape(-1, K // bv, bv).mean(dim=(0, 1)).tolist()])
        print("  V-block:", [round(x, 4) for x in d.reshape(-1, K // bv, bv).mean(dim=(0, 2)).tolist()])
        print("  chunk idx (first 8, last 4):", [round(x, 4) for x in rows.mean(dim=(0, 2, 3, 4)).tolist()[:8]],
              [round(x, 4) for x in rows.mean(dim=(0, 2, 3, 4)).tolist()[-4:]])
        print("  ref mag by row:", [round(x, 3) for x in ref.abs().reshape(B, T // c, c, H, K).mean(dim=(0, 1, 3, 4)).tolist()[:8]])
