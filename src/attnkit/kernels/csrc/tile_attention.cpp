// attnkit's compiled CPU tile kernel: FlashAttention-2 forward and backward over a block plan.
//
// The plan arrives as CSR arrays over query blocks: block b reads key tiles col[ptr[b] .. ptr[b+1]), and
// part[t] is -1 for a full tile (no mask evaluated) or the row of `forbid` (P, Nm, Bq, Bk) holding that
// partial tile's forbidden pairs; span (P, Nm, Bq, 2) holds, for a partial tile whose every row allows one
// interval of keys, that interval [lo, hi) (lo = Bk, hi = 0 for a row with none), and lo = -1 for the other
// partial tiles. Consecutive key tiles form runs (up to kMaxRun keys), read in place by one BLAS GEMM with
// leading dimensions (no gathered copies). A run whose first (last) tile is an interval tile narrows each row
// to the columns [a, b) that can hold an allowed key: the exponentials and the mask are evaluated there only,
// the rest of the row is zero (a +-128 window: 257 of the 320 columns of a 64-row block):
//
//   S = scale Q_b K_run^T ;  S = -inf where a partial tile forbids
//   m' = max(m, rowmax S) ;  P = exp(S - m') ;  l = l e^(m - m') + rowsum P ;  O = O e^(m - m') + P V_run
//   out = O / l ;  lse = m + log l      (a row with no allowed key: out 0, lse -inf)
//
// Backward, one batch row (batch x head) per task so dK and dV have one writer (no atomics):
//
//   P = exp(S - lse) ;  dV_run += P^T dO ;  dS = P (dO V_run^T - rowsum(dO O)) ;  dQ_b += scale dS K_run ;
//   dK_run += scale dS^T Q_b
//
// float32 runs on MKL's sgemm (exported by libtorch_cpu), float64 (gradcheck) on dgemm; the caller converts
// half inputs to float32. exp(x) is floored at -60 and zeroed there (no subnormals reach the GEMMs). With
// `check`, the forward also reports whether every row it read (the query rows of blocks with tiles, the key and
// value rows of the plan's tiles) was finite, so its caller can skip a separate pass over the inputs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

constexpr int64_t kMaxRun = 512;  // keys of one GEMM: the scores of a 64-row block stay in the L2 cache

// Row-major C (m x n) = alpha op(A) op(B) + beta C, via the column-major BLAS (C^T = op(B)^T op(A)^T).
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = (int)m, in = (int)n, ik = (int)k, ilda = (int)lda, ildb = (int)ldb, ildc = (int)ldc;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    dgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
}

// exp(x) for x <= 0, floored: x < -60 gives 0. float: Cephes-style polynomial (rel. error ~2e-7), written so
// the compiler vectorizes the loops that call it; double: std::exp.
inline float exp_floor(float x) {
  const bool zero = !(x >= -60.0f);  // also -inf and NaN
  x = zero ? 0.0f : x;
  const float log2e = 1.44269504088896341f;
  float n = x * log2e + 12582912.0f;  // round to nearest
  n -= 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return zero ? 0.0f : p * scale;
}
inline double exp_floor(double x) { return x >= -60.0 ? std::exp(x) : 0.0; }

constexpr int kLanes = 16;  // partial results per reduction, so the compiler vectorizes it

template <typename T>
inline T row_max(const T* x, int64_t n, T init) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 acc = _mm256_set1_ps(init);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    float mx = init;
    for (int l = 0; l < 8; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
    for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
    return mx;
  }
#endif
  T acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = init;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  T mx = init;
  for (int l = 0; l < kLanes; ++l) mx = acc[l] > mx ? acc[l] : mx;
  for (; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

#if defined(__AVX2__) && defined(__FMA__)
// exp_floor on 8 floats (the same polynomial): the loops below would not vectorize the scalar one.
inline __m256 exp_floor8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-60.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // false for x < -60, -inf and NaN
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}
#endif

// x[j] = exp_floor(x[j] - shift); returns the sum.
template <typename T>
inline T exp_sum(T* x, int64_t n, T shift) {
  int64_t j = 0;
  T sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp_floor8(_mm256_sub_ps(_mm256_loadu_ps(x + j), sh));
      _mm256_storeu_ps(x + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int l = 0; l < 8; ++l) sum += lanes[l];
  }
