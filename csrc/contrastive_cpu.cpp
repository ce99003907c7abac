// CPU kernels of the fused multi-positive contrastive loss: tiled, OpenMP over row tiles,
// AVX-512 (or whatever -march gives) through GCC vector extensions, fp32 accumulation
// (fp64 for fp64 inputs, through the same tiling code so that gradcheck exercises it).
//
// Work is organised in row tiles of kRowTile rows against column tiles of up to 8 panels of
// kPanel columns; a task takes a few consecutive row tiles through each column tile in turn. A similarity tile is computed into a thread-local buffer (micro-kernel of
// kMicroRows rows x one panel, D innermost, the panel transposed in memory so that columns are
// the vector lanes), then transformed in place (forward: online log-sum-exp; backward: the
// gradient coefficient of every entry), and in the backward multiplied back onto the columns'
// rows (micro-kernel of kAccRows rows x up to 4 vectors of D). Nothing of size rows x columns
// is ever stored; extra memory is the packed fp32 copies of q and k and O(rows) statistics.
//
// Numerics: similarities are kept in log2 units (s * log2(e) / tau). The forward tracks a
// running maximum for the allowed columns and one per positive-key set, and evaluates ONE
// exponential per entry, relative to the smallest maximum among the sets the entry belongs to;
// per-row factors (all <= 1) carry it to the other sums. No exponential of a positive number
// is ever taken, and positive sums cannot underflow relative to their own maximum. The backward
// uses the same trick with the final LSEs (see gradient_tables).
#include "contrastive.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <unordered_map>

namespace suncet {
namespace {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t IV __attribute__((vector_size(64)));
  using Id = int32_t;
  static constexpr int L = 16;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t IV __attribute__((vector_size(64)));
  using Id = int64_t;
  static constexpr int L = 8;
};

constexpr int kMicroRows = 8;        // rows of the similarity micro-kernel
constexpr int kAccRows = 6;          // rows of the accumulation micro-kernel
constexpr int kAccVecs = 4;          // vectors of D per accumulation micro-kernel call
constexpr int64_t kRowTile = 48;     // multiple of kMicroRows and kAccRows
constexpr int kPanelsPerTile = 8;    // column tile = 8 panels (256 fp32 columns)
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

template <typename T>
constexpr int64_t kPanel = 2 * Simd<T>::L;  // columns per transposed panel: two vectors
template <typename T>
constexpr int64_t kColTile = kPanelsPerTile * kPanel<T>;

// An offset that sends exp2(s - offset) to exactly 0: used for rows that receive no gradient.
template <typename T>
constexpr T kDeadOffset = T(1e30);

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

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

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
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(m)); ++l) m = std::max(m, v[l]);
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
// panels as [cols_pad / kPanel][D][kPanel]; both zero-padded, both in the accumulation type.

template <typename T>
int64_t padded_rows(int64_t n) {
  return std::max(round_up(n, kRowTile), round_up(n, kPanel<T>));
}

template <typename T, typename S>
std::vector<T> pack_rows(const S* src, int64_t rows, int64_t d, int64_t dp) {
  std::vector<T> out(static_cast<size_t>(padded_rows<T>(rows) * dp), T(0));
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t x = 0; x < d; ++x) out[r * dp + x] = static_cast<T>(src[r * d + x]);
  });
  return out;
}

template <typename T, typename S>
std::vector<T> pack_panels(const S* src, int64_t cols, int64_t d) {
  constexpr int64_t np = kPanel<T>;
  const int64_t cols_pad = padded_rows<T>(cols);
  std::vector<T> out(static_cast<size_t>(cols_pad * d), T(0));
  at::parallel_for(0, cols, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* panel = out.data() + (c / np) * d * np + (c % np);
      for (int64_t x = 0; x < d; ++x) panel[x * np] = static_cast<T>(src[c * d + x]);
    }
  });
  return out;
}

