// Exact running top-k over CPU score blocks (no torch, no CUDA): the selection half of chunked
// top-k search on a CPU, after a BLAS/oneDNN GEMM has produced a block of scores.
#pragma once
#include <cstdint>
#include <vector>

namespace bct_fast {

// Per query, a buffer of candidates (score, gallery index) and a threshold: once the buffer has
// been compacted to the k best, only scores strictly above the k-th best can still enter (blocks
// arrive in increasing gallery index, so an equal score loses its tie). Buffers stay in gallery
// order; a full buffer (2k + 64 entries) is compacted by a radix select of the k-th best integer
// sort key and one stable filter: amortized O(1) per candidate, one pass over the scores.
class TopkSelector {
 public:
  TopkSelector(int64_t queries, int64_t k);

  // scores(q, j) = scores[q * q_stride + j * col_stride], q < queries, j < n; gallery index n0 + j.
  // Scores must not be NaN (the caller checks). Splits queries over `threads` threads of the
  // OpenMP pool (std::threads in a build without OpenMP).
  void add_block(const float* scores, int64_t n, int64_t q_stride, int64_t col_stride, int64_t n0,
                 int threads);

  // The k best per query sorted by (score desc, index asc) into out_scores / out_index [queries, k].
  // Needs at least k candidates per query so far.
  void finish(float* out_scores, int64_t* out_index, int threads) const;

  int64_t queries() const { return queries_; }
  int64_t k() const { return k_; }

 private:
  struct Entry {
    float score;
    int64_t index;
  };
  void add_rows(const float* scores, int64_t q0, int64_t q1, int64_t n, int64_t q_stride,
                int64_t col_stride, int64_t n0);
  void compact(int64_t q);
  void first_threshold(int64_t q, const float* row, int64_t n, std::vector<uint32_t>& keys,
                       std::vector<uint32_t>& tmp);

  int64_t queries_, k_, cap_, seen_ = 0;
  std::vector<Entry> entries_;   // [queries, cap]
  std::vector<int64_t> count_;   // entries held per query
  std::vector<float> threshold_; // -inf, or a sample's k-th best, until the first compaction
};

// Which row scan the selector uses ("avx512", "avx2" or "portable"): the widest the CPU supports,
// unless BCT_FAST_CPU_SCAN=avx2|portable narrowed it when the library was loaded (tests).
const char* cpu_scan_kernel();

// Where the selector's threads come from: "openmp" (the process's pool, torch's when torch is
// loaded) or "std::thread" (a build without OpenMP).
const char* cpu_thread_pool();

}  // namespace bct_fast