#endif
  for (; j < n; ++j) {
    const T e = exp_floor(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

// Jobs [0, total) handed out one at a time to at::parallel_for's threads (each runs init() once, then body(job)
// for every job it takes): a thread slowed by another process on its core simply takes fewer jobs, where a
// static split would make the whole call wait for it.
template <typename Init, typename Body>
inline void dynamic_for(int64_t total, Init init, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = init();
    for (int64_t job = next.fetch_add(1); job < total; job = next.fetch_add(1)) body(state, job);
  });
}

// The kernel's outputs (out, lse, dq, dk, dv) come from a small cache of the buffers that earlier outputs freed.
// A fresh buffer costs one page fault per 4 KiB page on first touch (about 13 ms for a 32 MiB output on the
// 2-core VM it was measured on, a tenth of the window forward's time), and glibc returns every allocation of
// 32 MiB or more to the system when it is freed; a reused buffer costs none. The cache holds at most
// ATTNKIT_NATIVE_POOL_MB MiB (default 256; 0 turns it off), keeps only buffers of 1 MiB or more, matches sizes
// exactly, and frees the oldest buffers first when it is full.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: tensors may free into it at exit
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (auto n : sizes) numel *= n;
    const size_t bytes = (size_t)numel * options.dtype().itemsize();
    if (bytes < kMinBytes || bytes > cap_) return at::empty(sizes, options);
    void* data = take(bytes);
    return at::from_blob(data, sizes, [this, bytes](void* p) { give(p, bytes); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  BufferPool() {
    const char* env = std::getenv("ATTNKIT_NATIVE_POOL_MB");
    const long mb = env ? std::strtol(env, nullptr, 10) : 256;
    cap_ = mb > 0 ? (size_t)mb << 20 : 0;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->first == bytes) {
          void* p = it->second;
          held_ -= bytes;
          free_.erase(std::next(it).base());
          return p;
        }
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0) throw std::bad_alloc();
    return p;
  }

  void give(void* p, size_t bytes) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (held_ + bytes > cap_ && !free_.empty()) {
        held_ -= free_.front().first;
        evicted.push_back(free_.front().second);
        free_.pop_front();
      }
      free_.emplace_back(bytes, p);
      held_ += bytes;
    }
    for (void* e : evicted) std::free(e);
  }

  std::mutex mu_;
  std::list<std::pair<size_t, void*>> free_;  // oldest first
  size_t held_ = 0, cap_ = 0;
};

struct Plan {
  const int64_t* ptr;   // (nq + 1,)
  const int64_t* col;   // (T,) key tile ids, ascending within a block
  const int64_t* part;  // (T,) -1 full, else row of forbid
  const bool* forbid;   // (P, Nm, Bq, Bk)
  const int32_t* span;  // (P, Nm, Bq, 2): [lo, hi) of an interval tile's rows; lo = -1 for the other tiles
  const bool* first;    // (T,) whether tile position t is the first use of its key tile col[t]
  int64_t Nm, block, L, S;
};

// Runs of consecutive tiles of block b: calls f(t0, t1) for tile positions [t0, t1) of col.
template <typename F>
inline void for_runs(const Plan& pl, int64_t b, F f) {
  const int64_t per_run = std::max<int64_t>(1, kMaxRun / pl.block);
  int64_t t = pl.ptr[b], end = pl.ptr[b + 1];
  while (t < end) {
    int64_t u = t + 1;
    while (u < end && pl.col[u] == pl.col[u - 1] + 1 && u - t < per_run) ++u;
    f(t, u);
    t = u;
  }
}

// The span rows of tile position t, or nullptr where the tile is full or not an interval tile.
inline const int32_t* interval_rows(const Plan& pl, int64_t n, int64_t t) {
  const int64_t p = pl.part[t];
  if (p < 0) return nullptr;
  const int32_t* sp = pl.span + (p * pl.Nm + (pl.Nm == 1 ? 0 : n)) * pl.block * 2;
  return sp[0] < 0 ? nullptr : sp;
}

