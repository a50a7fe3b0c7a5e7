// Runtime of the CPU emulator (see cuda_shim.h): fibers, barriers, warp collectives, the
// shared-memory race check and guarded global buffers. Compiled WITHOUT -fsanitize=thread, so
// none of the accesses here are reported to the race check.
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda_shim.h"
#include "emu_host.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// Markers linked right before and after the kernel objects (smem_marker.cpp): the .bss between
// them holds exactly the kernels' `static` (= __shared__) arrays.
extern "C" char bct_emu_smem_begin[64], bct_emu_smem_end[64];

namespace bct_emu {
namespace {

constexpr size_t kStaticSmemLimit = 48 * 1024;     // per block without opt-in (H100)
constexpr size_t kOptinSmemLimit = 227 * 1024;     // static + dynamic with opt-in (H100)
constexpr size_t kDefaultDynamicLimit = 48 * 1024;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kPage = 4096;
constexpr int kMany = -2;  // several threads (race-check shadow)

struct KernelInfo {
  std::string name;
  size_t static_smem = 0;
  size_t max_dynamic = kDefaultDynamicLimit;
};
std::map<const void*, KernelInfo> g_kernels;
uint64_t g_seed = 1;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_error_msg = "no error";

enum State { kRunnable, kAtBarrier, kAtWarp, kDone };
struct Fiber {
  ucontext_t ctx;
  State state = kDone;
  const void* site = nullptr;  // call site of the __syncthreads it waits at
  int kind = 0, arg = 0, width = 32;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
};

// The running launch.
const char* g_name = "";
std::vector<Fiber> g_fibers;
char* g_stacks = nullptr;
size_t g_stacks_n = 0;
ucontext_t g_sched;
int g_cur = -1;  // running fiber, -1 in the scheduler / host code
int g_live = 0, g_at_barrier = 0;
std::deque<int> g_runq;
std::mt19937_64 g_rng;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;
unsigned g_block_threads = 0;

// Shared memory: [g_static_lo, g_static_hi) is the kernels' .bss; the dynamic arena ends at a
// PROT_NONE page and a block's dynamic smem is placed flush against it.
uintptr_t g_static_lo = 0, g_static_hi = 0;
char* g_arena = nullptr;  // kOptinSmemLimit bytes, then a guard page
uintptr_t g_dyn_lo = 0;   // start of this launch's dynamic smem (end = arena end)

// Race-check shadow, one entry per 4-byte word.
struct Word {
  uint32_t w_block = 0;  // block serial of the last write (uninitialised reads)
  uint32_t w_phase = 0;  // barrier phase of the last write
  uint32_t w_wsync = 0;  // the writer's warp: full __syncwarp count at the write
  int32_t writer = -1;
  bool w_atomic = false;
  uint32_t r_phase = 0;
  int32_t reader = -1;   // or kMany
  int32_t r_warp = -1;   // warp of all readers since the barrier, -1 when several warps
  uint32_t r_wsync = 0;  // max over those reads of the reader warp's __syncwarp count
};
std::vector<Word> g_shadow_static, g_shadow_dyn;
uint32_t g_phase = 0, g_block_serial = 0;
std::vector<uint32_t> g_warp_sync;  // completed full-warp __syncwarp per warp, this block

[[noreturn]] void vfail(const char* fmt, va_list ap) {
  std::fprintf(stderr, "bct_emu error: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  _exit(3);  // from a fiber: no unwinding, no destructors
}

std::string where() {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s, block (%u,%u,%u)", g_name, blockIdx.x, blockIdx.y,
                blockIdx.z);
  return buf;
}

void set_error(cudaError_t err, const std::string& msg) {
  g_last_error = err;
  g_last_error_msg = msg;
}

// ---- fibers ------------------------------------------------------------------------------

void yield_to_scheduler() { swapcontext(&g_fibers[g_cur].ctx, &g_sched); }

// Makes `ids` runnable in a seeded random order (the order threads leave a barrier).
void release(std::vector<int>& ids) {
  std::shuffle(ids.begin(), ids.end(), g_rng);
  for (int t : ids) {
    g_fibers[t].state = kRunnable;
    g_runq.push_back(t);
  }
}

void maybe_release_barrier() {
  if (g_at_barrier == 0 || g_at_barrier < g_live) return;
  std::vector<int> ids;
  const void* site = nullptr;
  int first = -1;
  for (int t = 0; t < static_cast<int>(g_fibers.size()); ++t) {
    if (g_fibers[t].state != kAtBarrier) continue;
    if (site == nullptr) {
      site = g_fibers[t].site;
      first = t;
    } else if (g_fibers[t].site != site) {
      fail("%s: divergent __syncthreads: thread %d and thread %d wait at different call sites",
           where().c_str(), first, t);
    }
    ids.push_back(t);
  }
  g_at_barrier = 0;
  ++g_phase;  // everything before this barrier is now ordered before everything after it
  release(ids);
}

const char* collective_name(int kind) {
  static const char* names[] = {"__syncwarp", "__shfl_sync",     "__shfl_xor_sync", "__shfl_up_sync",
                                "__shfl_down_sync", "__ballot_sync", "__any_sync", "__all_sync"};
  return names[kind];
}

// Completes the collective of `mask` in warp `w` once every lane it names has arrived.
void maybe_complete_collective(int w, unsigned mask) {
  const int base = w * 32;
  int kind = -1;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const Fiber& f = g_fibers[base + l];
    if (f.state != kAtWarp) return;  // not there yet (a lane that exited was refused earlier)
    if (f.mask != mask || (kind >= 0 && f.kind != kind))
      fail("%s: warp %d: lane %d waits in %s (mask 0x%08x) while the others call %s (mask 0x%08x)",
           where().c_str(), w, l, collective_name(f.kind), f.mask, collective_name(kind), mask);
    kind = f.kind;
  }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) ballot |= (g_fibers[base + l].value != 0 ? 1ull : 0ull) << l;
  std::vector<int> ids;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& f = g_fibers[base + l];
    const int width = f.width, seg = l & ~(width - 1);
    int src = l;
    switch (kind) {
      case kShflIdx: src = seg + (f.arg & (width - 1)); break;
      case kShflXor: src = l ^ f.arg; if ((src & ~(width - 1)) != seg) src = l; break;
      case kShflUp: src = l - f.arg; if (src < seg) src = l; break;
      case kShflDown: src = l + f.arg; if (src >= seg + width) src = l; break;
      default: break;
    }
    if (src < 0 || src > 31 || !((mask >> src) & 1u))
      fail("%s: warp %d: lane %d reads lane %d in %s, which its mask 0x%08x does not name",
           where().c_str(), w, l, src, collective_name(kind), mask);
    switch (kind) {
      case kBallot: f.result = ballot; break;
      case kAny: f.result = ballot != 0; break;
      case kAll: f.result = ballot == (mask & 0xffffffffull); break;
      case kSyncwarp: f.result = 0; break;
      default: f.result = g_fibers[base + src].value; break;
    }
    ids.push_back(base + l);
  }
  // A __syncwarp of every lane of the warp orders the warp's shared-memory accesses.
  const unsigned all = g_block_threads - base >= 32 ? 0xffffffffu
                                                    : (1u << (g_block_threads - base)) - 1u;
  if (kind == kSyncwarp && mask == all) ++g_warp_sync[w];
  release(ids);
}

