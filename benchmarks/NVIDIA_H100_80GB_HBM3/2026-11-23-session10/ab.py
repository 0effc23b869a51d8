"""A/B on the GPU: the TileLang kernels of HEAD (.carry/old) against the working tree's, each at HEAD's tuned
config (the working tree's sequential stages at num_stages 1). Usage: python .carry/ab.py SPEC..."""
import functools, importlib.util, json, sys
import torch, triton
from sla_dsl.backends.tilelang import TileLangKernels, tuning
from sla_dsl.loader import load_spec
from sla_dsl.workloads import realistic_inputs

import os, time
B, T, H, K, V = 4, 8192, 16, 128, 128
wait_for = sys.argv[1]  # a file that says the GPU is free for timing (compiling starts at once)
runs = []
for name in sys.argv[2:]:
    spec = load_spec(f"specs/{name}.yaml")
    entry = json.load(open(f".carry/old/tables/{name}.json"))["entries"][f"B{B}_T{T}_H{H}_K{K}_V{V}_bfloat16"]
    inputs = realistic_inputs(spec.recurrence, B, T, H, K, V)
    args = [inputs.get(key) for key in ("q", "k", "v", "g", "beta", "gq", "gk")]
    do = torch.randn_like(inputs["v"])
    for version in ("old", "new", "new0"):
        kernels = TileLangKernels(spec)
        fwd, bwd = dict(entry["fwd"]["config"]), dict(entry["bwd"]["config"])
        if version == "old":
            s = importlib.util.spec_from_file_location(f"old_{name}", f".carry/old/{name}.py")
            kernels.module = importlib.util.module_from_spec(s)
            s.loader.exec_module(kernels.module)
        else:
            for cfg in (fwd, bwd):
                for key in cfg:
                    if key.endswith("_num_stages") and tuning.stage_kernel(key[:-len("_num_stages")]) in tuning.SEQUENTIAL_KERNELS:
                        cfg[key] = 0 if version == "new0" else 1
        # bound now: a closure would see the last loop iteration's kernels and configs
        f = functools.partial(kernels.forward, *args, None, None, K ** -0.5, False, config=fwd)
        b = functools.partial(kernels.backward, *args, None, None, K ** -0.5, do, None, config=bwd)
        f(); b(); torch.cuda.synchronize()
        print(f"compiled {name} {version}", flush=True)
        runs.append((name, version, f, b))
while not os.path.exists(wait_for):
    time.sleep(1)
for name, version, f, b in runs:
    tf = triton.testing.do_bench(f, warmup=50, rep=300)
    tb = triton.testing.do_bench(b, warmup=50, rep=300)
    print(f"{name} {version}: fwd {tf:.3f} ms  bwd {tb:.3f} ms  fwd+bwd {tf + tb:.3f} ms", flush=True)