// Columns [a[i], b[i]) of the run's rows that can hold an allowed key (see the header), and (s not null; rows
// ld apart) -inf where a narrowed end tile's interval leaves a gap inside [a, b) (a first tile's row allowing
// [lo, hi) with hi < Bk); returns whether the first and the last tile were narrowed (their masks then need no
// evaluation).
template <typename T>
inline std::pair<bool, bool> row_spans(const Plan& pl, int64_t n, int64_t t0, int64_t t1, int64_t m, int64_t w,
                                       T* s, int64_t ld, int64_t* a, int64_t* b) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int32_t* first = interval_rows(pl, n, t0);
  const int32_t* last = interval_rows(pl, n, t1 - 1);
  const int64_t Bk = pl.block, c_last = (t1 - 1 - t0) * Bk;  // the runs' tiles are consecutive
  for (int64_t i = 0; i < m; ++i) {
    T* row = s ? s + i * ld : nullptr;  // null: the spans only
    int64_t lo = 0, hi = w;
    if (first) {
      lo = first[2 * i];
      const int64_t gap = first[2 * i + 1];  // allowed [lo, gap) of the first tile
      if (t1 - 1 == t0) hi = std::min<int64_t>(gap, w);
      else if (row && lo < gap && gap < Bk) std::fill(row + gap, row + Bk, ninf);
    }
    if (last && t1 - 1 > t0) {
      const int64_t l0 = last[2 * i], l1 = last[2 * i + 1];
      hi = std::min<int64_t>(c_last + l1, w);
      if (row && 0 < l0 && l0 < l1) std::fill(row + c_last, row + std::min<int64_t>(c_last + l0, w), ninf);
      if (l0 >= l1) hi = c_last;  // nothing allowed in the last tile
    }
    a[i] = std::min<int64_t>(lo, w);
    b[i] = std::max(a[i], hi);
  }
  return {first != nullptr, last != nullptr};
}

// Set forbidden scores of the run's partial tiles to -inf, except the first and last tiles when `skip` says
// they were narrowed. s: (m, w), rows ld apart, the run starting at key k0.
template <typename T>
inline void mask_run(const Plan& pl, int64_t n, int64_t t0, int64_t t1, int64_t m, int64_t k0, int64_t w, T* s,
                     int64_t ld, std::pair<bool, bool> skip) {
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t Bq = pl.block, Bk = pl.block;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t p = pl.part[t];
    if (p < 0 || (t == t0 && skip.first) || (t == t1 - 1 && skip.second)) continue;
    const bool* f = pl.forbid + ((p * pl.Nm + (pl.Nm == 1 ? 0 : n)) * Bq) * Bk;
    const int64_t c0 = pl.col[t] * Bk - k0, c1 = std::min(c0 + Bk, w);
    for (int64_t i = 0; i < m; ++i) {
      T* row = s + i * ld + c0;
      const bool* fr = f + i * Bk;
      for (int64_t j = 0; j < c1 - c0; ++j) row[j] = fr[j] ? ninf : row[j];
    }
  }
}

// ALiBi, fused: s[i, j] += slope * (key k0 + j - query q0 + i), the bias FlexAttention's
// `score + slopes[h] * (kv_idx - q_idx)` adds (the same product, rounded once). s: (m, w), rows ld apart.
template <typename T>
inline void add_alibi(T* s, int64_t m, int64_t w, int64_t ld, int64_t q0, int64_t k0, T slope) {
  for (int64_t i = 0; i < m; ++i) {
    T* row = s + i * ld;
    const T base = (T)(k0 - q0 - i);
    for (int64_t j = 0; j < w; ++j) row[j] += slope * (base + (T)j);
  }
}

constexpr int64_t kNR = 16;  // keys per packed panel (two AVX2 vectors)
constexpr int kMR = 6;       // query rows per register tile
constexpr int64_t kChunk = 8;  // consecutive query blocks per forward job when the keys are packed

#if defined(__AVX2__) && defined(__FMA__)
// Panel p of one batch row's keys, transposed: dst[d 16 + c] = k[(16 p + c) D + d]; zero past S.
inline void pack_panel(const float* k, int64_t S, int64_t D, int64_t p, float* dst) {
  for (int64_t c = 0; c < kNR; ++c) {
    const int64_t key = p * kNR + c;
    if (key < S) {
      const float* row = k + key * D;
      for (int64_t d = 0; d < D; ++d) dst[d * kNR + c] = row[d];
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * kNR + c] = 0.0f;
    }
  }
}

