"""sla_dsl.backends.tilelang.offline: registers from ptxas and the sm_90 limits that bound resident CTAs (no GPU
needed)."""

from __future__ import annotations

import json
import shutil

import pytest

from sla_dsl.backends.tilelang import offline


def test_ctas_per_sm_follows_each_sm90_limit():
    # 244 registers round up to 248 per thread, 7936 per warp: 8 warps take 63488 of 65536
    assert offline.ctas_per_sm(244, 256, 132992) == {"registers": 1, "shared": 1, "threads": 8}
    assert offline.ctas_per_sm(64, 128, 0) == {"registers": 8, "shared": 228, "threads": 16}
    assert offline.ctas_per_sm(96, 128, 104960)["shared"] == 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_registers_spills_and_code_size_of_a_cuda_kernel():
    source = """
    extern "C" __global__ void __launch_bounds__(128, 1) axpy(float a, const float* x, float* y) {
        y[threadIdx.x] = a * x[threadIdx.x] + y[threadIdx.x];
    }
    """
    usage = offline.compiled_usage(source)
    assert 0 < usage.registers < 32 and usage.spill_bytes == 0
    # a handful of sm_90 instructions of 16 bytes, padded by nvcc to 128-byte multiples
    assert 0 < usage.code_bytes <= 512 and usage.code_bytes % 16 == 0
    # unrolled, the same body per element: the code grows with the elements a thread takes
    unrolled = source.replace("y[threadIdx.x] = a * x[threadIdx.x] + y[threadIdx.x];",
                              "#pragma unroll\n for (int i = 0; i < 64; ++i) y[threadIdx.x + 128 * i] = "
                              "a * x[threadIdx.x + 128 * i] + y[threadIdx.x + 128 * i];")
    assert offline.compiled_usage(unrolled).code_bytes > 16 * 64 * 3
    with pytest.raises(RuntimeError, match="nvcc failed"):
        offline.compiled_usage("this is not CUDA")
    with pytest.raises(ValueError, match="not a 64-bit ELF"):
        offline.text_section_bytes(b"not an ELF file")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("name", ["gla", "sla_gla"])
def test_the_vector_decay_backward_fits_the_instruction_cache(name):
    """A vector decay's bwd_chunk is the largest kernel (every [C, K] loop unrolled, several of them per diagonal
    sub-block): sla_gla's had grown to 9200 instructions (147 KB) at its tuned config and ran 1.45 ms slower
    than at the same config with less code (2026-11-25-session25). At each K = 128 bucket's config of the H100
    tables it must stay under the instruction cache, with room for a template change."""
    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.autotune.shapes import Shape
    from sla_dsl.autotune.table import read_table, table_path
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel, tuning
    from sla_dsl.codegen import REPO_ROOT

    (spec,) = resolve_specs([name])
    kernels = TileLangKernels(spec)
    table = read_table(table_path("NVIDIA_H100_80GB_HBM3", "tilelang", name, root=REPO_ROOT / "autotune"))
    configs = {json.dumps(tuning.kernel_params(entry["bwd"]["config"], "bwd_chunk"), sort_keys=True)
               for key, entry in table["entries"].items() if Shape.from_key(key).K == 128}
    assert configs
    for config in map(json.loads, sorted(configs)):
        source = compile_kernel(kernels.module, "bwd_chunk", 16, 128, 128, "bfloat16", config,
                                target=SM90_TARGET).get_kernel_source()
        code = offline.compiled_usage(source).code_bytes
        assert code <= 0.95 * offline.SM90_INSTRUCTION_CACHE_BYTES, f"{name} bwd_chunk at {config}: {code} bytes"


def test_config_keys_it_does_not_know_are_an_error_naming_them():
    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.autotune.shapes import parse_shapes

    (spec,) = resolve_specs(["gla"])
    (shape,) = parse_shapes("4x8192x16x128", "bfloat16")
    with pytest.raises(SystemExit, match="chunkk is not a key of gla's TileLang configs"):
        offline.report(spec, shape, "NVIDIA_H100_80GB_HBM3", {"chunk": 64, "chunkk": 64})
    with pytest.raises(ValueError, match="expected a JSON object"):
        offline._config_object("[64]")


def test_row_sums_whose_compiled_all_reduce_goes_through_shared_memory_are_named():
    factory = """
            T.reduce_sum(terms_f, dgq_f, dim=1)
            T.reduce_sum(terms_f, bl_f, dim=0)
            T.reduce_sum(diag_terms_f, diag_column_f, dim=1)
    """
    # as TileLang 0.1.15 compiles them: a row split between warpgroups (workspace), a column sum (workspace, but
    # not a row sum), a row within a warp (shuffles only)
    cuda = """
    dgq_f[i_55] = tl::AllReduce<tl::SumOp, 256, 128, 0, tl::NamedBarrier<256>>::run(dgq_f[i_55], (&(((float*)workspace_1)[0])));
    dgq_f[i_55] = tl::AllReduce<tl::SumOp, 4, 1, 0, tl::NamedBarrier<256>>::run(dgq_f[i_55]);
    bl_f[i_48] = tl::AllReduce<tl::SumOp, 128, 32, 0, tl::NamedBarrier<256>>::run(bl_f[i_48], (&(((float*)workspace)[0])));
    diag_column_f[i_15] = tl::AllReduce<tl::SumOp, 32, 1, 0, tl::NamedBarrier<256>>::run(diag_column_f[i_15]);
    """
    assert offline.cross_warp_row_sums(factory, cuda) == {"dgq_f": 1}
    assert offline.cross_warp_row_sums(factory, cuda.replace("(&(((float*)workspace_1)[0]))", "")) == {}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_delta_rule_backward_keeps_its_row_sums_off_the_gemm_layout():
    """2d81a5a: gdn's bwd_delta sums dvb v once after its V loop (it took a sum across warps per V-block), takes
    db's dkb terms from dbeta's sum and dL M from shared buffers (xr_f); bwd_chunk's first db sum reads the
    stored dq', dk' (db_rows_f). What still crosses warps reads a gemm accumulator, at the shipped H100 configs'
    shape (chunk 32, 128 threads)."""
    import inspect

    from sla_dsl.autotune.runner import resolve_specs
    from sla_dsl.backends.tilelang import SM90_TARGET, TileLangKernels, compile_kernel

    (spec,) = resolve_specs(["gdn"])
    kernels = TileLangKernels(spec)
    expected = {"bwd_delta": {"dbr_f": 1, "rkr_f": 1, "tvr_f": 1}, "bwd_chunk": {"dbr_f": 1}}
    for stage, crossing in expected.items():
        params = {"chunk": 32, "block_v": 32, "threads": 128, "num_stages": 0, "min_blocks": 1}
        source = compile_kernel(kernels.module, stage, 4, 128, 128, "bfloat16", params,
                                target=SM90_TARGET).get_kernel_source()
        factory = inspect.getsource(getattr(kernels.module, stage))
        assert offline.cross_warp_row_sums(factory, source) == crossing, stage
