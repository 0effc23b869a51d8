"""The shared-memory bank-conflict reader of compiled TileLang kernels (`bank_conflicts`), on small CUDA texts
written the way TileLang emits them; the compile test applies it to every generated kernel."""

from __future__ import annotations

import pytest

from sla_dsl.backends.tilelang.bank_conflicts import hot_spots

PROLOGUE = """
extern "C" __global__ void __launch_bounds__(128, 1) kernel_kernel(float* __restrict__ O) {
  extern __shared__ __align__(1024) uchar buf_dyn_shmem[];
  void* b_s = ((void*)((char*)buf_dyn_shmem + 0));
  void* k_m = ((void*)((char*)buf_dyn_shmem + 32768));
  float acc[8];
"""


def kernel(body: str) -> str:
    return PROLOGUE + body + "\n}\n"


def test_a_warp_reading_one_row_is_conflict_free_and_sixteen_rows_of_one_column_are_not():
    row = kernel("""
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    acc[i] = ((float*)b_s)[((i * 512) + ((int)threadIdx.x))];
  }""")
    assert hot_spots(row) == []
    column = kernel("""
  #pragma unroll
  for (int i = 0; i < 8; ++i) {
    for (int d = 0; d < 128; ++d) {
      acc[i] = (acc[i] + ((float*)b_s)[(((i * 1024) + ((((int)threadIdx.x) & 15) * 128)) + d)]);
    }
  }""")
    (spot,) = hot_spots(column)
    assert (spot.buffer, spot.bytes_per_lane, spot.factor, spot.runs) == ("b_s", 4, 16, 8 * 128)


def test_vector_accesses_are_judged_per_quarter_warp():
    contiguous = kernel("""
  *(float4*)(acc + 0) = *(float4*)(((float*)b_s) + (((int)threadIdx.x) * 4));""")
    assert hot_spots(contiguous) == []
    # each lane its own 128-float row: the 8 lanes of a quarter warp all start in bank 0
    strided = kernel("""
  *(float4*)(acc + 0) = *(float4*)(((float*)b_s) + ((((int)threadIdx.x) & 31) * 128));""")
    (spot,) = hot_spots(strided)
    assert (spot.bytes_per_lane, spot.factor, spot.runs) == (16, 8, 1)


def test_lanes_reading_one_word_share_it_and_runtime_loops_count_once():
    broadcast = kernel("""
  for (int c = 0; c < ((eos + 63) >> 6); ++c) {
    acc[0] = ((float*)b_s)[(c * 64)];
  }""")
    assert hot_spots(broadcast) == []
    two_rows = kernel("""
  for (int c = 0; c < ((eos + 63) >> 6); ++c) {
    acc[0] = ((float*)b_s)[(((((int)threadIdx.x) & 7) * 128) + c)];
  }""")
    (spot,) = hot_spots(two_rows)
    assert (spot.factor, spot.runs) == (8, 1)


def test_tilelang_scan_down_the_rows_of_a_tile_is_judged_from_its_call():
    text = kernel("""
  for (int c = 0; c < ((eos + 63) >> 6); ++c) {
    tl::CumSum2D<128, 0, false>::run((&(((float*)b_s)[0])), (&(((float*)b_s)[0])), 64, 128, 128, 128);
    tl::CumSum2D<128, 1, false>::run((&(((float*)b_s)[0])), (&(((float*)b_s)[0])), 64, 128, 128, 128);
  }""")
    (spot,) = hot_spots(text)  # along the rows (axis 1) each lane reads the next word: no conflict
    assert (spot.buffer, spot.factor, spot.runs, spot.excess) == ("b_s", 32, 32 * 2 * 2, 31 * 128)


def test_tensor_core_operand_moves_and_global_memory_are_not_judged():
    text = kernel("""
  tl::ptx_ldmatrix_x4((&(((bfloat16_t*)k_m)[((((int)threadIdx.x) & 15) * 128)])), (&(A_local[0])));
  acc[0] = ((float*)O)[((((int)threadIdx.x) & 15) * 128)];""")
    assert hot_spots(text) == []


def test_an_address_it_cannot_read_is_an_error_naming_its_line():
    text = kernel("""
  acc[0] = ((float*)b_s)[(cond ? 1 : 2)];""")
    with pytest.raises(ValueError, match=r"line 8: cannot read the shared-memory address '\(cond \? 1 : 2\)'"):
        hot_spots(text)