// Whether every value of a packed buffer is finite. NaN and inf times 0 are NaN, so one
// vector sum of x * 0 answers it; the op then returns NaN losses and gradients, because an
// online maximum or a masked sum could otherwise turn a non-finite input into a finite loss.
template <typename T>
bool all_finite(const std::vector<T>& packed) {
  using V = typename Simd<T>::V;
  constexpr size_t L = Simd<T>::L;
  V acc{};
  size_t i = 0;
  for (; i + L <= packed.size(); i += L) acc += load<V>(packed.data() + i) * T(0);
  double tail = hsum(acc);
  for (; i < packed.size(); ++i) tail += static_cast<double>(packed[i]) * 0.0;
  return std::isfinite(tail);
}

// Equality-preserving maps of int64 keys to the vector lane integer type (int32 beside fp32):
// a row attribute and its column counterpart are mapped together, so equal values stay equal.
template <typename Id>
void equality_ids(const int64_t* a, int64_t a_stride, int64_t na, const int64_t* b, int64_t b_stride, int64_t nb,
                  Id* out_a, Id* out_b) {
  if constexpr (sizeof(Id) == sizeof(int64_t)) {
    for (int64_t i = 0; i < na; ++i) out_a[i] = a[i * a_stride];
    for (int64_t i = 0; i < nb; ++i) out_b[i] = b[i * b_stride];
  } else {
    int64_t lo = std::numeric_limits<int64_t>::max();
    int64_t hi = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < na; ++i) lo = std::min(lo, a[i * a_stride]), hi = std::max(hi, a[i * a_stride]);
    for (int64_t i = 0; i < nb; ++i) lo = std::min(lo, b[i * b_stride]), hi = std::max(hi, b[i * b_stride]);
    if (lo >= std::numeric_limits<Id>::min() && hi <= std::numeric_limits<Id>::max()) {
      for (int64_t i = 0; i < na; ++i) out_a[i] = static_cast<Id>(a[i * a_stride]);
      for (int64_t i = 0; i < nb; ++i) out_b[i] = static_cast<Id>(b[i * b_stride]);
      return;
    }
    std::unordered_map<int64_t, Id> ids;
    auto id_of = [&](int64_t v) { return ids.emplace(v, static_cast<Id>(ids.size())).first->second; };
    for (int64_t i = 0; i < na; ++i) out_a[i] = id_of(a[i * a_stride]);
    for (int64_t i = 0; i < nb; ++i) out_b[i] = id_of(b[i * b_stride]);
  }
}

// Keys and groups of both sides, as lane integers, padded so that any tile may read them.
template <typename T, int P>
struct Attributes {
  using Id = typename Simd<T>::Id;
  std::vector<Id> row_key[P], col_key[P], row_group, col_group;
  int64_t rows = 0, cols = 0;

  Attributes(const at::Tensor& row_keys, const at::Tensor& col_keys, const at::Tensor& row_groups,
             const at::Tensor& col_groups) {
    rows = row_keys.size(0);
    cols = col_keys.size(0);
    const int64_t row_len = padded_rows<T>(rows) + kColTile<T>;
    const int64_t col_len = padded_rows<T>(cols) + kColTile<T>;
    for (int p = 0; p < P; ++p) {
      row_key[p].assign(row_len, 0);
      col_key[p].assign(col_len, 0);
      equality_ids(row_keys.data_ptr<int64_t>() + p, P, rows, col_keys.data_ptr<int64_t>() + p, P, cols,
                   row_key[p].data(), col_key[p].data());
    }
    row_group.assign(row_len, 0);
    col_group.assign(col_len, 0);
    equality_ids(row_groups.data_ptr<int64_t>(), 1, rows, col_groups.data_ptr<int64_t>(), 1, cols, row_group.data(),
                 col_group.data());
  }
};

