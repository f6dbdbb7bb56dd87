// mas_local._C: the extension's op schemas (namespace mas_local_ext) and their CPU kernels.
//
// The public ops live in Python (mas_local::*) so that they exist without a compiled
// extension; backend "ext" forwards to the ops declared here. CUDA kernels are
// registered for the same schemas in csrc/cuda/binding.cpp (CUDA builds only).
//
//   abs_gemm_acc_       Ω[out,in] += α |A|ᵀ|B|          A [R,out], B [R,in]
//   per_sample_abs_acc_ Ω[out,in] += α Σ_b |A_bᵀ B_b|   A [B,T,out], B [B,T,in]
//   (both GEMM-shaped ops take a precision, "exact" / "accurate" / "fast": see docs/extension.md)
//   penalty_grad_       g += 2λΩ(θ−θ*) for every tensor; returns λ Σ Ω(θ−θ*)² (0-d fp32)
//   has_cuda            whether this build registered CUDA kernels

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MAS_LOCAL_X86_CLONES 1
#define MAS_LOCAL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MAS_LOCAL_ALWAYS_INLINE inline
#endif

namespace mas_local_ext {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------
// SIMD strategy. at::vec::Vectorized<float> compiled inside an extension is its
// generic, non-dispatched form (torch's CPU_CAPABILITY builds are internal to
// libtorch), and GCC left those loops scalar here (checked with objdump). The
// kernels below are instead plain loops of constant trip count over lane arrays,
// which GCC vectorises, compiled twice: baseline ISA and AVX2+FMA+F16C.
//
// bf16 <-> float on the raw bits, branch-free so that the compiler vectorises
// the lane loops (c10::BFloat16's scalar conversion checks for NaN with a branch).
MAS_LOCAL_ALWAYS_INLINE float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

MAS_LOCAL_ALWAYS_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);          // keep NaN a NaN
}

