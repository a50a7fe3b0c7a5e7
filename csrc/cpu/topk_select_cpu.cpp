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
  threshold_.assign(static_cast<size_t>(queries), std::numeric_limits<float>::quiet_NaN());
}

void TopkSelector::compact(int64_t q) {
  Entry* e = entries_.data() + q * cap_;
  std::nth_element(e, e + (k_ - 1), e + count_[q], better<Entry>);
  count_[q] = k_;
  threshold_[q] = e[k_ - 1].score;  // the k-th best: everything kept is at least this good
}

void TopkSelector::add_rows(const float* scores, int64_t q0, int64_t q1, int64_t n,
                            int64_t q_stride, int64_t col_stride, int64_t n0) {
  // `!(s <= t)` accepts everything while t is NaN, then exactly the scores above t.
  auto push = [&](int64_t q, float s, int64_t j) {
    int64_t& c = count_[q];
    entries_[q * cap_ + c] = Entry{s, n0 + j};
    if (++c == cap_) compact(q);
  };
  if (col_stride == 1) {  // row-major block: one query's scores are contiguous
    for (int64_t q = q0; q < q1; ++q) {
      const float* row = scores + q * q_stride;
      for (int64_t j = 0; j < n; ++j) {
        float s = row[j];
        if (!(s <= threshold_[q])) push(q, s, j);
      }
    }
  } else {  // transposed block ([n, queries] storage): walk it in storage order
    for (int64_t j = 0; j < n; ++j) {
      const float* col = scores + j * col_stride;
      for (int64_t q = q0; q < q1; ++q) {
        float s = col[q * q_stride];
        if (!(s <= threshold_[q])) push(q, s, j);
      }
    }
  }
}

void TopkSelector::add_block(const float* scores, int64_t n, int64_t q_stride, int64_t col_stride,
                             int64_t n0, int threads) {
  if (n0 < seen_) throw std::invalid_argument("TopkSelector: blocks must arrive in gallery order");
  parallel_rows(queries_, threads, [&](int64_t q0, int64_t q1) {
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
