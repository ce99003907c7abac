// CPU kernels of the fused multi-positive contrastive loss, built once per instruction-set
// variant (CMakeLists.txt passes SUNCET_CPU_VARIANT and the variant's flags; the vector width
// and the register blocking follow from the flags): tiled, OpenMP over row tiles, GCC vector
// extensions, fp32 accumulation (fp64 for fp64 inputs, through the same tiling code so that
// gradcheck exercises it). contrastive_cpu.cpp chooses a variant at run time.
//
// Work is organised in row tiles of kRowTile rows against column tiles of kColTile columns; a
// task takes a few consecutive row tiles through each column tile in turn. A similarity tile is
// computed into a thread-local buffer (micro-kernel of kMicroRows rows x one panel of two
// vectors, D innermost, the panel transposed in memory so that columns are the vector lanes),
// then transformed in place (forward: online log-sum-exp; backward: the gradient coefficient of
// every entry), and in the backward multiplied back onto the columns' rows (micro-kernel of
// kAccRows rows x up to kAccVecs vectors of D). Nothing of size rows x columns is ever stored;
// extra memory is the packed copies of q and k and O(rows) statistics.
//
// Register blocking: the similarity micro-kernel keeps 2 * kMicroRows accumulators and the
// accumulation one kAccRows * kAccVecs, plus the vectors loaded beside them: AVX-512 has 32
// vector registers, AVX2 and SSE 16, so each gets the largest blocking that does not spill.
//
// Numerics: similarities are kept in log2 units (s * log2(e) / tau). The forward tracks a
// running maximum for the allowed columns and one per positive-key set, and evaluates ONE
// exponential per entry, relative to the smallest maximum among the sets the entry belongs to;
// per-row factors (all <= 1) carry it to the other sums. No exponential of a positive number
// is ever taken, and positive sums cannot underflow relative to their own maximum. The backward
// uses the same trick with the final LSEs (contrastive_cpu.cpp, gradient_tables).
//
// This file includes no ATen and no standard container: see contrastive_cpu_kernels.h.
#include "contrastive_cpu_kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>

#ifndef SUNCET_CPU_VARIANT
#error "SUNCET_CPU_VARIANT must name the variant (avx512, avx2 or generic)"
#endif

namespace suncet::cpu::SUNCET_CPU_VARIANT {
namespace {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kMicroRows = 8;  // 16 accumulators + 2 panel vectors of 32 registers
constexpr int kAccRows = 6;    // 24 accumulators + 4 loaded vectors
constexpr int kAccVecs = 4;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
constexpr int kMicroRows = 6;  // 12 accumulators + 2 panel vectors + 1 broadcast of 16 registers
constexpr int kAccRows = 6;
constexpr int kAccVecs = 2;
#else
constexpr int kVectorBytes = 16;
constexpr int kMicroRows = 6;
constexpr int kAccRows = 6;
constexpr int kAccVecs = 2;
#endif

constexpr int64_t kRowTile = 48;  // a multiple of kMicroRows and kAccRows
constexpr int64_t kColTile = 256;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;
static_assert(kRowTile % kMicroRows == 0 && kRowTile % kAccRows == 0);

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(kVectorBytes)));
  using Id = LaneId<T>;
  typedef Id IV __attribute__((vector_size(kVectorBytes)));
  static constexpr int L = kVectorBytes / sizeof(T);
};

template <typename T>
constexpr int64_t kPanel = 2 * Simd<T>::L;  // columns per transposed panel: two vectors
static_assert(kColTile % kPanel<float> == 0 && kColTile % kPanel<double> == 0);
static_assert(kRowTile - 1 + kColTile <= kAttributePad, "a tile reads past the attribute padding");

// The standard algorithms are templates that every translation unit instantiates under the
// same names: the variant keeps its own few, so that none of its instructions leaks to others.
template <typename I>
inline I lo_of(I a, I b) { return a < b ? a : b; }
template <typename I>
inline I hi_of(I a, I b) { return a < b ? b : a; }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
inline void fill(T* p, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) p[i] = value;
}

// A zero-initialised heap array owned by one scope.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) : data_(new T[n > 0 ? n : 1]()), size_(n) {}
  ~Buffer() { delete[] data_; }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  T* data_;
  int64_t size_;
};