// Range of lane ids over each tile of `tile` entries (only the first n entries count), so that
// tiles whose row and column groups cannot meet are skipped.
template <typename Id>
struct TileRanges {
  std::vector<Id> lo, hi;
  TileRanges(const std::vector<Id>& ids, int64_t n, int64_t tile) {
    const int64_t tiles = (n + tile - 1) / tile;
    lo.assign(tiles, std::numeric_limits<Id>::max());
    hi.assign(tiles, std::numeric_limits<Id>::min());
    for (int64_t i = 0; i < n; ++i) {
      lo[i / tile] = std::min(lo[i / tile], ids[i]);
      hi[i / tile] = std::max(hi[i / tile], ids[i]);
    }
  }
  bool meets(int64_t t, const TileRanges& other, int64_t u) const {
    return lo[t] <= other.hi[u] && other.lo[u] <= hi[t];
  }
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
      micro_similarity(a + r * dp, dp, panel, d, s + r * kColTile<T> + p * kPanel<T>, kColTile<T>);
  }
}

// acc[r][vectors] += sum_j h[r][j] * b[j][vectors], for kAccRows rows and VECS vectors of D.
template <typename T, int VECS>
inline void micro_accumulate(const T* h, int64_t ldh, const T* b, int64_t ldb, int64_t ncols, T* acc,
                             int64_t ldacc) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  V c[kAccRows][VECS];
#pragma GCC unroll 6
  for (int r = 0; r < kAccRows; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) c[r][w] = load<V>(acc + r * ldacc + w * L);
  for (int64_t j = 0; j < ncols; ++j) {
    V bv[VECS];
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) bv[w] = load<V>(b + j * ldb + w * L);
#pragma GCC unroll 6
    for (int r = 0; r < kAccRows; ++r) {
      const T hv = h[r * ldh + j];
#pragma GCC unroll 4
      for (int w = 0; w < VECS; ++w) c[r][w] += hv * bv[w];
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < kAccRows; ++r)
#pragma GCC unroll 4
    for (int w = 0; w < VECS; ++w) store(acc + r * ldacc + w * L, c[r][w]);
}

// acc [kRowTile][dp] += h [kRowTile][ncols] @ b [ncols][dp].
template <typename T>
void accumulate_tile(const T* h, const T* b, int64_t dp, int64_t ncols, T* acc) {
  const int64_t vecs = dp / Simd<T>::L;
  for (int64_t r = 0; r < kRowTile; r += kAccRows) {
    for (int64_t v = 0; v < vecs; v += kAccVecs) {
      const int64_t off = v * Simd<T>::L;
      const T* hr = h + r * kColTile<T>;
      T* ar = acc + r * dp + off;
      switch (std::min<int64_t>(kAccVecs, vecs - v)) {
        case 4: micro_accumulate<T, 4>(hr, kColTile<T>, b + off, dp, ncols, ar, dp); break;
        case 3: micro_accumulate<T, 3>(hr, kColTile<T>, b + off, dp, ncols, ar, dp); break;
        case 2: micro_accumulate<T, 2>(hr, kColTile<T>, b + off, dp, ncols, ar, dp); break;
        default: micro_accumulate<T, 1>(hr, kColTile<T>, b + off, dp, ncols, ar, dp); break;
      }
    }
  }
}

// Row tiles per task: several, so that a column tile read from memory is reused from cache by
// each of them (it matters once q and k outgrow the caches), while leaving about eight tasks per
// thread for the dynamic schedule to balance.
int64_t tiles_per_task(int64_t row_tiles) {
  return std::clamp<int64_t>(row_tiles / (8 * static_cast<int64_t>(at::get_num_threads())), 1, 4);
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
        if (code >> p & 1) o = std::min(o, max_pos[p]);
      offset[code] = o;
      to_all[code] = static_cast<T>(std::exp2(static_cast<double>(o - max_all)));
      for (int p = 0; p < P; ++p)
        to_pos[p][code] = (code >> p & 1) ? static_cast<T>(std::exp2(static_cast<double>(o - max_pos[p]))) : T(0);
    }
  }
};

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