// s[r, 16 j .. 16 j + 16) = scale q[r] . keys of panel j, for r < MR and npanels panels: 12 accumulators.
template <int MR>
inline void qk_tiles(const float* q, int64_t D, const float* kp, int64_t npanels, float scale, float* s,
                     int64_t ld) {
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t j = 0; j < npanels; ++j, kp += D * kNR, s += kNR) {
    __m256 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(kp + d * kNR), k1 = _mm256_loadu_ps(kp + d * kNR + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 x = _mm256_broadcast_ss(q + r * D + d);
        acc0[r] = _mm256_fmadd_ps(x, k0, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(x, k1, acc1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(s + r * ld, _mm256_mul_ps(acc0[r], sc));
      _mm256_storeu_ps(s + r * ld + 8, _mm256_mul_ps(acc1[r], sc));
    }
  }
}

// [lo, hi): the columns some of the mr rows can use ([min a, max b) over rows with a[i] < b[i]); hi <= lo if none.
inline void group_columns(const int64_t* a, const int64_t* b, int mr, int64_t& lo, int64_t& hi) {
  lo = std::numeric_limits<int64_t>::max();
  hi = 0;
  for (int r = 0; r < mr; ++r) {
    if (a[r] < b[r]) {
      lo = std::min(lo, a[r]);
      hi = std::max(hi, b[r]);
    }
  }
}

// S = scale Q K^T of a block's m rows on the panels that hold some column [a[i], b[i]) of each group of kMR rows
// (the rest of S is left as it is: no one reads it). kp: the run's first panel; s: rows ld apart.
inline void qk_rows(const float* q, int64_t D, const float* kp, int64_t m, const int64_t* a, const int64_t* b,
                    float scale, float* s, int64_t ld) {
  for (int64_t r0 = 0; r0 < m; r0 += kMR) {
    const int mr = (int)std::min<int64_t>(kMR, m - r0);
    int64_t lo, hi;
    group_columns(a + r0, b + r0, mr, lo, hi);
    if (hi <= lo) continue;
    const int64_t p0 = lo / kNR, p1 = (hi + kNR - 1) / kNR;
    const float* qr = q + r0 * D;
    float* sr = s + r0 * ld + p0 * kNR;
    const float* kr = kp + p0 * D * kNR;
    switch (mr) {
      case 6: qk_tiles<6>(qr, D, kr, p1 - p0, scale, sr, ld); break;
      case 5: qk_tiles<5>(qr, D, kr, p1 - p0, scale, sr, ld); break;
      case 4: qk_tiles<4>(qr, D, kr, p1 - p0, scale, sr, ld); break;
      case 3: qk_tiles<3>(qr, D, kr, p1 - p0, scale, sr, ld); break;
      case 2: qk_tiles<2>(qr, D, kr, p1 - p0, scale, sr, ld); break;
      default: qk_tiles<1>(qr, D, kr, p1 - p0, scale, sr, ld); break;
    }
  }
}

// o[r, 0:8 NV] = (init ? 0 : alpha[r] o[r, 0:8 NV]) + sum_{lo <= j < hi} p[r ld + j] v[j Dv + 0:8 NV], r < MR.
template <int MR, int NV>
inline void pv_tile(const float* p, int64_t ld, int64_t lo, int64_t hi, const float* v, int64_t Dv, float* o,
                    bool init, const float* alpha) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    const __m256 a = _mm256_set1_ps(init ? 0.0f : alpha[r]);
    for (int c = 0; c < NV; ++c)
      acc[r][c] = init ? _mm256_setzero_ps() : _mm256_mul_ps(a, _mm256_loadu_ps(o + r * Dv + 8 * c));
  }
  for (int64_t j = lo; j < hi; ++j) {
    __m256 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm256_loadu_ps(v + j * Dv + 8 * c);
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(p + r * ld + j);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm256_fmadd_ps(x, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(o + r * Dv + 8 * c, acc[r][c]);
}

template <int MR>
inline void pv_group(const float* p, int64_t ld, int64_t lo, int64_t hi, const float* v, int64_t Dv, float* o,
                     bool init, const float* alpha) {
  int64_t d0 = 0;
  for (; d0 + 16 <= Dv; d0 += 16) pv_tile<MR, 2>(p, ld, lo, hi, v + d0, Dv, o + d0, init, alpha);
  if (d0 < Dv) pv_tile<MR, 1>(p, ld, lo, hi, v + d0, Dv, o + d0, init, alpha);
}

// O = P V (init: the block's first run) or O = alpha O + P V for a block's m rows, each group of kMR rows over the
// columns [min a, max b) its rows can use (P is zero elsewhere); V read in place, rows Dv apart (Dv % 8 == 0).
inline void pv_rows(const float* p, int64_t ld, int64_t m, const int64_t* a, const int64_t* b, const float* v,
                    int64_t Dv, float* o, bool init, const float* alpha) {
  for (int64_t r0 = 0; r0 < m; r0 += kMR) {
    const int mr = (int)std::min<int64_t>(kMR, m - r0);
    int64_t lo, hi;
    group_columns(a + r0, b + r0, mr, lo, hi);
    if (hi <= lo) lo = hi = 0;
    const float* pr = p + r0 * ld;
    float* orow = o + r0 * Dv;
    switch (mr) {
      case 6: pv_group<6>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
      case 5: pv_group<5>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
      case 4: pv_group<4>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
      case 3: pv_group<3>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
      case 2: pv_group<2>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
      default: pv_group<1>(pr, ld, lo, hi, v, Dv, orow, init, alpha + r0); break;
    }
  }
}
#endif

// Whether every entry of x[0, n) is finite (x * 0 is NaN for a NaN or an inf, 0 otherwise; vectorized).
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l] * T(0);
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) sum += x[j] * T(0);
  return sum == sum;
}

