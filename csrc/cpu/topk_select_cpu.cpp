#include "bct_fast/topk_select_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <thread>

namespace bct_fast {

namespace {

// Higher score first; equal scores go to the lower gallery index.
template <typename E>
bool better(const E& a, const E& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// Run fn(q0, q1) over `threads` contiguous query ranges (inline when one thread suffices).
template <typename F>
void parallel_rows(int64_t rows, int threads, F fn) {
  int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  if (t == 1) {
    fn(int64_t{0}, rows);
    return;
  }
  std::vector<std::thread> pool;
  int64_t step = (rows + t - 1) / t;
  for (int i = 1; i < t; ++i) {
    int64_t q0 = i * step, q1 = std::min(rows, q0 + step);
    if (q0 < q1) pool.emplace_back(fn, q0, q1);
  }
  fn(int64_t{0}, std::min(rows, step));
  for (auto& th : pool) th.join();
}

}  // namespace

TopkSelector::TopkSelector(int64_t queries, int64_t k)
    : queries_(queries), k_(k), cap_(2 * k + 64) {
  if (queries < 1 || k < 1) throw std::invalid_argument("TopkSelector: queries and k must be >= 1");
  entries_.resize(static_cast<size_t>(queries * cap_));
  count_.assign(static_cast<size_t>(queries), 0);
  // -inf until a query holds k candidates: every finite score enters. (-inf scores, the
  // own row under exclude_self, never do; the caller guarantees k finite candidates exist.)
  threshold_.assign(static_cast<size_t>(queries), -std::numeric_limits<float>::infinity());
}

void TopkSelector::compact(int64_t q) {
  Entry* e = entries_.data() + q * cap_;
  std::nth_element(e, e + (k_ - 1), e + count_[q], better<Entry>);
  count_[q] = k_;
  threshold_[q] = e[k_ - 1].score;  // the k-th best: everything kept is at least this good
}

// Branch-free "does any score beat its threshold" tests, which the compiler vectorizes: the
// common case (nothing enters) then costs one read of the scores. Fixed lengths keep them
// vectorized; a short tail goes through the scalar loop.
// The scans are compiled for AVX-512 and AVX2 too and picked at run time (GCC/Clang function
// multiversioning): the package is built for baseline x86-64, where they would run 4 wide.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define BCT_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BCT_FAST_SIMD_CLONES
#endif

constexpr int64_t kRowSpan = 64;  // scores of one query (row-major blocks)
constexpr int64_t kColSpan = 16;  // queries of one gallery row (transposed blocks)

// Written as an int OR of `>` so that GCC vectorizes them (a bool OR of `!(s <= t)` stays
// scalar: checked with -fopt-info-vec).
static inline bool any_above_one(const float* s, float t) {
  int any = 0;
  for (int64_t i = 0; i < kRowSpan; ++i) any |= s[i] > t;
  return any != 0;
}

static inline bool any_above_each(const float* s, const float* t) {
  int any = 0;
  for (int64_t i = 0; i < kColSpan; ++i) any |= s[i] > t[i];
  return any != 0;
}

BCT_FAST_SIMD_CLONES void TopkSelector::add_rows(const float* scores, int64_t q0, int64_t q1, int64_t n,
                            int64_t q_stride, int64_t col_stride, int64_t n0) {
  // A score enters when it beats the query's threshold (-inf until the query holds k).
  auto push = [&](int64_t q, float s, int64_t j) {
    int64_t& c = count_[q];
    entries_[q * cap_ + c] = Entry{s, n0 + j};
    if (++c == cap_) compact(q);
  };
  if (col_stride == 1) {  // row-major block: one query's scores are contiguous
    for (int64_t q = q0; q < q1; ++q) {
      const float* row = scores + q * q_stride;
      for (int64_t j0 = 0; j0 < n; j0 += kRowSpan) {
        int64_t j1 = std::min(n, j0 + kRowSpan);
        if (j1 - j0 == kRowSpan && !any_above_one(row + j0, threshold_[q])) continue;
        for (int64_t j = j0; j < j1; ++j) {
          if (row[j] > threshold_[q]) push(q, row[j], j);
        }
      }
    }
  } else if (q_stride == 1) {  // transposed block ([n, queries] storage): walk it in storage order
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
    std::vector<Entry> tmp;
    for (int64_t q = q0; q < q1; ++q) {
      const Entry* e = entries_.data() + q * cap_;
      tmp.assign(e, e + count_[q]);
      std::partial_sort(tmp.begin(), tmp.begin() + k_, tmp.end(), better<Entry>);
      for (int64_t r = 0; r < k_; ++r) {
        out_scores[q * k_ + r] = tmp[r].score;
        out_index[q * k_ + r] = tmp[r].index;
      }
    }
  });
}

}  // namespace bct_fast
