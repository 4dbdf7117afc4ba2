// Fused softmax attention for XLA:CPU, registered through the XLA FFI.
//
// out[b, i, h] = softmax_j(scale * q[b, i, h] . k[b, j, h]) @ v[b, :, h]
// q [B, Lq, H, D], k and v [B, Lk, H, D], float32, D in {32, 64, 128}.
//
// Why: XLA:CPU has no fused attention. It computes the logits with one dot, the
// softmax in separate passes and the value product with a second dot, each pass
// reading the logits again; at 4096 tokens that is the single slowest op of the
// SD UNet on a CPU. Here each task takes 64 query rows of one (batch, head) pair
// and walks the keys in blocks of 128 with an online softmax (running max and
// sum), so a block's logits are produced, exponentiated and consumed while they
// sit in the L1/L2 cache, and the logits never go to memory.
//
// The arithmetic is written with GCC/Clang vector extensions, compiled three times
// on x86-64 (16-float vectors for AVX-512, 8 for AVX2 + FMA, 4 for the baseline)
// and picked by what the CPU supports; elsewhere (NEON) as 4-float vectors. The
// result is deterministic and the same for every batch size: each (pair, query
// block) is computed by one thread in a fixed order.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// N-float vectors: 16 (AVX-512), 8 (AVX2) or 4 (SSE2, NEON).
template <int N>
struct Vec {
  typedef float F __attribute__((vector_size(4 * N)));
  typedef int32_t I __attribute__((vector_size(4 * N)));
};

constexpr int kRows = 64;   // query rows per task
constexpr int kKeys = 128;  // keys per online-softmax block
constexpr int kKeyPad = 32;  // keys are zero padded to a multiple of every tile width
// Logits of padded keys: exp() of it is exactly 0, and it stays finite so that a
// block of only padding cannot make (max - max) a NaN.
constexpr float kPadLogit = -1e30f;

#define JAXSR_INLINE inline __attribute__((always_inline))