#ifdef MAS_LOCAL_X86_CLONES
// Kernels below are compiled twice: for the baseline ISA the extension is built
// for (torch's extension flags carry no -march: SSE2 on x86-64) and, with GCC on
// x86-64, for AVX2+FMA+F16C; the second is picked at run time when the CPU has it.
// MAS_LOCAL_EXT_BASELINE_ISA=1 forces the baseline (tests use it).
bool cpu_has_avx2() {
  static const bool has = [] {
    const char* force = std::getenv("MAS_LOCAL_EXT_BASELINE_ISA");
    if (force != nullptr && std::string(force) == "1") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#define MAS_LOCAL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

// ---------------------------------------------------------------------------
// Penalty: g += 2λ w, value += w·d, with d = θ − θ*, w = Ω d, in one pass.
//
// Determinism: the work is cut into chunks of kPenaltyChunk elements of one
// tensor, independent of the thread count. Each chunk's value is a double,
// itself a sum, in fixed order, of 16 float lane sums per kPenaltyBlock
// elements; the chunk values are summed in chunk order at the end. So the
// returned value is bit-identical for any number of threads.
constexpr int64_t kPenaltyChunk = 1 << 16;
constexpr int64_t kPenaltyBlock = 512;  // a multiple of every vector width used
static_assert(kPenaltyBlock % 16 == 0, "block must be a multiple of the vector width");

using PenaltyFn = double (*)(void*, const void*, const void*, const void*, int64_t, float);

// Storage types for the lane loops below: bf16 as its raw bits, fp16 as the
// compiler's _Float16 where it has one, so that conversions vectorise (GCC keeps
// c10::BFloat16 / c10::Half conversions scalar: NaN branch, software fp16).
template <typename T>
struct Raw {
  using type = T;
};
template <>
struct Raw<c10::BFloat16> {
  using type = uint16_t;
};
#ifdef __FLT16_MAX__
template <>
struct Raw<c10::Half> {
  using type = _Float16;
};
#endif

MAS_LOCAL_ALWAYS_INLINE float to_f(float x) { return x; }
MAS_LOCAL_ALWAYS_INLINE float to_f(uint16_t bf16_bits) { return bf16_bits_to_float(bf16_bits); }
MAS_LOCAL_ALWAYS_INLINE float to_f(c10::Half x) { return static_cast<float>(x); }
#ifdef __FLT16_MAX__
MAS_LOCAL_ALWAYS_INLINE float to_f(_Float16 x) { return static_cast<float>(x); }
#endif

template <typename R>
MAS_LOCAL_ALWAYS_INLINE R from_f(float x) {
  if constexpr (std::is_same_v<R, uint16_t>) {
    return float_to_bf16_bits(x);
  } else {
    return static_cast<R>(x);  // float, _Float16 (round to nearest even) or c10::Half
  }
}

// One chunk. The elements go through fixed-width lane arrays (kPenaltyLanes
// floats: one AVX-512 or two AVX2 registers) in loops of constant trip count,
// which GCC turns into SIMD code, with float lane sums flushed to double every
// kPenaltyBlock elements.
constexpr int kPenaltyLanes = 16;
static_assert(kPenaltyBlock % kPenaltyLanes == 0, "block must hold whole lane groups");

template <typename G0, typename P0, typename O0>
MAS_LOCAL_ALWAYS_INLINE double penalty_chunk_body(void* g_, const void* p_, const void* a_, const void* o_, int64_t n,
                                                  float two_lam) {
  using G = typename Raw<G0>::type;
  using P = typename Raw<P0>::type;
  using O = typename Raw<O0>::type;
  G* __restrict__ g = static_cast<G*>(g_);
  const P* __restrict__ p = static_cast<const P*>(p_);
  const P* __restrict__ a = static_cast<const P*>(a_);
  const O* __restrict__ o = static_cast<const O*>(o_);
  double total = 0.0;
  int64_t i = 0;
  const int64_t n_full = n - n % kPenaltyLanes;
  while (i < n_full) {
    const int64_t stop = std::min(n_full, i + kPenaltyBlock);
    float lane[kPenaltyLanes] = {};
    for (; i < stop; i += kPenaltyLanes) {
      float gv[kPenaltyLanes];
      for (int k = 0; k < kPenaltyLanes; ++k) {
        const float d = to_f(p[i + k]) - to_f(a[i + k]);
        const float w = to_f(o[i + k]) * d;
        gv[k] = to_f(g[i + k]) + two_lam * w;
        lane[k] += w * d;
      }
      for (int k = 0; k < kPenaltyLanes; ++k) g[i + k] = from_f<G>(gv[k]);
    }
    double block = 0.0;
    for (int k = 0; k < kPenaltyLanes; ++k) block += static_cast<double>(lane[k]);
    total += block;
  }
  for (; i < n; ++i) {
    const float d = to_f(p[i]) - to_f(a[i]);
    const float w = to_f(o[i]) * d;
    g[i] = from_f<G>(to_f(g[i]) + two_lam * w);
    total += static_cast<double>(w * d);
  }
  return total;
}

template <typename G, typename P, typename O>
double penalty_chunk(void* g, const void* p, const void* a, const void* o, int64_t n, float two_lam) {
  return penalty_chunk_body<G, P, O>(g, p, a, o, n, two_lam);
}

#ifdef MAS_LOCAL_X86_CLONES
template <typename G, typename P, typename O>
MAS_LOCAL_AVX2 double penalty_chunk_avx2(void* g, const void* p, const void* a, const void* o, int64_t n,
                                         float two_lam) {
  return penalty_chunk_body<G, P, O>(g, p, a, o, n, two_lam);
}
#endif

template <typename G, typename P, typename O>
PenaltyFn pick_isa() {
#ifdef MAS_LOCAL_X86_CLONES
  if (cpu_has_avx2()) return &penalty_chunk_avx2<G, P, O>;
#endif
  return &penalty_chunk<G, P, O>;
}

template <typename G, typename P>
PenaltyFn pick_omega(at::ScalarType o) {
  if (o == at::kFloat) return pick_isa<G, P, float>();
  if (o == at::kBFloat16) return pick_isa<G, P, c10::BFloat16>();
  TORCH_CHECK(false, "mas_local_ext::penalty_grad_: omega must be float32 or bfloat16, got ", o);
}

template <typename G>
PenaltyFn pick_param(at::ScalarType p, at::ScalarType o) {
  if (p == at::kFloat) return pick_omega<G, float>(o);
  if (p == at::kBFloat16) return pick_omega<G, c10::BFloat16>(o);
  if (p == at::kHalf) return pick_omega<G, c10::Half>(o);
  TORCH_CHECK(false, "mas_local_ext::penalty_grad_: params must be float32, bfloat16 or float16, got ", p);
}

PenaltyFn pick_penalty(at::ScalarType g, at::ScalarType p, at::ScalarType o) {
  if (g == at::kFloat) return pick_param<float>(p, o);
  if (g == at::kBFloat16) return pick_param<c10::BFloat16>(p, o);
  if (g == at::kHalf) return pick_param<c10::Half>(p, o);
  TORCH_CHECK(false, "mas_local_ext::penalty_grad_: grads must be float32, bfloat16 or float16, got ", g);
}

// Whether t's elements fill numel consecutive slots of memory, in any dimension order.
bool dense(const Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

Tensor penalty_grad_cpu(at::TensorList grads, at::TensorList params, at::TensorList anchors, at::TensorList omegas,
                        double lam) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && anchors.size() == n && omegas.size() == n,
              "mas_local_ext::penalty_grad_: grads, params, anchors and omegas must have the same length");
  if (n == 0) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));

  struct Item {
    PenaltyFn fn;
    char* g;
    const char* p;
    const char* a;
    const char* o;
    int64_t gs, ps, os;  // element sizes in bytes (anchor has the param's)
  };
  struct Chunk {
    int32_t item;
    int64_t start, len;
  };
  std::vector<Item> items;
  std::vector<Chunk> chunks;
  std::vector<Tensor> keep;                            // contiguous copies kept alive
  std::vector<std::pair<Tensor, Tensor>> write_back;   // (grad, contiguous copy)
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& g0 = grads[i];
    const Tensor& p0 = params[i];
    const Tensor& a0 = anchors[i];
    const Tensor& o0 = omegas[i];
    TORCH_CHECK(g0.device().is_cpu() && p0.device().is_cpu() && a0.device().is_cpu() && o0.device().is_cpu(),
                "mas_local_ext::penalty_grad_ (CPU): tensor ", i, " is not on the CPU");
    TORCH_CHECK(g0.sizes() == p0.sizes() && a0.sizes() == p0.sizes() && o0.sizes() == p0.sizes(),
                "mas_local_ext::penalty_grad_: tensor ", i, " has mismatched shapes");
    TORCH_CHECK(a0.scalar_type() == p0.scalar_type(), "mas_local_ext::penalty_grad_: anchor ", i,
                " must have the param's dtype ", p0.scalar_type(), ", got ", a0.scalar_type());
    PenaltyFn fn = pick_penalty(g0.scalar_type(), p0.scalar_type(), o0.scalar_type());
    // Flat arrays in one element order: no copy when the four share strides and are dense
    // (contiguous, channels_last, ...); else the mismatched ones are copied into the grad's
    // layout (a non-dense grad into a contiguous copy that is written back).
    Tensor g = g0;
    if (!dense(g0)) {
      g = g0.contiguous();
      write_back.emplace_back(g0, g);
    }
    auto like_grad = [&](const Tensor& x) {
      return x.strides() == g.strides() ? x : at::empty_like(g, x.options()).copy_(x);
    };
    Tensor p = like_grad(p0), a = like_grad(a0), o = like_grad(o0);
    keep.push_back(p);
    keep.push_back(a);
    keep.push_back(o);
    keep.push_back(g);
    items.push_back({fn, static_cast<char*>(g.data_ptr()), static_cast<const char*>(p.const_data_ptr()),
                     static_cast<const char*>(a.const_data_ptr()), static_cast<const char*>(o.const_data_ptr()),
                     static_cast<int64_t>(g.element_size()), static_cast<int64_t>(p.element_size()),
                     static_cast<int64_t>(o.element_size())});
    const int64_t numel = p.numel();
    for (int64_t s = 0; s < numel; s += kPenaltyChunk)
      chunks.push_back({static_cast<int32_t>(i), s, std::min(kPenaltyChunk, numel - s)});
  }

  const float two_lam = static_cast<float>(2.0 * lam);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      const Item& it = items[ch.item];
      partial[c] = it.fn(it.g + ch.start * it.gs, it.p + ch.start * it.ps, it.a + ch.start * it.ps,
                         it.o + ch.start * it.os, ch.len, two_lam);
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  for (auto& wb : write_back) wb.first.copy_(wb.second);
  return at::scalar_tensor(static_cast<float>(total * lam), at::TensorOptions().dtype(at::kFloat));
}