// One row of a similarity tile through the online log-sum-exp. `s` holds raw dot products of
// columns [j0, j0 + width); it is overwritten (scaled and masked) between the two passes.
template <typename T, int P>
void forward_row(T* s, int64_t width, int64_t j0, const Attributes<T, P>& at, int64_t i, int64_t self_col, T scale2,
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
    const IV allowed = (c < limit) & (load<IV>(at.col_group.data() + j0 + v) == group) & (c != self);
    V x = load<V>(s + v) * scale2;
    x = allowed ? x : ninf;
    store(s + v, x);
    tile_all = vmax(tile_all, x);
    for (int p = 0; p < P; ++p) {
      const IV member = load<IV>(at.col_key[p].data() + j0 + v) == key[p];
      tile_pos[p] = member ? vmax(tile_pos[p], x) : tile_pos[p];
    }
  }
  bool changed = false;
  const T new_all = std::max(st.max_all, hmax(tile_all));
  if (new_all != st.max_all) {
    st.sum_all *= std::exp2(static_cast<double>(st.max_all - new_all));
    st.max_all = new_all;
    changed = true;
  }
  for (int p = 0; p < P; ++p) {
    const T new_pos = std::max(st.max_pos[p], hmax(tile_pos[p]));
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
    for (int p = 0; p < P; ++p) member[p] = load<IV>(at.col_key[p].data() + j0 + v) == key[p];
    const V e = exp2v(load<V>(s + v) - select_code<T, P>(member, st.offset));
    acc_all += e * select_code<T, P>(member, st.to_all);
    for (int p = 0; p < P; ++p) acc_pos[p] += member[p] ? e * select_code<T, P>(member, st.to_pos[p]) : V{};
  }
  st.sum_all += hsum(acc_all);
  for (int p = 0; p < P; ++p) st.sum_pos[p] += hsum(acc_pos[p]);
}

