#include "bct_fast/topk_select_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define BCT_FAST_X86_SCANS 1
#endif

namespace bct_fast {

namespace {

// Rank key of a score: a smaller key is a better score (order-preserving float bits, inverted).
// -0.0 is keyed as +0.0: the two compare equal, so they tie and the lower index wins.
inline uint32_t rank_key(float s) {
  s += 0.0f;  // -0.0 -> +0.0 (kept without -ffast-math)
  uint32_t u;
  std::memcpy(&u, &s, sizeof u);
  return ~(u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u));
}

// The score with rank key r (the inverse of rank_key; -0.0 comes back as +0.0, an equal score).
inline float key_score(uint32_t r) {
  uint32_t a = ~r;
  uint32_t u = (a & 0x80000000u) ? (a ^ 0x80000000u) : ~a;
  float s;
  std::memcpy(&s, &u, sizeof s);
  return s;
}

// The k-th smallest of the rank keys r[0..c), 1 <= k <= c: a radix select. Each round makes a
// 256-bin histogram of the keys' range (min to max; a query's candidates share their top bits,
// so the range is what narrows), keeps the bin that holds the k-th key and repeats on its keys;
// a few dozen keys left are finished with nth_element. Linear and branch-light, unlike an
// introselect over 2k + 64 keys.
uint32_t kth_key(const uint32_t* r, int64_t c, int64_t k, std::vector<uint32_t>& tmp) {
  if (static_cast<int64_t>(tmp.size()) < c) tmp.resize(static_cast<size_t>(c));
  const uint32_t* src = r;
  uint32_t lo = ~0u, hi = 0;
  for (int64_t i = 0; i < c; ++i) {
    lo = std::min(lo, r[i]);
    hi = std::max(hi, r[i]);
  }
  uint32_t hist[256];
  while (c > 32 && lo != hi) {
    const uint32_t span = hi - lo;
    const int shift = std::max(0, 32 - __builtin_clz(span) - 8);  // (span >> shift) < 256
    std::memset(hist, 0, sizeof hist);
    for (int64_t i = 0; i < c; ++i) ++hist[(src[i] - lo) >> shift];
    uint32_t b = 0;
    int64_t before = 0;
    while (before + hist[b] < k) before += hist[b++];
    int64_t w = 0;  // the keys of bin b, in tmp (in place when src is tmp: w <= i)
    for (int64_t i = 0; i < c; ++i) {
      const uint32_t v = src[i];
      tmp[w] = v;
      w += ((v - lo) >> shift) == b;
    }
    src = tmp.data();
    c = w;
    k -= before;
    const uint32_t bin_lo = lo + (b << shift);
    hi = std::min<uint64_t>(hi, uint64_t{bin_lo} + ((uint64_t{1} << shift) - 1));
    lo = bin_lo;
  }
  if (lo == hi) return lo;
  if (src != tmp.data()) std::copy(src, src + c, tmp.data());
  std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.begin() + c);
  return tmp[k - 1];
}

// Run fn(q0, q1) over `threads` contiguous query ranges (inline when one thread suffices).
// With OpenMP the ranges run on the process's OpenMP pool: libgomp.so.1 is the library torch
// loads, so this is torch's own pool. Its threads spin for a while after each GEMM; separate
// std::threads would share the cores with those spinning threads (measured: about 20 % of a
// 10k x 10k x 64 search). std::threads remain for builds without OpenMP.
template <typename F>
void parallel_rows(int64_t rows, int threads, F fn) {
  int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  if (t == 1) {
    fn(int64_t{0}, rows);
    return;
  }
  const int64_t step = (rows + t - 1) / t;
#ifdef _OPENMP
#pragma omp parallel for num_threads(t) schedule(static, 1)
  for (int i = 0; i < t; ++i) {
    const int64_t q0 = i * step, q1 = std::min(rows, q0 + step);
    if (q0 < q1) fn(q0, q1);
  }
#else
  std::vector<std::thread> pool;
  for (int i = 1; i < t; ++i) {
    int64_t q0 = i * step, q1 = std::min(rows, q0 + step);
    if (q0 < q1) pool.emplace_back(fn, q0, q1);
  }
  fn(int64_t{0}, std::min(rows, step));
  for (auto& th : pool) th.join();
#endif
}

// ---- positions of the scores above a threshold ------------------------------------------------
// collect(s, n, t, pos): the j < n with s[j] > t, ascending, written to pos (room for n + 16);
// returns their count. The package is built for baseline x86-64, so the vector versions are
// compiled with target attributes and picked once at load time (cpuid).
constexpr int64_t kSpan = 64;  // scores tested at once before any position is written