// ---------------------------------------------------------------------------
// |x| as a contiguous float32 tensor in one pass (the reference's
// x.float().abs() takes two for reduced types).
template <typename T0>
MAS_LOCAL_ALWAYS_INLINE void abs_to_float_body(const void* x_, float* __restrict__ y, int64_t n) {
  using T = typename Raw<T0>::type;
  const T* __restrict__ x = static_cast<const T*>(x_);
  for (int64_t i = 0; i < n; ++i) y[i] = std::fabs(to_f(x[i]));
}

template <typename T0>
void abs_to_float_base(const void* x, float* y, int64_t n) {
  abs_to_float_body<T0>(x, y, n);
}

#ifdef MAS_LOCAL_X86_CLONES
template <typename T0>
MAS_LOCAL_AVX2 void abs_to_float_avx2(const void* x, float* y, int64_t n) {
  abs_to_float_body<T0>(x, y, n);
}
#endif

template <typename T0>
void abs_to_float_kernel(const T0* x, float* y, int64_t n) {
  auto fn = &abs_to_float_base<T0>;
#ifdef MAS_LOCAL_X86_CLONES
  if (cpu_has_avx2()) fn = &abs_to_float_avx2<T0>;
#endif
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) { fn(x + begin, y + begin, end - begin); });
}