void fiber_main() {
  g_body(g_body_ctx);
  Fiber& f = g_fibers[g_cur];
  f.state = kDone;
  --g_live;
  // Lanes of this warp that wait in a collective naming this thread would wait forever.
  const int w = g_cur / 32, lane = g_cur % 32;
  for (int l = 0; l < 32; ++l) {
    const int t = w * 32 + l;
    if (t < static_cast<int>(g_fibers.size()) && g_fibers[t].state == kAtWarp &&
        ((g_fibers[t].mask >> lane) & 1u))
      fail("%s: thread %d exited while lane %d of its warp waits for it in %s (mask 0x%08x)",
           where().c_str(), g_cur, l, collective_name(g_fibers[t].kind), g_fibers[t].mask);
  }
  maybe_release_barrier();
  // Returning resumes the scheduler through uc_link.
}

[[noreturn]] void report_deadlock() {
  std::string msg;
  int at_barrier = 0;
  for (size_t t = 0; t < g_fibers.size(); ++t) {
    const Fiber& f = g_fibers[t];
    if (f.state == kAtBarrier) ++at_barrier;
    if (f.state == kAtWarp) {
      char buf[128];
      std::snprintf(buf, sizeof buf, " thread %zu in %s (mask 0x%08x);", t,
                    collective_name(f.kind), f.mask);
      if (msg.size() < 600) msg += buf;
    }
  }
  fail("%s: deadlock: %d live threads, %d wait at __syncthreads;%s", where().c_str(), g_live,
       at_barrier, msg.c_str());
}