template <typename F>
JAXSR_INLINE F Load(const float* p) {
  F r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
template <typename F>
JAXSR_INLINE void Store(float* p, F x) {
  std::memcpy(p, &x, sizeof x);
}
// For constants and per-row values only. The hot loops multiply a vector by a scalar
// directly, which compiles to an FMA with an embedded broadcast; a splat there costs
// an extra add (F{} + s cannot drop the zero, it would turn -0 into +0) or, spelled
// as an initialiser list, one masked insert per lane.
template <typename F>
JAXSR_INLINE F Splat(float s) {
  return F{} + s;
}
template <typename F>
JAXSR_INLINE F Max(F a, F b) {
  return a > b ? a : b;
}

// exp(x) for x <= 0 (the logits minus their running max), to about 1 ulp:
// x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial
// (truncation error < 6e-9 relative), times 2^n built in the exponent bits.
template <typename F, typename I>
JAXSR_INLINE F ExpNonPositive(F x) {
  const F magic = Splat<F>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  x = Max(x, Splat<F>(-87.0f));           // below this exp underflows float32 anyway
  const F t = x * 1.44269504088896341f + magic;
  const F n = t - magic;
  F r = x - n * 0.693145751953125f;  // ln2 split in two for an exact n * ln2_hi
  r = r - n * 1.428606765330187045e-6f;
  F p = Splat<F>(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I n_int = (I)t - (I)magic;  // n, from t's low mantissa bits
  return (F)((I)p + (n_int << 23));
}

// Across the lanes by halving (a tree: a chain of N - 1 dependent scalar ops would
// sit on the critical path of every row's softmax).
template <int N, typename F, typename Op>
JAXSR_INLINE float Horizontal(F x, Op op) {
  float t[N];
  std::memcpy(t, &x, sizeof x);
  for (int w = N / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = op(t[i], t[i + w]);
  return t[0];
}
template <int N, typename F>
JAXSR_INLINE float HorizontalMax(F x) {
  return Horizontal<N>(x, [](float a, float b) { return std::max(a, b); });
}
template <int N, typename F>
JAXSR_INLINE float HorizontalSum(F x) {
  return Horizontal<N>(x, [](float a, float b) { return a + b; });
}

// One attention call: q [B, Lq, H, D], k and v [B, Lk, H, D], out like q.
struct Problem {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  int64_t batch, q_len, kv_len, heads, head_dim;
  int64_t kv_padded;  // kv_len rounded up to kKeyPad
  float scale;
  float* kt;  // per pair: K^T in tiles, see PackPair
  float* vp;  // per pair: V, [kv_padded, D]
  int64_t q_blocks() const { return (q_len + kRows - 1) / kRows; }
  int64_t pair_size() const { return kv_padded * head_dim; }
};

// Register tiles for N-lane vectors: logits in (kTileRows x 2N keys) tiles, the
// value product in (kOutRows x kOutVecs vectors) tiles, both within the register
// file (32 vector registers with AVX-512, 16 with AVX2/SSE, 32 with NEON).
template <int N, int D>
struct Tiles {
  static constexpr int kLogitRows = N == 16 ? 8 : 4;
  static constexpr int kLogitKeys = 2 * N;
  static constexpr int kAccumulators = N == 16 ? 16 : 8;
  static constexpr int kOutVecs = D / N < 4 ? D / N : 4;
  static constexpr int kOutRows = kAccumulators / kOutVecs;
  static_assert(kKeys % kLogitKeys == 0 && kKeyPad % kLogitKeys == 0, "key tiles");
  static_assert(kRows % kLogitRows == 0 && kRows % kOutRows == 0, "row tiles");
  static_assert(D % (N * kOutVecs) == 0, "value tiles");
};

// Pair p's keys as [kv_padded / T, D, T] for T = the logit tile width (each tile
// transposed, so a tile is one contiguous piece: rows of a [D, kv_padded] transpose
// would lie kv_padded floats apart and fight over the same L1 sets), and its
// values as [kv_padded, D]; both zero padded.
template <int N, int D>
JAXSR_INLINE void PackPair(const Problem& s, int64_t p) {
  constexpr int T = Tiles<N, D>::kLogitKeys;
  const int64_t b = p / s.heads, h = p % s.heads, row_stride = s.heads * D;
  float* kt = s.kt + p * s.pair_size();
  float* vp = s.vp + p * s.pair_size();
  std::fill(kt, kt + s.pair_size(), 0.0f);
  std::fill(vp + s.kv_len * D, vp + s.pair_size(), 0.0f);
  for (int64_t j = 0; j < s.kv_len; ++j) {
    const int64_t src = (b * s.kv_len + j) * row_stride + h * D;
    float* tile = kt + (j / T) * D * T + j % T;
    for (int d = 0; d < D; ++d) tile[d * T] = s.k[src + d];
    std::memcpy(vp + j * D, s.v + src, D * sizeof(float));
  }
}

// Task t: kRows query rows of one (batch, head) pair, walked over the key blocks.
template <int N, int D>
JAXSR_INLINE void RunTask(const Problem& s, int64_t task) {
  using F = typename Vec<N>::F;
  using I = typename Vec<N>::I;
  using TL = Tiles<N, D>;
  constexpr int R = TL::kLogitRows, T = TL::kLogitKeys;
  constexpr int OR = TL::kOutRows, OV = TL::kOutVecs;
  const int64_t blocks = s.q_blocks();
  const int64_t p = task / blocks, row0 = (task % blocks) * kRows;
  const int64_t b = p / s.heads, h = p % s.heads, row_stride = s.heads * D;
  const int64_t rows = std::min<int64_t>(kRows, s.q_len - row0);
  const float* kt = s.kt + p * s.pair_size();
  const float* vp = s.vp + p * s.pair_size();

  alignas(64) float q[kRows * D];  // this block's queries, scaled; zero past q_len
  alignas(64) float logits[kRows * kKeys];
  alignas(64) float acc[kRows * D];
  float run_max[kRows], run_sum[kRows];
  std::fill(q, q + kRows * D, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = s.q + (b * s.q_len + row0 + r) * row_stride + h * D;
    for (int d = 0; d < D; ++d) q[r * D + d] = src[d] * s.scale;
  }
  std::fill(acc, acc + kRows * D, 0.0f);
  std::fill(run_max, run_max + kRows, kPadLogit);
  std::fill(run_sum, run_sum + kRows, 0.0f);

  for (int64_t key0 = 0; key0 < s.kv_padded; key0 += kKeys) {
    const int keys = static_cast<int>(std::min<int64_t>(kKeys, s.kv_padded - key0));
    // Logits: a tile of K^T stays in L1 while every row group passes over it.
    for (int j = 0; j < keys; j += T) {
      const float* ktile = kt + (key0 + j) / T * D * T;
      for (int r0 = 0; r0 < kRows; r0 += R) {
        F c0[R], c1[R];
        for (int r = 0; r < R; ++r) c0[r] = c1[r] = F{};
        const float* qr = q + r0 * D;
        for (int d = 0; d < D; ++d) {
          const F k0 = Load<F>(ktile + d * T), k1 = Load<F>(ktile + d * T + N);
          for (int r = 0; r < R; ++r) {
            c0[r] += qr[r * D + d] * k0;
            c1[r] += qr[r * D + d] * k1;
          }
        }
        for (int r = 0; r < R; ++r) {
          Store(logits + (r0 + r) * kKeys + j, c0[r]);
          Store(logits + (r0 + r) * kKeys + j + N, c1[r]);
        }
      }
    }
    // Padded keys (only in the last block) must get no weight.
    const int64_t real = std::min<int64_t>(keys, s.kv_len - key0);
    if (real < keys) {
      for (int r = 0; r < kRows; ++r)
        std::fill(logits + r * kKeys + real, logits + r * kKeys + keys, kPadLogit);
    }
    // Online softmax: exponentiate under the new running max and rescale what was
    // accumulated under the old one.
    for (int r = 0; r < kRows; ++r) {
      float* row = logits + r * kKeys;
      F m = Load<F>(row);
      for (int j = N; j < keys; j += N) m = Max(m, Load<F>(row + j));
      const float new_max = std::max(run_max[r], HorizontalMax<N>(m));
      const float correction = std::exp(run_max[r] - new_max);
      F total = F{};
      for (int j = 0; j < keys; j += N) {
        const F e = ExpNonPositive<F, I>(Load<F>(row + j) - new_max);
        Store(row + j, e);
        total += e;
      }
      run_sum[r] = run_sum[r] * correction + HorizontalSum<N>(total);
      run_max[r] = new_max;
      if (correction != 1.0f) {
        for (int d = 0; d < D; d += N) Store(acc + r * D + d, Load<F>(acc + r * D + d) * correction);
      }
    }
    // acc += weights @ V_block, in register tiles of OR rows x OV vectors.
    for (int r0 = 0; r0 < kRows; r0 += OR) {
      for (int d0 = 0; d0 < D; d0 += OV * N) {
        F o[OR][OV];
        for (int r = 0; r < OR; ++r)
          for (int v = 0; v < OV; ++v) o[r][v] = Load<F>(acc + (r0 + r) * D + d0 + v * N);
        const float* weights = logits + r0 * kKeys;
        const float* vrow = vp + key0 * D + d0;
        for (int j = 0; j < keys; ++j, vrow += D) {
          F vv[OV];
          for (int v = 0; v < OV; ++v) vv[v] = Load<F>(vrow + v * N);
          for (int r = 0; r < OR; ++r)
            for (int v = 0; v < OV; ++v) o[r][v] += weights[r * kKeys + j] * vv[v];
        }
        for (int r = 0; r < OR; ++r)
          for (int v = 0; v < OV; ++v) Store(acc + (r0 + r) * D + d0 + v * N, o[r][v]);
      }
    }
  }
  float* out = s.out + (b * s.q_len + row0) * row_stride + h * D;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.0f / run_sum[r];
    for (int d = 0; d < D; d += N) Store(out + r * row_stride + d, Load<F>(acc + r * D + d) * inv);
  }
}

// The entry points per instruction set: the always-inline templates above are
// compiled inside each, with that target's registers and instructions.
struct Ops {
  void (*pack)(const Problem&, int64_t);
  void (*task)(const Problem&, int64_t);
};

#define JAXSR_ISA_OPS(NAME, TARGET, N)                                      \
  template <int D>                                                          \
  TARGET void NAME##Pack(const Problem& s, int64_t i) { PackPair<N, D>(s, i); } \
  template <int D>                                                          \
  TARGET void NAME##Task(const Problem& s, int64_t i) { RunTask<N, D>(s, i); } \
  template <int D>                                                          \
  constexpr Ops NAME##Ops() { return Ops{&NAME##Pack<D>, &NAME##Task<D>}; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define JAXSR_X86_LEVELS 1
JAXSR_ISA_OPS(Avx512, __attribute__((target("arch=x86-64-v4"))), 16)
JAXSR_ISA_OPS(Avx2, __attribute__((target("arch=x86-64-v3"))), 8)
#endif
JAXSR_ISA_OPS(Baseline, , 4)

// 4: x86-64-v4 (AVX-512), 3: x86-64-v3 (AVX2 + FMA), 0: baseline vectors.
// JAXSR_CPU_ATTENTION_ISA=3 or 0 caps it (to test the narrower paths on a wide CPU).
int DetectIsa() {
  int isa = 0;
#ifdef JAXSR_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) {
    isa = 4;
  } else if (__builtin_cpu_supports("x86-64-v3")) {
    isa = 3;
  }
#endif
  if (const char* cap = std::getenv("JAXSR_CPU_ATTENTION_ISA")) isa = std::min(isa, std::atoi(cap));
  return isa < 3 ? 0 : isa;
}

template <int D>
Ops OpsFor(int isa) {
#ifdef JAXSR_X86_LEVELS
  if (isa == 4) return Avx512Ops<D>();
  if (isa == 3) return Avx2Ops<D>();
#endif
  return BaselineOps<D>();
}

// Runs fn(0..n-1) on the calling thread and up to `workers - 1` tasks of XLA's
// intra-op pool, taking indices from a shared counter; returns when all are done.
// Helpers that start after the work is gone touch only the shared state they own.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [](const std::shared_ptr<State>& st) {
    for (;;) {
      const int64_t i = st->next.fetch_add(1);
      if (i >= st->n) return;
      (*st->fn)(i);
      if (st->done.fetch_add(1) + 1 == st->n) {
        std::lock_guard<std::mutex> lock(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(state); });
  work(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->n; });
}

