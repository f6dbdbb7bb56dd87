// CUDA registrations of the mas_local_ext ops (compiled only in CUDA builds).
//
// This file holds every torch-facing step: argument checks, layouts, the device
// guard, the current stream, scratch allocation through the caching allocator. The
// kernels themselves are in csrc/cuda/*.cu behind csrc/cuda/ops.h. Only c10's CUDA
// headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers), so that csrc/check_cuda_compile.sh can syntax-check this file on a
// machine with the CUDA runtime headers and a CPU build of torch.
//
// Precision (docs/extension.md): "exact" never uses TF32 — fp32 operands run the
// FMA kernels; "accurate" lets fp32 operands use TF32; "fast" rounds fp32 operands
// to bf16 (the extension has no fp8). 16-bit operands of one dtype are used as given.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "ops.h"

namespace mas_local_ext {
namespace {

using at::Tensor;
using mas_local_cuda::DType;

DType to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return DType::F32;
    case at::kBFloat16:
      return DType::BF16;
    case at::kHalf:
      return DType::F16;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", t, " (expected float32, bfloat16 or float16)");
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error: ", cudaGetErrorString(err));
}

bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int sm_count(const at::Device& device) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()), "cudaDeviceGetAttribute");
  return sms;
}

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

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

// ---------------------------------------------------------------------------
Tensor penalty_grad_cuda(at::TensorList grads, at::TensorList params, at::TensorList anchors, at::TensorList omegas,
                         double lam) {
  const size_t n = params.size();
  const char* what = "mas_local_ext::penalty_grad_ (CUDA)";
  TORCH_CHECK(grads.size() == n && anchors.size() == n && omegas.size() == n, what,
              ": grads, params, anchors and omegas must have the same length");
  if (n == 0) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), what, ": params must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None, what,
              ": cannot run inside a CUDA-graph capture (its chunk table is copied from pinned host memory on every "
              "call); use the Triton backend there, or call it outside the graph");
  cudaStream_t stream = current_stream();

  // Group the tensors by element types: one launch per combination (usually one).
  std::map<std::array<int, 3>, std::vector<size_t>> groups;
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> write_back;
  std::vector<mas_local_cuda::PenaltyTensor> descs(n);
  std::vector<int> vec_ok(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& g0 = grads[i];
    const Tensor& p0 = params[i];
    TORCH_CHECK(g0.device() == device && p0.device() == device && anchors[i].device() == device &&
                    omegas[i].device() == device,
                what, ": tensor ", i, " is not on ", device);
    TORCH_CHECK(g0.sizes() == p0.sizes() && anchors[i].sizes() == p0.sizes() && omegas[i].sizes() == p0.sizes(),
                what, ": tensor ", i, " has mismatched shapes");
    TORCH_CHECK(anchors[i].scalar_type() == p0.scalar_type(), what, ": anchor ", i, " must have the param's dtype");
    TORCH_CHECK(omegas[i].scalar_type() == at::kFloat || omegas[i].scalar_type() == at::kBFloat16, what,
                ": omega must be float32 or bfloat16");
    const DType gt = to_dtype(g0.scalar_type(), what), pt = to_dtype(p0.scalar_type(), what),
                ot = to_dtype(omegas[i].scalar_type(), what);
    // Walk the four tensors as flat arrays in one element order: no copy when they share
    // strides and are dense (contiguous, channels_last, ...); otherwise copy the mismatched
    // ones into the grad's layout (a non-dense grad into a contiguous copy, written back).
    Tensor g = g0;
    if (!dense(g0)) {
      g = g0.contiguous();
      write_back.emplace_back(g0, g);
    }
    auto like_grad = [&](const Tensor& x) {
      return x.strides() == g.strides() ? x : at::empty_like(g, x.options()).copy_(x);
    };
    Tensor p = like_grad(p0), a = like_grad(anchors[i]), o = like_grad(omegas[i]);
    keep.insert(keep.end(), {p, a, o, g});
    descs[i] = {g.data_ptr(), p.const_data_ptr(), a.const_data_ptr(), o.const_data_ptr(), p.numel()};
    const int vec = mas_local_cuda::penalty_vec(gt, pt, ot);
    vec_ok[i] = aligned_to(descs[i].grad, vec * mas_local_cuda::dtype_size(gt)) &&
                aligned_to(descs[i].param, vec * mas_local_cuda::dtype_size(pt)) &&
                aligned_to(descs[i].anchor, vec * mas_local_cuda::dtype_size(pt)) &&
                aligned_to(descs[i].omega, vec * mas_local_cuda::dtype_size(ot));
    groups[{static_cast<int>(gt), static_cast<int>(pt), static_cast<int>(ot)}].push_back(i);
  }

  // Chunk table, group after group; one host->device copy for both tables.
  std::vector<mas_local_cuda::PenaltyChunk> chunks;
  std::vector<std::pair<std::array<int, 3>, std::pair<int64_t, int64_t>>> ranges;  // key, (first chunk, count)
  for (const auto& [key, members] : groups) {
    const int64_t first = static_cast<int64_t>(chunks.size());
    for (size_t i : members) {
      for (int64_t s = 0; s < descs[i].numel; s += mas_local_cuda::kPenaltyChunk)
        chunks.push_back({static_cast<int32_t>(i), vec_ok[i], s,
                          std::min(mas_local_cuda::kPenaltyChunk, descs[i].numel - s)});
    }
    ranges.push_back({key, {first, static_cast<int64_t>(chunks.size()) - first}});
  }
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const size_t desc_bytes = descs.size() * sizeof(mas_local_cuda::PenaltyTensor);
  const size_t chunk_offset = (desc_bytes + 15) / 16 * 16;
  const size_t total_bytes = chunk_offset + chunks.size() * sizeof(mas_local_cuda::PenaltyChunk);
  Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(total_bytes, 16))},
                          at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), descs.data(), desc_bytes);
  if (!chunks.empty())
    std::memcpy(static_cast<char*>(host.data_ptr()) + chunk_offset, chunks.data(),
                chunks.size() * sizeof(mas_local_cuda::PenaltyChunk));
  Tensor table = host.to(device, /*non_blocking=*/true);  // the host allocator keeps `host` alive until copied
  const auto* d_descs = reinterpret_cast<const mas_local_cuda::PenaltyTensor*>(table.const_data_ptr());
  const auto* d_chunks =
      reinterpret_cast<const mas_local_cuda::PenaltyChunk*>(static_cast<const char*>(table.const_data_ptr()) +
                                                            chunk_offset);

  Tensor partials = at::empty({std::max<int64_t>(num_chunks, 1)}, params[0].options().dtype(at::kDouble));
  const float two_lam = static_cast<float>(2.0 * lam);
  for (const auto& [key, range] : ranges) {
    check(mas_local_cuda::launch_penalty(d_descs, d_chunks + range.first, range.second, static_cast<DType>(key[0]),
                                         static_cast<DType>(key[1]), static_cast<DType>(key[2]), two_lam,
                                         partials.mutable_data_ptr<double>() + range.first, stream),
          what);
  }
  Tensor value = at::empty({}, params[0].options().dtype(at::kFloat));
  check(mas_local_cuda::launch_penalty_finish(partials.const_data_ptr<double>(), num_chunks, lam,
                                              value.mutable_data_ptr<float>(), stream),
        what);
  for (auto& wb : write_back) wb.first.copy_(wb.second);
  return value;
}