template <typename V, typename S>
inline V load(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename S>
inline void store(S* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename S>
inline V splat(S x) {
  return V{} + x;
}

template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// 2^x with a degree-6 polynomial on the reduced argument (Cephes exp2f coefficients, relative
// error ~2e-7); exactly 0 below -126, which also covers -inf.
inline Simd<float>::V exp2v(Simd<float>::V x) {
  using V = Simd<float>::V;
  using IV = Simd<float>::IV;
  const V lo = splat<V>(-126.0f);
  const V hi = splat<V>(127.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V n = (xc + shifter) - shifter;
  const V f = xc - n;
  V p = splat<V>(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  IV bits;
  std::memcpy(&bits, &p, sizeof(V));
  bits += __builtin_convertvector(n, IV) << 23;
  V r;
  std::memcpy(&r, &bits, sizeof(V));
  return x < lo ? V{} : r;
}

// The fp64 path exists for gradient checks, not speed: the library exp2 per lane.
inline Simd<double>::V exp2v(Simd<double>::V x) {
  Simd<double>::V r;
  for (int l = 0; l < Simd<double>::L; ++l) r[l] = std::exp2(x[l]);
  return r;
}

template <typename V>
inline auto hmax(V v) {
  auto m = v[0];
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(m)); ++l) m = hi_of(m, v[l]);
  return m;
}

template <typename V>
inline double hsum(V v) {
  double s = 0;
  for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) s += v[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Packing: rows as [rows_pad][dp] (dp = D rounded up to a vector), and the columns' transposed
// panels as [cols_pad / kPanel][D][kPanel]; both zero-padded.

template <typename T>
int64_t padded_rows(int64_t n) {
  return hi_of(round_up(n, kRowTile), round_up(n, kPanel<T>));
}

template <typename T>
void pack_rows(const T* src, int64_t rows, int64_t d, int64_t dp, T* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t x = 0; x < d; ++x) out[r * dp + x] = src[r * d + x];
}

template <typename T>
void pack_panels(const T* src, int64_t cols, int64_t d, T* out, int threads) {
  constexpr int64_t np = kPanel<T>;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < cols; ++c) {
    T* panel = out + (c / np) * d * np + (c % np);
    for (int64_t x = 0; x < d; ++x) panel[x * np] = src[c * d + x];
  }
}

// Whether every value of a packed buffer is finite. NaN and inf times 0 are NaN, so one
// vector sum of x * 0 answers it; the op then returns NaN losses and gradients, because an
// online maximum or a masked sum could otherwise turn a non-finite input into a finite loss.
template <typename T>
bool all_finite(const Buffer<T>& packed) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = Simd<T>::L;
  V acc{};
  int64_t i = 0;
  for (; i + L <= packed.size(); i += L) acc += load<V>(packed.data() + i) * T(0);
  double tail = hsum(acc);
  for (; i < packed.size(); ++i) tail += static_cast<double>(packed.data()[i]) * 0.0;
  return std::isfinite(tail);
}

// Range of lane ids over each tile of `tile` entries (only the first n entries count), so that
// tiles whose row and column groups cannot meet are skipped.
template <typename Id>
class TileRanges {
 public:
  TileRanges(const Id* ids, int64_t n, int64_t tile) : lo_((n + tile - 1) / tile), hi_((n + tile - 1) / tile) {
    fill(lo_.data(), lo_.size(), std::numeric_limits<Id>::max());
    fill(hi_.data(), hi_.size(), std::numeric_limits<Id>::min());
    for (int64_t i = 0; i < n; ++i) {
      lo_.data()[i / tile] = lo_of(lo_.data()[i / tile], ids[i]);
      hi_.data()[i / tile] = hi_of(hi_.data()[i / tile], ids[i]);
    }
  }
  bool meets(int64_t t, const TileRanges& other, int64_t u) const {
    return lo_.data()[t] <= other.hi_.data()[u] && other.lo_.data()[u] <= hi_.data()[t];
  }

 private:
  Buffer<Id> lo_, hi_;
};

// ---------------------------------------------------------------------------------------------
// Micro-kernels.