Tensor abs_to_float(const Tensor& x0) {
  const Tensor x = x0.contiguous();
  Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case at::kFloat:
      abs_to_float_kernel(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), n);
      break;
    case at::kBFloat16:
      abs_to_float_kernel(x.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<float>(), n);
      break;
    case at::kHalf:
      abs_to_float_kernel(x.const_data_ptr<c10::Half>(), y.mutable_data_ptr<float>(), n);
      break;
    default:
      y.copy_(x.abs());  // float64 and anything else: exact through torch
  }
  return y;
}

void check_omega(const Tensor& omega, int64_t out, int64_t in, const char* what) {
  TORCH_CHECK(omega.scalar_type() == at::kFloat, what, ": omega must be float32, got ", omega.scalar_type());
  TORCH_CHECK(omega.dim() == 2 && omega.size(0) == out && omega.size(1) == in, what, ": omega has shape ",
              omega.sizes(), ", expected [", out, ", ", in, "]");
}

// abs-GEMM on the CPU: one-pass abs+cast of both operands, then MKL/oneDNN's GEMM
// with beta = 1 straight into Ω. A hand-written blocked kernel cannot beat the
// vendor GEMM here; the only waste of the reference is the extra cast pass.
void abs_gemm_acc_cpu(Tensor omega, const Tensor& a, const Tensor& b, double alpha, c10::string_view precision) {
  (void)precision;  // the CPU always computes in exact fp32
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
              "mas_local_ext::abs_gemm_acc_: expected a [R, out] and b [R, in]");
  check_omega(omega, a.size(1), b.size(1), "mas_local_ext::abs_gemm_acc_");
  omega.addmm_(abs_to_float(a).t(), abs_to_float(b), /*beta=*/1.0, /*alpha=*/alpha);
}

// ---------------------------------------------------------------------------
// Per-sample abs accumulation on the CPU. The batch is processed in slices
// whose [slice, out, in] products fit in ~1 MiB (cache-resident): one batched
// GEMM (MKL) per slice into a reused scratch buffer, then one fused pass
// Ω += α Σ_b |P_b| over the slice, parallel over Ω's elements, summing b in
// order (so the result does not depend on the thread count). The full
// [B, out, in] tensor is never materialised.
constexpr int64_t kPerSampleScratchBytes = 1 << 20;

MAS_LOCAL_ALWAYS_INLINE void abs_sum_body(float* __restrict__ omega, const float* __restrict__ prod, int64_t nb,
                                          int64_t m, int64_t begin, int64_t end, float alpha) {
  constexpr int64_t kTile = 1024;
  float acc[kTile];
  for (int64_t j0 = begin; j0 < end; j0 += kTile) {
    const int64_t len = std::min(kTile, end - j0);
    const float* first = prod + j0;
    for (int64_t j = 0; j < len; ++j) acc[j] = std::fabs(first[j]);
    for (int64_t k = 1; k < nb; ++k) {
      const float* row = prod + k * m + j0;
      for (int64_t j = 0; j < len; ++j) acc[j] += std::fabs(row[j]);
    }
    float* dst = omega + j0;
    for (int64_t j = 0; j < len; ++j) dst[j] += alpha * acc[j];
  }
}