void run_block(unsigned n) {
  // Fresh, poisoned shared memory: a kernel must not rely on what an earlier block left.
  std::memset(reinterpret_cast<void*>(g_static_lo), 0xff, g_static_hi - g_static_lo);
  const uintptr_t arena_hi = reinterpret_cast<uintptr_t>(g_arena) + kOptinSmemLimit;
  std::memset(reinterpret_cast<void*>(g_dyn_lo), 0xff, arena_hi - g_dyn_lo);
  ++g_block_serial;
  ++g_phase;
  std::fill(g_warp_sync.begin(), g_warp_sync.end(), 0);

  std::vector<int> ids(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = g_fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks + t * (kStackBytes + kPage) + kPage;  // guard page below
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = kRunnable;
    ids[t] = static_cast<int>(t);
  }
  g_live = static_cast<int>(n);
  g_at_barrier = 0;
  g_runq.clear();
  release(ids);
  while (!g_runq.empty()) {
    const int t = g_runq.front();
    g_runq.pop_front();
    g_cur = t;
    threadIdx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    swapcontext(&g_sched, &g_fibers[t].ctx);
    g_cur = -1;
  }
  if (g_live > 0) report_deadlock();
}

void setup_memory() {
  if (g_arena != nullptr) return;
  g_static_lo = reinterpret_cast<uintptr_t>(bct_emu_smem_begin + sizeof bct_emu_smem_begin);
  g_static_hi = reinterpret_cast<uintptr_t>(bct_emu_smem_end);
  if (g_static_hi < g_static_lo) fail("static shared memory markers are out of order (link order)");
  g_shadow_static.resize((g_static_hi - g_static_lo + 3) / 4);
  void* p = mmap(nullptr, kOptinSmemLimit + kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("mmap of the shared-memory arena failed");
  g_arena = static_cast<char*>(p);
  mprotect(g_arena + kOptinSmemLimit, kPage, PROT_NONE);
  g_shadow_dyn.resize(kOptinSmemLimit / 4);
}

void ensure_stacks(size_t n) {
  if (n <= g_stacks_n) return;
  if (g_stacks != nullptr) munmap(g_stacks, g_stacks_n * (kStackBytes + kPage));
  const size_t bytes = n * (kStackBytes + kPage);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail("mmap of fiber stacks failed");
  g_stacks = static_cast<char*>(p);
  for (size_t t = 0; t < n; ++t) mprotect(g_stacks + t * (kStackBytes + kPage), kPage, PROT_NONE);
  g_stacks_n = n;
}

// ---- race check ------------------------------------------------------------------------

// The executable's load bias: runtime address - bias = the address `nm` prints.
uintptr_t load_bias() {
  uintptr_t bias = 0;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        *static_cast<uintptr_t*>(out) = info->dlpi_addr;
        return 1;  // the first object is the executable
      },
      &bias);
  return bias;
}

std::string describe_word(bool dynamic, size_t word) {
  char buf[160];
  if (dynamic)
    std::snprintf(buf, sizeof buf, "dynamic smem offset %zu",
                  reinterpret_cast<uintptr_t>(g_arena) + word * 4 - g_dyn_lo);
  else  // an address nm can name (tests/ops/kernel_emulator.py turns it into a variable name)
    std::snprintf(buf, sizeof buf, "static smem [nm 0x%lx]",
                  static_cast<unsigned long>(g_static_lo + word * 4 - load_bias()));
  return buf;
}

