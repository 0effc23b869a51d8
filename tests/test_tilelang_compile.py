"""Every generated TileLang kernel of the six seed specs lowers and compiles for sm_90a (nvcc, no GPU needed), in
bfloat16 and in float32 (whose gemms are error-compensated, `tf32x3`, with scratch in shared memory), within
the shared memory of an sm_90 CTA and with no shared-memory bank conflicts in its loops (`bank_conflicts`).

Compiled binaries go to TileLang's cache under the sla_dsl cache directory (keyed by the kernel's full TIR),
so repeated runs are fast. Compile times are printed and recorded in <cache>/tilelang_compile_times.json.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from sla_dsl.codegen import cache_dir, seed_specs

pytest.importorskip("tilelang")

SPECS = seed_specs()
HEADS, DIM_K, DIM_V = 4, 128, 128
# Extra wavefronts per warp (conflict factor - 1, times the runs per thread) that mark a conflict in a loop over a
# tile's rows or columns. gla's forward had 15 x 1024 in its diagonal sub-blocks (most of its H100 time) and
# 31 x 128 in T.cumsum of b; the one-pass moves between gemm fragments and fp32 shared buffers that remain
# cost at most 7 x 32.
HOT_EXCESS_WAVEFRONTS = 1024


def assert_no_bank_conflicts_in_loops(source: str, label: str) -> None:
    from sla_dsl.backends.tilelang import bank_conflicts

    hot = [spot for spot in bank_conflicts.hot_spots(source) if spot.excess >= HOT_EXCESS_WAVEFRONTS]
    assert not hot, f"{label}: shared-memory bank conflicts in a loop:\n" + "\n".join(map(str, hot))
TIMES: dict[str, float] = {}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_tilelang_kernels_compile_for_sm90a(spec, dtype):
    from sla_dsl.autotune import Shape
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, copy_hazards, tuning

    kernels = TileLangKernels(spec)
    total = 0.0
    shape = Shape(1, 64, HEADS, DIM_K, DIM_V, dtype)
    for phase, stage in ((phase, stage) for phase in ("fwd", "bwd")
                         for stage in tuning.phase_stages(kernels.module, phase)):
        name = tuning.stage_kernel(stage)
        full_config = kernels.default_config(shape, phase)
        config = tuning.kernel_params(full_config, stage)
        start = time.perf_counter()
        compiled = compile_kernel(kernels.module, name, HEADS, DIM_K, DIM_V, dtype, config, target=SM90_TARGET)
        elapsed = time.perf_counter() - start
        total += elapsed
        source = compiled.get_kernel_source()
        assert "__global__" in source
        label = f"{spec.name}.{stage}.{dtype}"
        assert_no_bank_conflicts_in_loops(source, label)
        assert not copy_hazards.hazards(source), (label, [str(h) for h in copy_hazards.hazards(source)])
        if name in tuning.SEQUENTIAL_KERNELS:
            # at num_stages 1 the next chunk's loads are asynchronous copies, issued while this chunk computes
            assert config["num_stages"] == tuning.sequential_num_stages(kernels.module), label
            assert ("cp_async_commit" in source) == (config["num_stages"] == 1), label
        # the layout TileLang emitted is within the bound that picks the default, which fits an sm_90 CTA
        offsets = list(tuning.shared_buffer_offsets(source).values())
        compiled_bytes = tuning.compiled_shared_memory_bytes(source, kernels.module, stage, full_config, shape)
        bound = tuning.shared_memory_bytes(kernels.module, stage, full_config, shape)
        assert offsets and max(offsets) < compiled_bytes <= bound <= tuning.SM90_SHARED_MEMORY_BYTES
        TIMES[label] = elapsed
        print(f"compiled {label} ({config}) in {elapsed:.1f} s")
    TIMES[f"{spec.name}.{dtype}.total"] = total
    print(f"{spec.name}: all {dtype} TileLang kernels compiled in {total:.1f} s")
    from sla_dsl.autotune.table import file_lock, write_atomically

    record = cache_dir() / "tilelang_compile_times.json"
    with file_lock(record):  # pytest-xdist workers record their cases into the one file
        previous = json.loads(record.read_text()) if record.exists() else {}
        previous.update(TIMES)
        write_atomically(record, json.dumps(previous, indent=1, sort_keys=True))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("dim", [16, 48])
@pytest.mark.parametrize("name", ["gla", "gdn"])
def test_small_and_odd_head_dims_compile_for_sm90a(name, dim):
    """At K = V = 16 a 16-row gemm tile has work for two warps only (the default gives such stages 64 threads,
    and 128 is rejected before compiling); K = 48 runs padded to 64 (TileLang cannot lower some reductions over
    48 columns). Every stage of both phases, bf16, at its default, with no bank conflicts in its loops."""
    from sla_dsl.autotune import ConfigRejected, Shape
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, tuning

    kernels = TileLangKernels(next(s for s in SPECS if s.name == name))
    shape = Shape(2, 1024, 4, dim, dim, "bfloat16")
    for phase in ("fwd", "bwd"):
        config = kernels.default_config(shape, phase)
        for stage in tuning.phase_stages(kernels.module, phase):
            params = tuning.kernel_params(config, stage)
            compiled = compile_kernel(kernels.module, tuning.stage_kernel(stage), HEADS, tuning.padded(dim),
                                      tuning.padded(dim), "bfloat16", params, target=SM90_TARGET)
            assert_no_bank_conflicts_in_loops(compiled.get_kernel_source(), f"{name}.{stage} K=V={dim}")
    too_many = {**kernels.default_config(shape, "bwd"), "bwd_dh_threads": 128}
    if dim == 16:
        with pytest.raises(ConfigRejected, match="gemm tiles have work for at most 64"):
            tuning.check_threads(kernels.module, "bwd_dh", too_many, shape)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_shared_memory_of_the_compiled_layout_decides():
    """TileLang reuses the shared memory of buffers no longer live, so a compiled kernel may need about half
    the sum of its buffers. At chunk 64 (K=V=128): retnet's bwd_chunk (bf16) sums to 263168 bytes (each buffer
    rounded up to its alignment), over what an sm_90 CTA may have, and its layout takes 107520: it runs. So does
    gdn's in float32 at block_v 16 (327680 by the sum, 197376 compiled), whose gemms add the 3xTF32 scratch.
    gdn's bwd_delta in float32 at block_v 16 takes 304128 and is refused after compiling, before a launch would
    fail. Every seed spec's default fits by the sum, for the usual head dims and dtypes."""
    from sla_dsl.autotune import ConfigRejected, Shape
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, tuning

    limit = tuning.SM90_SHARED_MEMORY_BYTES
    for name, stage, dtype, block_v, bound, compiled_bytes in (
            ("retnet", "bwd_chunk", "bfloat16", 64, 263168, 107520),
            ("gdn", "bwd_chunk", "float32", 16, 327680, 197376),
            ("gdn", "bwd_delta", "float32", 16, 373760, 304128)):
        shape = Shape(2, 4096, 4, 128, 128, dtype)
        kernels = TileLangKernels(next(s for s in SPECS if s.name == name))
        config = {"chunk": 64, f"{stage}_block_v": block_v, f"{stage}_threads": 128, f"{stage}_num_stages": 0}
        compiled = compile_kernel(kernels.module, stage, HEADS, 128, 128, dtype, tuning.kernel_params(config, stage),
                                  target=SM90_TARGET)
        source = compiled.get_kernel_source()
        assert tuning.shared_memory_bytes(kernels.module, stage, config, shape) == bound > limit
        assert tuning.compiled_shared_memory_bytes(source, kernels.module, stage, config, shape) == compiled_bytes
        if compiled_bytes > limit:
            with pytest.raises(ConfigRejected, match=f"needs {compiled_bytes} bytes of shared memory; a CTA may have"):
                tuning.check_shared_memory(source, kernels.module, stage, config, shape)
        else:
            tuning.check_shared_memory(source, kernels.module, stage, config, shape)
    for spec in SPECS:
        kernels = TileLangKernels(spec)
        for dim in (64, 128):
            for dtype in ("bfloat16", "float16", "float32"):
                shape = Shape(2, 4096, 4, dim, dim, dtype)
                for phase in ("fwd", "bwd"):
                    config = kernels.default_config(shape, phase)
                    assert config in kernels.tuning_space(shape, phase)
                    for stage in tuning.phase_stages(kernels.module, phase):
                        tuning.check_threads(kernels.module, stage, config, shape)
                        assert tuning.shared_memory_bytes(kernels.module, stage, config, shape) <= limit


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_sequential_stages_copy_no_buffer_a_gemm_of_another_warpgroup_still_reads(spec):
    """The sequential stages' pipelined loops copy the next chunk's inputs into shared buffers their gemms read;
    with two warpgroups (256 threads) a barrier must separate each gemm from the next copy into its operand
    (`copy_hazards`: a variant of the fused forward in which a gemm was the last reader of its copy of q raced)."""
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, copy_hazards, tuning

    kernels = TileLangKernels(spec)
    stages = [stage for phase in ("fwd", "bwd") for stage in tuning.phase_stages(kernels.module, phase)
              if tuning.stage_kernel(stage) in tuning.SEQUENTIAL_KERNELS]
    chunk = tuning.chunk_preference(kernels.module)[0]
    for stage in dict.fromkeys(tuning.stage_kernel(stage) for stage in stages):
        params = {"chunk": chunk, "block_v": 32, "threads": 256, "num_stages": 1}
        source = compile_kernel(kernels.module, stage, HEADS, DIM_K, DIM_V, "bfloat16", params,
                                target=SM90_TARGET).get_kernel_source()
        assert "cp_async_commit" in source, stage
        assert not copy_hazards.hazards(source), (stage, [str(h) for h in copy_hazards.hazards(source)])


