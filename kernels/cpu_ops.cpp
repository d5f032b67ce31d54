// CPU kernels of the engine's forward, on CPUs with AVX-512: the decode GEMV (float32, bfloat16, int8 weights),
// decode attention over a KV cache (alone, or with rotary and the cache write as one decode step), RMSNorm and
// rotary for decode rows, an adapter run's low-rank update, and the pool of worker threads they (and the engine's
// prefill GEMMs and attention) run on.
//
// GEMV: y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) for a few rows of activations (decode).
//
// Decode projections are bound by the bytes of W they read, so this kernel reads every weight byte once for all
// M rows: each thread takes a contiguous range of W's rows (one sequential stream through memory), and a register
// tile of MB activation rows × NB weight rows accumulates dot products along K in float32. Rows of x past MB are
// handled by further passes over the same NB weight rows while they are still in L1.
//
// Every output element's sum runs in the same order whatever M is (the per-(row, column) accumulator never
// depends on the tile it sits in), so a sequence's result does not depend on the other rows of its batch.
//
// float32: FMA on 16 lanes. bfloat16: VDPBF16PS (AVX512_BF16) on pairs of K, float32 accumulation, bias added in
// float32, one rounding to bfloat16 at the end (what torch's CPU bf16 linear does).
//
// int8 weight-only (linear_int8): W is int8 with one float32 scale per row (symmetric, per output channel). Each
// 16 int8 weights are sign-extended to int32 and converted to float32 (exact), then FMA'd with float32 x: the sum
// x·q[n] is a float32 sum like the float kernel's, scaled by scale[n] once at the end. x is float32 (bfloat16 or
// float16 x is widened first), so the only error beyond float32 rounding is the weights' quantization. More
// than kMaxRows rows (prefill) dequantize W tile by tile into float32 and run a GEMM on each tile: compute-bound
// there, and the dequantization costs one extra pass over W per call.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

// MKL's C entry point for this thread's thread count (mkl_service.h maps mkl_set_num_threads_local to it; the
// lowercase symbol is the Fortran one, which takes a pointer), exported by libtorch_cpu
extern "C" int MKL_Set_Num_Threads_Local(int);

namespace {

// Torch ops on the calling thread run on it alone: OpenMP's and MKL's thread counts of this thread only.
void torch_ops_single_threaded_here() {
  omp_set_num_threads(1);
  MKL_Set_Num_Threads_Local(1);
}

// The threads of the kernels' parallel loops in a thread that called use_worker_pool (the engine's scheduler):
// our own, not OpenMP's.
//
// A decode step is hundreds of parallel loops of 10-100 us each, so the threads must wait for the next loop by
// spinning, not sleeping. libgomp spins only while it manages no more threads than the machine has CPUs, and every
// thread that has ever run a parallel region owns a team of its own: once the program's main thread and the
// engine's scheduler thread have both used torch, each loop's helper threads fall asleep between loops and the
// decode step took twice as long (measured on the 2-core dev machine: 48 vs 24 ms). These workers spin for
// kSpinFor after each loop, then sleep until the next one. One caller at a time: a loop started while another
// thread's loop runs (or from inside a loop) runs on its caller's thread alone.
//
// OpenMP's threads and these must not spin at once (on 2 cores a spinning OpenMP worker held the CPU one of ours
// needed: a 10x slower step), so a thread that uses the pool runs torch's own ops single-threaded, and its heavy
// ops (GEMMs, attention) are split over the pool here, each piece a single-threaded torch op on a worker.
class WorkerPool {
 public:
  static WorkerPool& get() {
    static WorkerPool* pool = nullptr;
    static pid_t owner = 0;
    static std::mutex create;
    std::lock_guard<std::mutex> lock(create);
    if (pool == nullptr || owner != getpid()) {  // a forked child has none of its parent's threads
      pool = new WorkerPool();  // never freed: detached workers may still be waiting at exit
      owner = getpid();
    }
    return *pool;
  }