// s[r][0 .. kPanel) = a_r . panel columns, for kMicroRows rows of a.
template <typename T>
inline void micro_similarity(const T* a, int64_t lda, const T* panel, int64_t d, T* s, int64_t lds) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V lo[kMicroRows], hi[kMicroRows];
#pragma GCC unroll 8
  for (int r = 0; r < kMicroRows; ++r) lo[r] = hi[r] = V{};
  for (int64_t x = 0; x < d; ++x) {
    const V b0 = load<V>(panel + x * kPanel<T>);
    const V b1 = load<V>(panel + x * kPanel<T> + L);
#pragma GCC unroll 8
    for (int r = 0; r < kMicroRows; ++r) {
      const T av = a[r * lda + x];
      lo[r] += av * b0;
      hi[r] += av * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMicroRows; ++r) {
    store(s + r * lds, lo[r]);
    store(s + r * lds + L, hi[r]);
  }
}

// One row tile against `panels` panels: s [kRowTile][kColTile].
template <typename T>
void similarity_tile(const T* a, int64_t dp, const T* panels, int64_t d, int64_t n_panels, T* s) {
  for (int64_t p = 0; p < n_panels; ++p) {
    const T* panel = panels + p * d * kPanel<T>;
    for (int64_t r = 0; r < kRowTile; r += kMicroRows)
      micro_similarity(a + r * dp, dp, panel, d, s + r * kColTile + p * kPanel<T>, kColTile);
  }
}

// acc[r][vectors] += sum_j h[r][j] * b[j][vectors], for kAccRows rows and VECS vectors of D.
template <typename T, int VECS>
inline void micro_accumulate(const T* h, int64_t ldh, const T* b, int64_t ldb, int64_t ncols, T* acc,
                             int64_t ldacc) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V c[kAccRows][VECS];
#pragma GCC unroll 8
  for (int r = 0; r < kAccRows; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) c[r][w] = load<V>(acc + r * ldacc + w * L);
  for (int64_t j = 0; j < ncols; ++j) {
    V bv[VECS];
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) bv[w] = load<V>(b + j * ldb + w * L);
#pragma GCC unroll 8
    for (int r = 0; r < kAccRows; ++r) {
      const T hv = h[r * ldh + j];
#pragma GCC unroll 4
      for (int w = 0; w < VECS; ++w) c[r][w] += hv * bv[w];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kAccRows; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) store(acc + r * ldacc + w * L, c[r][w]);
}

template <typename T, int VECS>
inline void accumulate_rows(const T* h, const T* b, int64_t dp, int64_t ncols, T* acc, int64_t vecs) {
  if constexpr (VECS > 0) {
    for (int64_t v = 0; v < vecs; v += VECS) {
      if (vecs - v < VECS) return accumulate_rows<T, VECS - 1>(h, b + v * Simd<T>::L, dp, ncols, acc + v * Simd<T>::L, vecs - v);
      micro_accumulate<T, VECS>(h, kColTile, b + v * Simd<T>::L, dp, ncols, acc + v * Simd<T>::L, dp);
    }
  }
}

// acc [kRowTile][dp] += h [kRowTile][ncols] @ b [ncols][dp].
template <typename T>
void accumulate_tile(const T* h, const T* b, int64_t dp, int64_t ncols, T* acc) {
  const int64_t vecs = dp / Simd<T>::L;
  for (int64_t r = 0; r < kRowTile; r += kAccRows)
    accumulate_rows<T, kAccVecs>(h + r * kColTile, b, dp, ncols, acc + r * dp, vecs);
}

// Row tiles per task: several, so that a column tile read from memory is reused from cache by
// each of them (it matters once q and k outgrow the caches), while leaving about eight tasks per
// thread for the dynamic schedule to balance.
int64_t tiles_per_task(int64_t row_tiles, int threads) {
  return hi_of<int64_t>(lo_of<int64_t>(row_tiles / (8 * static_cast<int64_t>(threads)), 4), 1);
}

// Selects among per-row scalars by which positive-key sets an entry belongs to
// (code = bit p set for set p): table[0] for none, table[1], table[2], table[3] for both.
template <typename T, int P>
inline typename Simd<T>::V select_code(const typename Simd<T>::IV* member, const T* table) {
  using V = typename Simd<T>::V;
  if constexpr (P == 1) {
    return member[0] ? splat<V>(table[1]) : splat<V>(table[0]);
  } else {
    return member[0] ? (member[1] ? splat<V>(table[3]) : splat<V>(table[1]))
                     : (member[1] ? splat<V>(table[2]) : splat<V>(table[0]));
  }
}

