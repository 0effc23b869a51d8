"""Scratch: A/B of hand-edited variants of a generated TileLang module, one process, per-kernel times.

python .carry/stage_ab.py SPEC SHAPE PHASE(fwd|fwdbwd) CONFIG_JSON|tuned VARIANT.py [VARIANT.py ...]
"""
import importlib.util
import json
import os
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from sla_dsl.autotune.shapes import parse_shapes
from sla_dsl.autotune.runner import resolve_specs
from sla_dsl.backends.tilelang import TileLangKernels
from sla_dsl.workloads import realistic_inputs

spec_name, shape_text, phase, cfg_text, *variants = sys.argv[1:]
spec = resolve_specs([spec_name])[0]
DEV = os.environ.get("DEV", "cuda")
DT = getattr(torch, os.environ.get("DT", "bfloat16"))
shape = parse_shapes(shape_text, "bfloat16")[0]
if cfg_text == "tuned":
    table = json.load(open(f"autotune/NVIDIA_H100_80GB_HBM3/tilelang/{spec_name}.json"))
    entry = table["entries"][f"B{shape.B}_T{shape.T}_H{shape.H}_K{shape.K}_V{shape.V}_bfloat16"]
    cfgs = {p: dict(entry[p]["config"]) for p in ("fwd", "bwd")}
else:
    cfgs = {p: json.loads(cfg_text) for p in ("fwd", "bwd")}
overrides = [a for a in variants if "=" in a]
variants = [a for a in variants if "=" not in a]
for o in overrides:
    k, v = o.split("=")
    for p in cfgs:
        cfgs[p][k] = int(v)
cfg = cfgs
print("config", cfg, flush=True)


def load(path, i):
    s = importlib.util.spec_from_file_location(f"variant{i}", path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    return m


inputs = realistic_inputs(spec.recurrence, shape.B, shape.T, shape.H, shape.K, shape.V, dtype=DT,
                          device=DEV, requires_grad=(phase == "fwdbwd"))
grad = torch.randn(shape.B, shape.T, shape.H, shape.V, device=DEV, dtype=DT)
runs = []
for i, path in enumerate(variants):
    kernels = TileLangKernels(spec)
    kernels.module = load(path, i)
    runs.append((path, kernels))


def forward_of(kernels):
    args = dict(inputs)

    def fwd():
        o, ht = kernels.forward(args["q"], args["k"], args["v"], args.get("g"), args.get("beta"), args.get("gq"),
                                args.get("gk"), None, None, shape.K ** -0.5, True, config=cfgs["fwd"])
        return o, ht

    def fwdbwd():
        fwd()
        return bwd()

    def bwd():
        return kernels.backward(args["q"], args["k"], args["v"], args.get("g"), args.get("beta"), args.get("gq"),
                                args.get("gk"), None, None, shape.K ** -0.5, grad, None, config=cfgs["bwd"])

    return {"fwd": fwd, "fwdbwd": fwdbwd, "bwd": bwd}[phase]


outs = []
good = []
for path, kernels in runs:
    f = forward_of(kernels)
    try:
        with torch.no_grad():
            out = f()
    except Exception as exc:  # noqa
        print(f"{path}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        continue
    good.append((path, kernels))
    outs.append([t for t in out if t is not None])
    ref = outs[0]
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(outs[-1], ref)]
    nan = any(torch.isnan(a).any().item() for a in outs[-1])
    print(f"{path}: rel diff vs first {['%.2e' % e for e in errs]} nan={nan}", flush=True)

if DEV == 'cpu':
    sys.exit(0)
runs = good
times = {p: [] for p, _ in runs}
for rnd in range(3):
    for path, kernels in runs:
        f = forward_of(kernels)
        with torch.no_grad():
            times[path].append(triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median"))
for path, _ in runs:
    print(f"{path}: {phase} ms rounds {['%.3f' % t for t in times[path]]} min {min(times[path]):.3f}", flush=True)

for path, kernels in runs:
    f = forward_of(kernels)
    with torch.no_grad():
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                f()
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    print(f"{path}: per call")
    for e in events[:8]:
        if e.device_time_total > 0:
            print(f"   {e.device_time_total / 10 / 1e3:8.3f} ms {e.count // 10:3d}x {e.key[:60]}")
