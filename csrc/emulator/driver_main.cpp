// Driver of the CPU emulator: runs one launcher of the library (the same entry points that
// bct_fast/_native.py calls) on inputs read from files, and writes the outputs back.
//
//   bct_emu_driver DIR
// DIR/request.txt holds "key value" lines: op (stats | grad_weight | epi_stats | epi_grads | topk |
// topk_select | fused_stats | fused_mma_tile | fused_pws | fused_pv_tile | fused_topk | convert |
// selftest | fragment_probe), the sizes and
// scalars of that op, and seeds (comma-separated; each seed reruns the launch with another
// thread order and must give bit-identical outputs). Arrays are raw little-endian files
// DIR/<name>.bin; outputs are written to DIR/<name>.out.bin.
// Exit status: 0 ok, 3 emulator error (race, deadlock, ...), 4 the launcher returned an error;
// a fault (e.g. a guard page hit) kills the process with SIGSEGV.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bct_fast/cosine_topk.h"
#include "bct_fast/margin_epilogue.h"
#include "bct_fast/margin_fused.h"
#include "bct_fast/margin_softmax.h"
#include "bct_fast/topk_epilogue.h"
#include "bct_fast/topk_fused.h"
#include "cuda_shim.h"  // cudaGetErrorString
#include "emu_host.h"

int bct_emu_selftest(const std::string& name, int* out);
int bct_emu_fragment_probe(const std::string& name, const void* in0, const void* in1,
                           const void* in2, void* out);

namespace {

using bct_emu::fail;

std::string g_dir;
std::map<std::string, std::string> g_req;

std::string req(const std::string& key) {
  auto it = g_req.find(key);
  if (it == g_req.end()) fail("request has no '%s'", key.c_str());
  return it->second;
}
int64_t req_int(const std::string& key) { return std::stoll(req(key)); }
float req_float(const std::string& key) { return std::stof(req(key)); }

size_t dtype_size(int code) { return code == 0 ? 4 : 2; }

// An input in a guarded, read-only buffer; nullptr when the request has no such file.
const void* input(const std::string& name, size_t bytes, bool optional = false) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) {
    if (optional) return nullptr;
    fail("missing input %s.bin", name.c_str());
  }
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() != bytes)
    fail("input %s.bin has %zu bytes, expected %zu", name.c_str(), data.size(), bytes);
  void* buf = bct_emu::guarded_alloc(bytes);
  std::memcpy(buf, data.data(), bytes);
  bct_emu::guarded_make_readonly(buf, bytes);
  return buf;
}

struct Output {
  std::string name;
  void* buf;
  size_t bytes;
  unsigned char fill;  // what the caller's buffer holds before the launch
  std::vector<char> init;  // in-out buffers: their input (instead of `fill`) before each seed
  std::vector<char> first;  // result of the first seed
};

Output output(const std::string& name, size_t bytes, unsigned char fill) {
  return Output{name, bct_emu::guarded_alloc(bytes), bytes, fill, {}, {}};
}

// An in-out buffer (e.g. running statistics) that starts as DIR/<name>.bin before each seed.
Output inout(const std::string& name, size_t bytes) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) fail("missing input %s.bin", name.c_str());
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() != bytes)
    fail("input %s.bin has %zu bytes, expected %zu", name.c_str(), data.size(), bytes);
  Output o = output(name, bytes, 0);
  o.init = std::move(data);
  return o;
}

// The inputs of margin_fused_lse / margin_fused_lse_pws (bf16 x, w and the per-row / per-class
// vectors), the one named by the request's optional `null NAME` passed as a null pointer.
struct FusedMarginInputs {
  const void *x, *w;
  const float *inv_nx, *inv_nw;
  const int64_t* labels;
};
FusedMarginInputs fused_margin_inputs(int64_t B, int64_t C, int64_t d, const std::string& null_arg) {
  auto arg = [&](const std::string& name, size_t bytes) {
    const void* p = input(name, bytes);
    return name == null_arg ? nullptr : p;
  };
  return {arg("x", B * d * 2),
          arg("w", C * d * 2),
          static_cast<const float*>(arg("inv_nx", B * 4)),
          static_cast<const float*>(arg("inv_nw", C * 4)),
          static_cast<const int64_t*>(arg("labels", B * 8))};
}