using CollectFn = int64_t (*)(const float*, int64_t, float, int32_t*);

// Written as an int OR of `>` so that GCC vectorizes it (a bool OR of `!(s <= t)` stays scalar).
inline bool any_above(const float* s, float t) {
  int any = 0;
  for (int64_t i = 0; i < kSpan; ++i) any |= s[i] > t;
  return any != 0;
}

int64_t collect_portable(const float* s, int64_t n, float t, int32_t* pos) {
  int64_t c = 0, j0 = 0;
  for (; j0 + kSpan <= n; j0 += kSpan) {
    if (!any_above(s + j0, t)) continue;
    for (int64_t j = j0; j < j0 + kSpan; ++j) {  // branch-free: write every position, keep the hits
      pos[c] = static_cast<int32_t>(j);
      c += s[j] > t;
    }
  }
  for (int64_t j = j0; j < n; ++j) {
    pos[c] = static_cast<int32_t>(j);
    c += s[j] > t;
  }
  return c;
}

#ifdef BCT_FAST_X86_SCANS
__attribute__((target("avx2,bmi,popcnt"))) int64_t collect_avx2(const float* s, int64_t n, float t, int32_t* pos) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t c = 0, j0 = 0;
  for (; j0 + 32 <= n; j0 += 32) {
    uint32_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j0), tv, _CMP_GT_OQ)));
    m |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j0 + 8), tv, _CMP_GT_OQ))) << 8;
    m |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j0 + 16), tv, _CMP_GT_OQ))) << 16;
    m |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + j0 + 24), tv, _CMP_GT_OQ))) << 24;
    for (; m != 0; m &= m - 1) pos[c++] = static_cast<int32_t>(j0 + __builtin_ctz(m));
  }
  for (int64_t j = j0; j < n; ++j) {
    pos[c] = static_cast<int32_t>(j);
    c += s[j] > t;
  }
  return c;
}

// AVX-512: four compares per 64 scores; the hits' positions are compressed in registers (the
// memory form of vpcompressd is microcoded on AMD Zen 4) and stored 16 at a time.
__attribute__((target("avx512f,popcnt"))) int64_t collect_avx512(const float* s, int64_t n, float t, int32_t* pos) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0, j0 = 0;
  for (; j0 + kSpan <= n; j0 += kSpan) {
    __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j0), tv, _CMP_GT_OQ);
    __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j0 + 16), tv, _CMP_GT_OQ);
    __mmask16 m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j0 + 32), tv, _CMP_GT_OQ);
    __mmask16 m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j0 + 48), tv, _CMP_GT_OQ);
    if ((m0 | m1 | m2 | m3) == 0) continue;
    __m512i base = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j0)));
    const __m512i sixteen = _mm512_set1_epi32(16);
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(m0, base));
    c += __builtin_popcount(m0);
    base = _mm512_add_epi32(base, sixteen);
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(m1, base));
    c += __builtin_popcount(m1);
    base = _mm512_add_epi32(base, sixteen);
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(m2, base));
    c += __builtin_popcount(m2);
    base = _mm512_add_epi32(base, sixteen);
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(m3, base));
    c += __builtin_popcount(m3);
  }
  for (; j0 < n; j0 += 16) {  // the last 1-63 scores, 16 at a time (masked loads at the end)
    const __mmask16 in = n - j0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j0)) - 1);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(in, _mm512_maskz_loadu_ps(in, s + j0), tv, _CMP_GT_OQ);
    const __m512i base = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j0)));
    _mm512_storeu_si512(pos + c, _mm512_maskz_compress_epi32(m, base));
    c += __builtin_popcount(m);
  }
  return c;
}
#endif

// BCT_FAST_CPU_SCAN=avx2|portable (read once, at load) forces a narrower scan than the CPU
// supports, so that tests run every version on one machine; unknown values are ignored.
const char* forced_scan() {
  const char* v = std::getenv("BCT_FAST_CPU_SCAN");
  return v ? v : "";
}

struct PickedScan {
  CollectFn fn;
  const char* name;
};

PickedScan pick_collect() {
  const std::string force = forced_scan();
#ifdef BCT_FAST_X86_SCANS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("popcnt");
  if (force != "avx2" && force != "portable" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt"))
    return {collect_avx512, "avx512"};
  if (force != "portable" && avx2) return {collect_avx2, "avx2"};
#endif
  return {collect_portable, "portable"};
}

const PickedScan picked = pick_collect();
const CollectFn collect = picked.fn;

// Transposed blocks: "does any of 16 queries' scores beat its own threshold" (vectorized by GCC
// when built with -O3; kept scalar-safe for any target).
constexpr int64_t kColSpan = 16;

inline bool any_above_each(const float* s, const float* t) {
  int any = 0;
  for (int64_t i = 0; i < kColSpan; ++i) any |= s[i] > t[i];
  return any != 0;
}

}  // namespace