void Attend(ffi::ThreadPool& pool, Problem& s, const Ops& ops) {
  const int64_t pairs = s.batch * s.heads;
  // Uninitialised: PackPair writes every element, padding included.
  std::unique_ptr<float[]> kt(new float[pairs * s.pair_size()]);
  std::unique_ptr<float[]> vp(new float[pairs * s.pair_size()]);
  s.kt = kt.get();
  s.vp = vp.get();
  ParallelFor(pool, pairs, [&](int64_t p) { ops.pack(s, p); });
  ParallelFor(pool, pairs * s.q_blocks(), [&](int64_t t) { ops.task(s, t); });
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                         ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                         ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("jaxsr_cpu_attention: q, k, v must be [B, L, H, D]");
  for (int i : {0, 1, 2, 3}) {
    if (kd[i] != vd[i])
      return ffi::Error::InvalidArgument("jaxsr_cpu_attention: k and v shapes differ");
  }
  if (qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3])
    return ffi::Error::InvalidArgument("jaxsr_cpu_attention: q and k disagree on B, H or D");
  if (kd[1] < 1) return ffi::Error::InvalidArgument("jaxsr_cpu_attention: no keys");
  Problem s{q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
            qd[0], qd[1], kd[1], qd[2], qd[3],
            (kd[1] + kKeyPad - 1) / kKeyPad * kKeyPad, scale, nullptr, nullptr};
  const int isa = DetectIsa();  // cheap; read per call so tests can switch paths
  switch (s.head_dim) {
    case 32: Attend(pool, s, OpsFor<32>(isa)); break;
    case 64: Attend(pool, s, OpsFor<64>(isa)); break;
    case 128: Attend(pool, s, OpsFor<128>(isa)); break;
    default:
      return ffi::Error::InvalidArgument("jaxsr_cpu_attention: head size must be 32, 64 or 128");
  }
  return ffi::Error::Success();
}

}  // namespace

// Which code path this CPU runs (4: AVX-512, 3: AVX2 + FMA, 0: baseline vectors).
extern "C" int JaxsrCpuAttentionIsa() { return DetectIsa(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsrCpuAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