  // fn(begin', end') on at most `threads` contiguous, even chunks of [begin, end), the caller running the first.
  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, int threads, const F& fn) {
    const int64_t range = end - begin;
    const int n = static_cast<int>(std::min<int64_t>(threads, (range + grain - 1) / std::max<int64_t>(grain, 1)));
    if (n <= 1 || in_loop_) {
      if (range > 0) fn(begin, end);
      return;
    }
    std::unique_lock<std::mutex> caller(call_, std::try_to_lock);
    if (!caller.owns_lock()) {
      fn(begin, end);
      return;
    }
    ensure_workers(n - 1);
    chunk_ = (range + n - 1) / n;
    begin_ = begin;
    end_ = end;
    fn_ = [](const void* f, int64_t b, int64_t e) { (*static_cast<const F*>(f))(b, e); };
    ctx_ = &fn;
    active_ = n;
    // every worker answers every loop (those past n - 1 with nothing to do), so none can mistake one loop's
    // fields for another's
    pending_.store(workers_, std::memory_order_relaxed);
    int sleeping;
    {
      std::lock_guard<std::mutex> lock(wake_);
      generation_.fetch_add(1, std::memory_order_release);
      sleeping = sleeping_;
    }
    if (sleeping) wakeup_.notify_all();
    in_loop_ = true;
    fn(begin, std::min(end, begin + chunk_));
    in_loop_ = false;
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  static constexpr auto kSpinFor = std::chrono::microseconds(2000);
  using Job = void (*)(const void*, int64_t, int64_t);

  void ensure_workers(int count) {
    const uint64_t now = generation_.load(std::memory_order_relaxed);  // before this loop's bump
    while (workers_ < count) {
      const int id = ++workers_;
      std::thread([this, id, now] { work(id, now); }).detach();
    }
  }

  void work(int id, uint64_t seen) {
    torch_ops_single_threaded_here();
    for (;;) {
      const auto since = std::chrono::steady_clock::now();
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; spins++) {
        _mm_pause();
        if (spins % 64 == 0) sched_yield();  // a runnable thread (OpenMP's, torch's) gets this CPU first
        if (spins % 1024 == 0 && std::chrono::steady_clock::now() - since > kSpinFor) {
          std::unique_lock<std::mutex> lock(wake_);
          sleeping_++;
          wakeup_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          sleeping_--;
        }
      }
      seen++;  // the caller waits for every worker before the next bump: loops come one at a time
      if (id < active_) {
        const int64_t b = begin_ + id * chunk_, e = std::min(end_, b + chunk_);
        if (b < e) fn_(ctx_, b, e);
      }
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex call_;  // one loop at a time
  std::mutex wake_;  // guards sleeping_ and the generation bump that wakes sleepers
  std::condition_variable wakeup_;
  std::atomic<uint64_t> generation_{0};  // bumped once per loop
  std::atomic<int> pending_{0};          // workers that have not finished the current loop
  int sleeping_ = 0;
  int workers_ = 0;
  static thread_local bool in_loop_;
  // the current loop: written before generation_'s bump (release), read after it (acquire)
  Job fn_ = nullptr;
  const void* ctx_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 0;
  int active_ = 0;
};

thread_local bool WorkerPool::in_loop_ = false;

thread_local int pool_threads = 0;  // set by use_worker_pool: this thread's loops run on the pool, this wide

// fn over [begin, end) in chunks of at least `grain`: on the worker pool in a thread that uses it, on torch's
// threads (OpenMP) in any other.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  if (pool_threads > 0)
    WorkerPool::get().parallel_for(begin, end, grain, pool_threads, fn);
  else
    at::parallel_for(begin, end, grain, fn);
}

// parallel_for for a body that calls torch ops: each piece runs under the caller's thread-local state (inference
// mode, grad mode, dispatch keys), as at::parallel_for's pieces do.
template <typename F>
void parallel_for_torch_ops(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const at::ThreadLocalState state;
  parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    fn(b, e);
  });
}

void use_worker_pool(int64_t threads) {
  TORCH_CHECK(threads >= 1, "use_worker_pool: threads must be >= 1, got ", threads);
  pool_threads = static_cast<int>(threads);
  torch_ops_single_threaded_here();
}

constexpr int64_t kMaxRows = 16;  // cpu_gemv.MAX_ROWS
constexpr int kMaxRowsPerPass = 8;

// One NB-row stripe of W against MB rows of x: acc[i][j] += x[i, k:k+L] · w[j, k:k+L] over all of K.
template <int MB, int NB>
struct TileF32 {
  using X = float;
  using W = float;
  static constexpr int64_t kStep = 16;
  static inline void run(const float* x, int64_t ldx, const float* w, int64_t K, float sums[MB][NB]) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    const char* next = reinterpret_cast<const char*>(w + 2 * NB * K);  // see TileI8
    for (; k + kStep <= K; k += kStep) {
      for (int64_t b = 0; b < NB * kStep * 4; b += 64) _mm_prefetch(next + k * NB * 4 + b, _MM_HINT_T0);
      __m512 wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = _mm512_loadu_ps(w + j * K + k);
      for (int i = 0; i < MB; i++) {
        const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    if (k < K) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
      for (int i = 0; i < MB; i++) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  }
};

template <int MB, int NB>
struct TileBF16 {
  using X = c10::BFloat16;
  using W = c10::BFloat16;
  static constexpr int64_t kStep = 32;
  __attribute__((target("avx512bf16")))
  static inline void run(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t K, float sums[MB][NB]) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    const char* next = reinterpret_cast<const char*>(w + 2 * NB * K);  // see TileI8
    for (; k + kStep <= K; k += kStep) {
      for (int64_t b = 0; b < NB * kStep * 2; b += 64) _mm_prefetch(next + k * NB * 2 + b, _MM_HINT_T0);
      __m512bh wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * K + k);
      for (int i = 0; i < MB; i++) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
      }
    }
    if (k < K) {
      const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1);
      __m512bh wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * K + k);
      for (int i = 0; i < MB; i++) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
      }
    }
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  }
};