template <typename T, int P, typename S>
void forward_impl(const S* q_data, const S* k_data, int64_t d, const Attributes<T, P>& at, int64_t self_offset,
                  double tau, bool one_tower, T* loss, bool* valid, T* lse_all, T* lse_pos) {
  using Id = typename Simd<T>::Id;
  const int64_t m = at.rows, n = at.cols;
  const int64_t dp = round_up(d, Simd<T>::L);
  const std::vector<T> rows = pack_rows<T>(q_data, m, d, dp);
  const std::vector<T> panels = pack_panels<T>(one_tower ? q_data : k_data, n, d);
  const T scale2 = static_cast<T>(kLog2e / tau);
  const TileRanges<Id> row_ranges(at.row_group, m, kRowTile), col_ranges(at.col_group, n, kColTile<T>);
  const int64_t row_tiles = (m + kRowTile - 1) / kRowTile;
  const int64_t col_tiles = (n + kColTile<T> - 1) / kColTile<T>;
  const int64_t cols_pad = round_up(n, kPanel<T>);

  if (!all_finite(rows) || !all_finite(panels)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    std::fill(loss, loss + m * P, nan);
    std::fill(lse_all, lse_all + m, nan);
    std::fill(lse_pos, lse_pos + m * P, nan);
    std::fill(valid, valid + m * P, false);
    return;
  }
  const int64_t per_task = tiles_per_task(row_tiles);
  const int64_t tasks = (row_tiles + per_task - 1) / per_task;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> tile(static_cast<size_t>(kRowTile * kColTile<T>));
    std::vector<RowStats<T, P>> stats(kRowTile * per_task);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t first_tile = task * per_task, end_tile = std::min(first_tile + per_task, row_tiles);
      const int64_t r_first = first_tile * kRowTile, r_end = std::min(end_tile * kRowTile, m);
      for (auto& st : stats) st.reset();
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t j0 = ct * kColTile<T>;
        const int64_t width = std::min(kColTile<T>, cols_pad - j0);
        for (int64_t rt = first_tile; rt < end_tile; ++rt) {
          if (!row_ranges.meets(rt, col_ranges, ct)) continue;
          const int64_t r0 = rt * kRowTile;
          similarity_tile(rows.data() + r0 * dp, dp, panels.data() + j0 * d, d, width / kPanel<T>, tile.data());
          for (int64_t i = r0; i < std::min(r0 + kRowTile, m); ++i) {
            const int64_t self_col = (i + self_offset >= 0 && i + self_offset < n) ? i + self_offset : -1;
            forward_row<T, P>(tile.data() + (i - r0) * kColTile<T>, width, j0, at, i, self_col, scale2,
                              stats[i - r_first]);
          }
        }
      }
      for (int64_t i = r_first; i < r_end; ++i) {
        const RowStats<T, P>& st = stats[i - r_first];
        const double all2 = st.sum_all > 0 ? st.max_all + std::log2(st.sum_all) : -INFINITY;
        lse_all[i] = static_cast<T>(all2 * kLn2);
        for (int p = 0; p < P; ++p) {
          const bool ok = st.sum_pos[p] > 0;
          const double pos2 = ok ? st.max_pos[p] + std::log2(st.sum_pos[p]) : -INFINITY;
          lse_pos[i * P + p] = static_cast<T>(pos2 * kLn2);
          valid[i * P + p] = ok;
          loss[i * P + p] = ok ? static_cast<T>((all2 - pos2) * kLn2) : T(0);
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
// matching combination of g and LSE differences (see gradient_tables). Rows without any valid
// set get a dead offset and a zero coefficient.

template <typename T, int P>
struct GradientTables {
  static constexpr int codes = 1 << P;
  std::vector<T> offset[codes], coef[codes];  // per row of q, log2 units / natural units
};

template <typename T, int P>
GradientTables<T, P> gradient_tables(const T* grad, const T* lse_all, const T* lse_pos, int64_t m) {
  constexpr int codes = 1 << P;
  GradientTables<T, P> t;
  const int64_t len = padded_rows<T>(m) + kColTile<T>;
  for (int c = 0; c < codes; ++c) t.offset[c].assign(len, kDeadOffset<T>), t.coef[c].assign(len, T(0));
  for (int64_t i = 0; i < m; ++i) {
    const double all2 = static_cast<double>(lse_all[i]) * kLog2e;
    double pos2[P], g[P], g_sum = 0;
    bool ok[P], any = false;
    for (int p = 0; p < P; ++p) {
      ok[p] = std::isfinite(static_cast<double>(lse_pos[i * P + p]));
      pos2[p] = ok[p] ? static_cast<double>(lse_pos[i * P + p]) * kLog2e : 0.0;
      g[p] = ok[p] ? static_cast<double>(grad[i * P + p]) : 0.0;
      g_sum += g[p];
      any = any || ok[p];
    }
    if (!any) continue;
    for (int c = 0; c < codes; ++c) {
      bool reachable = true;
      double o = all2;
      for (int p = 0; p < P; ++p)
        if (c >> p & 1) reachable = reachable && ok[p], o = std::min(o, pos2[p]);
      if (!reachable) continue;
      double coef = g_sum * std::exp2(o - all2);
      for (int p = 0; p < P; ++p)
        if (c >> p & 1) coef -= g[p] * std::exp2(o - pos2[p]);
      t.offset[c][i] = static_cast<T>(o);
      t.coef[c][i] = static_cast<T>(coef);
    }
  }
  return t;
}

// What one pass needs to know about its rows (a) and columns (b). The row side treats a as rows
// of q and b as columns of k; the column side treats b as rows of q and a as columns of k (the
// transposed term G_ba). A one-tower pass uses both sides on the same tensor.
template <typename T, int P>
struct PassSides {
  const Attributes<T, P>& at;
  const GradientTables<T, P>& tables;
  int64_t self_offset;
};

template <typename T, int P, bool ROW_SIDE, bool COL_SIDE>
void gradient_row(T* s, int64_t width, int64_t j0, int64_t b_count, int64_t a, const PassSides<T, P>& ps, T scale2) {
  using V = typename Simd<T>::V;
  using IV = typename Simd<T>::IV;
  using Id = typename Simd<T>::Id;
  constexpr int L = Simd<T>::L;
  constexpr int codes = 1 << P;
  const Attributes<T, P>& at = ps.at;
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
    for (int code = 0; code < codes; ++code) r_offset[code] = ps.tables.offset[code][a], r_coef[code] = ps.tables.coef[code][a];
    const int64_t self_col = a + ps.self_offset;
    if (self_col >= 0 && self_col < at.cols) r_self = splat<IV>(static_cast<Id>(self_col));
  }
  // Column side: b is a row of q, a a column of k.
  Id c_group = 0, c_key[P] = {};
  const T* c_offset[codes] = {};
  const T* c_coef[codes] = {};
  IV c_self = splat<IV>(Id(-1));
  if constexpr (COL_SIDE) {
    c_group = at.col_group[a];
    for (int p = 0; p < P; ++p) c_key[p] = at.col_key[p][a];
    for (int code = 0; code < codes; ++code) c_offset[code] = ps.tables.offset[code].data(), c_coef[code] = ps.tables.coef[code].data();
    const int64_t self_row = a - ps.self_offset;
    if (self_row >= 0 && self_row < at.rows) c_self = splat<IV>(static_cast<Id>(self_row));
  }

  for (int64_t v = 0; v < width; v += L, c += L) {
    const int64_t j = j0 + v;
    const V x = load<V>(s + v) * scale2;
    V h = V{};
    if constexpr (ROW_SIDE) {
      const IV allowed = (c < limit) & (load<IV>(at.col_group.data() + j) == r_group) & (c != r_self);
      IV member[P];
      for (int p = 0; p < P; ++p) member[p] = load<IV>(at.col_key[p].data() + j) == r_key[p];
      const V e = exp2v(x - select_code<T, P>(member, r_offset));
      h = allowed ? e * select_code<T, P>(member, r_coef) : h;
    }
    if constexpr (COL_SIDE) {
      const IV allowed = (c < limit) & (load<IV>(at.row_group.data() + j) == c_group) & (c != c_self);
      IV member[P];
      for (int p = 0; p < P; ++p) member[p] = load<IV>(at.row_key[p].data() + j) == c_key[p];
      const V e = exp2v(x - select_code<T, P>(member, c_offset, j));
      h += allowed ? e * select_code<T, P>(member, c_coef, j) : V{};
    }
    store(s + v, h);
  }
}

// d a_rows = (1 / tau) sum_b H_ab b_b over all b, one row tile per task.
template <typename T, int P, bool ROW_SIDE, bool COL_SIDE, typename S>
void gradient_pass(const S* a_data, int64_t a_count, const S* b_data, int64_t b_count, int64_t d,
                   const PassSides<T, P>& ps, double tau, S* out) {
  using Id = typename Simd<T>::Id;
  const Attributes<T, P>& at = ps.at;
  const int64_t dp = round_up(d, Simd<T>::L);
  const bool same = a_data == b_data && a_count == b_count;
  const std::vector<T> a_rows = pack_rows<T>(a_data, a_count, d, dp);
  std::vector<T> b_rows_storage;
  if (!same) b_rows_storage = pack_rows<T>(b_data, b_count, d, dp);
  const std::vector<T>& b_rows = same ? a_rows : b_rows_storage;
  const std::vector<T> panels = pack_panels<T>(b_data, b_count, d);
  const T scale2 = static_cast<T>(kLog2e / tau);
  const T out_scale = static_cast<T>(1.0 / tau);

  // Group ranges of the a tiles and b tiles in the role each side gives them.
  const std::vector<Id>& a_groups_row = ROW_SIDE ? at.row_group : at.col_group;
  const std::vector<Id>& b_groups_row = ROW_SIDE ? at.col_group : at.row_group;
  const TileRanges<Id> a_row(a_groups_row, a_count, kRowTile), b_col(b_groups_row, b_count, kColTile<T>);
  const TileRanges<Id> a_col(at.col_group, COL_SIDE ? a_count : 0, kRowTile);
  const TileRanges<Id> b_row(at.row_group, COL_SIDE ? b_count : 0, kColTile<T>);

  const int64_t row_tiles = (a_count + kRowTile - 1) / kRowTile;
  const int64_t col_tiles = (b_count + kColTile<T> - 1) / kColTile<T>;
  const int64_t cols_pad = round_up(b_count, kPanel<T>);

  if (!all_finite(a_rows) || !all_finite(panels)) {
    std::fill(out, out + a_count * d, static_cast<S>(std::numeric_limits<T>::quiet_NaN()));
    return;
  }
  const int64_t per_task = tiles_per_task(row_tiles);
  const int64_t tasks = (row_tiles + per_task - 1) / per_task;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> tile(static_cast<size_t>(kRowTile * kColTile<T>));
    std::vector<T> acc(static_cast<size_t>(kRowTile * per_task * dp));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t first_tile = task * per_task, end_tile = std::min(first_tile + per_task, row_tiles);
      const int64_t r_first = first_tile * kRowTile, r_end = std::min(end_tile * kRowTile, a_count);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int64_t j0 = ct * kColTile<T>;
        const int64_t width = std::min(kColTile<T>, cols_pad - j0);
        for (int64_t rt = first_tile; rt < end_tile; ++rt) {
          bool meets = false;
          if constexpr (ROW_SIDE && COL_SIDE) {
            meets = a_row.meets(rt, b_col, ct) || a_col.meets(rt, b_row, ct);
          } else {
            meets = a_row.meets(rt, b_col, ct);
          }
          if (!meets) continue;
          const int64_t r0 = rt * kRowTile;
          const int64_t rows_here = std::min(kRowTile, a_count - r0);
          similarity_tile(a_rows.data() + r0 * dp, dp, panels.data() + j0 * d, d, width / kPanel<T>, tile.data());
          for (int64_t r = 0; r < kRowTile; ++r) {
            T* row = tile.data() + r * kColTile<T>;
            if (r < rows_here)
              gradient_row<T, P, ROW_SIDE, COL_SIDE>(row, width, j0, b_count, r0 + r, ps, scale2);
            else
              std::fill(row, row + width, T(0));
          }
          accumulate_tile(tile.data(), b_rows.data() + j0 * dp, dp, width, acc.data() + (r0 - r_first) * dp);
        }
      }
      for (int64_t i = r_first; i < r_end; ++i)
        for (int64_t x = 0; x < d; ++x) out[i * d + x] = static_cast<S>(acc[(i - r_first) * dp + x] * out_scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys, const at::Tensor& col_keys,
                  const at::Tensor& row_groups, const at::Tensor& col_groups, bool one_tower) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "q and k must be [rows, D] of the same D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have the same dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "the cpu backend takes CPU tensors");
  TORCH_CHECK(!one_tower || q.size(0) == k.size(0), "one_tower needs k to be q");
  TORCH_CHECK(row_keys.dim() == 2 && col_keys.dim() == 2 && row_keys.size(1) == col_keys.size(1),
              "keys must be [rows, P] and [cols, P]");
  TORCH_CHECK(row_keys.size(1) == 1 || row_keys.size(1) == 2, "1 or 2 positive-key sets are supported");
  TORCH_CHECK(row_keys.size(0) == q.size(0) && col_keys.size(0) == k.size(0), "one key row per row of q and of k");
  TORCH_CHECK(row_groups.dim() == 1 && row_groups.size(0) == q.size(0) && col_groups.dim() == 1 &&
                  col_groups.size(0) == k.size(0),
              "one group per row of q and of k");
  for (const at::Tensor* t : {&row_keys, &col_keys, &row_groups, &col_groups})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device().is_cpu(), "keys and groups must be int64 CPU tensors");
}