// bad (null: no check) becomes true if a query row of a block with tiles, or a key or value row of a tile in the
// plan, holds a NaN or an inf: the rows the kernel reads, each key tile checked once (at its first use).
template <typename T>
void forward_impl(const T* q, const T* k, const T* v, T* out, T* lse, const Plan& pl, int64_t N, int64_t D,
                  int64_t Dv, T scale, const T* slope, std::atomic<bool>* bad) {
  const int64_t L = pl.L, S = pl.S, Bq = pl.block, Bk = pl.block;
  const int64_t nq = (L + Bq - 1) / Bq;
  const T ninf = -std::numeric_limits<T>::infinity();
  // float32 with AVX2: QK^T on register tiles over key panels, packed per job (a chunk of kChunk consecutive
  // query blocks of one batch row: each key tile is packed once for the blocks of the chunk that read it)
  bool tiles = false;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) tiles = Bk % kNR == 0;
#endif
  const int64_t chunk = tiles ? kChunk : 1, nchunks = (nq + chunk - 1) / chunk;
  auto forward_block = [&](auto& sc, int64_t n, int64_t b) {
    T* mrow = sc.mrow.data();
    T* lrow = sc.lrow.data();
    T* alpha = sc.alpha.data();
    int64_t* ra = sc.ra.data();
    int64_t* rb = sc.rb.data();
    const int64_t q0 = b * Bq, m = std::min(Bq, L - q0);
    const T* qb = q + (n * L + q0) * D;
    const T* kn = k + n * S * D;
    const T* vn = v + n * S * Dv;
    T* ob = out + (n * L + q0) * Dv;  // O accumulates in place: the block's output rows have one writer
    std::fill(mrow, mrow + m, ninf);
    std::fill(lrow, lrow + m, T(0));
    bool first_run = true;
    for_runs(pl, b, [&](int64_t t0, int64_t t1) {
      const int64_t k0 = pl.col[t0] * Bk, w = std::min(pl.col[t1 - 1] * Bk + Bk, S) - k0;
      T* s = sc.sbuf.data();
      const int64_t ld = (w + kNR - 1) / kNR * kNR;  // rows of S: whole key panels
      // S = scale Q K^T
      bool done = false;
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        if (tiles) {  // register tiles on the columns each group of rows needs; the run's panels are in order
          const int64_t slot = std::lower_bound(sc.kt.begin(), sc.kt.end(), pl.col[t0]) - sc.kt.begin();
          row_spans<T>(pl, n, t0, t1, m, w, nullptr, ld, ra, rb);
          qk_rows(qb, D, sc.kpack.data() + slot * Bk * D, m, ra, rb, scale, s, ld);
          done = true;
        }
      }
#endif
      if (!done) gemm<T>(false, true, m, w, D, scale, qb, D, kn + k0 * D, D, T(0), s, ld);
      if (slope) add_alibi(s, m, w, ld, q0, k0, slope[n]);
      mask_run(pl, n, t0, t1, m, k0, w, s, ld, row_spans(pl, n, t0, t1, m, w, s, ld, ra, rb));
      for (int64_t i = 0; i < m; ++i) {
        T* row = s + i * ld;
        const int64_t a = ra[i], e = rb[i];
        const T mx = row_max(row + a, e - a, mrow[i]);
        if (mx == ninf) {  // nothing allowed yet on this row
          std::fill(row, row + w, T(0));
          alpha[i] = T(1);
          continue;
        }
        std::fill(row, row + a, T(0));
        std::fill(row + e, row + w, T(0));
        const T sum = exp_sum(row + a, e - a, mx);
        alpha[i] = mrow[i] == ninf ? T(0) : exp_floor(mrow[i] - mx);
        lrow[i] = lrow[i] * alpha[i] + sum;
        mrow[i] = mx;
      }
      // O = P V (the first run), O = alpha O + P V
      done = false;
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float>) {
        if (tiles && Dv % 8 == 0) {
          pv_rows(s, ld, m, ra, rb, vn + k0 * Dv, Dv, ob, first_run, alpha);
          done = true;
        }
      }
#endif
      if (!done) {
        if (!first_run) {
          for (int64_t i = 0; i < m; ++i) {
            if (alpha[i] != T(1)) {
              T* o = ob + i * Dv;
              for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha[i];
            }
          }
        }
        gemm<T>(false, false, m, Dv, w, T(1), s, ld, vn + k0 * Dv, Dv, first_run ? T(0) : T(1), ob, Dv);
      }
      first_run = false;
    });
    if (first_run) std::fill(ob, ob + m * Dv, T(0));  // a block with no tiles
    T* lb = lse + n * L + q0;
    for (int64_t i = 0; i < m; ++i) {
      const T l = lrow[i];
      const T inv = l > 0 ? T(1) / l : T(0);
      for (int64_t d = 0; d < Dv; ++d) ob[i * Dv + d] *= inv;
      lb[i] = l > 0 ? mrow[i] + std::log(l) : ninf;
    }
    if (bad && !first_run && !bad->load(std::memory_order_relaxed)) {
      bool ok = all_finite(qb, m * D);
      for (int64_t t = pl.ptr[b]; ok && t < pl.ptr[b + 1]; ++t) {
        if (!pl.first[t]) continue;
        const int64_t r0 = pl.col[t] * Bk, r1 = std::min(r0 + Bk, S);
        ok = all_finite(kn + r0 * D, (r1 - r0) * D) && all_finite(vn + r0 * Dv, (r1 - r0) * Dv);
      }
      if (!ok) bad->store(true, std::memory_order_relaxed);
    }
  };
  struct Scratch {
    std::vector<T> sbuf, mrow, lrow, alpha;
    std::vector<int64_t> ra, rb, kt;  // kt: the chunk's key tiles, ascending (their panels lie in kpack in order)
    std::vector<float> kpack;
  };
  dynamic_for(N * nchunks, [&] {
    const int64_t width = (std::max(kMaxRun, pl.block) + kNR - 1) / kNR * kNR;
    return Scratch{std::vector<T>(Bq * width), std::vector<T>(Bq), std::vector<T>(Bq), std::vector<T>(Bq),
                   std::vector<int64_t>(Bq), std::vector<int64_t>(Bq), {}, {}};
  }, [&](Scratch& sc, int64_t job) {
    const int64_t n = job / nchunks, b0 = job % nchunks * chunk, b1 = std::min(b0 + chunk, nq);
#if defined(__AVX2__) && defined(__FMA__)
    if (tiles) {
      sc.kt.assign(pl.col + pl.ptr[b0], pl.col + pl.ptr[b1]);
      std::sort(sc.kt.begin(), sc.kt.end());
      sc.kt.erase(std::unique(sc.kt.begin(), sc.kt.end()), sc.kt.end());
      const int64_t per_tile = Bk / kNR * D * kNR;
      if ((int64_t)sc.kpack.size() < (int64_t)sc.kt.size() * per_tile) sc.kpack.resize(sc.kt.size() * per_tile);
      const float* kn = reinterpret_cast<const float*>(k) + n * S * D;
      for (size_t i = 0; i < sc.kt.size(); ++i)
        for (int64_t p = 0; p < Bk / kNR; ++p)
          pack_panel(kn, S, D, sc.kt[i] * (Bk / kNR) + p, sc.kpack.data() + i * per_tile + p * D * kNR);
    }
#endif
    for (int64_t b = b0; b < b1; ++b) forward_block(sc, n, b);
  });
}