// int8 weights, float32 x: 16 weights sign-extended and converted to float32 per vector.
template <int MB, int NB>
struct TileI8 {
  using X = float;
  using W = int8_t;
  static constexpr int64_t kStep = 16;
  static inline __m512 widen(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
  static inline void run(const float* x, int64_t ldx, const int8_t* w, int64_t K, float sums[MB][NB]) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    // Prefetch the stripe after next (rows are contiguous), a step's share of it per step: with a quarter of
    // float32's bytes per FMA, the hardware prefetchers alone left memory idle (M = 1 went from 16 to 29 GB/s
    // on one core of the 2-core dev machine; the next stripe only: 22 GB/s).
    const char* next = reinterpret_cast<const char*>(w + 2 * NB * K);
    for (; k + kStep <= K; k += kStep) {
      for (int64_t b = 0; b < NB * kStep; b += 64) _mm_prefetch(next + k * NB + b, _MM_HINT_T0);
      __m512 wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * K + k)));
      for (int i = 0; i < MB; i++) {
        const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    if (k < K) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 wv[NB];
      for (int j = 0; j < NB; j++) wv[j] = widen(_mm_maskz_loadu_epi8(mask, w + j * K + k));
      for (int i = 0; i < MB; i++) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + k);
        for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
  }
};

// Weight rows per register tile for MB activation rows: MB·NB accumulators + NB weight vectors + one x vector
// must fit the 32 vector registers.
constexpr int stripe_rows(int mb) { return mb <= 2 ? 8 : mb <= 4 ? 6 : mb <= 6 ? 4 : 3; }

// One tile's sums to y: scaled per weight row where the weights are quantized (scale non-null), plus bias.
template <template <int, int> class Tile, typename X, typename W, int MB, int NB>
inline void tile_store(const X* x, int64_t ldx, const W* w, int64_t K, const float* scale, const X* bias, X* y,
                       int64_t ldy) {
  float sums[MB][NB];
  Tile<MB, NB>::run(x, ldx, w, K, sums);
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      const float b = bias ? static_cast<float>(bias[j]) : 0.0f;
      // an explicit FMA: left to the compiler, contraction could differ between tile shapes, and a row's
      // result with its batch
      y[i * ldy + j] = static_cast<X>(scale ? std::fma(sums[i][j], scale[j], b) : sums[i][j] + b);
    }
}

// Rows [n0, n1) of W against a pass of MB rows of x.
template <template <int, int> class Tile, typename X, typename W, int MB>
void pass_rows(const X* x, int64_t ldx, const W* w, int64_t K, const float* scale, const X* bias, X* y, int64_t N,
               int64_t n0, int64_t n1) {
  constexpr int NB = stripe_rows(MB);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB)
    tile_store<Tile, X, W, MB, NB>(x, ldx, w + n * K, K, scale ? scale + n : nullptr, bias ? bias + n : nullptr,
                                   y + n, N);
  for (; n < n1; n++)
    tile_store<Tile, X, W, MB, 1>(x, ldx, w + n * K, K, scale ? scale + n : nullptr, bias ? bias + n : nullptr,
                                  y + n, N);
}

template <template <int, int> class Tile, typename X, typename W>
void pass_rows_any(int mb, const X* x, int64_t ldx, const W* w, int64_t K, const float* scale, const X* bias, X* y,
                   int64_t N, int64_t n0, int64_t n1) {
  switch (mb) {
    case 1: return pass_rows<Tile, X, W, 1>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 2: return pass_rows<Tile, X, W, 2>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 3: return pass_rows<Tile, X, W, 3>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 4: return pass_rows<Tile, X, W, 4>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 5: return pass_rows<Tile, X, W, 5>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 6: return pass_rows<Tile, X, W, 6>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    case 7: return pass_rows<Tile, X, W, 7>(x, ldx, w, K, scale, bias, y, N, n0, n1);
    default: return pass_rows<Tile, X, W, 8>(x, ldx, w, K, scale, bias, y, N, n0, n1);
  }
}

// y = x · Wᵀ (· scale per row of W, where given) (+ bias) for x of at most kMaxRows rows.
template <template <int, int> class Tile, typename X = typename Tile<1, 1>::X, typename W = typename Tile<1, 1>::W>
void run_linear(const at::Tensor& x, const at::Tensor& w, const float* scale, const X* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  const X* xp = x.const_data_ptr<X>();
  const W* wp = w.const_data_ptr<W>();
  X* yp = y.mutable_data_ptr<X>();
  // Passes of at most 8 rows, as even as possible (16 rows: 8 + 8, 12: 6 + 6).
  const int64_t passes = (M + kMaxRowsPerPass - 1) / kMaxRowsPerPass;
  // Weight rows per chunk of work: a multiple of every stripe height, and about 64 KiB of weights at least,
  // so a small matrix is not split into pieces cheaper than waking a thread.
  const int64_t row_bytes = std::max<int64_t>(K * static_cast<int64_t>(sizeof(W)), 1);
  const int64_t grain = std::max<int64_t>(1, (64 * 1024 / row_bytes + 23) / 24);
  const int64_t stripes = (N + 23) / 24;
  parallel_for(0, stripes, grain, [&](int64_t s0, int64_t s1) {
    const int64_t n0 = s0 * 24, n1 = std::min(N, s1 * 24);
    // One weight stripe at a time for all passes, so later passes read it from cache rather than memory.
    for (int64_t c0 = n0; c0 < n1; c0 += 24) {
      const int64_t c1 = std::min(n1, c0 + 24);
      for (int64_t p = 0, m0 = 0; p < passes; p++) {
        const int64_t mb = (M - m0) / (passes - p);
        pass_rows_any<Tile, X, W>(static_cast<int>(mb), xp + m0 * ldx, ldx, wp, K, scale, bias, yp + m0 * N, N,
                                  c0, c1);
        m0 += mb;
      }
    }
  });
}