def test_copy_hazards_are_copies_after_a_gemm_read_with_no_barrier_between():
    from sla_dsl.backends.tilelang import copy_hazards

    source = """
    tl::initialize_wgmma_descriptor<1, 1, 64>(desc_a, (&(((bfloat16_t*)q_m)[0])));
    tl::initialize_wgmma_descriptor<1, 1, 64>(desc_b, (&(((bfloat16_t*)k_m)[0])));
    __syncthreads();
    tl::wgmma_ss<tl::DataType::kBFloat16, 64, 16>(uint64_t(desc_a + 4), uint64_t(desc_b + 2), ((uint32_t*)(O + 0)), 1);
    tl::warpgroup_wait<0>();
    tl::cp_async_gs_conditional<16>((&(((bfloat16_t*)q_m)[threadIdx.x])), (&(Q[0])), true);
    __syncthreads();
    tl::cp_async_gs_conditional<16>((&(((bfloat16_t*)k_m)[threadIdx.x])), (&(K[0])), true);
    """
    # the read is the wgmma (line 5), not the descriptor (line 2, before the barrier); k_m's copy is after one
    assert [(h.buffer, h.gemm_line, h.copy_line) for h in copy_hazards.hazards(source)] == [("q_m", 5, 7)]


def test_shared_buffers_in_the_state_dtype_count_its_width():
    """The sequential stages' state copies are allocated in state_dt: float32 for float16 inputs (whose states are
    stored in float32), the input dtype otherwise. The shared-memory bound counts their bytes by it."""
    from sla_dsl.autotune import Shape
    from sla_dsl.backends.tilelang import TileLangKernels, tuning

    kernels = TileLangKernels(next(s for s in SPECS if s.name == "retnet"))
    config = {"chunk": 64, "states_block_v": 32, "states_threads": 128, "states_num_stages": 1}
    for dtype, width in (("bfloat16", 2), ("float16", 4), ("float32", 4)):
        sizes = tuning._buffer_bytes(kernels.module, "states", config, Shape(2, 4096, 4, 128, 128, dtype))
        assert sizes["S_m"] == 128 * 32 * width, dtype
        assert sizes["ke_m"] == 64 * 128 * (4 if dtype == "float32" else 2), dtype


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_min_blocks_bounds_the_registers_and_needs_the_shared_memory_of_as_many_ctas():
    """bwd_chunk's min_blocks is __launch_bounds__' second argument: at 2, ptxas keeps gdn's bwd_chunk (chunk 32,
    block_v 32, 256 threads) within half an SM's registers. At chunk 64 (block_v 64) its layout (over 115 KB) does
    not fit twice in an SM's shared memory, so 2 is refused there; at chunk 32 it does. bwd_delta takes it too."""
    from sla_dsl.autotune import ConfigRejected, Shape
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, offline, tuning

    kernels = TileLangKernels(next(s for s in SPECS if s.name == "gdn"))
    shape = Shape(2, 4096, 4, 128, 128, "bfloat16")
    space = kernels.tuning_space(shape, "bwd")  # billions of configs: read each key's settings off its factor
    for key in ("bwd_chunk_min_blocks", "bwd_delta_min_blocks"):
        assert {setting[key] for factor in space.factors for setting in factor if key in setting} == {1, 2}
    assert "wy_min_blocks" not in kernels.default_config(shape, "fwd")  # only bwd_chunk and bwd_delta take it
    assert kernels.default_config(shape, "bwd")["bwd_chunk_min_blocks"] == 1
    for chunk, block_v, fits in ((64, 64, False), (32, 32, True)):
        config = {"chunk": chunk, "bwd_chunk_block_v": block_v, "bwd_chunk_threads": 256, "bwd_chunk_num_stages": 0,
                  "bwd_chunk_min_blocks": 2}
        source = compile_kernel(kernels.module, "bwd_chunk", HEADS, 128, 128, "bfloat16",
                                tuning.kernel_params(config, "bwd_chunk"), target=SM90_TARGET).get_kernel_source()
        assert "__launch_bounds__(256, 2)" in source
        if fits:
            tuning.check_shared_memory(source, kernels.module, "bwd_chunk", config, shape)
            registers = offline.compiled_usage(source).registers
            assert registers <= 65536 // (2 * 256)
        else:
            with pytest.raises(ConfigRejected, match="2 CTAs per SM need"):
                tuning.check_shared_memory(source, kernels.module, "bwd_chunk", config, shape)