at::ScalarType stats_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

template <typename F>
void dispatch_p(int64_t p, F&& f) {
  if (p == 1)
    f(std::integral_constant<int, 1>{});
  else
    f(std::integral_constant<int, 2>{});
}

}  // namespace

std::vector<at::Tensor> multi_positive_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_keys,
                                                   const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                   const at::Tensor& col_groups, int64_t self_offset, double tau,
                                                   bool one_tower) {
  check_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  TORCH_CHECK(tau > 0, "tau must be positive");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  const int64_t m = q.size(0), p_sets = row_keys.size(1);
  const auto st = q.options().dtype(stats_type(q.scalar_type()));
  at::Tensor loss = at::empty({m, p_sets}, st), lse_all = at::empty({m}, st), lse_pos = at::empty({m, p_sets}, st);
  at::Tensor valid = at::empty({m, p_sets}, q.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "multi_positive_forward_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    dispatch_p(p_sets, [&](auto pc) {
      constexpr int P = decltype(pc)::value;
      const Attributes<T, P> attrs(rk, ck, rg, cg);
      forward_impl<T, P>(qc.data_ptr<S>(), kc.data_ptr<S>(), q.size(1), attrs, self_offset, tau, one_tower,
                         loss.data_ptr<T>(), valid.data_ptr<bool>(), lse_all.data_ptr<T>(), lse_pos.data_ptr<T>());
    });
  });
  return {loss, valid, lse_all, lse_pos};
}