bool has_bf16_dot() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

// Inputs of one floating dtype on CPU, 2-D and of matching sizes, no gradient wanted: what the GEMV (for a
// contiguous W of a dtype it has tiles for, at most kMaxRows rows of x) and the pool's split GEMM take.
bool plain(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto dtype = x.scalar_type();
  if (!(x.device().is_cpu() && w.device().is_cpu() && x.layout() == at::kStrided && w.layout() == at::kStrided &&
        x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.scalar_type() == dtype &&
        at::isFloatingType(dtype)))
    return false;
  if (bias.defined() && !(bias.device().is_cpu() && bias.layout() == at::kStrided && bias.dim() == 1 &&
                          bias.size(0) == w.size(0) && bias.scalar_type() == dtype))
    return false;
  // no autograd formula here: a call that wants gradients takes at::linear's
  return !(at::GradMode::is_enabled() &&
           (x.requires_grad() || w.requires_grad() || (bias.defined() && bias.requires_grad())));
}

bool gemv_serves(const at::Tensor& x, const at::Tensor& w) {
  const auto dtype = x.scalar_type();
  return x.size(0) <= kMaxRows && w.is_contiguous() &&
         (dtype == at::kFloat || (dtype == at::kBFloat16 && has_bf16_dot()));
}

// y = x · Wᵀ (+ bias) for many rows (prefill) in a thread that uses the pool: W's rows split into one block per
// thread, each block's columns of y by one single-threaded GEMM.
at::Tensor split_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t N = w.size(0);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const int64_t grain = std::max<int64_t>(64, (N / pool_threads + 15) / 16 * 16);
  parallel_for_torch_ops(0, N, grain, [&](int64_t n0, int64_t n1) {
    at::Tensor out = y.narrow(1, n0, n1 - n0);
    const at::Tensor wt = w.narrow(0, n0, n1 - n0).t();
    if (bias.defined())
      at::addmm_out(out, bias.narrow(0, n0, n1 - n0), x, wt);
    else
      at::mm_out(out, x, wt);
  });
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias_opt) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  if (!plain(x, w, bias)) return at::linear(x, w, bias_opt);
  if (!gemv_serves(x, w)) return pool_threads > 1 ? split_linear(x, w, bias) : at::linear(x, w, bias_opt);
  const at::Tensor xc = (x.stride(1) == 1 && x.stride(0) >= x.size(1)) ? x : x.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (x.scalar_type() == at::kFloat)
    run_linear<TileF32>(xc, w, nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr, y);
  else
    run_linear<TileBF16>(xc, w, nullptr, b.defined() ? b.const_data_ptr<c10::BFloat16>() : nullptr, y);
  return y;
}

// More rows than the GEMV serves: W dequantized into float32 one tile of rows at a time (about 1 MiB, so a tile
// is read back from cache), each tile's columns of y by one GEMM.
void dequantized_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& bias,
                        at::Tensor& y) {
  const int64_t N = q.size(0), K = q.size(1);
  const int64_t rows = std::min<int64_t>(N, std::max<int64_t>(16, (1 << 20) / (4 * std::max<int64_t>(K, 1))));
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  auto dequantize = [&](float* tile, int64_t n0, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const int8_t* src = qp + (n0 + r) * K;
      const float s = sp[n0 + r];
      for (int64_t k = 0; k < K; k++) tile[r * K + k] = static_cast<float>(src[k]) * s;
    }
  };
  auto multiply = [&](const at::Tensor& tile, int64_t n0, int64_t nr) {
    at::Tensor out = y.narrow(1, n0, nr);
    const at::Tensor wt = tile.narrow(0, 0, nr).t();
    if (bias.defined())
      at::addmm_out(out, bias.narrow(0, n0, nr), x, wt);
    else
      at::mm_out(out, x, wt);
  };
  if (pool_threads > 1) {  // one range of W's rows per thread, each dequantized and multiplied tile by tile there
    parallel_for_torch_ops(0, N, std::max(rows, (N / pool_threads + 15) / 16 * 16), [&](int64_t a, int64_t b) {
      at::Tensor tile = at::empty({rows, K}, x.options());
      for (int64_t n0 = a; n0 < b; n0 += rows) {
        const int64_t nr = std::min(rows, b - n0);
        dequantize(tile.mutable_data_ptr<float>(), n0, 0, nr);
        multiply(tile, n0, nr);
      }
    });
    return;
  }
  at::Tensor tile = at::empty({rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nr = std::min(rows, N - n0);
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) { dequantize(tile.mutable_data_ptr<float>(), n0, r0, r1); });
    multiply(tile, n0, nr);
  }
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias_opt) {
  TORCH_CHECK(q.device().is_cpu() && q.layout() == at::kStrided && q.dim() == 2 && q.scalar_type() == at::kChar &&
                  q.is_contiguous(),
              "linear_int8: qweight must be a contiguous int8 [N, K] CPU tensor, got ", q.scalar_type(), " ",
              q.sizes(), " on ", q.device());
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scales.device().is_cpu() && scales.layout() == at::kStrided && scales.dim() == 1 &&
                  scales.size(0) == N && scales.scalar_type() == at::kFloat,
              "linear_int8: scales must be a float32 [N=", N, "] CPU tensor, got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.layout() == at::kStrided && x.dim() == 2 && x.size(1) == K &&
                  at::isFloatingType(x.scalar_type()),
              "linear_int8: x must be a floating-point [M, K=", K, "] CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  TORCH_CHECK(!bias.defined() || (bias.device().is_cpu() && bias.dim() == 1 && bias.size(0) == N &&
                                  bias.scalar_type() == x.scalar_type()),
              "linear_int8: bias must be None or a [N=", N, "] CPU tensor of x's dtype");
  TORCH_CHECK(!(at::GradMode::is_enabled() && (x.requires_grad() || (bias.defined() && bias.requires_grad()))),
              "linear_int8 computes no gradients: call it under torch.no_grad() or torch.inference_mode()");
  // float32 activations and bias whatever x's dtype: one rounding to x's dtype at the end
  at::Tensor xf = x.to(at::kFloat);
  if (!(xf.stride(1) == 1 && xf.stride(0) >= K)) xf = xf.contiguous();
  const at::Tensor bf = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
  const at::Tensor sc = scales.contiguous();
  at::Tensor y = at::empty({x.size(0), N}, xf.options());
  if (y.numel() == 0) return y.to(x.scalar_type());
  if (x.size(0) <= kMaxRows)
    run_linear<TileI8>(xf, q, sc.const_data_ptr<float>(), bf.defined() ? bf.const_data_ptr<float>() : nullptr, y);
  else
    dequantized_linear(xf, q, sc, bf, y);
  return y.to(x.scalar_type());
}