template <typename T>
void backward_impl(const T* q, const T* k, const T* v, const T* out, const T* dout, const T* lse, T* dq, T* dk,
                   T* dv, const Plan& pl, int64_t N, int64_t D, int64_t Dv, T scale, const T* slope) {
  const int64_t L = pl.L, S = pl.S, Bq = pl.block;
  const int64_t nq = (L + Bq - 1) / Bq;
  struct Scratch {
    std::vector<T> pbuf, dsbuf, delta, lrow;
    std::vector<int64_t> ra, rb;
  };
  const int64_t width = std::max(kMaxRun, pl.block);
  dynamic_for(N, [&] {
    return Scratch{std::vector<T>(Bq * width), std::vector<T>(Bq * width), std::vector<T>(Bq), std::vector<T>(Bq),
                   std::vector<int64_t>(Bq), std::vector<int64_t>(Bq)};
  }, [&](Scratch& sc, int64_t n) {
    auto& pbuf = sc.pbuf; auto& dsbuf = sc.dsbuf; auto& delta = sc.delta; auto& lrow = sc.lrow;
    int64_t* ra = sc.ra.data();
    int64_t* rb = sc.rb.data();
    {
      const T* kn = k + n * S * D;
      const T* vn = v + n * S * Dv;
      T* dkn = dk + n * S * D;
      T* dvn = dv + n * S * Dv;
      std::fill(dkn, dkn + S * D, T(0));
      std::fill(dvn, dvn + S * Dv, T(0));
      for (int64_t b = 0; b < nq; ++b) {
        const int64_t q0 = b * Bq, m = std::min(Bq, L - q0);
        const T* qb = q + (n * L + q0) * D;
        const T* dob = dout + (n * L + q0) * Dv;
        const T* ob = out + (n * L + q0) * Dv;
        T* dqb = dq + (n * L + q0) * D;
        std::fill(dqb, dqb + m * D, T(0));
        for (int64_t i = 0; i < m; ++i) {  // rowsum(dO O); lse -inf (empty row) -> +inf so P = 0
          T acc = 0;
          for (int64_t d = 0; d < Dv; ++d) acc += dob[i * Dv + d] * ob[i * Dv + d];
          delta[i] = acc;
          const T l = lse[n * L + q0 + i];
          lrow[i] = std::isfinite(l) ? l : std::numeric_limits<T>::infinity();
        }
        for_runs(pl, b, [&](int64_t t0, int64_t t1) {
          const int64_t k0 = pl.col[t0] * pl.block, w = std::min(pl.col[t1 - 1] * pl.block + pl.block, S) - k0;
          T* p = pbuf.data();
          T* ds = dsbuf.data();
          // P = exp(scale Q K^T - lse)
          gemm<T>(false, true, m, w, D, scale, qb, D, kn + k0 * D, D, T(0), p, w);
          if (slope) add_alibi(p, m, w, w, q0, k0, slope[n]);
          mask_run(pl, n, t0, t1, m, k0, w, p, w, row_spans(pl, n, t0, t1, m, w, p, w, ra, rb));
          for (int64_t i = 0; i < m; ++i) {
            T* row = p + i * w;
            std::fill(row, row + ra[i], T(0));
            std::fill(row + rb[i], row + w, T(0));
            exp_sum(row + ra[i], rb[i] - ra[i], lrow[i]);
          }
          // dV += P^T dO
          gemm<T>(true, false, w, Dv, m, T(1), p, w, dob, Dv, T(1), dvn + k0 * Dv, Dv);
          // dP = dO V^T ; dS = P (dP - delta)
          gemm<T>(false, true, m, w, Dv, T(1), dob, Dv, vn + k0 * Dv, Dv, T(0), ds, w);
          for (int64_t i = 0; i < m; ++i) {  // zero outside [a, b), where P is
            T* dr = ds + i * w;
            const T* pr = p + i * w;
            const T di = delta[i];
            std::fill(dr, dr + ra[i], T(0));
            for (int64_t j = ra[i]; j < rb[i]; ++j) dr[j] = pr[j] * (dr[j] - di);
            std::fill(dr + rb[i], dr + w, T(0));
          }
          // dQ += scale dS K ; dK += scale dS^T Q
          gemm<T>(false, false, m, D, w, scale, ds, w, kn + k0 * D, D, T(1), dqb, D);
          gemm<T>(true, false, w, D, m, scale, ds, w, qb, D, T(1), dkn + k0 * D, D);
        });
      }
    }
  });
}

