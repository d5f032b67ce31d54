// y[M, N] = x[M, K] · W[N, K]ᵀ (+ bias) for a few rows of activations (decode), on CPUs with AVX-512.
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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kMaxRows = 16;  // cpu_gemv.MAX_ROWS
constexpr int kMaxRowsPerPass = 8;

// One NB-row stripe of W against MB rows of x: acc[i][j] += x[i, k:k+L] · w[j, k:k+L] over all of K.
template <int MB, int NB>
struct TileF32 {
  static constexpr int64_t kStep = 16;
  static inline void run(const float* x, int64_t ldx, const float* w, int64_t K, float sums[MB][NB]) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) {
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
  static constexpr int64_t kStep = 32;
  __attribute__((target("avx512bf16")))
  static inline void run(const c10::BFloat16* x, int64_t ldx, const c10::BFloat16* w, int64_t K, float sums[MB][NB]) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; i++)
      for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) {
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

// Weight rows per register tile for MB activation rows: MB·NB accumulators + NB weight vectors + one x vector
// must fit the 32 vector registers.
constexpr int stripe_rows(int mb) { return mb <= 2 ? 8 : mb <= 4 ? 6 : mb <= 6 ? 4 : 3; }

template <template <int, int> class Tile, typename T, int MB, int NB>
inline void tile_store(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t ldy) {
  float sums[MB][NB];
  Tile<MB, NB>::run(x, ldx, w, K, sums);
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) {
      const float b = bias ? static_cast<float>(bias[j]) : 0.0f;
      y[i * ldy + j] = static_cast<T>(sums[i][j] + b);
    }
}

// Rows [n0, n1) of W against a pass of MB rows of x.
template <template <int, int> class Tile, typename T, int MB>
void pass_rows(const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t N,
               int64_t n0, int64_t n1) {
  constexpr int NB = stripe_rows(MB);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB)
    tile_store<Tile, T, MB, NB>(x, ldx, w + n * K, K, bias ? bias + n : nullptr, y + n, N);
  for (; n < n1; n++) tile_store<Tile, T, MB, 1>(x, ldx, w + n * K, K, bias ? bias + n : nullptr, y + n, N);
}

template <template <int, int> class Tile, typename T>
void pass_rows_any(int mb, const T* x, int64_t ldx, const T* w, int64_t K, const T* bias, T* y, int64_t N,
                   int64_t n0, int64_t n1) {
  switch (mb) {
    case 1: return pass_rows<Tile, T, 1>(x, ldx, w, K, bias, y, N, n0, n1);
    case 2: return pass_rows<Tile, T, 2>(x, ldx, w, K, bias, y, N, n0, n1);
    case 3: return pass_rows<Tile, T, 3>(x, ldx, w, K, bias, y, N, n0, n1);
    case 4: return pass_rows<Tile, T, 4>(x, ldx, w, K, bias, y, N, n0, n1);
    case 5: return pass_rows<Tile, T, 5>(x, ldx, w, K, bias, y, N, n0, n1);
    case 6: return pass_rows<Tile, T, 6>(x, ldx, w, K, bias, y, N, n0, n1);
    case 7: return pass_rows<Tile, T, 7>(x, ldx, w, K, bias, y, N, n0, n1);
    default: return pass_rows<Tile, T, 8>(x, ldx, w, K, bias, y, N, n0, n1);
  }
}

template <template <int, int> class Tile, typename T>
void run_linear(const at::Tensor& x, const at::Tensor& w, const T* bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  // Passes of at most 8 rows, as even as possible (16 rows: 8 + 8, 12: 6 + 6).
  const int64_t passes = (M + kMaxRowsPerPass - 1) / kMaxRowsPerPass;
  // Weight rows per chunk of work: a multiple of every stripe height, and about 64 KiB of weights at least,
  // so a small matrix is not split into pieces cheaper than waking a thread.
  const int64_t row_bytes = std::max<int64_t>(K * static_cast<int64_t>(sizeof(T)), 1);
  const int64_t grain = std::max<int64_t>(1, (64 * 1024 / row_bytes + 23) / 24);
  const int64_t stripes = (N + 23) / 24;
  at::parallel_for(0, stripes, grain, [&](int64_t s0, int64_t s1) {
    const int64_t n0 = s0 * 24, n1 = std::min(N, s1 * 24);
    // One weight stripe at a time for all passes, so later passes read it from cache rather than memory.
    for (int64_t c0 = n0; c0 < n1; c0 += 24) {
      const int64_t c1 = std::min(n1, c0 + 24);
      for (int64_t p = 0, m0 = 0; p < passes; p++) {
        const int64_t mb = (M - m0) / (passes - p);
        pass_rows_any<Tile, T>(static_cast<int>(mb), xp + m0 * ldx, ldx, wp, K, bias, yp + m0 * N, N, c0, c1);
        m0 += mb;
      }
    }
  });
}

bool has_bf16_dot() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}

// What the kernel serves; everything else is at::linear's.
bool serves(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const auto dtype = x.scalar_type();
  if (!(x.device().is_cpu() && w.device().is_cpu() && x.layout() == at::kStrided && w.layout() == at::kStrided &&
        x.dim() == 2 && w.dim() == 2 && x.size(0) <= kMaxRows && x.size(1) == w.size(1) && w.is_contiguous() &&
        w.scalar_type() == dtype && (dtype == at::kFloat || (dtype == at::kBFloat16 && has_bf16_dot()))))
    return false;
  if (bias.defined() && !(bias.device().is_cpu() && bias.layout() == at::kStrided && bias.dim() == 1 &&
                          bias.size(0) == w.size(0) && bias.scalar_type() == dtype))
    return false;
  // no autograd formula here: a call that wants gradients takes at::linear's
  return !(at::GradMode::is_enabled() &&
           (x.requires_grad() || w.requires_grad() || (bias.defined() && bias.requires_grad())));
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias_opt) {
  const at::Tensor bias = bias_opt.has_value() ? *bias_opt : at::Tensor();
  if (!serves(x, w, bias)) return at::linear(x, w, bias_opt);
  const at::Tensor xc = (x.stride(1) == 1 && x.stride(0) >= x.size(1)) ? x : x.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  if (y.numel() == 0) return y;
  if (x.scalar_type() == at::kFloat)
    run_linear<TileF32, float>(xc, w, b.defined() ? b.const_data_ptr<float>() : nullptr, y);
  else
    run_linear<TileBF16, c10::BFloat16>(xc, w, b.defined() ? b.const_data_ptr<c10::BFloat16>() : nullptr, y);
  return y;
}

}  // namespace

// A drop-in for F.linear: the kernel for CPU inputs it serves (at most kMaxRows rows of x, a contiguous weight,
// float32, or bfloat16 where the CPU has AVX512_BF16, no gradients wanted), at::linear for everything else.
// Registered as composite so the choice costs no second dispatch, and gradients flow through at::linear.
TORCH_LIBRARY(alora_gemv, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(alora_gemv, CompositeImplicitAutograd, m) {
  m.impl("linear", &linear);
}