std::vector<uint64_t> seeds() {
  std::vector<uint64_t> out;
  std::stringstream ss(req("seeds"));
  std::string s;
  while (std::getline(ss, s, ',')) out.push_back(std::stoull(s));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s REQUEST_DIR\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];
  {
    std::ifstream f(g_dir + "/request.txt");
    std::string key, value;
    while (f >> key >> value) g_req[key] = value;
  }
  bct_emu::register_all_kernels();

  const std::string op = req("op");
  std::vector<Output> outs;
  std::function<bct_fast::Status()> call;
  if (op == "stats" || op == "grad_weight") {
    const int64_t B = req_int("B"), C = req_int("C"), d = req_int("d");
    const int dt = static_cast<int>(req_int("dtype"));
    const float scale = req_float("scale");
    const void* x = input("x", B * d * dtype_size(dt));
    const void* w = input("w", C * d * dtype_size(dt));
    auto inv_nx = static_cast<const float*>(input("inv_nx", B * 4));
    auto inv_nw = static_cast<const float*>(input("inv_nw", C * 4));
    auto labels = static_cast<const int64_t*>(input("labels", B * 8));
    if (op == "stats") {
      const int S = static_cast<int>(req_int("splits"));
      const bool with_acc = req_int("with_acc") != 0;
      outs.push_back(output("m", S * B * 4, 0xff));  // torch.empty: anything; NaN here
      outs.push_back(output("l", S * B * 4, 0xff));
      if (with_acc) outs.push_back(output("acc", S * B * d * 4, 0xff));
      call = [=, &outs] {
        return bct_fast::margin_softmax_stats(
            x, w, inv_nx, inv_nw, labels, B, C, d, static_cast<bct_fast::DType>(dt), scale,
            S, static_cast<float*>(outs[0].buf), static_cast<float*>(outs[1].buf),
            with_acc ? static_cast<float*>(outs[2].buf) : nullptr, nullptr);
      };
    } else {
      auto lse = static_cast<const float*>(input("lse", B * 4));
      auto row_coef = static_cast<const float*>(input("row_coef", B * 4));
      outs.push_back(output("gw", C * d * 4, 0xff));
      call = [=, &outs] {
        return bct_fast::margin_softmax_grad_weight(
            x, w, inv_nx, inv_nw, labels, lse, row_coef, B, C, d,
            static_cast<bct_fast::DType>(dt), scale, static_cast<float*>(outs[0].buf), nullptr);
      };
    }
  } else if (op == "epi_stats" || op == "epi_grads") {  // margin_epilogue.h, one score block
    const int64_t B = req_int("B"), cols = req_int("cols"), c0 = req_int("c0");
    const float scale = req_float("scale");
    const int odt = static_cast<int>(req_int("out_dtype"));
    auto scores = static_cast<const float*>(input("scores", B * cols * 4));
    auto inv_nx = static_cast<const float*>(input("inv_nx", B * 4));
    auto inv_nw = static_cast<const float*>(input("inv_nw", cols * 4));
    auto labels = static_cast<const int64_t*>(input("labels", B * 8));
    const auto dt = static_cast<bct_fast::DType>(odt);
    if (op == "epi_stats") {
      const bool with_e = req_int("with_e") != 0;
      outs.push_back(inout("m", B * 4));
      outs.push_back(inout("l", B * 4));
      if (with_e) {
        outs.push_back(output("e", B * cols * dtype_size(odt), 0xff));
        outs.push_back(output("alpha", B * 4, 0xff));
      }
      call = [=, &outs] {
        return bct_fast::margin_epilogue_stats(
            scores, B, cols, inv_nx, inv_nw, labels, c0, scale,
            static_cast<float*>(outs[0].buf), static_cast<float*>(outs[1].buf),
            with_e ? outs[2].buf : nullptr, dt,
            with_e ? static_cast<float*>(outs[3].buf) : nullptr, nullptr);
      };
    } else {
      const bool need_p = req_int("need_p") != 0, need_pw = req_int("need_pw") != 0;
      auto lse = static_cast<const float*>(input("lse", B * 4));
      auto row_coef = static_cast<const float*>(input("row_coef", B * 4));
      // Always two slots (an unused one stays empty) so the indices below are fixed.
      outs.push_back(output("p", need_p ? B * cols * dtype_size(odt) : 0, 0xff));
      outs.push_back(output("pw", need_pw ? B * cols * dtype_size(odt) : 0, 0xff));
      call = [=, &outs] {
        return bct_fast::margin_epilogue_grads(
            scores, B, cols, inv_nx, inv_nw, labels, c0, scale, lse, row_coef,
            need_p ? outs[0].buf : nullptr, need_pw ? outs[1].buf : nullptr, dt, nullptr);
      };
    }
  } else if (op == "topk") {
    const int64_t Q = req_int("Q"), N = req_int("N"), d = req_int("d");
    const int qdt = static_cast<int>(req_int("q_dtype")), gdt = static_cast<int>(req_int("g_dtype"));
    const int k = static_cast<int>(req_int("k")), S = static_cast<int>(req_int("splits"));
    const bool exclude = req_int("exclude") != 0;
    const int64_t offset = req_int("exclude_offset");
    const void* q = input("q", Q * d * dtype_size(qdt));
    const void* g = input("g", N * d * dtype_size(gdt));
    auto inv_nq = static_cast<const float*>(input("inv_nq", Q * 4, true));
    auto inv_ng = static_cast<const float*>(input("inv_ng", N * 4, true));
    outs.push_back(output("scores", S * Q * k * 4, 0xff));
    outs.push_back(output("index", S * Q * k * 8, 0xff));
    outs.push_back(output("nonfinite", 4, 0));  // the caller zeroes the flag
    call = [=, &outs] {
      return bct_fast::cosine_topk_partial(
          q, g, inv_nq, inv_ng, Q, N, d, static_cast<bct_fast::DType>(qdt),
          static_cast<bct_fast::DType>(gdt), k, S, exclude, offset,
          static_cast<float*>(outs[0].buf), static_cast<int64_t*>(outs[1].buf),
          static_cast<int*>(outs[2].buf), nullptr);
    };
  } else if (op == "topk_select") {  // topk_epilogue.h, one score block into the running lists
    const int64_t rows = req_int("rows"), cols = req_int("cols"), n0 = req_int("n0");
    const int k = static_cast<int>(req_int("k"));
    const bool exclude = req_int("exclude") != 0;
    const int64_t self_col0 = req_int("self_col0");
    auto scores = static_cast<const float*>(input("scores", rows * cols * 4));
    auto inv_nq = static_cast<const float*>(input("inv_nq", rows * 4, true));
    auto inv_ng = static_cast<const float*>(input("inv_ng", cols * 4, true));
    outs.push_back(inout("run_s", rows * k * 4));
    outs.push_back(inout("run_i", rows * k * 8));
    outs.push_back(inout("nonfinite", 4));
    call = [=, &outs] {
      return bct_fast::topk_epilogue_select(
          scores, rows, cols, inv_nq, inv_ng, k, n0, exclude, self_col0,
          static_cast<float*>(outs[0].buf), static_cast<int64_t*>(outs[1].buf),
          static_cast<int*>(outs[2].buf), nullptr);
    };
  } else if (op == "fused_stats") {  // margin_fused.h: lse of bf16 x, w with the workspace
    const int64_t B = req_int("B"), C = req_int("C"), d = req_int("d");
    const int64_t S = req_int("splits");
    const float scale = req_float("scale");
    // Optional: the workspace size passed to the launcher, and one argument passed as nullptr.
    const int64_t ws_floats = g_req.count("ws_floats") ? req_int("ws_floats")
                                                       : bct_fast::margin_fused_workspace_floats(B, S);
    const std::string null_arg = g_req.count("null") ? req("null") : "";
    const FusedMarginInputs in = fused_margin_inputs(B, C, d, null_arg);
    outs.push_back(output("lse", B * 8, 0xff));  // double
    outs.push_back(output("ws", (ws_floats > 0 ? ws_floats : 0) * 4, 0xff));
    call = [=, &outs] {
      return bct_fast::margin_fused_lse(
          in.x, in.w, bct_fast::DType::kBFloat16, B, C, d, in.inv_nx, in.inv_nw, in.labels,
          scale, S,
          null_arg == "workspace" ? nullptr : static_cast<float*>(outs[1].buf), ws_floats,
          null_arg == "lse" ? nullptr : static_cast<double*>(outs[0].buf), nullptr);
    };
  } else if (op == "fused_mma_tile") {  // margin_fused.h: d = c + a @ b^T, one 16 x 16 tile
    const void* a = input("a", 16 * 16 * 2);
    const void* b = input("b", 16 * 16 * 2);
    auto c = static_cast<const float*>(input("c", 16 * 16 * 4));
    outs.push_back(output("d", 16 * 16 * 4, 0xff));
    call = [=, &outs] {
      return bct_fast::margin_fused_mma_tile_check(a, b, c, static_cast<float*>(outs[0].buf),
                                                   nullptr);
    };
  } else if (op == "fused_pws") {  // margin_fused.h: lse and pws of bf16 x, w with the workspace
    const int64_t B = req_int("B"), C = req_int("C"), d = req_int("d");
    const int64_t S = req_int("splits");
    const float scale = req_float("scale");
    // Optional: the workspace size passed to the launcher, and one argument passed as nullptr.
    const int64_t ws_floats = g_req.count("ws_floats")
                                  ? req_int("ws_floats")
                                  : bct_fast::margin_fused_pws_workspace_floats(B, d, S);
    const std::string null_arg = g_req.count("null") ? req("null") : "";
    const FusedMarginInputs in = fused_margin_inputs(B, C, d, null_arg);
    outs.push_back(output("lse", B * 8, 0xff));  // double
    outs.push_back(output("pws", (B * d > 0 ? B * d : 0) * 4, 0xff));
    outs.push_back(output("ws", (ws_floats > 0 ? ws_floats : 0) * 4, 0xff));
    // By value: `call` runs after this block's locals are gone.
    auto nul = [null_arg](const std::string& name, void* p) {
      return static_cast<float*>(name == null_arg ? nullptr : p);
    };
    call = [=, &outs] {
      return bct_fast::margin_fused_lse_pws(
          in.x, in.w, bct_fast::DType::kBFloat16, B, C, d, in.inv_nx, in.inv_nw, in.labels,
          scale, S,
          nul("workspace", outs[2].buf), ws_floats,
          reinterpret_cast<double*>(nul("lse", outs[0].buf)), nul("pws", outs[1].buf), nullptr);
    };
  } else if (op == "fused_pv_tile") {  // margin_fused.h: d = c + p @ w, w row-major [k][n]
    const void* p = input("p", 16 * 16 * 2);
    const void* w = input("w", 16 * 16 * 2);
    auto c = static_cast<const float*>(input("c", 16 * 16 * 4));
    outs.push_back(output("d", 16 * 16 * 4, 0xff));
    call = [=, &outs] {
      return bct_fast::margin_fused_pv_tile_check(p, w, c, static_cast<float*>(outs[0].buf),
                                                  nullptr);
    };
  } else if (op == "fused_topk") {  // topk_fused.h: bf16 q, g chunk into the running lists
    const int64_t Q = req_int("Q"), N = req_int("N"), d = req_int("d"), n0 = req_int("n0");
    const int k = static_cast<int>(req_int("k"));
    const bool exclude = req_int("exclude") != 0;
    const int64_t self_col0 = req_int("self_col0");
    // Optional: splits (default topk_fused_default_splits), the workspace size passed to the
    // launcher (ws_bytes), and one argument passed as a null pointer (`null NAME`).
    const int64_t S = g_req.count("splits") ? req_int("splits")
                                            : bct_fast::topk_fused_default_splits(Q, N);
    const int64_t ws_bytes = g_req.count("ws_bytes") ? req_int("ws_bytes")
                                                     : bct_fast::topk_fused_workspace_bytes(Q, S, k);
    const std::string null_arg = g_req.count("null") ? req("null") : "";
    const void* q = input("q", Q * d * 2);
    const void* g = input("g", N * d * 2);
    auto inv_nq = static_cast<const float*>(input("inv_nq", Q * 4, true));
    auto inv_ng = static_cast<const float*>(input("inv_ng", N * 4, true));
    outs.push_back(inout("run_s", Q * k * 4));
    outs.push_back(inout("run_i", Q * k * 8));
    outs.push_back(inout("nonfinite", 4));
    outs.push_back(output("ws", ws_bytes > 0 ? ws_bytes : 0, 0xff));
    auto nul = [null_arg](const std::string& name, void* p) { return name == null_arg ? nullptr : p; };
    call = [=, &outs] {
      return bct_fast::topk_fused_search(
          nul("q", const_cast<void*>(q)), nul("g", const_cast<void*>(g)),
          bct_fast::DType::kBFloat16, Q, N, d, inv_nq, inv_ng, k, n0, exclude, self_col0, S,
          nul("workspace", outs[3].buf), ws_bytes, static_cast<float*>(nul("run_s", outs[0].buf)),
          static_cast<int64_t*>(nul("run_i", outs[1].buf)),
          static_cast<int*>(nul("nonfinite", outs[2].buf)), nullptr);
    };
  } else if (op == "convert") {  // the shim's fp32 -> fp16 / bf16 conversions
    const int64_t n = req_int("n");
    auto src = static_cast<const float*>(input("x", n * 4));
    outs.push_back(output("half", n * 2, 0));
    outs.push_back(output("bf16", n * 2, 0));
    call = [=, &outs] {
      auto h = static_cast<__half*>(outs[0].buf);
      auto b = static_cast<__nv_bfloat16*>(outs[1].buf);
      for (int64_t i = 0; i < n; ++i) {
        h[i] = __float2half(src[i]);
        b[i] = __float2bfloat16(src[i]);
        if (!(__half2float(h[i]) == __half2float(h[i])) && src[i] == src[i])
          fail("fp16 round trip of %g gives NaN", static_cast<double>(src[i]));
      }
      return bct_fast::Status::Ok();
    };
  } else if (op == "selftest") {  // selftest_emu.cpp: grid 2 x 64 threads, out[128] int32
    const std::string name = req("case");
    outs.push_back(output("out", 128 * 4, 0));
    call = [name, &outs] {
      const int err = bct_emu_selftest(name, static_cast<int*>(outs[0].buf));
      return err == 0 ? bct_fast::Status::Ok()
                      : bct_fast::Status::Error(cudaGetErrorString(static_cast<cudaError_t>(err)));
    };
  } else if (op == "fragment_probe") {  // fragment_probe_emu.cpp: one warp, one instruction
    const std::string name = req("case");
    // mma: a[32][4] u32, b[32][2] u32, c[32][4] f32 -> out[32][4] f32; ldmatrix(_trans):
    // tile[32][4] u32 (32 rows of 8 b16) -> out[32][4] u32; c_to_a: c[32][8] f32 ->
    // out[32][4] u32; addressing: -> out[32][14] int32.
    const void *in0 = nullptr, *in1 = nullptr, *in2 = nullptr;
    size_t out_bytes = 32 * 4 * 4;
    if (name == "mma") {
      in0 = input("a", 32 * 4 * 4), in1 = input("b", 32 * 2 * 4), in2 = input("c", 32 * 4 * 4);
    } else if (name == "ldmatrix" || name == "ldmatrix_trans") {
      in0 = input("tile", 32 * 4 * 4);
    } else if (name == "c_to_a") {
      in0 = input("c", 32 * 8 * 4);
    } else if (name == "addressing") {
      out_bytes = 32 * 14 * 4;
    } else {
      fail("unknown fragment probe '%s'", name.c_str());
    }
    outs.push_back(output("out", out_bytes, 0xff));
    call = [=, &outs] {
      const int err = bct_emu_fragment_probe(name, in0, in1, in2, outs[0].buf);
      return err == 0 ? bct_fast::Status::Ok()
                      : bct_fast::Status::Error(cudaGetErrorString(static_cast<cudaError_t>(err)));
    };
  } else {
    fail("unknown op '%s'", op.c_str());
  }

  bool first = true;
  for (uint64_t seed : seeds()) {
    for (Output& o : outs) {
      if (o.init.empty()) std::memset(o.buf, o.fill, o.bytes);
      else std::memcpy(o.buf, o.init.data(), o.bytes);
    }
    bct_emu::set_seed(seed);
    const bct_fast::Status st = call();
    if (!st.ok()) {
      std::fprintf(stderr, "launcher error: %s\n", st.error.c_str());
      return 4;
    }
    for (Output& o : outs) {
      const char* p = static_cast<const char*>(o.buf);
      if (first) {
        o.first.assign(p, p + o.bytes);
      } else if (std::memcmp(o.first.data(), p, o.bytes) != 0) {
        fail("output %s differs between seeds (result depends on the thread schedule)",
             o.name.c_str());
      }
    }
    first = false;
  }
  for (const Output& o : outs) {
    std::ofstream f(g_dir + "/" + o.name + ".out.bin", std::ios::binary);
    f.write(o.first.data(), static_cast<std::streamsize>(o.bytes));
  }
  return 0;
}
