// CUDA kernels of the fused multi-positive contrastive loss, bf16 inputs, fp32 statistics.
//
// Tensor cores through WMMA (16x16x16 bf16 fragments, fp32 accumulators). A block of 4 warps
// owns a tile of 64 rows; each warp computes its 16 rows x 64 columns of s into shared memory
// and transforms them itself (two lanes per row, 32 columns each), so the only block-wide
// barriers are around the loads of the column tile. The same algorithm as the CPU and Triton
// backends (see docs/kernels.md): log2-unit similarities, one exp2 per entry relative to the
// smallest maximum (forward) or LSE (backward) among the entry's positive sets, per-row
// statistics only, deterministic (every output written by one block, no atomics).
#include "contrastive_cuda.h"

#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

namespace suncet::cuda {
namespace {

using namespace nvcuda;
using bf16 = __nv_bfloat16;

constexpr int kThreads = 128;
constexpr int kSLd = kTile + 4;  // fp32 similarity tile row stride (multiple of 4 for WMMA)
constexpr int kHLd = kTile + 8;  // bf16 gradient tile row stride (multiple of 8 for WMMA)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kFloor = -1e30f;  // start of running maxima: -inf minus it stays -inf
constexpr float kDead = 1e30f;    // offset of rows without gradient: exp2(s - kDead) == 0
constexpr float kInf = __builtin_huge_valf();

template <int DP>
constexpr int kLd = DP + 8;  // bf16 row stride of the q/k tiles in shared memory

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ bool meets(int64_t lo, int64_t hi, int64_t lo2, int64_t hi2) {
  return lo <= hi2 && lo2 <= hi;
}

// Rows [first, first + kTile) of a [count, dim] bf16 matrix into a zero-padded [kTile][DP + 8] tile.
template <int DP>
__device__ void load_tile(bf16* dst, const bf16* src, int64_t first, int64_t count, int dim) {
  constexpr int ld = kLd<DP>;
  // 16-byte vector loads need whole 8-element rows and a 16-byte aligned base: a contiguous view
  // into a larger tensor may start anywhere. Otherwise one element at a time.
  if (dim % 8 == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    constexpr int chunks = DP / 8;
    for (int idx = threadIdx.x; idx < kTile * chunks; idx += kThreads) {
      const int r = idx / chunks, c = (idx % chunks) * 8;
      const int64_t row = first + r;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (row < count && c < dim) v = *reinterpret_cast<const uint4*>(src + row * dim + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < kTile * DP; idx += kThreads) {
      const int r = idx / DP, c = idx % DP;
      const int64_t row = first + r;
      dst[r * ld + c] = (row < count && c < dim) ? src[row * dim + c] : __float2bfloat16(0.0f);
    }
  }
}

// s[warp rows][0, kTile) = a_tile[warp rows] . b_tile^T, for this warp's 16 rows.
template <int DP>
__device__ void warp_similarity(const bf16* a_tile, const bf16* b_tile, float* s_tile, int warp) {
  constexpr int ld = kLd<DP>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTile / 16];
#pragma unroll
  for (int n = 0; n < kTile / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll 4
  for (int kk = 0; kk < DP / 16; ++kk) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
    wmma::load_matrix_sync(a, a_tile + warp * 16 * ld + kk * 16, ld);
#pragma unroll
    for (int n = 0; n < kTile / 16; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
      wmma::load_matrix_sync(b, b_tile + n * 16 * ld + kk * 16, ld);
      wmma::mma_sync(acc[n], a, b, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < kTile / 16; ++n)
    wmma::store_matrix_sync(s_tile + warp * 16 * kSLd + n * 16, acc[n], kSLd, wmma::mem_row_major);
}

// Picks, per entry, the table value of its membership code (bit p: positive of key set p).
template <int P>
__device__ __forceinline__ float select_code(bool m0, bool m1, float t0, float t1, float t2, float t3) {
  if constexpr (P == 1) return m0 ? t1 : t0;
  return m0 ? (m1 ? t3 : t1) : (m1 ? t2 : t0);
}

// ---------------------------------------------------------------------------------------------
// Forward: per (row tile, column split) partial statistics, then a merge per row.

struct ForwardParams {
  const bf16* q;
  const bf16* k;
  int dim;
  Attributes at;
  float scale2;
  float* partial;
  const int64_t* tile_lo;
  const int64_t* tile_hi;
};

template <int DP, int P>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams prm) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ld = kLd<DP>;
  bf16* q_tile = reinterpret_cast<bf16*>(smem);
  bf16* k_tile = q_tile + kTile * ld;
  float* s_tile = reinterpret_cast<float*>(k_tile + kTile * ld);
  int64_t* col_key = reinterpret_cast<int64_t*>(s_tile + kTile * kSLd);  // [P][kTile]
  int64_t* col_group = col_key + P * kTile;
  __shared__ int64_t row_lo, row_hi;

  const Attributes& at = prm.at;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  load_tile<DP>(q_tile, prm.q, row0, at.rows, prm.dim);
  if (threadIdx.x == 0) {
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    for (int64_t i = row0; i < std::min<int64_t>(row0 + kTile, at.rows); ++i)
      lo = min(lo, at.row_groups[i]), hi = max(hi, at.row_groups[i]);
    row_lo = lo, row_hi = hi;
  }
  const int r = warp * 16 + lane / 2;  // this lane's row in the tile; the lane pair splits its columns
  const int half = lane & 1;
  const int64_t i = row0 + r;
  const bool row_ok = i < at.rows;
  const int64_t group = row_ok ? at.row_groups[i] : 0;
  const int64_t key0 = row_ok ? at.row_keys[i * P] : 0;
  const int64_t key1 = (row_ok && P == 2) ? at.row_keys[i * P + P - 1] : 0;
  const int64_t self_col = i + at.self_offset;

  float max_all = kFloor, max0 = kFloor, max1 = kFloor;
  float sum_all = 0.0f, sum0 = 0.0f, sum1 = 0.0f;
  __syncthreads();

  const int64_t tiles = cdiv(at.cols, kTile);
  const int64_t per_split = cdiv(tiles, gridDim.y);
  const int64_t t_begin = blockIdx.y * per_split, t_end = std::min(t_begin + per_split, tiles);
  for (int64_t t = t_begin; t < t_end; ++t) {
    if (!meets(row_lo, row_hi, prm.tile_lo[t], prm.tile_hi[t])) continue;  // block-uniform
    const int64_t col0 = t * kTile;
    __syncthreads();  // the previous tile is no longer read
    load_tile<DP>(k_tile, prm.k, col0, at.cols, prm.dim);
    if (threadIdx.x < kTile) {
      const int64_t j = col0 + threadIdx.x;
      const bool ok = j < at.cols;
      col_group[threadIdx.x] = ok ? at.col_groups[j] : 0;
      for (int p = 0; p < P; ++p) col_key[p * kTile + threadIdx.x] = ok ? at.col_keys[j * P + p] : 0;
    }
    __syncthreads();
    warp_similarity<DP>(q_tile, k_tile, s_tile, warp);
    __syncwarp();

    float x[kTile / 2];
    uint32_t member0 = 0, member1 = 0;
    float tile_all = -kInf, tile0 = -kInf, tile1 = -kInf;
#pragma unroll
    for (int c2 = 0; c2 < kTile / 2; ++c2) {
      const int c = 2 * c2 + half;
      const int64_t j = col0 + c;
      const bool allowed = j < at.cols && col_group[c] == group && j != self_col;
      const float v = allowed ? s_tile[r * kSLd + c] * prm.scale2 : -kInf;
      x[c2] = v;
      tile_all = fmaxf(tile_all, v);
      if (col_key[c] == key0) member0 |= 1u << c2, tile0 = fmaxf(tile0, v);
      if (P == 2 && col_key[(P - 1) * kTile + c] == key1) member1 |= 1u << c2, tile1 = fmaxf(tile1, v);
    }
    tile_all = fmaxf(tile_all, __shfl_xor_sync(0xffffffffu, tile_all, 1));
    tile0 = fmaxf(tile0, __shfl_xor_sync(0xffffffffu, tile0, 1));
    tile1 = fmaxf(tile1, __shfl_xor_sync(0xffffffffu, tile1, 1));
    const float new_all = fmaxf(max_all, tile_all), new0 = fmaxf(max0, tile0), new1 = fmaxf(max1, tile1);
    sum_all *= exp2f(max_all - new_all);
    sum0 *= exp2f(max0 - new0);
    sum1 *= exp2f(max1 - new1);
    max_all = new_all, max0 = new0, max1 = new1;
    const float both = fminf(max0, max1);
    const float to_all1 = exp2f(max0 - max_all), to_all2 = exp2f(max1 - max_all), to_all3 = exp2f(both - max_all);
    const float to0_3 = exp2f(both - max0), to1_3 = exp2f(both - max1);
    float acc_all = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
#pragma unroll
    for (int c2 = 0; c2 < kTile / 2; ++c2) {
      const bool m0 = member0 >> c2 & 1u, m1 = P == 2 && (member1 >> c2 & 1u);
      const float e = exp2f(x[c2] - select_code<P>(m0, m1, max_all, max0, max1, both));
      acc_all += e * select_code<P>(m0, m1, 1.0f, to_all1, to_all2, to_all3);
      if (m0) acc0 += m1 ? e * to0_3 : e;
      if (m1) acc1 += m0 ? e * to1_3 : e;
    }
    sum_all += acc_all + __shfl_xor_sync(0xffffffffu, acc_all, 1);
    sum0 += acc0 + __shfl_xor_sync(0xffffffffu, acc0, 1);
    sum1 += acc1 + __shfl_xor_sync(0xffffffffu, acc1, 1);
  }
  if (row_ok && half == 0) {
    float* out = prm.partial + static_cast<int64_t>(blockIdx.y) * (2 + 2 * P) * at.rows + i;
    out[0] = max_all;
    out[at.rows] = sum_all;
    out[2 * at.rows] = max0;
    out[3 * at.rows] = sum0;
    if (P == 2) out[4 * at.rows] = max1, out[5 * at.rows] = sum1;
  }
}

template <int P>
__global__ void combine_kernel(const float* partial, int splits, int64_t rows, float* loss, bool* valid,
                               float* lse_all, float* lse_pos) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  constexpr int stats = 2 + 2 * P;
  float lse2[1 + P];
  for (int s = 0; s < 1 + P; ++s) {
    float top = kFloor;
    for (int k = 0; k < splits; ++k) top = fmaxf(top, partial[(k * stats + 2 * s) * rows + i]);
    float total = 0.0f;
    for (int k = 0; k < splits; ++k)
      total += partial[(k * stats + 2 * s + 1) * rows + i] * exp2f(partial[(k * stats + 2 * s) * rows + i] - top);
    lse2[s] = total > 0.0f ? top + log2f(total) : -kInf;
  }
  lse_all[i] = lse2[0] * kLn2;
  for (int p = 0; p < P; ++p) {
    const bool ok = lse2[1 + p] > -kInf;
    lse_pos[i * P + p] = lse2[1 + p] * kLn2;
    valid[i * P + p] = ok;
    loss[i * P + p] = ok ? (lse2[0] - lse2[1 + p]) * kLn2 : 0.0f;
  }
}

__global__ void tile_ranges_kernel(const int64_t* groups, int64_t count, int64_t* lo, int64_t* hi) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= cdiv(count, kTile)) return;
  int64_t l = INT64_MAX, h = INT64_MIN;
  for (int64_t j = t * kTile; j < std::min<int64_t>((t + 1) * kTile, count); ++j)
    l = min(l, groups[j]), h = max(h, groups[j]);
  lo[t] = l, hi[t] = h;
}