std::vector<at::Tensor> multi_positive_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& row_keys,
                                                    const at::Tensor& col_keys, const at::Tensor& row_groups,
                                                    const at::Tensor& col_groups, const at::Tensor& lse_all,
                                                    const at::Tensor& lse_pos, int64_t self_offset, double tau,
                                                    bool one_tower) {
  check_inputs(q, k, row_keys, col_keys, row_groups, col_groups, one_tower);
  const int64_t m = q.size(0), n = k.size(0), d = q.size(1), p_sets = row_keys.size(1);
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == m && grad_loss.size(1) == p_sets,
              "grad_loss must be [rows, P]");
  TORCH_CHECK(lse_all.numel() == m && lse_pos.numel() == m * p_sets, "statistics do not match q");
  const at::ScalarType st = stats_type(q.scalar_type());
  const at::Tensor g = grad_loss.to(st).contiguous(), la = lse_all.to(st).contiguous(), lp = lse_pos.to(st).contiguous();
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  const at::Tensor rk = row_keys.contiguous(), ck = col_keys.contiguous();
  const at::Tensor rg = row_groups.contiguous(), cg = col_groups.contiguous();
  at::Tensor dq = at::empty_like(qc);
  at::Tensor dk = one_tower ? at::empty({0, d}, q.options()) : at::empty_like(kc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "multi_positive_backward_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    dispatch_p(p_sets, [&](auto pc) {
      constexpr int P = decltype(pc)::value;
      const Attributes<T, P> attrs(rk, ck, rg, cg);
      const GradientTables<T, P> tables = gradient_tables<T, P>(g.data_ptr<T>(), la.data_ptr<T>(), lp.data_ptr<T>(), m);
      const PassSides<T, P> sides{attrs, tables, self_offset};
      if (one_tower) {
        gradient_pass<T, P, true, true>(qc.data_ptr<S>(), m, qc.data_ptr<S>(), m, d, sides, tau, dq.data_ptr<S>());
      } else {
        gradient_pass<T, P, true, false>(qc.data_ptr<S>(), m, kc.data_ptr<S>(), n, d, sides, tau, dq.data_ptr<S>());
        gradient_pass<T, P, false, true>(kc.data_ptr<S>(), n, qc.data_ptr<S>(), m, d, sides, tau, dk.data_ptr<S>());
      }
    });
  });
  return {dq, dk};
}

}  // namespace suncet
