"""The tuning space of the TileLang kernel templates (`generator`: one kernel factory per chunkwise stage).

Each kernel factory takes a chunk size, a V-block (block_v: the grid's split of V in the sequential stages,
the inner loop's block in the chunk-parallel ones), its thread count and the software pipelining depth of its
main loop (num_stages; 0 leaves the loop unpipelined). A generated module lists the kernels of each phase in
the order they run (`PHASES`): fwd runs [wy|prep,] states, output; bwd runs [wy|bwd_prep,] states, [dv_local,]
bwd_dh, bwd_chunk[, bwd_delta] (wy, dv_local and bwd_delta: delta rule only; prep and bwd_prep: a vector decay
without it).
The stages of a phase exchange per-chunk tensors, so a phase has one chunk size. A forward without the delta
rule or a vector decay has a second schedule, fused: one sequential stage, states_output, that computes each
chunk's output with the state it carries (`generator.STATES_OUTPUT`); the key "fwd_schedule" ("split" or
"fused") picks one, and the settings of the other's stages are in the config but ignored (Space.inactive).

Config keys: "chunk", and "<stage>_block_v", "<stage>_threads", "<stage>_num_stages" for each stage, where a
stage is the kernel's name in phase fwd and "bwd_" + its name in phase bwd (BACKWARD_KERNELS keep theirs),
so that one flat override can name settings of both phases; bwd_chunk's and bwd_delta's also
"<stage>_min_blocks" (MIN_BLOCKS). Constraints: the kernels' K and V are the head dims rounded up to powers of
two from 16 (tensor-core tiles; `padded`); block_v divides that V. A setting with more threads than its gemm tiles can
split among is rejected before it compiles (`check_threads`), one whose compiled kernel needs more shared
memory than a CTA may have (or than min_blocks CTAs may share on an SM) before it launches
(`check_shared_memory`); one that needs more registers than the GPU has fails to compile or launch, and the
sweep skips it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re

import torch

from sla_dsl.autotune.protocol import ConfigRejected
from sla_dsl.autotune.space import Space
from sla_dsl.backends import (SM90_RESERVED_SHARED_PER_CTA, SM90_SHARED_MEMORY_BYTES, SM90_SHARED_MEMORY_PER_SM,
                              sequential_block)
from sla_dsl.backends.tilelang.tf32x3 import FP32_ONLY

TILE = 16  # the smallest K and V of the kernels: one tensor-core tile
CHUNK_SIZES = (16, 32, 64)
BLOCK_V = (16, 32, 64)
THREADS = (64, 128, 256)
NUM_STAGES = (0, 1, 2)
# The stages that walk a sequence's chunks in order. Their loads are T.copy's that num_stages 1 issues as
# cp.async once their buffers are free, so the next chunk's loads overlap this chunk's math; 0 waits for
# each load where it stands. num_stages 2 fails to lower (the wait count of a loop whose trip count is a
# sequence's length is not a constant), so the space offers 0 and 1 (default: sequential_num_stages).
SEQUENTIAL_KERNELS = ("states", "bwd_dh", "states_output")
SEQUENTIAL_NUM_STAGES = (0, 1)
# The stages with no loop over blocks of V: block_v and num_stages change nothing in them, so the space offers
# one of each (the largest block_v, as default_config picks).
UNBLOCKED_KERNELS = ("prep", "bwd_prep")
STAGE_PARAMS = ("block_v", "threads", "num_stages")
# The CTAs per SM a kernel's registers must allow (its factory's min_blocks: __launch_bounds__' second
# argument). Only bwd_chunk and bwd_delta (the delta rule's WY backward, split from it) take it: the offline
# report (`offline`, 2026-11-24) found bwd_chunk the one stage held to one CTA per SM, by registers (gdn: 236 per
# thread at 256 threads, where ptxas fits it in 128 with 20 bytes spilled), so each CTA's chain of dependent
# loads and small gemms ran with nothing to overlap it. 2 is offered only where the compiled kernel's shared
# memory fits twice on an SM (check_shared_memory).
MIN_BLOCKS = (1, 2)
OCCUPANCY_PARAM = "min_blocks"


# The forward's fused schedule: this kernel alone, where a generated module's forward lists it (last), in place of
# the kernels before it (the split schedule). The config key SCHEDULE picks one.
FUSED_FORWARD = "states_output"
SCHEDULE = "fwd_schedule"
# The default schedule is fused where its grid, at block_v FUSED_BLOCK_V, has at least FUSED_MIN_PROGRAMS CTAs:
# each CTA walks its sequence's chunks and recomputes the chunk's C x C products for its block of V, so it pays
# with wide blocks of V and enough sequences x heads to fill the GPU. On the H100 (retnet, sla_retnet; block_v
# 64, 256 threads) it took 0.91x and 0.86x the tuned split forward's time at 4x8192x16x128 (128 CTAs), 0.75x and
# 0.52x at 8x2048x16x64 (128), and 2.2x and 2.0x at 1x32768x16x128 (32) (benchmarks/NVIDIA_H100_80GB_HBM3/
# 2026-11-24-session20/fused-ab.log).
FUSED_BLOCK_V = 64
FUSED_THREADS = 256
FUSED_MIN_PROGRAMS = 64
# the kernels only the backward runs, whose names say so: their stage names are theirs
BACKWARD_KERNELS = ("bwd_prep", "bwd_dh", "bwd_chunk", "bwd_delta")


def stage_name(phase: str, kernel: str) -> str:
    return kernel if phase == "fwd" or kernel in BACKWARD_KERNELS else f"bwd_{kernel}"


def stage_kernel(stage: str) -> str:
    """The kernel factory a stage runs (the inverse of stage_name)."""
    return stage if stage in BACKWARD_KERNELS else stage.removeprefix("bwd_")


def schedules(module, phase: str) -> dict[str, tuple[str, ...]]:
    """The schedules of `phase` of a generated module and the stages each runs, in order, where there are two
    (the forward's split and fused); else {}."""
    kernels = module.PHASES[phase]
    if phase != "fwd" or FUSED_FORWARD not in kernels:
        return {}
    return {"split": tuple(k for k in kernels if k != FUSED_FORWARD), "fused": (FUSED_FORWARD,)}


def phase_stages(module, phase: str, config: dict | None = None) -> tuple[str, ...]:
    """The stages of `phase` of a generated module, in the order they run: those of `config`'s schedule, or
    without a config every stage of the phase (those of both schedules, each of which has its settings in a
    config)."""
    if phase not in module.PHASES:
        raise ValueError(f"phase: expected 'fwd' or 'bwd', got {phase!r}")
    kernels = module.PHASES[phase]
    if config is not None and schedules(module, phase):
        kernels = schedules(module, phase)[config[SCHEDULE]]
    return tuple(stage_name(phase, kernel) for kernel in kernels)


def takes_min_blocks(module, stage: str) -> bool:
    """Whether the stage's kernel factory has the occupancy parameter (MIN_BLOCKS)."""
    return OCCUPANCY_PARAM in inspect.signature(getattr(module, stage_kernel(stage))).parameters


def _search_order(module, phase: str, stages) -> tuple[str, ...]:
    # tried first by the sweep: the chunk, the schedule and the V-blocking change the work of every CTA most;
    # then the CTAs per SM (on the H100, gdn's backward 5.55 -> 5.10 ms at 4x8192, 2026-11-24-session16/
    # ab-mb2-gdn.log)
    occupancy = tuple(f"{stage}_{OCCUPANCY_PARAM}" for stage in stages if takes_min_blocks(module, stage))
    blocks, rest = STAGE_PARAMS[0], STAGE_PARAMS[1:]
    return ("chunk", *((SCHEDULE,) if schedules(module, phase) else ()), *(f"{stage}_{blocks}" for stage in stages),
            *occupancy, *(f"{stage}_{param}" for param in rest for stage in stages))


def _stage_keys(module, stage: str) -> list[str]:
    """The config keys of one stage's settings."""
    return [f"{stage}_{param}" for param in STAGE_PARAMS + ((OCCUPANCY_PARAM,) if takes_min_blocks(module, stage)
                                                            else ())]


def padded(dim: int) -> int:
    """A head dim rounded up to a power of two, at least the tensor-core tile (16): the kernels' K and V (the
    host pads the inputs). TileLang's layouts for multiples of 16 that are not powers of two fail to lower in
    places (gla's bwd_chunk at K = 48: a reduction over a fragment "depends on a thread-owned reduce
    segment"), as Triton's tiles need powers of two too."""
    return max(TILE, 1 << (dim - 1).bit_length())


def _padded_shape(shape):
    return dataclasses.replace(shape, K=padded(shape.K), V=padded(shape.V))


def tuning_space(module, shape, phase: str) -> Space:
    """Every valid config of `phase` of a generated module for `shape` (a sla_dsl.autotune.Shape)."""
    shape = _padded_shape(shape)
    names = phase_stages(module, phase)

    def settings(stage: str) -> list[dict]:
        kernel = stage_kernel(stage)
        depths = ((0,) if kernel in UNBLOCKED_KERNELS
                  else SEQUENTIAL_NUM_STAGES if kernel in SEQUENTIAL_KERNELS else NUM_STAGES)
        blocks = [bv for bv in BLOCK_V if shape.V % bv == 0]
        blocks = blocks[-1:] if kernel in UNBLOCKED_KERNELS else blocks
        occupancies = MIN_BLOCKS if takes_min_blocks(module, stage) else (None,)
        return [{f"{stage}_block_v": bv, f"{stage}_threads": t, f"{stage}_num_stages": d,
                 **({} if m is None else {f"{stage}_{OCCUPANCY_PARAM}": m})}
                for bv in blocks for t in THREADS for d in depths for m in occupancies]

    # more CTAs per SM may pay only with smaller tiles (block_v) or more threads per CTA: gdn's bwd_chunk at
    # min_blocks 2 fits an SM twice only at block_v 32, and its tuned block_v was 64
    linked = {f"{stage}_{OCCUPANCY_PARAM}": (f"{stage}_block_v", f"{stage}_threads")
              for stage in names if takes_min_blocks(module, stage)}
    by_schedule = schedules(module, phase)
    choice = [[{SCHEDULE: name} for name in by_schedule]] if by_schedule else []
    # the stages a schedule leaves out: their settings change nothing while it is chosen
    inactive = {SCHEDULE: {name: [key for stage in names if stage not in own for key in _stage_keys(module, stage)]
                           for name, own in by_schedule.items()}} if by_schedule else None
    return Space([{"chunk": c} for c in CHUNK_SIZES], *choice, *(settings(stage) for stage in names),
                 order=_search_order(module, phase, names), linked=linked, inactive=inactive)


_SHARED_ALLOC = re.compile(r'(\w+) = T\.alloc_shared\(\(([^)]*)\),\s*("float32"|dtype|state_dt)\)('
                           + re.escape(FP32_ONLY) + ')?')
# where the compiled CUDA places a shared buffer in the kernel's one dynamic allocation
_SHARED_OFFSET = re.compile(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\)")


@functools.cache
def _shared_buffers(module, kernel: str) -> tuple[tuple[str, tuple[str, ...], str, bool], ...]:
    """(name, dimension names, element type as written: '"float32"', 'dtype' or 'state_dt', exists only for
    float32 inputs) of every T.alloc_shared in the source of a generated kernel factory."""
    source = inspect.getsource(getattr(module, kernel))
    return tuple((name, tuple(d.strip() for d in dims.split(",") if d.strip()), kind, bool(fp32_only))
                 for name, dims, kind, fp32_only in _SHARED_ALLOC.findall(source))


def _sizes(module, stage: str, config: dict, shape) -> dict[str, int]:
    """The value of every dimension name a kernel's buffers are declared with."""
    params = kernel_params(config, stage)
    return {"C": params["chunk"], "BV": params["block_v"], "K": padded(shape.K), "V": padded(shape.V),
            "SB": getattr(module, "SUB_BLOCK", 0)}


def _buffer_bytes(module, stage: str, config: dict, shape) -> dict[str, int]:
    """Bytes of each shared buffer of the stage's kernel under `config` (float32 inputs add the scratch of
    their error-compensated gemms, `tf32x3`)."""
    sizes = _sizes(module, stage, config, shape)
    fp32_inputs = shape.dtype == "float32"
    out = {}
    element = {'"float32"': "float32", "dtype": shape.dtype, "state_dt": module.state_dtype(shape.dtype)}
    for name, dims, kind, fp32_only in _shared_buffers(module, stage_kernel(stage)):
        if fp32_only and not fp32_inputs:
            continue
        count = 4 if element[kind] == "float32" else 2
        for dim in dims:
            count *= sizes[dim]
        out[name] = count
    return out


# TileLang starts each shared buffer that a gemm reads (swizzled) on a multiple of this many bytes
SHARED_ALIGNMENT = 1024


def shared_memory_bytes(module, stage: str, config: dict, shape) -> int:
    """An upper bound on the shared memory of one stage's kernel under `config`, known before compiling: the
    sum of its buffers, each rounded up to SHARED_ALIGNMENT (the padding before a swizzled buffer, which a
    sequential stage, all of whose buffers live through its loop, does take). TileLang reuses the space of
    buffers no longer live, so a chunk-parallel kernel may take about half (compiled_shared_memory_bytes);
    defaults kept within the bound always fit."""
    return sum(-(-size // SHARED_ALIGNMENT) * SHARED_ALIGNMENT
               for size in _buffer_bytes(module, stage, config, shape).values())


# a kernel with one shared buffer declares that buffer as the dynamic allocation itself
_SHARED_EXTERN = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?\w+ (\w+)\[\];")


def shared_buffer_offsets(kernel_source: str) -> dict[str, int]:
    """Each shared buffer of a compiled kernel, by name, and its byte offset in the kernel's one dynamic
    allocation, from the CUDA source."""
    offsets = {name: 0 for name in _SHARED_EXTERN.findall(kernel_source) if name != "buf_dyn_shmem"}
    offsets.update({name: int(offset) for name, offset in _SHARED_OFFSET.findall(kernel_source)})
    return offsets


def compiled_shared_memory_bytes(kernel_source: str, module, stage: str, config: dict, shape) -> int:
    """The shared memory a compiled kernel takes: the end of the last buffer in its one dynamic allocation, read
    from the offsets in the CUDA source (`JITKernel.get_kernel_source()`). Buffers TileLang adds itself (the
    workspaces of reductions, a few hundred bytes) are taken to reach the next buffer, or 1 KB past the last."""
    sizes = _buffer_bytes(module, stage, config, shape)
    placed = sorted((offset, name) for name, offset in shared_buffer_offsets(kernel_source).items())
    ends = [offset + sizes.get(name, (placed[i + 1][0] - offset) if i + 1 < len(placed) else 1024)
            for i, (offset, name) in enumerate(placed)]
    return max(ends, default=0)


def _gpu_property(name: str, sm90_value: int) -> int:
    """Property `name` of this machine's GPU (torch's device properties), or sm_90's value where there is no GPU
    or torch does not report it."""
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(properties, name, sm90_value))
    return sm90_value


def shared_memory_limit() -> int:
    """Bytes of shared memory a CTA may opt into on this machine's GPU (sm_90's when there is none)."""
    return _gpu_property("shared_memory_per_block_optin", SM90_SHARED_MEMORY_BYTES)


def shared_memory_per_sm() -> int:
    """Bytes of shared memory an SM of this machine's GPU holds for its resident CTAs (sm_90's when there is
    none)."""
    return _gpu_property("shared_memory_per_multiprocessor", SM90_SHARED_MEMORY_PER_SM)


_FRAGMENT_ALLOC = re.compile(r'^ *(\w+) = T\.alloc_fragment\(\(([^)]*)\), "float32"\)', re.M)
_GEMM_ACCUMULATOR = re.compile(r'\b(?:T\.gemm|compensated_gemm)\(\w+, \w+, (\w+)')


@functools.cache
def _gemm_accumulators(module, kernel: str) -> tuple[tuple[str, ...], ...]:
    """The dimension names of every fragment a T.gemm of a generated kernel factory accumulates into."""
    source = inspect.getsource(getattr(module, kernel))
    fragments = {name: tuple(d.strip() for d in dims.split(",") if d.strip())
                 for name, dims in _FRAGMENT_ALLOC.findall(source)}
    return tuple(fragments[name] for name in dict.fromkeys(_GEMM_ACCUMULATOR.findall(source)))


def _warps_covering(rows: int, cols: int) -> int:
    """The most warps (a power of two) T.gemm can split a rows x cols tile among: each warp owns a multiple of
    16 rows and 8 columns, so m x n warps need m | rows / 16 and n | cols / 8."""
    feasible = [w for w in (1, 2, 4, 8, 16)
                if any((rows // 16) % m == 0 and (cols // 8) % (w // m) == 0 for m in (1, 2, 4, 8, 16) if w % m == 0)]
    return max(feasible)


def max_threads(module, stage: str, config: dict, shape) -> int:
    """The most threads the stage's kernel can have: every gemm's accumulator tile must split among its warps
    (16 x 16 has work for 2 warps, so a 16-row sub-block product at K = 16 allows 64 threads)."""
    sizes = _sizes(module, stage, config, shape)
    accumulators = _gemm_accumulators(module, stage_kernel(stage))
    # a kernel with no gemm (prep) splits its element-wise loops among any number of threads
    return 32 * min((_warps_covering(*(sizes[d] for d in dims)) for dims in accumulators),
                    default=max(THREADS) // 32)


def check_threads(module, stage: str, config: dict, shape) -> None:
    """Raises ConfigRejected, before compiling, when the stage's kernel has more threads than its gemm tiles
    have warps for."""
    params, most = kernel_params(config, stage), max_threads(module, stage, config, shape)
    if params["threads"] > most:
        raise ConfigRejected(f"tilelang {stage}: {params['threads']} threads at {params} for K={shape.K}, "
                             f"V={shape.V}; its gemm tiles have work for at most {most}")


def check_shared_memory(kernel_source: str, module, stage: str, config: dict, shape) -> None:
    """Raises ConfigRejected, after compiling and before the launch would fail, when the compiled kernel needs
    more shared memory than a CTA may have, or when it asks registers for more CTAs per SM (min_blocks) than
    the SM's shared memory holds: a setting that would only cost registers."""
    needed, limit = compiled_shared_memory_bytes(kernel_source, module, stage, config, shape), shared_memory_limit()
    params = kernel_params(config, stage)
    if needed > limit:
        raise ConfigRejected(f"tilelang {stage} at {params} for K={shape.K}, V={shape.V} "
                             f"needs {needed} bytes of shared memory; a CTA may have {limit}")
    blocks, per_sm = params.get(OCCUPANCY_PARAM, 1), shared_memory_per_sm()
    if blocks > 1 and blocks * (needed + SM90_RESERVED_SHARED_PER_CTA) > per_sm:
        raise ConfigRejected(f"tilelang {stage} at {params} for K={shape.K}, V={shape.V}: {blocks} CTAs per SM "
                             f"need {blocks} x ({needed} + {SM90_RESERVED_SHARED_PER_CTA}) bytes of shared memory; an "
                             f"SM has {per_sm}")


def chunk_preference(module) -> tuple[int, ...]:
    """The chunk sizes default_config tries, best first. A vector decay's sub-block products and the delta rule's
    triangular solve grow with the chunk squared and keep C x K tiles in registers. Every sweep so far (H100 and
    H200, K = V = 128, benchmarks/*/2026-11-23-session{8,9}) picked chunk 32 for them, with forwards 1.24x to
    1.75x faster than the chunk-64 default (other settings changed with it), and chunk 64 for the constant decay
    without the delta rule. Once gdn's backward fitted chunk 64 too (2026-11-24-session14, chunk64-gdn.log), its
    tuned chunk-32 config against the same at chunk 64: forward 1.43 against 1.95 ms, backward 5.61 against 7.28
    (wy and bwd_chunk slower, states and bwd_dh faster)."""
    features = module.FEATURES
    if features["decay"] == "vector" or features["write"] == "delta":
        return (32, 64, 16)
    return tuple(sorted(CHUNK_SIZES, reverse=True))


def sequential_num_stages(module) -> int:
    """num_stages of the sequential stages in default_config. Measured on the H100 at 4x8192x16x128 bf16, each
    spec at its tuned config otherwise (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-23-session10, ab-*.log): 1
    made gdn's forward 1.14x and backward 1.08x faster than 0, and retnet's backward 1.13x; it made gla's
    forward 1.16x and backward 1.09x slower (its states and bwd_dh copy only ke or qe ahead)."""
    features = module.FEATURES
    return 0 if features["decay"] == "vector" and features["write"] != "delta" else 1


def default_config(module, shape, phase: str) -> dict:
    """Heuristic settings for `shape` (a member of tuning_space): the schedule of default_schedule, then the first
    chunk of chunk_preference at which every stage it runs fits in shared memory by the bound known before
    compiling (shared_memory_bytes), and at it each chunk-parallel stage's largest block_v that fits (narrower
    than 32 only as a last resort), each sequential stage's largest that fits within sequential_block_v, and the
    fused forward's within FUSED_BLOCK_V. The stages of the schedule not chosen get the settings that fit at that
    chunk where some do (else the smallest): they are the sweep's first move to the other schedule."""
    shape = _padded_shape(shape)
    schedule = default_schedule(module, shape, phase)
    config = {} if schedule is None else {SCHEDULE: schedule}
    stages = phase_stages(module, phase, config or None)
    others = [stage for stage in phase_stages(module, phase) if stage not in stages]
    block_sizes = [b for b in sorted(BLOCK_V, reverse=True) if shape.V % b == 0]
    limit = shared_memory_limit()
    for narrowest in (32, 16):
        for chunk in chunk_preference(module):
            blocks = [b for b in block_sizes if b >= narrowest]
            settings = _largest_fitting_blocks(module, shape, stages, chunk, blocks, limit)
            if settings is not None:
                settings.update(_largest_fitting_blocks(module, shape, others, chunk, block_sizes, limit)
                                or _smallest_settings(module, others))
                return {"chunk": chunk, **config, **{key: settings[key] for stage in phase_stages(module, phase)
                                                    for key in _stage_keys(module, stage)}}
    raise ValueError(f"tilelang backend: no chunk size in {CHUNK_SIZES} and block_v in {block_sizes} fits the "
                     f"{phase} kernels for K={shape.K}, V={shape.V} in {limit} bytes of shared memory")


def default_schedule(module, shape, phase: str) -> str | None:
    """The schedule default_config picks where `phase` has two: fused where its grid at FUSED_BLOCK_V has
    FUSED_MIN_PROGRAMS CTAs, else split; None where there is one."""
    if not schedules(module, phase):
        return None
    programs = shape.B * shape.H * -(-shape.V // FUSED_BLOCK_V)
    return "fused" if programs >= FUSED_MIN_PROGRAMS else "split"


def _smallest_settings(module, stages) -> dict:
    """Every stage at the smallest block_v, threads and num_stages of the space (all valid for any shape)."""
    return {key: value for stage in stages
            for key, value in zip(_stage_keys(module, stage), (TILE, min(THREADS), 0, min(MIN_BLOCKS)))}


def sequential_block_v(shape) -> int:
    """The widest block_v at which a sequential stage's grid, V / block_v x B * H CTAs, has SEQUENTIAL_PROGRAMS,
    else the narrowest (TILE). Each CTA walks all its sequence's chunks, so the stage takes one CTA's walk, and
    with fewer CTAs than SMs the rest idle. On the H100 at (1, 32768, 16, 128) the sweeps chose block_v 16 for
    states and bwd_dh of all six seed specs (128 CTAs; block_v 64 gives 32): retnet's backward 2.21 ms against
    4.68 at the default, gdn's 6.82 against 11.69 (benchmarks/NVIDIA_H100_80GB_HBM3/2026-11-24-session12)."""
    return sequential_block(shape.V, shape.V, shape.B * shape.H, narrowest=TILE)


def _largest_fitting_blocks(module, shape, stages, chunk: int, block_sizes: list[int], limit: int) -> dict | None:
    config = {"chunk": chunk}
    # the sequential stages' candidates ignore the chunk-parallel stages' floor of 32 (default_config)
    sequential_blocks = [b for b in sorted(BLOCK_V, reverse=True)
                         if shape.V % b == 0 and b <= sequential_block_v(shape)]
    fused_blocks = [b for b in sorted(BLOCK_V, reverse=True) if shape.V % b == 0 and b <= FUSED_BLOCK_V]
    for stage in stages:
        # num_stages=0 in the chunk-parallel stages: their pipelined variants are left to the sweep, which
        # checks each winner against the float64 reference on the GPU. The sequential stages' is measured
        # (sequential_num_stages).
        sequential = stage_kernel(stage) in SEQUENTIAL_KERNELS
        depth = sequential_num_stages(module) if sequential else 0
        # min_blocks 1: what nvcc does without the bound; 2 is the sweep's to measure
        occupancy = {f"{stage}_{OCCUPANCY_PARAM}": 1} if takes_min_blocks(module, stage) else {}
        fused = stage_kernel(stage) == FUSED_FORWARD
        candidates = ({**config, f"{stage}_block_v": b, f"{stage}_threads": 0, f"{stage}_num_stages": depth,
                       **occupancy}
                      for b in (fused_blocks if fused else sequential_blocks if sequential else block_sizes))
        threads = FUSED_THREADS if fused else 128
        fitting = ({**candidate, f"{stage}_threads": min(threads, max_threads(module, stage, candidate, shape))}
                   for candidate in candidates if shared_memory_bytes(module, stage, candidate, shape) <= limit)
        setting = next(fitting, None)
        if setting is None:
            return None
        config.update(setting)
    return config


def kernel_params(config: dict, stage: str) -> dict:
    """The factory arguments of one stage's kernel (chunk, block_v, threads, num_stages, and min_blocks where
    the config has it) from a flat config."""
    occupancy = f"{stage}_{OCCUPANCY_PARAM}"
    return {"chunk": config["chunk"], **{param: config[f"{stage}_{param}"] for param in STAGE_PARAMS},
            **({OCCUPANCY_PARAM: config[occupancy]} if occupancy in config else {})}