// ---------------------------------------------------------------------------------------------
// Backward.

// Per row of q and membership code c: offset_c (log2 units) and coef_c with
// dL/ds = coef_c * exp2(s2 - offset_c). Layout: offsets of codes 0..2^P-1, then coefficients.
template <int P>
__global__ void gradient_tables_kernel(const float* grad, const float* lse_all, const float* lse_pos, int64_t rows,
                                       float* tables) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  constexpr int codes = 1 << P;
  const float all2 = lse_all[i] * kLog2e;
  float pos2[P], g[P], g_sum = 0.0f;
  bool ok[P], alive = false;
  for (int p = 0; p < P; ++p) {
    ok[p] = lse_pos[i * P + p] > -kInf;
    pos2[p] = ok[p] ? lse_pos[i * P + p] * kLog2e : 0.0f;
    g[p] = ok[p] ? grad[i * P + p] : 0.0f;
    g_sum += g[p];
    alive = alive || ok[p];
  }
  for (int c = 0; c < codes; ++c) {
    bool reachable = alive;
    float o = all2;
    for (int p = 0; p < P; ++p)
      if (c >> p & 1) reachable = reachable && ok[p], o = fminf(o, pos2[p]);
    float coef = g_sum * exp2f(o - all2);
    for (int p = 0; p < P; ++p)
      if (c >> p & 1) coef -= g[p] * exp2f(o - pos2[p]);
    tables[c * rows + i] = reachable ? o : kDead;
    tables[(codes + c) * rows + i] = reachable ? coef : 0.0f;
  }
}

