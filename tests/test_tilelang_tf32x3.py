"""3xTF32 (`sla_dsl.backends.tilelang.tf32x3`): the operand parts the float32 gemms are built from, computed by
the generated macros on CPU (TileLang's C target), and the kernels that use them: float32 gemms run three
products, 16-bit kernels are the plain T.gemm kernels they were before."""

import importlib.util
import re

import pytest
import torch

from sla_dsl.codegen import seed_specs

pytest.importorskip("tilelang")

SPECS = seed_specs()
FACTORY_ARGS = dict(H=4, K=128, V=128, chunk=32, block_v=64, threads=128, num_stages=0)


def _module(spec):
    from sla_dsl.backends.tilelang import TileLangKernels

    return TileLangKernels(spec).module


def _kernel_names(module) -> list[str]:
    return sorted({name for kernels in module.PHASES.values() for name in kernels})


def _tf32_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of a 2-D float32 tensor from the generated tf32_hi / tf32_lo macros, run on CPU."""
    import tilelang
    import tilelang.cpu.language as TC
    import tilelang.language as T

    module = _module(SPECS[0])
    M, N = x.shape

    @T.prim_func
    def parts(X: T.Tensor((M, N), "float32"), HI: T.Tensor((M, N), "float32"), LO: T.Tensor((M, N), "float32")):
        with TC.Kernel(1):
            module.tf32_hi(X, HI)
            module.tf32_lo(X, LO)

    kernel = tilelang.compile(parts, target="c", execution_backend="cython")
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    kernel(x.contiguous(), hi, lo)
    return hi, lo


def _tensor_core_reading(x: torch.Tensor) -> torch.Tensor:
    """What a tf32 mma reads of an fp32 register: the 13 low mantissa bits dropped (rounding would be closer)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_tf32_parts_are_exact_and_rounded_to_nearest():
    tie = 1 + 2.0 ** -11  # exactly half a tf32 ulp above 1
    special = torch.tensor([tie, -tie, tie - 2.0 ** -23, 2 - 2.0 ** -23, 1.5, 0.0])
    expected_hi = torch.tensor([1 + 2.0 ** -10, -(1 + 2.0 ** -10), 1.0, 2.0, 1.5, 0.0])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=generator) * torch.exp2(torch.randint(-30, 30, (16, 64), generator=generator))
    x[0, :len(special)] = special
    hi, lo = _tf32_parts(x)
    assert torch.equal(hi + lo, x)  # the split loses nothing
    assert not (hi.view(torch.int32) & 0x1FFF).any()  # the tensor cores read all of hi
    assert (lo.abs() <= 2.0 ** -11 * x.abs()).all()  # nearest: at most half a tf32 ulp off
    assert torch.equal(hi[0, :len(special)], expected_hi)  # ties away from zero; a carry into the exponent


def test_three_products_of_the_parts_reach_fp32_accuracy():
    """A_hi B_lo + A_hi B_hi + A_lo B_hi, each read by tensor cores as tf32, is within fp32 accuracy of A B;
    the plain tf32 product is not."""
    generator = torch.Generator().manual_seed(1)
    a, bt = torch.randn(2, 16, 128, generator=generator)
    (a_hi, a_lo), (b_hi, b_lo) = _tf32_parts(a), _tf32_parts(bt)
    read = lambda t: _tensor_core_reading(t).double()  # noqa: E731
    exact = a.double() @ bt.double().T
    compensated = read(a_hi) @ read(b_lo).T + read(a_hi) @ read(b_hi).T + read(a_lo) @ read(b_hi).T
    plain = read(a) @ read(bt).T
    error = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(compensated) < 1e-6 < 1e-4 < error(plain)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_16_bit_kernels_are_the_plain_gemm_kernels(spec, tmp_path):
    """The TIR of every 16-bit kernel equals that of its factory with T.gemm written where compensated_gemm
    is and without the float32 scratch."""
    from sla_dsl.backends.tilelang.tf32x3 import FP32_ONLY

    module = _module(spec)
    source = open(module.__file__, encoding="utf-8").read()
    plain = re.sub(r"(?<!def )compensated_gemm\((\w+), (\w+), (\w+), \w+, \w+", r"T.gemm(\1, \2, \3", source)
    plain = "".join(line for line in plain.splitlines(keepends=True) if not line.endswith(FP32_ONLY + "\n"))
    assert "compensated_gemm(" not in re.split(r"\ndef (?:wy|states)\(", plain, maxsplit=1)[1]
    path = tmp_path / f"plain_{spec.name}.py"
    path.write_text(plain, encoding="utf-8")
    loader = importlib.util.spec_from_file_location(f"plain_{spec.name}", path)
    plain_module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(plain_module)
    for name in _kernel_names(module):
        for dtype in ("bfloat16", "float16"):
            args = dict(FACTORY_ARGS, dtype=dtype)
            assert getattr(module, name)(**args).script() == getattr(plain_module, name)(**args).script(), (name, dtype)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_float32_gemms_are_compensated(spec):
    module = _module(spec)
    with_gemms = 0
    for name in _kernel_names(module):
        bf16 = getattr(module, name)(**FACTORY_ARGS, dtype="bfloat16").script()
        fp32 = getattr(module, name)(**FACTORY_ARGS, dtype="float32").script()
        gemms = bf16.count("T.gemm(")
        assert fp32.count("T.gemm(") == 3 * gemms, name
        assert "tf32_" not in bf16 and ("tf32_" in fp32) == (gemms > 0), name  # prep has no gemm
        with_gemms += gemms > 0
    assert with_gemms >= 3