bool ordered(int32_t other, uint32_t other_wsync, int t) {
  if (other == t) return true;
  if (other < 0 || other / 32 != t / 32) return false;
  return g_warp_sync[t / 32] > other_wsync;  // a full __syncwarp since the other's access
}

enum Access { kRead, kWrite, kAtomic };

void check_word(Word& s, bool dynamic, size_t word, Access a) {
  const int t = g_cur, warp = t / 32;
  const uint32_t wsync = g_warp_sync[warp];
  auto race = [&](const char* what, int other) {
    fail("%s: shared-memory race on %s: thread %d %s it, thread %d %s since the last "
         "__syncthreads",
         where().c_str(), describe_word(dynamic, word).c_str(), t,
         a == kRead ? "reads" : a == kWrite ? "writes" : "atomically updates", other, what);
  };
  if (a != kWrite && s.w_block != g_block_serial)
    fail("%s: thread %d reads %s, which no thread of this block has written (yet: a missing "
         "barrier, or uninitialised shared memory)",
         where().c_str(), t, describe_word(dynamic, word).c_str());
  if (s.w_phase == g_phase) {
    const bool both_atomic = s.w_atomic && a == kAtomic;
    if (!both_atomic && !ordered(s.writer, s.w_wsync, t))
      race(s.w_atomic ? "updated it atomically" : "wrote it", s.writer);
  }
  if (a != kRead && s.r_phase == g_phase && s.reader != t) {
    const bool warp_ordered = s.r_warp == warp && wsync > s.r_wsync;
    if (!warp_ordered) race("read it", s.reader);
  }
  if (a == kRead) {
    if (s.r_phase != g_phase) {
      s.r_phase = g_phase;
      s.reader = t;
      s.r_warp = warp;
      s.r_wsync = wsync;
    } else {
      if (s.reader != t) s.reader = kMany;
      if (s.r_warp != warp) s.r_warp = -1;
      s.r_wsync = std::max(s.r_wsync, wsync);
    }
    return;
  }
  const bool same_atomic_phase = a == kAtomic && s.w_atomic && s.w_phase == g_phase;
  s.writer = same_atomic_phase && s.writer != t ? kMany : t;
  s.w_atomic = a == kAtomic;
  s.w_phase = g_phase;
  s.w_wsync = wsync;
  s.w_block = g_block_serial;
}

inline void on_access(const void* p, size_t n, Access a) {
  if (g_cur < 0 || n == 0) return;  // host code of the launchers
  const uintptr_t x = reinterpret_cast<uintptr_t>(p);
  if (x - g_static_lo < g_static_hi - g_static_lo) {
    for (size_t w = (x - g_static_lo) / 4; w <= (x + n - 1 - g_static_lo) / 4; ++w)
      check_word(g_shadow_static[w], false, w, a);
    return;
  }
  const uintptr_t arena = reinterpret_cast<uintptr_t>(g_arena);
  if (x - arena < kOptinSmemLimit) {
    if (x < g_dyn_lo)
      fail("%s: thread %d accesses dynamic shared memory %zu bytes before its start",
           where().c_str(), g_cur, static_cast<size_t>(g_dyn_lo - x));
    for (size_t w = (x - arena) / 4; w <= (x + n - 1 - arena) / 4; ++w)
      check_word(g_shadow_dyn[w], true, w, a);
  }
}

template <typename T, typename F>
T atomic_op(T* p, F f) {
  on_access(p, sizeof(T), kAtomic);
  const T old = *p;  // fibers never interleave inside this function
  *p = f(old);
  return old;
}

}  // namespace

// ---- API used by cuda_shim.h ------------------------------------------------------------

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
}

void* dynamic_smem() { return reinterpret_cast<void*>(g_dyn_lo); }

