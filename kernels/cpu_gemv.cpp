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
//
// int8 weight-only (linear_int8): W is int8 with one float32 scale per row (symmetric, per output channel). Each
// 16 int8 weights are sign-extended to int32 and converted to float32 (exact), then FMA'd with float32 x: the sum
// x·q[n] is a float32 sum like the float kernel's, scaled by scale[n] once at the end. x is float32 (bfloat16 or
// float16 x is widened first), so the only error beyond float32 rounding is the weights' quantization. More
// than kMaxRows rows (prefill) dequantize W tile by tile into float32 and run a GEMM on each tile: compute-bound
// there, and the dequantization costs one extra pass over W per call.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/linear.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

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
  using X = c10::BFloat16;
  using W = c10::BFloat16;
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
  at::parallel_for(0, stripes, grain, [&](int64_t s0, int64_t s1) {
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
  at::Tensor tile = at::empty({rows, K}, x.options());
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = scales.const_data_ptr<float>();
  float* tp = tile.mutable_data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nr = std::min(rows, N - n0);
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        const int8_t* src = qp + (n0 + r) * K;
        const float s = sp[n0 + r];
        for (int64_t k = 0; k < K; k++) tp[r * K + k] = static_cast<float>(src[k]) * s;
      }
    });
    at::Tensor out = y.narrow(1, n0, nr);
    const at::Tensor wt = tile.narrow(0, 0, nr).t();
    if (bias.defined())
      at::addmm_out(out, bias.narrow(0, n0, nr), x, wt);
    else
      at::mm_out(out, x, wt);
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

}  // namespace

// A drop-in for F.linear: the kernel for CPU inputs it serves (at most kMaxRows rows of x, a contiguous weight,
// float32, or bfloat16 where the CPU has AVX512_BF16, no gradients wanted), at::linear for everything else.
// Registered as composite so the choice costs no second dispatch, and gradients flow through at::linear.
//
// linear_int8: y = x · (scales ⊙ q)ᵀ (+ bias) for int8 weights q [N, K] with float32 scales [N], computed in
// float32 for x of any floating dtype (y in x's dtype); inference only (no autograd formula).
TORCH_LIBRARY(alora_gemv, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(alora_gemv, CompositeImplicitAutograd, m) {
  m.impl("linear", &linear);
  m.impl("linear_int8", &linear_int8);
}