constexpr size_t kPerSampleScratchBytes = size_t{64} << 20;  // docs/extension.md: ≤ 64 MiB extra

// ---------------------------------------------------------------------------
// |x| in `type` through the pre-pass kernel.
Tensor abs_cast(const Tensor& x0, at::ScalarType type, cudaStream_t stream) {
  const Tensor x = x0.contiguous();
  Tensor y = at::empty(x.sizes(), x.options().dtype(type));
  check(mas_local_cuda::launch_abs_cast(x.const_data_ptr(), to_dtype(x.scalar_type(), "abs_gemm_acc_"),
                                        y.mutable_data_ptr(), to_dtype(type, "abs_gemm_acc_"), x.numel(), stream),
        "mas_local_ext::abs_gemm_acc_ (CUDA) abs pre-pass");
  return y;
}

// abs-GEMM on CUDA = abs pre-pass kernel + a GEMM on the non-negative copies.
//
// Why not fuse the abs into the GEMM's operand loads: taking |·| in registers breaks
// the async-copy → tensor-core pipeline (a Triton abs-GEMM measured 1.67× cuBLAS on
// the H200, docs/triton.md), while the pre-pass costs one read+write of A and B.
//  * 16-bit operands of one dtype ("exact" and "accurate"): |A|, |B| in that dtype,
//    cuBLAS with an fp32 result (mm with out_dtype: exact products, fp32 accumulation),
//    then Ω += α·result. (The addmm overload with an fp32 output for 16-bit operands
//    changed its constraint on the accumulated matrix's dtype between the torch
//    releases we build against, 2.11 and 2.13; mm's out_dtype overload is stable.)
//  * "fast": |A|, |B| rounded to bf16 (fp16 when both are fp16), as above.
//  * "accurate", fp32 or mixed operands: |A|, |B| in fp32 (exact for 16-bit values),
//    Ω.addmm_ with beta = 1: cuBLAS under torch's matmul precision setting, i.e. TF32
//    if the user allowed it, IEEE otherwise — both within "accurate".
//  * "exact", fp32 or mixed operands: no cuBLAS (its TF32 use follows torch's global
//    setting): abs_gemm_exact below.
//  * float64 operands: computed in float64 through torch.
constexpr size_t kExactScratchBytes = size_t{256} << 20;