uint64_t warp_collective(int kind, unsigned mask, uint64_t value, int arg, int width) {
  if (g_cur < 0) fail("%s called outside a kernel", collective_name(kind));
  const int t = g_cur, w = t / 32, lane = t % 32;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail("%s: %s with width %d", where().c_str(), collective_name(kind), width);
  if (!((mask >> lane) & 1u))
    fail("%s: thread %d calls %s with mask 0x%08x, which does not name its lane %d",
         where().c_str(), t, collective_name(kind), mask, lane);
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const unsigned other = static_cast<unsigned>(w * 32 + l);
    if (other >= g_block_threads || g_fibers[other].state == kDone)
      fail("%s: thread %d calls %s with mask 0x%08x naming lane %d, which %s", where().c_str(), t,
           collective_name(kind), mask, l,
           other >= g_block_threads ? "does not exist" : "has exited");
  }
  Fiber& f = g_fibers[t];
  f.state = kAtWarp;
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  maybe_complete_collective(w, mask);
  yield_to_scheduler();
  return g_fibers[t].result;
}

cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  auto it = g_kernels.find(kernel);
  if (it == g_kernels.end()) fail("cudaFuncGetAttributes of a kernel never registered");
  attr->sharedSizeBytes = it->second.static_smem;
  return cudaSuccess;
}

cudaError_t func_set_max_dynamic_smem(const void* kernel, int bytes) {
  auto it = g_kernels.find(kernel);
  if (it == g_kernels.end()) fail("cudaFuncSetAttribute of a kernel never registered");
  if (bytes < 0 || it->second.static_smem + static_cast<size_t>(bytes) > kOptinSmemLimit) {
    set_error(cudaErrorInvalidValue,
              "invalid argument (" + it->second.name + ": opt-in to " + std::to_string(bytes) +
                  " bytes of dynamic smem exceeds the 227 KiB limit)");
    return cudaErrorInvalidValue;
  }
  it->second.max_dynamic = std::max(kDefaultDynamicLimit, static_cast<size_t>(bytes));
  return cudaSuccess;
}

void register_kernel(const void* kernel, const std::string& name, size_t static_smem) {
  g_kernels[kernel] = KernelInfo{name, static_smem, kDefaultDynamicLimit};
}

void launch(const void* kernel, const char* text, dim3 grid, dim3 block, size_t dynamic,
            void (*body)(void*), void* ctx) {
  auto it = g_kernels.find(kernel);
  if (it == g_kernels.end()) fail("launch of a kernel never registered (%s)", text);
  const KernelInfo& info = it->second;
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid configuration argument (" + info.name + ")");
    return;
  }
  if (info.static_smem > kStaticSmemLimit || dynamic > info.max_dynamic) {
    set_error(cudaErrorInvalidValue,
              "invalid argument (" + info.name + ": " + std::to_string(dynamic) +
                  " bytes of dynamic smem, the kernel may use " +
                  std::to_string(info.max_dynamic) + ")");
    return;
  }
  setup_memory();
  ensure_stacks(n);
  g_fibers.assign(n, Fiber());
  g_warp_sync.assign((n + 31) / 32, 0);
  g_block_threads = static_cast<unsigned>(n);
  g_dyn_lo = reinterpret_cast<uintptr_t>(g_arena) + kOptinSmemLimit - ((dynamic + 15) / 16 * 16);
  g_name = info.name.c_str();
  g_body = body;
  g_body_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        g_rng.seed(g_seed * 0x9e3779b97f4a7c15ull + (static_cast<uint64_t>(z) << 40) +
                   (static_cast<uint64_t>(y) << 20) + x);
        run_block(static_cast<unsigned>(n));
      }
}

void set_seed(uint64_t seed) { g_seed = seed; }

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_f32(sign);
    const float v = std::ldexp(static_cast<float>(man), -24);  // subnormal: exact
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t float_to_half_rn(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // nan
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {                        // half subnormal or zero: round m * 2^24
    const float scaled = bits_f32(a) * 16777216.0f;  // exact
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));  // default mode: ties to even
  }
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
}

// ---- guarded global buffers (emu_host.h) -----------------------------------------------