void abs_sum_base(float* omega, const float* prod, int64_t nb, int64_t m, int64_t begin, int64_t end, float alpha) {
  abs_sum_body(omega, prod, nb, m, begin, end, alpha);
}

#ifdef MAS_LOCAL_X86_CLONES
MAS_LOCAL_AVX2 void abs_sum_avx2(float* omega, const float* prod, int64_t nb, int64_t m, int64_t begin, int64_t end,
                                 float alpha) {
  abs_sum_body(omega, prod, nb, m, begin, end, alpha);
}
#endif

// omega[j] += alpha Σ_k |prod[k, j]|, k in order for every j (thread-count independent).
void abs_sum_into(float* omega, const float* prod, int64_t nb, int64_t m, float alpha) {
  auto fn = &abs_sum_base;
#ifdef MAS_LOCAL_X86_CLONES
  if (cpu_has_avx2()) fn = &abs_sum_avx2;
#endif
  at::parallel_for(0, m, 1 << 12, [&](int64_t begin, int64_t end) { fn(omega, prod, nb, m, begin, end, alpha); });
}

// The CPU computes in fp32 (MKL's IEEE GEMM) whatever the precision asks for.
void per_sample_abs_acc_cpu(Tensor omega, const Tensor& a0, const Tensor& b0, double alpha,
                            c10::string_view precision) {
  (void)precision;
  TORCH_CHECK(a0.dim() == 3 && b0.dim() == 3 && a0.size(0) == b0.size(0) && a0.size(1) == b0.size(1),
              "mas_local_ext::per_sample_abs_acc_: expected a [B, T, out] and b [B, T, in]");
  const int64_t nb = a0.size(0), out = a0.size(2), in = b0.size(2);
  check_omega(omega, out, in, "mas_local_ext::per_sample_abs_acc_");
  if (nb == 0 || out == 0 || in == 0) return;
  const Tensor a = a0.to(at::kFloat);
  const Tensor b = b0.to(at::kFloat);
  Tensor om = omega.is_contiguous() ? omega : omega.contiguous();
  const int64_t m = out * in;
  const int64_t slice = std::max<int64_t>(1, std::min<int64_t>(nb, kPerSampleScratchBytes / (4 * m)));
  Tensor scratch = at::empty({slice, out, in}, a.options());
  for (int64_t s = 0; s < nb; s += slice) {
    const int64_t len = std::min(slice, nb - s);
    Tensor prod = scratch.narrow(0, 0, len);
    at::bmm_out(prod, a.narrow(0, s, len).transpose(1, 2), b.narrow(0, s, len));
    abs_sum_into(om.mutable_data_ptr<float>(), prod.const_data_ptr<float>(), len, m, static_cast<float>(alpha));
  }
  if (!omega.is_same(om)) omega.copy_(om);
}

bool has_cuda() {
#ifdef MAS_LOCAL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(mas_local_ext, m) {
  m.def("abs_gemm_acc_(Tensor(a!) omega, Tensor a, Tensor b, float alpha, str precision) -> ()");
  m.def("per_sample_abs_acc_(Tensor(a!) omega, Tensor a, Tensor b, float alpha, str precision) -> ()");
  m.def(
      "penalty_grad_(Tensor(a!)[] grads, Tensor[] params, Tensor[] anchors, Tensor[] omegas, float lam) -> Tensor");
  m.def("has_cuda() -> bool", &has_cuda);
}

TORCH_LIBRARY_IMPL(mas_local_ext, CPU, m) {
  m.impl("abs_gemm_acc_", &abs_gemm_acc_cpu);
  m.impl("per_sample_abs_acc_", &per_sample_abs_acc_cpu);
  m.impl("penalty_grad_", &penalty_grad_cpu);
}

}  // namespace mas_local_ext

// A Python module with no attributes: importing mas_local._C runs the static
// registrations above. (No pybind11 needed.)
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                      nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