// Exact fp32 |A|ᵀ|B| with the per-sample FMA kernel: the fp32 abs copies (rows zero-
// padded) are viewed as `pieces` blocks of t rows, and Σ_s |A_sᵀB_s| = |A|ᵀ|B| because
// every term is non-negative. The pieces spread the work over the SMs; the copies are
// made per R-chunk so that they stay below kExactScratchBytes.
void abs_gemm_exact(Tensor& om, const Tensor& a, const Tensor& b, double alpha, cudaStream_t stream, int sms,
                    const char* what) {
  const int64_t rows = a.size(0), out = a.size(1), in = b.size(1);
  const int64_t chunk =
      std::max<int64_t>(256, static_cast<int64_t>(kExactScratchBytes / (sizeof(float) * (out + in))));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t len = std::min(chunk, rows - r0);
    const int pieces = mas_local_cuda::per_sample_splits((len + 63) / 64, out, in, sms, kPerSampleScratchBytes);
    const int64_t t = (len + pieces - 1) / pieces;
    Tensor abs_a = at::empty({pieces * t, out}, om.options());
    Tensor abs_b = at::empty({pieces * t, in}, om.options());
    const Tensor src_a = a.narrow(0, r0, len).contiguous(), src_b = b.narrow(0, r0, len).contiguous();
    check(mas_local_cuda::launch_abs_cast(src_a.const_data_ptr(), to_dtype(src_a.scalar_type(), what),
                                          abs_a.mutable_data_ptr(), mas_local_cuda::DType::F32, len * out, stream),
          what);
    check(mas_local_cuda::launch_abs_cast(src_b.const_data_ptr(), to_dtype(src_b.scalar_type(), what),
                                          abs_b.mutable_data_ptr(), mas_local_cuda::DType::F32, len * in, stream),
          what);
    if (pieces * t > len) {
      abs_a.narrow(0, len, pieces * t - len).zero_();
      abs_b.narrow(0, len, pieces * t - len).zero_();
    }
    Tensor scratch;
    if (pieces > 1) scratch = at::empty({static_cast<int64_t>(pieces) * out * in}, om.options());
    check(mas_local_cuda::launch_per_sample_abs(om.mutable_data_ptr<float>(), abs_a.const_data_ptr(),
                                                abs_b.const_data_ptr(), mas_local_cuda::DType::F32, /*tf32=*/false,
                                                pieces, t, out, in, static_cast<float>(alpha), pieces,
                                                pieces > 1 ? scratch.mutable_data_ptr<float>() : nullptr, stream),
          what);
  }
}