struct BackwardParams {
  const bf16* a;  // rows this pass differentiates
  const bf16* b;  // rows it sums over
  bf16* out;
  int64_t a_count, b_count;
  int dim;
  Attributes at;
  const float* tables;
  const int64_t* b_col_lo;  // group ranges of b's tiles as columns of k (row side)
  const int64_t* b_col_hi;
  const int64_t* b_row_lo;  // ... and as rows of q (column side)
  const int64_t* b_row_hi;
  float scale2, inv_tau;
};

// d a = (1/tau) sum_b H_ab b. Row side: a are rows of q, b columns of k; column side: a are
// columns of k, b rows of q (the transposed term). One tower: both, on the same tensor.
template <int DP, int P, bool ROW_SIDE, bool COL_SIDE>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams prm) {
  constexpr int codes = 1 << P;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int ld = kLd<DP>;
  bf16* a_tile = reinterpret_cast<bf16*>(smem);
  bf16* b_tile = a_tile + kTile * ld;
  float* s_tile = reinterpret_cast<float*>(b_tile + kTile * ld);
  bf16* h_tile = reinterpret_cast<bf16*>(s_tile + kTile * kSLd);
  // b's attributes for this tile: as columns of k (row side) and as rows of q (column side).
  int64_t* b_col_key = reinterpret_cast<int64_t*>(h_tile + kTile * kHLd);  // [P][kTile]
  int64_t* b_col_group = b_col_key + P * kTile;
  int64_t* b_row_key = b_col_group + kTile;  // [P][kTile]
  int64_t* b_row_group = b_row_key + P * kTile;
  float* b_table = reinterpret_cast<float*>(b_row_group + kTile);  // [2 codes][kTile]
  __shared__ int64_t lo_row_side, hi_row_side, lo_col_side, hi_col_side;

  const Attributes& at = prm.at;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  load_tile<DP>(a_tile, prm.a, row0, prm.a_count, prm.dim);
  if (threadIdx.x == 0) {
    int64_t lr = INT64_MAX, hr = INT64_MIN, lc = INT64_MAX, hc = INT64_MIN;
    for (int64_t i = row0; i < std::min<int64_t>(row0 + kTile, prm.a_count); ++i) {
      if (ROW_SIDE) lr = min(lr, at.row_groups[i]), hr = max(hr, at.row_groups[i]);
      if (COL_SIDE) lc = min(lc, at.col_groups[i]), hc = max(hc, at.col_groups[i]);
    }
    lo_row_side = lr, hi_row_side = hr, lo_col_side = lc, hi_col_side = hc;
  }
  const int r = warp * 16 + lane / 2;
  const int half = lane & 1;
  const int64_t a_idx = row0 + r;
  const bool row_ok = a_idx < prm.a_count;
  // Row side: this lane's row as a row of q.
  int64_t r_group = 0, r_key0 = 0, r_key1 = 0;
  float r_off[4] = {kDead, kDead, kDead, kDead}, r_coef[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (ROW_SIDE && row_ok) {
    r_group = at.row_groups[a_idx];
    r_key0 = at.row_keys[a_idx * P];
    if (P == 2) r_key1 = at.row_keys[a_idx * P + P - 1];
#pragma unroll
    for (int c = 0; c < codes; ++c)
      r_off[c] = prm.tables[c * at.rows + a_idx], r_coef[c] = prm.tables[(codes + c) * at.rows + a_idx];
  }
  // Column side: this lane's row as a column of k.
  int64_t c_group = 0, c_key0 = 0, c_key1 = 0;
  if (COL_SIDE && row_ok) {
    c_group = at.col_groups[a_idx];
    c_key0 = at.col_keys[a_idx * P];
    if (P == 2) c_key1 = at.col_keys[a_idx * P + P - 1];
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[DP / 16];
#pragma unroll
  for (int n = 0; n < DP / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
  __syncthreads();

  const int64_t tiles = cdiv(prm.b_count, kTile);
  for (int64_t t = 0; t < tiles; ++t) {
    const bool row_hit = ROW_SIDE && meets(lo_row_side, hi_row_side, prm.b_col_lo[t], prm.b_col_hi[t]);
    const bool col_hit = COL_SIDE && meets(lo_col_side, hi_col_side, prm.b_row_lo[t], prm.b_row_hi[t]);
    if (!row_hit && !col_hit) continue;  // block-uniform
    const int64_t col0 = t * kTile;
    __syncthreads();
    load_tile<DP>(b_tile, prm.b, col0, prm.b_count, prm.dim);
    if (threadIdx.x < kTile) {
      const int64_t j = col0 + threadIdx.x;
      const bool ok = j < prm.b_count;
      if (ROW_SIDE) {
        b_col_group[threadIdx.x] = ok ? at.col_groups[j] : 0;
        for (int p = 0; p < P; ++p) b_col_key[p * kTile + threadIdx.x] = ok ? at.col_keys[j * P + p] : 0;
      }
      if (COL_SIDE) {
        b_row_group[threadIdx.x] = ok ? at.row_groups[j] : 0;
        for (int p = 0; p < P; ++p) b_row_key[p * kTile + threadIdx.x] = ok ? at.row_keys[j * P + p] : 0;
        for (int c = 0; c < 2 * codes; ++c) b_table[c * kTile + threadIdx.x] = ok ? prm.tables[c * at.rows + j] : 0.0f;
      }
    }
    __syncthreads();
    warp_similarity<DP>(a_tile, b_tile, s_tile, warp);
    __syncwarp();

#pragma unroll 8
    for (int c2 = 0; c2 < kTile / 2; ++c2) {
      const int c = 2 * c2 + half;
      const int64_t j = col0 + c;
      const float x = s_tile[r * kSLd + c] * prm.scale2;
      float h = 0.0f;
      if (ROW_SIDE && j < prm.b_count) {
        const bool allowed = b_col_group[c] == r_group && j != a_idx + at.self_offset;
        const bool m0 = b_col_key[c] == r_key0, m1 = P == 2 && b_col_key[(P - 1) * kTile + c] == r_key1;
        const float e = exp2f(x - select_code<P>(m0, m1, r_off[0], r_off[1], r_off[2], r_off[3]));
        if (allowed) h += e * select_code<P>(m0, m1, r_coef[0], r_coef[1], r_coef[2], r_coef[3]);
      }
      if (COL_SIDE && j < prm.b_count) {
        const bool allowed = b_row_group[c] == c_group && a_idx != j + at.self_offset;
        const bool m0 = b_row_key[c] == c_key0, m1 = P == 2 && b_row_key[(P - 1) * kTile + c] == c_key1;
        const float* tb = b_table + c;
        float off, coef;
        if constexpr (P == 1) {
          off = m0 ? tb[kTile] : tb[0];
          coef = m0 ? tb[3 * kTile] : tb[2 * kTile];
        } else {
          off = select_code<2>(m0, m1, tb[0], tb[kTile], tb[2 * kTile], tb[3 * kTile]);
          coef = select_code<2>(m0, m1, tb[4 * kTile], tb[5 * kTile], tb[6 * kTile], tb[7 * kTile]);
        }
        const float e = exp2f(x - off);
        if (allowed) h += e * coef;
      }
      h_tile[r * kHLd + c] = __float2bfloat16(h);
    }
    __syncwarp();
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> hf;
      wmma::load_matrix_sync(hf, h_tile + warp * 16 * kHLd + kk * 16, kHLd);
#pragma unroll
      for (int n = 0; n < DP / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, b_tile + kk * 16 * ld + n * 16, ld);
        wmma::mma_sync(acc[n], hf, bf, acc[n]);
      }
    }
  }

  // The accumulators leave through this warp's rows of the similarity tile, 64 columns at a time.
  __syncwarp();
#pragma unroll
  for (int n0 = 0; n0 < DP / 16; n0 += kTile / 16) {
#pragma unroll
    for (int n = 0; n < kTile / 16; ++n)
      wmma::store_matrix_sync(s_tile + warp * 16 * kSLd + n * 16, acc[n0 + n], kSLd, wmma::mem_row_major);
    __syncwarp();
    for (int idx = lane; idx < 16 * kTile; idx += 32) {
      const int rr = idx / kTile, c = idx % kTile;
      const int64_t row = row0 + warp * 16 + rr;
      const int col = n0 * 16 + c;
      if (row < prm.a_count && col < prm.dim)
        prm.out[row * prm.dim + col] = __float2bfloat16(s_tile[(warp * 16 + rr) * kSLd + c] * prm.inv_tau);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

template <int DP, int P>
size_t forward_smem() {
  return 2 * kTile * kLd<DP> * sizeof(bf16) + kTile * kSLd * sizeof(float) + (P + 1) * kTile * sizeof(int64_t);
}

template <int DP, int P>
size_t backward_smem() {
  return 2 * kTile * kLd<DP> * sizeof(bf16) + kTile * kSLd * sizeof(float) + kTile * kHLd * sizeof(bf16) +
         2 * (P + 1) * kTile * sizeof(int64_t) + 2 * (1 << P) * kTile * sizeof(float);
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename F>
cudaError_t with_dims(int dim, int sets, F&& f) {
  auto by_p = [&](auto dp) {
    if (sets == 1) return f(dp, std::integral_constant<int, 1>{});
    return f(dp, std::integral_constant<int, 2>{});
  };
  if (dim <= 64) return by_p(std::integral_constant<int, 64>{});
  if (dim <= 128) return by_p(std::integral_constant<int, 128>{});
  return by_p(std::integral_constant<int, 256>{});
}

template <int DP, int P, bool ROW_SIDE, bool COL_SIDE>
cudaError_t launch_pass(const BackwardParams& prm, cudaStream_t stream) {
  auto kernel = backward_kernel<DP, P, ROW_SIDE, COL_SIDE>;
  const size_t smem = backward_smem<DP, P>();
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  if (prm.a_count == 0) return cudaSuccess;  // no rows to write (an empty k): a zero-block grid is an error
  kernel<<<static_cast<unsigned>(cdiv(prm.a_count, kTile)), kThreads, smem, stream>>>(prm);
  return cudaGetLastError();
}

}  // namespace

int forward_splits(int64_t rows, int64_t cols, int multiprocessors) {
  const int64_t row_tiles = cdiv(rows, kTile);
  const int64_t want = cdiv(2 * static_cast<int64_t>(multiprocessors), row_tiles);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, cols / 1024, 8})));
}

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  const Attributes& at = args.at;
  const int64_t col_tiles = cdiv(at.cols, kTile);
  int64_t* tile_lo = args.col_tile_range;
  int64_t* tile_hi = args.col_tile_range + col_tiles;
  if (col_tiles > 0) {
    tile_ranges_kernel<<<static_cast<unsigned>(cdiv(col_tiles, 256)), 256, 0, stream>>>(at.col_groups, at.cols,
                                                                                       tile_lo, tile_hi);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const ForwardParams prm{static_cast<const bf16*>(args.q), static_cast<const bf16*>(args.k), args.dim, at,
                          kLog2e / args.tau, args.partial, tile_lo, tile_hi};
  return with_dims(args.dim, at.sets, [&](auto dp, auto pc) -> cudaError_t {
    constexpr int DP = decltype(dp)::value, P = decltype(pc)::value;
    auto kernel = forward_kernel<DP, P>;
    const size_t smem = forward_smem<DP, P>();
    cudaError_t e = allow_smem(kernel, smem);
    if (e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>(cdiv(at.rows, kTile)), static_cast<unsigned>(args.splits));
    kernel<<<grid, kThreads, smem, stream>>>(prm);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    combine_kernel<P><<<static_cast<unsigned>(cdiv(at.rows, 256)), 256, 0, stream>>>(
        args.partial, args.splits, at.rows, args.loss, args.valid, args.lse_all, args.lse_pos);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  const Attributes& at = args.at;
  const int64_t span = cdiv(std::max(at.rows, at.cols), kTile);
  int64_t* col_lo = args.tile_ranges;  // tiles of the columns of k (by col_groups)
  int64_t* col_hi = col_lo + span;
  int64_t* row_lo = col_hi + span;     // tiles of the rows of q (by row_groups)
  int64_t* row_hi = row_lo + span;
  tile_ranges_kernel<<<static_cast<unsigned>(cdiv(span, 256)), 256, 0, stream>>>(at.col_groups, at.cols, col_lo,
                                                                                 col_hi);
  tile_ranges_kernel<<<static_cast<unsigned>(cdiv(span, 256)), 256, 0, stream>>>(at.row_groups, at.rows, row_lo,
                                                                                 row_hi);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned table_blocks = static_cast<unsigned>(cdiv(at.rows, 256));
  if (at.sets == 1)
    gradient_tables_kernel<1><<<table_blocks, 256, 0, stream>>>(args.grad, args.lse_all, args.lse_pos, at.rows, args.tables);
  else
    gradient_tables_kernel<2><<<table_blocks, 256, 0, stream>>>(args.grad, args.lse_all, args.lse_pos, at.rows, args.tables);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const float scale2 = kLog2e / args.tau, inv_tau = 1.0f / args.tau;
  const auto* q = static_cast<const bf16*>(args.q);
  const auto* k = static_cast<const bf16*>(args.k);
  return with_dims(args.dim, at.sets, [&](auto dp, auto pc) -> cudaError_t {
    constexpr int DP = decltype(dp)::value, P = decltype(pc)::value;
    if (args.one_tower) {
      const BackwardParams prm{q, q, static_cast<bf16*>(args.dq), at.rows, at.rows, args.dim, at, args.tables,
                               col_lo, col_hi, row_lo, row_hi, scale2, inv_tau};
      return launch_pass<DP, P, true, true>(prm, stream);
    }
    const BackwardParams dq{q, k, static_cast<bf16*>(args.dq), at.rows, at.cols, args.dim, at, args.tables,
                            col_lo, col_hi, row_lo, row_hi, scale2, inv_tau};
    cudaError_t e = launch_pass<DP, P, true, false>(dq, stream);
    if (e != cudaSuccess) return e;
    const BackwardParams dk{k, q, static_cast<bf16*>(args.dk), at.cols, at.rows, args.dim, at, args.tables,
                            col_lo, col_hi, row_lo, row_hi, scale2, inv_tau};
    return launch_pass<DP, P, false, true>(dk, stream);
  });
}

}  // namespace suncet::cuda
