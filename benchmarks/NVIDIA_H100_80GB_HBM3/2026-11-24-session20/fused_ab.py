"""Scratch: the fused forward (states_output) against the split one (states + output), same process."""
import itertools
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

SPECS = sys.argv[1].split(",")
SHAPES = sys.argv[2].split(",")
CONFIGS = [dict(chunk=c, block_v=bv, threads=t, num_stages=s)
           for c, bv, t, s in json.loads(os.environ.get("FUSED_CONFIGS", "[[64,32,128,1],[64,64,128,1],[64,32,256,1],[64,64,256,1],[64,128,256,1],[32,32,128,1],[64,32,128,0]]"))]


def parse(s):
    b, t, h, k = map(int, s.split("x"))
    return b, t, h, k


def old_module(spec_name):
    """$OLD_DIR/<spec>_fused_v1.py: an earlier generated module whose states_output is timed alongside."""
    import importlib.util
    path = os.path.join(os.environ["OLD_DIR"], f"{spec_name}_fused_v1.py")
    spec = importlib.util.spec_from_file_location(f"old_{spec_name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def precompile(args):
    spec_name, h, k, params, old = args
    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.backends.tilelang import TileLangKernels, compile_kernel
    spec = resolve_specs([spec_name])[0]
    kern = TileLangKernels(spec)
    try:
        compile_kernel(old_module(spec_name) if old else kern.module, "states_output", h, k, k, "bfloat16", params)
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:200]}"


if __name__ == "__main__":
    olds = (False, True) if os.environ.get("OLD_DIR") else (False,)
    jobs = [(s, parse(sh)[2], parse(sh)[3], p, old) for s in SPECS for sh in SHAPES for p in CONFIGS for old in olds]
    with ProcessPoolExecutor(14) as pool:
        errors = dict(zip([(j[0], j[2], tuple(j[3].values()), j[4]) for j in jobs], pool.map(precompile, jobs)))
    import triton.testing
    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.backends.tilelang import TileLangKernels, compile_kernel
    from sla_dsl.workloads import realistic_inputs
    for spec_name in SPECS:
        spec = resolve_specs([spec_name])[0]
        kern = TileLangKernels(spec)
        table = json.load(open(f"autotune/NVIDIA_H100_80GB_HBM3/tilelang/{spec_name}.json"))
        for sh in SHAPES:
            B, T, H, K = parse(sh)
            cfg = table["entries"][f"B{B}_T{T}_H{H}_K{K}_V{K}_bfloat16"]["fwd"]["config"]
            cfg = {**cfg, "fwd_schedule": "split"} if "fwd_schedule" in cfg else cfg
            a = realistic_inputs(spec.recurrence, B, T, H, K, K, dtype=torch.bfloat16, device="cuda")
            args = (a["q"], a["k"], a["v"], a.get("g"), a.get("beta"), a.get("gq"), a.get("gk"))

            def split():
                return kern.forward(*args, None, None, K ** -0.5, True, config=cfg)
            with torch.no_grad():
                o_ref, ht_ref = split()
                t_split = min(triton.testing.do_bench(split, warmup=50, rep=300, return_mode="median") for _ in range(2))
            print(f"{spec_name} {sh} split tuned {cfg}: {t_split:.3f} ms", flush=True)
            p = kern._pack(*args, None, None, K ** -0.5)
            for params, old in itertools.product(CONFIGS, olds):
                label = "old fused" if old else "fused"
                err = errors[(spec_name, K, tuple(params.values()), old)]
                if err:
                    print(f"  {label} {params}: compile failed {err}", flush=True)
                    continue
                try:
                    fk = compile_kernel(old_module(spec_name) if old else kern.module, "states_output", H, K, K,
                                        "bfloat16", params)
                    o = torch.full((p["nt"], H, K), float("nan"), dtype=torch.bfloat16, device="cuda")
                    ht = torch.full((B, H, K, K), float("nan"), dtype=torch.float32, device="cuda")

                    def fused():
                        fk(*p["inputs"], p["cu"], p["h0"], o, ht)
                    fused()
                    torch.cuda.synchronize()
                    eo = ((o.float().reshape(o_ref.shape) - o_ref.float()).norm() / o_ref.float().norm()).item()
                    eh = ((ht - ht_ref.float()).norm() / ht_ref.float().norm()).item()
                    t = min(triton.testing.do_bench(fused, warmup=50, rep=300, return_mode="median") for _ in range(2))
                    print(f"  {label} {params}: {t:.3f} ms ({t / t_split:.2f}x split) err o {eo:.1e} ht {eh:.1e}", flush=True)
                except Exception as exc:  # noqa: BLE001
                    print(f"  {label} {params}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