// ---- attention -------------------------------------------------------------------------------------------------

// e^x for x <= 0 (softmax after subtracting the max): 2^n · e^r with n = round(x·log2 e) and |r| <= ln2/2, e^r by
// its degree-6 Taylor polynomial (relative error below 2e-7, about float32 rounding); x below -87 gives e^-87.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// fn(T()) with T the element type of `dtype`: float for float32, c10::BFloat16 for bfloat16 (the only two the
// callers accept).
template <typename F>
decltype(auto) with_element_type(at::ScalarType dtype, const F& fn) {
  if (dtype == at::kFloat) return fn(float());
  return fn(c10::BFloat16());
}

// The first min(left, 16) lanes.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

inline __m512 load_f32(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_f32(const c10::BFloat16* p, __mmask16 m) {  // bfloat16 is float32's upper half
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One query row per head against positions [t0, t1) of its KV head: the chunk's max score, sum of exponentials
// and unnormalized output (flash-decoding's partial), for the G query heads that share KV head h.
template <typename T>
void attend_chunk(const T* q, const T* k, const T* v, int64_t sk, int64_t sv, int64_t D, int G, float scale,
                  int64_t t0, int64_t t1, float* m_out, float* l_out, float* acc_out) {
  const int64_t L = t1 - t0, V = (D + 15) / 16;
  std::vector<float> scores(static_cast<size_t>(G * L));
  std::vector<__m512> qv(static_cast<size_t>(G * V));
  auto mask_of = [&](int64_t c) { return lanes(D - 16 * c); };
  for (int g = 0; g < G; g++)
    for (int64_t c = 0; c < V; c++) qv[g * V + c] = load_f32(q + g * D + 16 * c, mask_of(c));
  // rows are read one after another, but too slowly for the hardware prefetchers to run ahead (measured: a
  // third of the bandwidth of a plain sum over a cache that is not in L3): prefetch kAhead rows ahead
  constexpr int64_t kAhead = 8;
  auto prefetch_row = [&](const T* row) {
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
  };
  for (int64_t t = 0; t < L; t++) {
    const T* kr = k + (t0 + t) * sk;
    if (t + kAhead < L) prefetch_row(kr + kAhead * sk);
    __m512 acc[8];
    for (int g = 0; g < G; g++) acc[g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < V; c++) {
      const __m512 kv = load_f32(kr + 16 * c, mask_of(c));
      for (int g = 0; g < G; g++) acc[g] = _mm512_fmadd_ps(qv[g * V + c], kv, acc[g]);
    }
    for (int g = 0; g < G; g++) scores[g * L + t] = _mm512_reduce_add_ps(acc[g]) * scale;
  }
  for (int g = 0; g < G; g++) {
    float* s = scores.data() + g * L;
    float m = -INFINITY;
    for (int64_t t = 0; t < L; t++) m = std::max(m, s[t]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += 16) {
      const __mmask16 mk = lanes(L - t);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), _mm512_set1_ps(m)));
      _mm512_mask_storeu_ps(s + t, mk, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
    }
    m_out[g] = m;
    l_out[g] = _mm512_reduce_add_ps(sum);
  }
  // Σ p·v row by row (a sequential read of the chunk's values), accumulators per (head, 16 lanes of D)
  std::vector<__m512> acc(static_cast<size_t>(G * V), _mm512_setzero_ps());
  for (int64_t t = 0; t < L; t++) {
    const T* vr = v + (t0 + t) * sv;
    if (t + kAhead < L) prefetch_row(vr + kAhead * sv);
    for (int64_t c = 0; c < V; c++) {
      const __m512 vv = load_f32(vr + 16 * c, mask_of(c));
      for (int g = 0; g < G; g++) acc[g * V + c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * L + t]), vv, acc[g * V + c]);
    }
  }
  for (int g = 0; g < G; g++)
    for (int64_t c = 0; c < V; c++) _mm512_mask_storeu_ps(acc_out + g * D + 16 * c, mask_of(c), acc[g * V + c]);
}