TopkSelector::TopkSelector(int64_t queries, int64_t k)
    : queries_(queries), k_(k), cap_(2 * k + 64) {
  if (queries < 1 || k < 1) throw std::invalid_argument("TopkSelector: queries and k must be >= 1");
  if (cap_ > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("TopkSelector: k is too large");
  entries_.resize(static_cast<size_t>(queries * cap_));
  count_.assign(static_cast<size_t>(queries), 0);
  // -inf until a query holds k candidates: every finite score enters. (-inf scores, the
  // own row under exclude_self, never do; the caller guarantees k finite candidates exist.)
  threshold_.assign(static_cast<size_t>(queries), -std::numeric_limits<float>::infinity());
}

// Keep the k best of a query's buffer (count > k), in buffer order (= gallery-index order): the
// k-th best rank key by radix select, then one stable, branch-free filter pass that keeps the
// keys below it and the first (lowest-index) of those equal to it.
void TopkSelector::compact(int64_t q) {
  Entry* e = entries_.data() + q * cap_;
  const int64_t c = count_[q];
  thread_local std::vector<uint32_t> rk, tmp;
  if (static_cast<int64_t>(rk.size()) < c) rk.resize(static_cast<size_t>(c));
  for (int64_t i = 0; i < c; ++i) rk[i] = rank_key(e[i].score);
  const uint32_t kth = kth_key(rk.data(), c, k_, tmp);
  int64_t less = 0;
  for (int64_t i = 0; i < c; ++i) less += rk[i] < kth;
  const int64_t ties = k_ - less;  // entries equal to the k-th key that are kept
  int64_t w = 0, seen = 0;
  for (int64_t i = 0; i < c; ++i) {
    const Entry x = e[i];
    const uint32_t v = rk[i];
    e[w] = x;
    w += (v < kth) | ((v == kth) & (seen < ties));
    seen += v == kth;
  }
  count_[q] = w;                  // == k
  threshold_[q] = key_score(kth);  // the k-th best: all kept are at least this good
}

// A query's first block: its threshold starts at the k-th best of a strided sample of 8k scores
// (lowered by one ulp), not at -inf. The k-th best of any subset of the row is at most the row's
// k-th best, so a score below it has k better ones and cannot be in the top-k; scores equal to it
// still enter, so ties keep going to the lower index. The sample's k-th best is about the row's
// (n / 8)-th best, so the first scan admits ~n / 8 scores instead of everything up to the first
// compaction and all that the lagging threshold lets through after it (an 8192-score block at
// k = 100: ~800 pushes and 4 compactions per query before, ~350 and 1 after, in a simulation).
void TopkSelector::first_threshold(int64_t q, const float* row, int64_t n, std::vector<uint32_t>& keys,
                                   std::vector<uint32_t>& tmp) {
  const int64_t m = std::min<int64_t>(n, 8 * k_);
  const int64_t stride = n / m;  // >= 1; the sample is row[0], row[stride], ...
  if (static_cast<int64_t>(keys.size()) < m) keys.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) keys[i] = rank_key(row[i * stride]);
  const float t0 = key_score(kth_key(keys.data(), m, k_, tmp));
  threshold_[q] = std::nextafter(t0, -std::numeric_limits<float>::infinity());
}

// Cloned for AVX-512 / AVX2 (GCC function multiversioning) for the transposed-block test.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define BCT_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BCT_FAST_SIMD_CLONES
#endif