Plan make_plan(const at::Tensor& ptr, const at::Tensor& col, const at::Tensor& part, const at::Tensor& forbid,
               const at::Tensor& span, const at::Tensor& first, int64_t block, int64_t L, int64_t S) {
  TORCH_CHECK(ptr.dtype() == at::kLong && col.dtype() == at::kLong && part.dtype() == at::kLong,
              "plan indices must be int64");
  TORCH_CHECK(forbid.dtype() == at::kBool && forbid.dim() == 4 && forbid.is_contiguous(),
              "forbid must be a contiguous bool (P, Nm, Bq, Bk) tensor");
  TORCH_CHECK(span.dtype() == at::kInt && span.dim() == 4 && span.is_contiguous() && span.size(0) == forbid.size(0) &&
              span.size(1) == forbid.size(1) && span.size(2) == forbid.size(2) && span.size(3) == 2,
              "span must be a contiguous int32 (P, Nm, Bq, 2) tensor beside forbid");
  TORCH_CHECK(first.dtype() == at::kBool && first.is_contiguous() && first.numel() == col.numel(),
              "first must be a contiguous bool tensor of col's length");
  TORCH_CHECK(ptr.numel() == (L + block - 1) / block + 1, "ptr must hold one entry per query block, plus one");
  return Plan{ptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), part.data_ptr<int64_t>(),
              forbid.data_ptr<bool>(), span.data_ptr<int32_t>(), first.data_ptr<bool>(), forbid.size(1), block, L,
              S};
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->is_contiguous(), "q, k, v must be contiguous CPU (N, len, d)");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) && q.size(2) == k.size(2),
              "q, k, v shapes disagree");
}