// Decode attention: q [H, D] (one new token), keys and values [Hkv, T, D] (any stride over heads and positions,
// unit stride within a row: the KV cache's valid prefix), H a multiple of Hkv (grouped queries); out [H, D].
// Positions are split into chunks over the threads (flash-decoding), partials merged at the end; float32 math.
template <typename T>
void run_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          at::Tensor& out) {
  const int64_t H = q.size(0), D = q.size(1), Hkv = k.size(0), T_ = k.size(1);
  const int G = static_cast<int>(H / Hkv);
  const int threads = pool_threads > 0 ? pool_threads : at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((T_ + 63) / 64, 2 * threads));
  const int64_t per = (T_ + chunks - 1) / chunks;
  std::vector<float> m(static_cast<size_t>(Hkv * chunks * G)), l(m.size()), acc(m.size() * D);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  parallel_for(0, Hkv * chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t task = a; task < b; task++) {
      const int64_t h = task / chunks, c = task % chunks;
      const int64_t t0 = c * per, t1 = std::min(T_, t0 + per);
      if (t0 >= t1) {
        for (int g = 0; g < G; g++) m[task * G + g] = -INFINITY, l[task * G + g] = 0;
        continue;
      }
      attend_chunk<T>(qp + h * G * D, kp + h * k.stride(0), vp + h * v.stride(0), k.stride(1), v.stride(1), D, G,
                      static_cast<float>(scale), t0, t1, &m[task * G], &l[task * G], &acc[task * G * D]);
    }
  });
  T* op = out.mutable_data_ptr<T>();
  for (int64_t h = 0; h < Hkv; h++)
    for (int g = 0; g < G; g++) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < chunks; c++) mx = std::max(mx, m[(h * chunks + c) * G + g]);
      float denom = 0;
      std::vector<float> o(static_cast<size_t>(D), 0.0f);
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t i = (h * chunks + c) * G + g;
        if (l[i] == 0) continue;
        const float w = std::exp(m[i] - mx);
        denom += w * l[i];
        for (int64_t d = 0; d < D; d++) o[d] += w * acc[i * D + d];
      }
      for (int64_t d = 0; d < D; d++) op[(h * G + g) * D + d] = static_cast<T>(o[d] / denom);
    }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && q.dim() == 2 && k.dim() == 3 &&
                  v.sizes() == k.sizes() && k.size(2) == q.size(1) && k.size(0) > 0 && q.size(0) % k.size(0) == 0 &&
                  q.size(0) / k.size(0) <= 8 && k.size(1) > 0,
              "decode_attention: expected q [H, D] and keys/values [Hkv, T>0, D] on CPU with H a multiple of Hkv "
              "(at most 8 query heads per KV head), got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode_attention: q, keys and values must all be float32 or all bfloat16");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "decode_attention: rows of keys and values must be contiguous");
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty_like(qc);
  with_element_type(q.scalar_type(), [&](auto t) { run_decode_attention<decltype(t)>(qc, k, v, scale, out); });
  return out;
}

// Prefill attention: torch's scaled_dot_product_attention, split over heads on the pool in a thread that uses it
// (elsewhere one call, on torch's threads). q [1, H, n, D], k/v [1, H, T, D], mask [n, T] bool or None.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, bool is_causal, double scale) {
  if (pool_threads <= 1 || q.dim() != 4 || k.dim() != 4 || q.size(0) != 1 || k.size(1) != q.size(1))
    return at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  parallel_for_torch_ops(0, q.size(1), 1, [&](int64_t h0, int64_t h1) {
    const int64_t n = h1 - h0;
    out.narrow(1, h0, n).copy_(at::scaled_dot_product_attention(q.narrow(1, h0, n), k.narrow(1, h0, n),
                                                                 v.narrow(1, h0, n), mask, 0.0, is_causal, scale));
  });
  return out;
}

// ---- elementwise ---------------------------------------------------------------------------------------------