BCT_FAST_SIMD_CLONES void TopkSelector::add_rows(const float* scores, int64_t q0, int64_t q1, int64_t n,
                            int64_t q_stride, int64_t col_stride, int64_t n0) {
  // A score enters when it beats the query's threshold (-inf until the query holds k).
  // A full buffer is compacted first (any layout may leave it full), which may raise the threshold.
  auto push = [&](int64_t q, float s, int64_t j) {
    if (count_[q] == cap_) {
      compact(q);
      if (!(s > threshold_[q])) return;
    }
    entries_[q * cap_ + count_[q]++] = Entry{s, n0 + j};
  };
  if (col_stride == 1 && n <= std::numeric_limits<int32_t>::max() - kSpan) {
    // Row-major block: the positions above the threshold are found with vector compares, then
    // pushed without branches on the scores; a full buffer is compacted (raising the threshold),
    // and the remaining positions are tested against the raised threshold.
    thread_local std::vector<int32_t> pos_buf;
    if (static_cast<int64_t>(pos_buf.size()) < n + 16) pos_buf.resize(static_cast<size_t>(n + 16));
    // A local pointer: through the thread_local vector the push loop re-derived the address
    // (a __tls_get_addr call) on every candidate, since compact() might have changed it.
    int32_t* const pos = pos_buf.data();
    thread_local std::vector<uint32_t> sample_keys, sample_tmp;
    for (int64_t q = q0; q < q1; ++q) {
      const float* row = scores + q * q_stride;
      if (count_[q] == 0 && n >= 2 * cap_) first_threshold(q, row, n, sample_keys, sample_tmp);
      const int64_t hits = collect(row, n, threshold_[q], pos);
      if (hits == 0) continue;
      Entry* e = entries_.data() + q * cap_;
      float t = threshold_[q];
      int64_t c = count_[q];
      for (int64_t i = 0; i < hits; ++i) {
        if (c == cap_) {
          count_[q] = c;
          compact(q);
          c = count_[q];
          t = threshold_[q];
        }
        const int32_t j = pos[i];
        const float s = row[j];
        e[c] = Entry{s, n0 + j};
        c += s > t;
      }
      count_[q] = c;
    }
  } else if (q_stride == 1 && col_stride != 1) {
    // Transposed block ([n, queries] storage): walk it in storage order.
    for (int64_t j = 0; j < n; ++j) {
      const float* col = scores + j * col_stride;
      for (int64_t g0 = q0; g0 < q1; g0 += kColSpan) {
        int64_t g1 = std::min(q1, g0 + kColSpan);
        if (g1 - g0 == kColSpan && !any_above_each(col + g0, threshold_.data() + g0)) continue;
        for (int64_t q = g0; q < g1; ++q) {
          if (col[q] > threshold_[q]) push(q, col[q], j);
        }
      }
    }
  } else {  // any other layout: plain loops
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t j = 0; j < n; ++j) {
        float s = scores[q * q_stride + j * col_stride];
        if (s > threshold_[q]) push(q, s, j);
      }
    }
  }
}

void TopkSelector::add_block(const float* scores, int64_t n, int64_t q_stride, int64_t col_stride,
                             int64_t n0, int threads) {
  if (n0 < seen_) throw std::invalid_argument("TopkSelector: blocks must arrive in gallery order");
  // Threads pay off only on wide blocks: each must own enough queries (whole cache lines of a
  // transposed block) to outweigh starting it.
  int useful = static_cast<int>(std::min<int64_t>(threads, queries_ / 128));
  parallel_rows(queries_, std::max(1, useful), [&](int64_t q0, int64_t q1) {
    add_rows(scores, q0, q1, n, q_stride, col_stride, n0);
  });
  seen_ = n0 + n;
}

void TopkSelector::finish(float* out_scores, int64_t* out_index, int threads) const {
  for (int64_t q = 0; q < queries_; ++q) {
    if (count_[q] < k_) throw std::invalid_argument("TopkSelector: fewer than k candidates");
  }
  parallel_rows(queries_, threads, [&](int64_t q0, int64_t q1) {
    std::vector<uint32_t> rk(static_cast<size_t>(cap_)), tmp;
    std::vector<uint64_t> keys(static_cast<size_t>(cap_));
    for (int64_t q = q0; q < q1; ++q) {
      const Entry* e = entries_.data() + q * cap_;
      const int64_t c = count_[q];
      for (int64_t i = 0; i < c; ++i) rk[i] = rank_key(e[i].score);
      // The k best as (rank key, buffer position) keys; the position breaks ties (index order).
      const uint32_t kth = c > k_ ? kth_key(rk.data(), c, k_, tmp) : ~0u;
      int64_t less = 0;
      for (int64_t i = 0; i < c; ++i) less += rk[i] < kth;
      const int64_t ties = k_ - less;
      int64_t w = 0, seen = 0;
      for (int64_t i = 0; i < c; ++i) {
        const uint32_t v = rk[i];
        keys[w] = (static_cast<uint64_t>(v) << 32) | static_cast<uint32_t>(i);
        w += (v < kth) | ((v == kth) & (seen < ties));
        seen += v == kth;
      }
      std::sort(keys.begin(), keys.begin() + k_);
      for (int64_t r = 0; r < k_; ++r) {
        const Entry& x = e[static_cast<uint32_t>(keys[r])];
        out_scores[q * k_ + r] = x.score;
        out_index[q * k_ + r] = x.index;
      }
    }
  });
}

const char* cpu_scan_kernel() { return picked.name; }

const char* cpu_thread_pool() {
#ifdef _OPENMP
  return "openmp";
#else
  return "std::thread";
#endif
}

}  // namespace bct_fast