template <typename T, int P>
inline typename Simd<T>::V select_code(const typename Simd<T>::IV* member, const T* const* tables, int64_t j) {
  using V = typename Simd<T>::V;
  if constexpr (P == 1) {
    return member[0] ? load<V>(tables[1] + j) : load<V>(tables[0] + j);
  } else {
    return member[0] ? (member[1] ? load<V>(tables[3] + j) : load<V>(tables[1] + j))
                     : (member[1] ? load<V>(tables[2] + j) : load<V>(tables[0] + j));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename T, int P>
struct RowStats {
  static constexpr int codes = 1 << P;
  T max_all, max_pos[P];
  double sum_all, sum_pos[P];  // relative to the maxima
  // Per membership code: the offset of its exponentials (the smallest maximum among its sets)
  // and the factors, all <= 1, that carry them over to each sum's own maximum. They change only
  // when a maximum does, which after the first tiles is rare.
  T offset[codes], to_all[codes], to_pos[P][codes];

  void reset() {
    max_all = std::numeric_limits<T>::lowest() / 4;
    sum_all = 0;
    for (int p = 0; p < P; ++p) max_pos[p] = max_all, sum_pos[p] = 0;
    refresh_tables();
  }

  void refresh_tables() {
    for (int code = 0; code < codes; ++code) {
      T o = max_all;
      for (int p = 0; p < P; ++p)
        if (code >> p & 1) o = lo_of(o, max_pos[p]);
      offset[code] = o;
      to_all[code] = static_cast<T>(std::exp2(static_cast<double>(o - max_all)));
      for (int p = 0; p < P; ++p)
        to_pos[p][code] = (code >> p & 1) ? static_cast<T>(std::exp2(static_cast<double>(o - max_pos[p]))) : T(0);
    }
  }
};

// One row of a similarity tile through the online log-sum-exp. `s` holds raw dot products of
// columns [j0, j0 + width); it is overwritten (scaled and masked) between the two passes.
template <typename T, int P>
void forward_row(T* s, int64_t width, int64_t j0, const Layout<T, P>& at, int64_t i, int64_t self_col, T scale2,
                 RowStats<T, P>& st) {
  using V = typename Simd<T>::V;
  using IV = typename Simd<T>::IV;
  using Id = typename Simd<T>::Id;
  constexpr int L = Simd<T>::L;
  const V ninf = splat<V>(-std::numeric_limits<T>::infinity());
  IV col;
  for (int l = 0; l < L; ++l) col[l] = static_cast<Id>(j0 + l);
  const IV limit = splat<IV>(static_cast<Id>(at.cols));
  const IV self = splat<IV>(static_cast<Id>(self_col));
  const Id group = at.row_group[i];
  Id key[P];
  for (int p = 0; p < P; ++p) key[p] = at.row_key[p][i];

  V tile_all = ninf, tile_pos[P];
  for (int p = 0; p < P; ++p) tile_pos[p] = ninf;
  IV c = col;
  for (int64_t v = 0; v < width; v += L, c += L) {
    const IV allowed = (c < limit) & (load<IV>(at.col_group + j0 + v) == group) & (c != self);
    V x = load<V>(s + v) * scale2;
    x = allowed ? x : ninf;
    store(s + v, x);
    tile_all = vmax(tile_all, x);
    for (int p = 0; p < P; ++p) {
      const IV member = load<IV>(at.col_key[p] + j0 + v) == key[p];
      tile_pos[p] = member ? vmax(tile_pos[p], x) : tile_pos[p];
    }
  }
  bool changed = false;
  const T new_all = hi_of(st.max_all, hmax(tile_all));
  if (new_all != st.max_all) {
    st.sum_all *= std::exp2(static_cast<double>(st.max_all - new_all));
    st.max_all = new_all;
    changed = true;
  }
  for (int p = 0; p < P; ++p) {
    const T new_pos = hi_of(st.max_pos[p], hmax(tile_pos[p]));
    if (new_pos != st.max_pos[p]) {
      st.sum_pos[p] *= std::exp2(static_cast<double>(st.max_pos[p] - new_pos));
      st.max_pos[p] = new_pos;
      changed = true;
    }
  }
  if (changed) st.refresh_tables();

  V acc_all = V{}, acc_pos[P];
  for (int p = 0; p < P; ++p) acc_pos[p] = V{};
  for (int64_t v = 0; v < width; v += L) {
    IV member[P];
    for (int p = 0; p < P; ++p) member[p] = load<IV>(at.col_key[p] + j0 + v) == key[p];
    const V e = exp2v(load<V>(s + v) - select_code<T, P>(member, st.offset));
    acc_all += e * select_code<T, P>(member, st.to_all);
    for (int p = 0; p < P; ++p) acc_pos[p] += member[p] ? e * select_code<T, P>(member, st.to_pos[p]) : V{};
  }
  st.sum_all += hsum(acc_all);
  for (int p = 0; p < P; ++p) st.sum_pos[p] += hsum(acc_pos[p]);
}

template <typename T, int P>
void forward(const ForwardCall<T, P>& call) {
  using Id = typename Simd<T>::Id;
  const Layout<T, P>& at = call.layout;
  const int64_t m = at.rows, n = at.cols, d = call.d;
  const int64_t dp = round_up(d, Simd<T>::L);
  Buffer<T> rows(padded_rows<T>(m) * dp), panels(padded_rows<T>(n) * d);
  pack_rows(call.q, m, d, dp, rows.data(), call.threads);
  pack_panels(call.k, n, d, panels.data(), call.threads);
  const T scale2 = static_cast<T>(kLog2e / call.tau);
  const TileRanges<Id> row_ranges(at.row_group, m, kRowTile), col_ranges(at.col_group, n, kColTile);
  const int64_t row_tiles = (m + kRowTile - 1) / kRowTile;
  const int64_t col_tiles = (n + kColTile - 1) / kColTile;
  const int64_t cols_pad = round_up(n, kPanel<T>);

  if (!all_finite(rows) || !all_finite(panels)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    fill(call.loss, m * P, nan);
    fill(call.lse_all, m, nan);
    fill(call.lse_pos, m * P, nan);
    fill(call.valid, m * P, false);
    return;
  }
  const int64_t per_task = tiles_per_task(row_tiles, call.threads);
  const int64_t tasks = (row_tiles + per_task - 1) / per_task;

#pragma omp parallel num_threads(call.threads)
  {
    Buffer<T> tile(kRowTile * kColTile);
    Buffer<RowStats<T, P>> stats(kRowTile * per_task);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t first_tile = task * per_task, end_tile = lo_of(first_tile + per_task, row_tiles);
      const int64_t r_first = first_tile * kRowTile, r_end = lo_of(end_tile * kRowTile, m);
      for (int64_t s = 0; s < stats.size(); ++s) stats.data()[s].reset();
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t j0 = ct * kColTile;
        const int64_t width = lo_of(kColTile, cols_pad - j0);
        for (int64_t rt = first_tile; rt < end_tile; ++rt) {
          if (!row_ranges.meets(rt, col_ranges, ct)) continue;
          const int64_t r0 = rt * kRowTile;
          similarity_tile(rows.data() + r0 * dp, dp, panels.data() + j0 * d, d, width / kPanel<T>, tile.data());
          for (int64_t i = r0; i < lo_of(r0 + kRowTile, m); ++i) {
            const int64_t self_col = (i + at.self_offset >= 0 && i + at.self_offset < n) ? i + at.self_offset : -1;
            forward_row<T, P>(tile.data() + (i - r0) * kColTile, width, j0, at, i, self_col, scale2,
                              stats.data()[i - r_first]);
          }
        }
      }
      for (int64_t i = r_first; i < r_end; ++i) {
        const RowStats<T, P>& st = stats.data()[i - r_first];
        const double all2 = st.sum_all > 0 ? st.max_all + std::log2(st.sum_all) : -INFINITY;
        call.lse_all[i] = static_cast<T>(all2 * kLn2);
        for (int p = 0; p < P; ++p) {
          const bool ok = st.sum_pos[p] > 0;
          const double pos2 = ok ? st.max_pos[p] + std::log2(st.sum_pos[p]) : -INFINITY;
          call.lse_pos[i * P + p] = static_cast<T>(pos2 * kLn2);
          call.valid[i * P + p] = ok;
          call.loss[i * P + p] = ok ? static_cast<T>((all2 - pos2) * kLn2) : T(0);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.
//
// The gradient of the losses with respect to s_ij is
//   G_ij = sum_p g_ip (pA_ij - [j in P_p(i)] pP_ij),  pA = exp(s - lse_all), pP_p = exp(s - lse_pos_p).
// For an entry whose membership code is c, G_ij = coef_c(i) * exp2(s2_ij - offset_c(i)) with
// offset_c the smallest LSE among the entry's sets (so the exponential is <= 1) and coef_c the
// matching combination of g and LSE differences. Rows without any valid set have a dead offset
// and a zero coefficient.
//
// A pass multiplies the gradient entries of its rows (a) against its columns (b) back onto b.
// The row side treats a as rows of q and b as columns of k; the column side treats b as rows of
// q and a as columns of k (the transposed term G_ba). A one-tower pass uses both sides on the
// same tensor.
template <typename T, int P, bool ROW_SIDE, bool COL_SIDE>
void gradient_row(T* s, int64_t width, int64_t j0, int64_t b_count, int64_t a, const Layout<T, P>& at,
                  const GradientTables<T, P>& tables, T scale2) {
  using V = typename Simd<T>::V;
  using IV = typename Simd<T>::IV;
  using Id = typename Simd<T>::Id;
  constexpr int L = Simd<T>::L;
  constexpr int codes = 1 << P;
  IV c;
  for (int l = 0; l < L; ++l) c[l] = static_cast<Id>(j0 + l);
  const IV limit = splat<IV>(static_cast<Id>(b_count));

  // Row side: a is a row of q, b a column of k.
  Id r_group = 0, r_key[P] = {};
  T r_offset[codes] = {}, r_coef[codes] = {};
  IV r_self = splat<IV>(Id(-1));
  if constexpr (ROW_SIDE) {
    r_group = at.row_group[a];
    for (int p = 0; p < P; ++p) r_key[p] = at.row_key[p][a];
    for (int code = 0; code < codes; ++code) r_offset[code] = tables.offset[code][a], r_coef[code] = tables.coef[code][a];
    const int64_t self_col = a + at.self_offset;
    if (self_col >= 0 && self_col < at.cols) r_self = splat<IV>(static_cast<Id>(self_col));
  }
  // Column side: b is a row of q, a a column of k.
  Id c_group = 0, c_key[P] = {};
  IV c_self = splat<IV>(Id(-1));
  if constexpr (COL_SIDE) {
    c_group = at.col_group[a];
    for (int p = 0; p < P; ++p) c_key[p] = at.col_key[p][a];
    const int64_t self_row = a - at.self_offset;
    if (self_row >= 0 && self_row < at.rows) c_self = splat<IV>(static_cast<Id>(self_row));
  }

  for (int64_t v = 0; v < width; v += L, c += L) {
    const int64_t j = j0 + v;
    const V x = load<V>(s + v) * scale2;
    V h = V{};
    if constexpr (ROW_SIDE) {
      const IV allowed = (c < limit) & (load<IV>(at.col_group + j) == r_group) & (c != r_self);
      IV member[P];
      for (int p = 0; p < P; ++p) member[p] = load<IV>(at.col_key[p] + j) == r_key[p];
      const V e = exp2v(x - select_code<T, P>(member, r_offset));
      h = allowed ? e * select_code<T, P>(member, r_coef) : h;
    }
    if constexpr (COL_SIDE) {
      const IV allowed = (c < limit) & (load<IV>(at.row_group + j) == c_group) & (c != c_self);
      IV member[P];
      for (int p = 0; p < P; ++p) member[p] = load<IV>(at.row_key[p] + j) == c_key[p];
      const V e = exp2v(x - select_code<T, P>(member, tables.offset, j));
      h += allowed ? e * select_code<T, P>(member, tables.coef, j) : V{};
    }
    store(s + v, h);
  }
}

// out = (1 / tau) sum_b H_ab b_b over all b, one row tile per task.
template <typename T, int P, bool ROW_SIDE, bool COL_SIDE>
void gradient_pass(const T* a_data, int64_t a_count, const T* b_data, int64_t b_count, const BackwardCall<T, P>& call,
                   T* out) {
  using Id = typename Simd<T>::Id;
  const Layout<T, P>& at = call.layout;
  const int64_t d = call.d;
  const int64_t dp = round_up(d, Simd<T>::L);
  const bool same = a_data == b_data && a_count == b_count;
  Buffer<T> a_rows(padded_rows<T>(a_count) * dp), b_own(same ? 0 : padded_rows<T>(b_count) * dp);
  Buffer<T> panels(padded_rows<T>(b_count) * d);
  pack_rows(a_data, a_count, d, dp, a_rows.data(), call.threads);
  if (!same) pack_rows(b_data, b_count, d, dp, b_own.data(), call.threads);
  const T* b_rows = same ? a_rows.data() : b_own.data();
  pack_panels(b_data, b_count, d, panels.data(), call.threads);
  const T scale2 = static_cast<T>(kLog2e / call.tau);
  const T out_scale = static_cast<T>(1.0 / call.tau);

  // Group ranges of the a tiles and b tiles in the role each side gives them.
  const Id* a_groups_row = ROW_SIDE ? at.row_group : at.col_group;
  const Id* b_groups_row = ROW_SIDE ? at.col_group : at.row_group;
  const TileRanges<Id> a_row(a_groups_row, a_count, kRowTile), b_col(b_groups_row, b_count, kColTile);
  const TileRanges<Id> a_col(at.col_group, COL_SIDE ? a_count : 0, kRowTile);
  const TileRanges<Id> b_row(at.row_group, COL_SIDE ? b_count : 0, kColTile);

  const int64_t row_tiles = (a_count + kRowTile - 1) / kRowTile;
  const int64_t col_tiles = (b_count + kColTile - 1) / kColTile;
  const int64_t cols_pad = round_up(b_count, kPanel<T>);

  if (!all_finite(a_rows) || !all_finite(panels)) {
    fill(out, a_count * d, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  const int64_t per_task = tiles_per_task(row_tiles, call.threads);
  const int64_t tasks = (row_tiles + per_task - 1) / per_task;

#pragma omp parallel num_threads(call.threads)
  {
    Buffer<T> tile(kRowTile * kColTile);
    Buffer<T> acc(kRowTile * per_task * dp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t first_tile = task * per_task, end_tile = lo_of(first_tile + per_task, row_tiles);
      const int64_t r_first = first_tile * kRowTile, r_end = lo_of(end_tile * kRowTile, a_count);
      fill(acc.data(), acc.size(), T(0));
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t j0 = ct * kColTile;
        const int64_t width = lo_of(kColTile, cols_pad - j0);
        for (int64_t rt = first_tile; rt < end_tile; ++rt) {
          bool meets = false;
          if constexpr (ROW_SIDE && COL_SIDE) {
            meets = a_row.meets(rt, b_col, ct) || a_col.meets(rt, b_row, ct);
          } else {
            meets = a_row.meets(rt, b_col, ct);
          }
          if (!meets) continue;
          const int64_t r0 = rt * kRowTile;
          const int64_t rows_here = lo_of(kRowTile, a_count - r0);
          similarity_tile(a_rows.data() + r0 * dp, dp, panels.data() + j0 * d, d, width / kPanel<T>, tile.data());
          for (int64_t r = 0; r < kRowTile; ++r) {
            T* row = tile.data() + r * kColTile;
            if (r < rows_here)
              gradient_row<T, P, ROW_SIDE, COL_SIDE>(row, width, j0, b_count, r0 + r, at, call.tables, scale2);
            else
              fill(row, width, T(0));
          }
          accumulate_tile(tile.data(), b_rows + j0 * dp, dp, width, acc.data() + (r0 - r_first) * dp);
        }
      }
      for (int64_t i = r_first; i < r_end; ++i)
        for (int64_t x = 0; x < d; ++x) out[i * d + x] = acc.data()[(i - r_first) * dp + x] * out_scale;
    }
  }
}

template <typename T, int P>
void backward(const BackwardCall<T, P>& call) {
  const int64_t m = call.layout.rows, n = call.layout.cols;
  if (call.one_tower) {
    gradient_pass<T, P, true, true>(call.q, m, call.q, m, call, call.dq);
  } else {
    gradient_pass<T, P, true, false>(call.q, m, call.k, n, call, call.dq);
    gradient_pass<T, P, false, true>(call.k, n, call.q, m, call, call.dk);
  }
}

}  // namespace

#define SUNCET_STRING(x) #x
#define SUNCET_NAME_OF(x) SUNCET_STRING(x)

extern const Variant variant{
    .name = SUNCET_NAME_OF(SUNCET_CPU_VARIANT),
    .forward_f32_p1 = &forward<float, 1>,
    .forward_f32_p2 = &forward<float, 2>,
    .forward_f64_p1 = &forward<double, 1>,
    .forward_f64_p2 = &forward<double, 2>,
    .backward_f32_p1 = &backward<float, 1>,
    .backward_f32_p2 = &backward<float, 2>,
    .backward_f64_p1 = &backward<double, 1>,
    .backward_f64_p2 = &backward<double, 2>,
};

}  // namespace suncet::cpu::SUNCET_CPU_VARIANT