void abs_gemm_acc_cuda(Tensor omega, const Tensor& a, const Tensor& b, double alpha, c10::string_view precision) {
  const char* what = "mas_local_ext::abs_gemm_acc_ (CUDA)";
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0), what, ": expected a [R, out] and b [R, in]");
  TORCH_CHECK(omega.scalar_type() == at::kFloat && omega.dim() == 2 && omega.size(0) == a.size(1) &&
                  omega.size(1) == b.size(1),
              what, ": omega must be float32 [out, in]");
  TORCH_CHECK(omega.is_cuda() && a.device() == omega.device() && b.device() == omega.device(), what,
              ": all tensors must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(omega.device());
  cudaStream_t stream = current_stream();
  if (a.numel() == 0 || b.numel() == 0) return;
  const std::string prec(precision);
  const at::ScalarType ta = a.scalar_type(), tb = b.scalar_type();
  if (ta == at::kDouble || tb == at::kDouble) {  // float64: exact, through torch
    omega.add_(at::mm(a.abs().to(at::kDouble).t(), b.abs().to(at::kDouble)).mul_(alpha).to(at::kFloat));
    return;
  }
  const bool same_16bit = ta == tb && is_16bit(ta);
  if (same_16bit || prec == "fast") {
    const at::ScalarType low = same_16bit ? ta : at::kBFloat16;
    const Tensor prod = at::mm(abs_cast(a, low, stream).t(), abs_cast(b, low, stream), at::kFloat);
    omega.add_(prod, alpha);
    return;
  }
  if (prec == "exact") {
    Tensor om = omega.is_contiguous() ? omega : omega.contiguous();
    abs_gemm_exact(om, a, b, alpha, stream, sm_count(omega.device()), what);
    if (!omega.is_same(om)) omega.copy_(om);
    return;
  }
  omega.addmm_(abs_cast(a, at::kFloat, stream).t(), abs_cast(b, at::kFloat, stream), /*beta=*/1.0, /*alpha=*/alpha);
}

// ---------------------------------------------------------------------------

void per_sample_abs_acc_cuda(Tensor omega, const Tensor& a0, const Tensor& b0, double alpha,
                             c10::string_view precision) {
  const char* what = "mas_local_ext::per_sample_abs_acc_ (CUDA)";
  TORCH_CHECK(a0.dim() == 3 && b0.dim() == 3 && a0.size(0) == b0.size(0) && a0.size(1) == b0.size(1), what,
              ": expected a [B, T, out] and b [B, T, in]");
  const int64_t nb = a0.size(0), t = a0.size(1), out = a0.size(2), in = b0.size(2);
  TORCH_CHECK(omega.scalar_type() == at::kFloat && omega.dim() == 2 && omega.size(0) == out && omega.size(1) == in,
              what, ": omega must be float32 [out, in]");
  TORCH_CHECK(omega.is_cuda() && a0.device() == omega.device() && b0.device() == omega.device(), what,
              ": all tensors must be on one CUDA device");
  if (nb == 0 || out == 0 || in == 0) return;
  const c10::cuda::CUDAGuard guard(omega.device());
  cudaStream_t stream = current_stream();
  const std::string prec(precision);

  // 16-bit operands of one dtype: tensor cores as given (exact products, fp32 accumulation).
  // Otherwise fp32 (exact for 16-bit values): "fast" rounds to bf16 for the tensor cores,
  // "accurate" uses TF32 tensor cores, "exact" the fp32 FMA kernel.
  at::ScalarType type = at::kFloat;
  bool tf32 = prec == "accurate";
  if (a0.scalar_type() == b0.scalar_type() && is_16bit(a0.scalar_type())) {
    type = a0.scalar_type();
  } else if (prec == "fast") {
    type = at::kBFloat16;
  }
  const Tensor a = a0.to(type).contiguous();
  const Tensor b = b0.to(type).contiguous();
  Tensor om = omega.is_contiguous() ? omega : omega.contiguous();

  const int splits = mas_local_cuda::per_sample_splits(nb, out, in, sm_count(omega.device()), kPerSampleScratchBytes);
  Tensor scratch;
  if (splits > 1) scratch = at::empty({static_cast<int64_t>(splits) * out * in}, om.options());
  check(mas_local_cuda::launch_per_sample_abs(om.mutable_data_ptr<float>(), a.const_data_ptr(), b.const_data_ptr(),
                                              to_dtype(type, what), tf32, nb, t, out, in, static_cast<float>(alpha),
                                              splits, splits > 1 ? scratch.mutable_data_ptr<float>() : nullptr,
                                              stream),
        what);
  if (!omega.is_same(om)) omega.copy_(om);
}

}  // namespace

TORCH_LIBRARY_IMPL(mas_local_ext, CUDA, m) {
  m.impl("abs_gemm_acc_", &abs_gemm_acc_cuda);
  m.impl("per_sample_abs_acc_", &per_sample_abs_acc_cuda);
  m.impl("penalty_grad_", &penalty_grad_cuda);
}

}  // namespace mas_local_ext