inline void store_f32(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store_f32(c10::BFloat16* p, __m512 v, __mmask16 m) {  // round to nearest even, as torch does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(rounded));
}
inline __m512 round_trip(__m512 v, float*) { return v; }
inline __m512 round_trip(__m512 v, c10::BFloat16*) {  // v rounded to bfloat16 and widened again
  alignas(64) c10::BFloat16 tmp[16];
  store_f32(tmp, v, 0xFFFF);
  return load_f32(tmp, 0xFFFF);
}

// RMSNorm as transformers computes it: h = x·rsqrt(mean(x²) + eps) in float32, rounded to x's dtype, times the
// weight (a product in x's dtype). x [rows, D] with unit stride in D, weight [D] of x's dtype.
template <typename T>
void run_rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y) {
  const int64_t R = x.size(0), D = x.size(1), ld = x.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const T* row = xp + r * ld;
      __m512 sq = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = load_f32(row + d, lanes(D - d));
        sq = _mm512_fmadd_ps(v, v, sq);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(D) + static_cast<float>(eps));
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = lanes(D - d);
        const __m512 h = round_trip(_mm512_mul_ps(load_f32(row + d, m), _mm512_set1_ps(inv)), static_cast<T*>(nullptr));
        store_f32(yp + r * D + d, _mm512_mul_ps(load_f32(wp + d, m), h), m);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) &&
                  w.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16) && x.stride(1) == 1,
              "rms_norm: expected x [rows, D] (unit stride in D) and weight [D] of one dtype, float32 or bfloat16, "
              "on CPU; got x ", x.sizes(), " ", x.scalar_type(), ", weight ", w.sizes(), " ", w.scalar_type());
  const at::Tensor wc = w.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  with_element_type(dtype, [&](auto t) { run_rms_norm<decltype(t)>(x, wc, eps, y); });
  return y;
}

// Rotary embedding of one head's row: x·cos + rotate_half(x)·sin with rotate_half(x) = (-x[D/2:], x[:D/2]), rounded
// to T after each product and the sum, as torch's three ops round (bfloat16 results equal transformers').
template <typename T>
inline void rotate_row(const T* row, const T* c, const T* s, T* out, int64_t D) {
  const int64_t half = D / 2;
  T* const tag = nullptr;  // selects round_trip's overload
  for (int64_t d = 0; d < half; d += 16) {
    const __mmask16 m = lanes(half - d);
    const __m512 a = load_f32(row + d, m), b = load_f32(row + half + d, m);
    const __m512 ac = round_trip(_mm512_mul_ps(a, load_f32(c + d, m)), tag);
    const __m512 bs = round_trip(_mm512_mul_ps(b, load_f32(s + d, m)), tag);
    const __m512 bc = round_trip(_mm512_mul_ps(b, load_f32(c + half + d, m)), tag);
    const __m512 as = round_trip(_mm512_mul_ps(a, load_f32(s + half + d, m)), tag);
    store_f32(out + d, _mm512_sub_ps(ac, bs), m);
    store_f32(out + half + d, _mm512_add_ps(bc, as), m);
  }
}

// x [T, heads, D] (rows of D contiguous) by cos/sin [T, 1, D].
template <typename T>
void run_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y) {
  const int64_t Tn = x.size(0), H = x.size(1), D = x.size(2);
  const T* xp = x.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  parallel_for(0, Tn * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const int64_t t = i / H, h = i % H;
      rotate_row<T>(xp + t * x.stride(0) + h * x.stride(1), cp + t * cos.stride(0), sp + t * sin.stride(0),
                    yp + i * D, D);
    }
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0 && cos.dim() == 3 &&
                  sin.sizes() == cos.sizes() && cos.size(0) == x.size(0) && cos.size(2) == x.size(2) &&
                  cos.stride(2) == 1 && sin.stride(2) == 1 && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype && (dtype == at::kFloat || dtype == at::kBFloat16),
              "rotary: expected x [T, heads, D even] and cos/sin [T, 1, D] of one dtype, float32 or bfloat16, on CPU; "
              "got x ", x.sizes(), ", cos ", cos.sizes());
  at::Tensor y = at::empty(x.sizes(), x.options());
  with_element_type(dtype, [&](auto t) { run_rotary<decltype(t)>(x, cos, sin, y); });
  return y;
}

// One decoding token of one sequence through attention, from its fused q|k|v row to the attention output:
// rotary embedding of q and k, k and v stored at position `pos` of the layer's KV cache, decode attention over
// positions [start, pos]. qkv [T, (H + 2·Hkv)·D] (the row `row` is this token's), cos/sin [T, 1, D], k_cache and
// v_cache [Hkv, capacity > pos, D]. Replaces some fifteen torch ops per layer and token (the decode step's
// dispatch cost); the same arithmetic and roundings as those ops.
template <typename T>
at::Tensor run_decode_step(const at::Tensor& qkv, int64_t row, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos, int64_t start, int64_t H,
                           double scale) {
  const int64_t Hkv = k_cache.size(0), D = k_cache.size(2);
  const T* x = qkv.const_data_ptr<T>() + row * qkv.stride(0);
  const T* c = cos.const_data_ptr<T>() + row * cos.stride(0);
  const T* s = sin.const_data_ptr<T>() + row * sin.stride(0);
  at::Tensor q = at::empty({H, D}, qkv.options());
  T* qp = q.mutable_data_ptr<T>();
  for (int64_t h = 0; h < H; h++) rotate_row<T>(x + h * D, c, s, qp + h * D, D);
  T* kp = k_cache.mutable_data_ptr<T>();
  T* vp = v_cache.mutable_data_ptr<T>();
  for (int64_t h = 0; h < Hkv; h++) {
    rotate_row<T>(x + (H + h) * D, c, s, kp + h * k_cache.stride(0) + pos * k_cache.stride(1), D);
    std::copy_n(x + (H + Hkv + h) * D, D, vp + h * v_cache.stride(0) + pos * v_cache.stride(1));
  }
  at::Tensor out = at::empty({H, D}, qkv.options());
  run_decode_attention<T>(q, k_cache.narrow(1, start, pos + 1 - start), v_cache.narrow(1, start, pos + 1 - start),
                          scale, out);
  return out;
}