void* guarded_alloc(size_t bytes) {
  const size_t body = (bytes + kPage - 1) / kPage * kPage;
  // guard | body | guard, the buffer flush against the trailing guard.
  char* p = static_cast<char*>(mmap(nullptr, body + 2 * kPage, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (p == MAP_FAILED) fail("mmap of a guarded buffer failed");
  mprotect(p, kPage, PROT_NONE);
  mprotect(p + kPage + body, kPage, PROT_NONE);
  return p + kPage + body - bytes;
}

void guarded_make_readonly(void* buf, size_t bytes) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(buf) / kPage * kPage;
  const uintptr_t hi = reinterpret_cast<uintptr_t>(buf) + bytes;
  mprotect(reinterpret_cast<void*>(lo), hi - lo, PROT_READ);
}

}  // namespace bct_emu

// ---- CUDA runtime calls of the launchers ------------------------------------------------

void __syncthreads() {
  using namespace bct_emu;
  if (g_cur < 0) fail("__syncthreads called outside a kernel");
  Fiber& f = g_fibers[g_cur];
  f.state = kAtBarrier;
  f.site = __builtin_return_address(0);
  ++g_at_barrier;
  maybe_release_barrier();
  yield_to_scheduler();
}

int atomicAdd(int* p, int v) { return bct_emu::atomic_op(p, [v](int o) { return o + v; }); }
unsigned atomicAdd(unsigned* p, unsigned v) {
  return bct_emu::atomic_op(p, [v](unsigned o) { return o + v; });
}
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return bct_emu::atomic_op(p, [v](unsigned long long o) { return o + v; });
}
float atomicAdd(float* p, float v) { return bct_emu::atomic_op(p, [v](float o) { return o + v; }); }
int atomicMax(int* p, int v) { return bct_emu::atomic_op(p, [v](int o) { return std::max(o, v); }); }
int atomicMin(int* p, int v) { return bct_emu::atomic_op(p, [v](int o) { return std::min(o, v); }); }
int atomicExch(int* p, int v) { return bct_emu::atomic_op(p, [v](int) { return v; }); }
int atomicCAS(int* p, int compare, int v) {
  return bct_emu::atomic_op(p, [=](int o) { return o == compare ? v : o; });
}

cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  // BCT_EMU_OPTIN_SMEM: a smaller device (an A100's 166912, an sm_89's 101376) for the tests of
  // the launchers' shared-memory checks; never above the emulator's arena.
  size_t limit = bct_emu::kOptinSmemLimit;
  if (const char* env = std::getenv("BCT_EMU_OPTIN_SMEM")) {
    const long long v = std::atoll(env);
    if (v > 0 && static_cast<size_t>(v) < limit) limit = static_cast<size_t>(v);
  }
  *value = static_cast<int>(limit);
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t err = bct_emu::g_last_error;
  bct_emu::g_last_error = cudaSuccess;
  return err;
}
const char* cudaGetErrorString(cudaError_t) { return bct_emu::g_last_error_msg.c_str(); }

// ---- hooks of g++ -fsanitize=thread (kernel objects only): shared-memory accesses -----------
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
#define BCT_EMU_HOOKS(N)                                                                      \
  void __tsan_read##N(void* p) { bct_emu::on_access(p, N, bct_emu::kRead); }                  \
  void __tsan_write##N(void* p) { bct_emu::on_access(p, N, bct_emu::kWrite); }                \
  void __tsan_unaligned_read##N(void* p) { bct_emu::on_access(p, N, bct_emu::kRead); }        \
  void __tsan_unaligned_write##N(void* p) { bct_emu::on_access(p, N, bct_emu::kWrite); }      \
  void __tsan_volatile_read##N(void* p) { bct_emu::on_access(p, N, bct_emu::kRead); }         \
  void __tsan_volatile_write##N(void* p) { bct_emu::on_access(p, N, bct_emu::kWrite); }
BCT_EMU_HOOKS(1)
BCT_EMU_HOOKS(2)
BCT_EMU_HOOKS(4)
BCT_EMU_HOOKS(8)
BCT_EMU_HOOKS(16)
#undef BCT_EMU_HOOKS
void __tsan_read_range(void* p, unsigned long n) { bct_emu::on_access(p, n, bct_emu::kRead); }
void __tsan_write_range(void* p, unsigned long n) { bct_emu::on_access(p, n, bct_emu::kWrite); }
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