// slope: empty (no ALiBi) or (N,) in q's dtype, one ALiBi slope per batch row (batch x head)
void check_slope(const at::Tensor& slope, const at::Tensor& q) {
  if (slope.numel() == 0) return;
  TORCH_CHECK(slope.device().is_cpu() && slope.dim() == 1 && slope.is_contiguous() && slope.size(0) == q.size(0) &&
              slope.scalar_type() == q.scalar_type(), "slope must be a contiguous (N,) CPU tensor of q's dtype");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ptr,
                                const at::Tensor& col, const at::Tensor& part, const at::Tensor& forbid,
                                const at::Tensor& span, const at::Tensor& first, int64_t block, double scale,
                                const at::Tensor& slope, bool check) {
  check_qkv(q, k, v);
  check_slope(slope, q);
  const int64_t N = q.size(0), L = q.size(1), D = q.size(2), S = k.size(1), Dv = v.size(2);
  Plan pl = make_plan(ptr, col, part, forbid, span, first, block, L, S);
  auto& pool = BufferPool::get();
  auto out = pool.empty({N, L, Dv}, q.options());
  auto lse = pool.empty({N, L}, q.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attnkit_native_forward", [&] {
    forward_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), pl, N, D, Dv, (scalar_t)scale,
                           slope.numel() ? slope.data_ptr<scalar_t>() : nullptr, check ? &bad : nullptr);
  });
  return {out, lse, at::scalar_tensor(check && !bad.load(), at::kBool)};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& ptr,
                                 const at::Tensor& col, const at::Tensor& part, const at::Tensor& forbid,
                                 const at::Tensor& span, const at::Tensor& first, int64_t block, double scale,
                                 const at::Tensor& slope) {
  check_qkv(q, k, v);
  check_slope(slope, q);
  TORCH_CHECK(out.is_contiguous() && dout.is_contiguous() && lse.is_contiguous(), "out, dout, lse must be contiguous");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
              lse.scalar_type() == q.scalar_type(), "out, dout, lse must share q's dtype");
  const int64_t N = q.size(0), L = q.size(1), D = q.size(2), S = k.size(1), Dv = v.size(2);
  Plan pl = make_plan(ptr, col, part, forbid, span, first, block, L, S);
  auto& pool = BufferPool::get();
  auto dq = pool.empty(q.sizes(), q.options()), dk = pool.empty(k.sizes(), k.options());
  auto dv = pool.empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attnkit_native_backward", [&] {
    backward_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), pl, N, D,
                            Dv, (scalar_t)scale, slope.numel() ? slope.data_ptr<scalar_t>() : nullptr);
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "tile attention forward over a CSR block plan (optional fused ALiBi): (out, lse, "
        "finite: with check, whether every row it read was finite)");
  m.def("backward", &backward, "tile attention backward over a CSR block plan (optional fused ALiBi): (dq, dk, dv)");
}