at::Tensor decode_step_attention(const at::Tensor& qkv, int64_t row, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor k_cache, at::Tensor v_cache, int64_t pos, int64_t start, int64_t heads,
                                 double scale) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes() && k_cache.stride(2) == 1 &&
                  v_cache.stride(2) == 1 && heads > 0 && k_cache.size(0) > 0 && heads % k_cache.size(0) == 0 &&
                  heads / k_cache.size(0) <= 8 && k_cache.size(2) % 2 == 0,
              "decode_step_attention: caches must be [Hkv, capacity, D even] (unit stride in D) with heads a multiple "
              "of Hkv (at most 8 per KV head), got ", k_cache.sizes(), " for ", heads, " heads");
  const int64_t D = k_cache.size(2), width = (heads + 2 * k_cache.size(0)) * D;
  TORCH_CHECK(qkv.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu() && qkv.dim() == 2 &&
                  qkv.size(1) == width && qkv.stride(1) == 1 && 0 <= row && row < qkv.size(0),
              "decode_step_attention: qkv must be a CPU [T, ", width, "] tensor with row < T, got ", qkv.sizes());
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes() && cos.size(0) == qkv.size(0) && cos.size(2) == D &&
                  cos.stride(2) == 1 && sin.stride(2) == 1,
              "decode_step_attention: cos/sin must be [T, 1, D=", D, "], got ", cos.sizes());
  TORCH_CHECK(0 <= start && start <= pos && pos < k_cache.size(1),
              "decode_step_attention: need 0 <= start <= pos < capacity, got start ", start, ", pos ", pos,
              ", capacity ", k_cache.size(1));
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "decode_step_attention: qkv, cos, sin and the caches must all be float32 or all bfloat16");
  return with_element_type(dtype, [&](auto t) {
    return run_decode_step<decltype(t)>(qkv, row, cos, sin, k_cache, v_cache, pos, start, heads, scale);
  });
}

// y[start:stop] += alpha · (x[start:stop] · A[slot]ᵀ) · B[slot]ᵀ in place, for a run of rows that share one adapter
// (stacks A [S, r, K], B [S, N, r]): the two small products through the GEMV (up to kMaxRows rows; more go to a
// GEMM), then one add. Three C++ calls instead of seven torch ops from Python per adapted projection and step.
void add_lora_rows_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, int64_t slot,
                    int64_t start, int64_t stop, double alpha) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && A.dim() == 3 && B.dim() == 3 && 0 <= slot && slot < A.size(0) &&
                  B.size(0) == A.size(0) && A.size(2) == x.size(1) && B.size(1) == y.size(1) &&
                  B.size(2) == A.size(1) && y.size(0) == x.size(0) && 0 <= start && start < stop && stop <= x.size(0),
              "add_lora_rows_: expected x [T, K], y [T, N], A [S, r, K], B [S, N, r], slot < S and "
              "0 <= start < stop <= T, got x ", x.sizes(), ", y ", y.sizes(), ", A ", A.sizes(), ", B ", B.sizes(),
              ", slot ", slot, ", rows ", start, ":", stop);
  const at::Tensor xs = x.narrow(0, start, stop - start);
  at::Tensor ys = y.narrow(0, start, stop - start);
  // (linear): ours, not at::linear, which argument-dependent lookup would also find
  const at::Tensor h = (linear)(xs, A.select(0, slot), std::nullopt);
  ys.add_((linear)(h, B.select(0, slot), std::nullopt), alpha);
}

}  // namespace

// linear: a drop-in for F.linear: the GEMV for CPU inputs it serves (at most kMaxRows rows of x, a contiguous
// weight, float32, or bfloat16 where the CPU has AVX512_BF16, no gradients wanted), the pool's split GEMM for more
// rows in a thread that uses the pool, at::linear for everything else. Registered as composite so the choice
// costs no second dispatch, and gradients flow through at::linear.
//
// linear_int8: y = x · (scales ⊙ q)ᵀ (+ bias) for int8 weights q [N, K] with float32 scales [N], computed in
// float32 for x of any floating dtype (y in x's dtype); inference only (no autograd formula).
//
// add_lora_rows_, decode_attention, attention, decode_step_attention, rms_norm, rotary: see above. use_worker_pool(threads): the calling thread's kernels run on the
// worker pool with `threads` threads, its torch ops single-threaded.
TORCH_LIBRARY(alora_cpu, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale) -> Tensor");
  m.def("add_lora_rows_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, int slot, int start, int stop, float alpha) -> ()");
  m.def("decode_step_attention(Tensor qkv, int row, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int pos, int start, int heads, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("use_worker_pool(int threads) -> ()", &use_worker_pool);
}

TORCH_LIBRARY_IMPL(alora_cpu, CompositeImplicitAutograd, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
  m.impl("decode_attention", &decode_attention);
  m.impl("attention", &attention);
  m.impl("add_lora_rows_", &add_lora_rows_);
  m.impl("decode_step_attention", &decode_step_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
