// Launchers of the extension's CUDA kernels. Plain C++ with raw pointers, sizes and a
// stream, and no torch headers, so that the .cu files compile with nvcc alone
// (csrc/check_cuda_compile.sh) and the torch-facing code stays in binding.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace mas_local_cuda {

// Element types understood by the kernels.
enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

// ---------------------------------------------------------------------------
// Penalty: for every tensor, grad += 2λ Ω (θ − θ*) and value = λ Σ Ω (θ − θ*)².
//
// All tensors of one launch share the element types (g, p, o); the anchor has
// the param's type. The caller groups tensors by type combination; all groups
// write into one partials buffer and one final reduction gives the value.
struct PenaltyTensor {
  void* grad;
  const void* param;
  const void* anchor;
  const void* omega;
  int64_t numel;
};

// One unit of work: `len` elements of tensor `tensor` starting at `start`.
struct PenaltyChunk {
  int32_t tensor;
  int32_t vectorized;  // 1 when every pointer of the tensor is 16-byte aligned
  int64_t start;
  int64_t len;
};

// Elements per chunk. Chunk boundaries do not depend on the GPU or the grid, so
// neither does the value.
constexpr int64_t kPenaltyChunk = 1 << 16;

// Elements per vector step for a type combination: 16 bytes of the narrowest
// type. With `vectorized` set, every pointer of the tensor must be aligned to
// vec·sizeof(its type) bytes.
inline int penalty_vec(DType g, DType p, DType o) {
  const int narrowest = (g == DType::F32 && p == DType::F32 && o == DType::F32) ? 4 : 2;
  return 16 / narrowest;
}
inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Runs one launch over `num_chunks` chunks (device arrays `tensors` and
// `chunks`), writing one double per chunk to `partials[0..num_chunks)`.
cudaError_t launch_penalty(const PenaltyTensor* tensors, const PenaltyChunk* chunks, int64_t num_chunks,
                           DType grad_type, DType param_type, DType omega_type, float two_lam, double* partials,
                           cudaStream_t stream);

// out[0] = (float)(lam * Σ partials[0..n)), summed in a fixed order (one block).
cudaError_t launch_penalty_finish(const double* partials, int64_t n, double lam, float* out, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Per-sample abs accumulation: omega[out, in] += alpha Σ_b |A_bᵀ B_b| with A
// [nb, T, out] and B [nb, T, in] contiguous and of one type `type`.
// bf16/f16 use tensor cores (WMMA 16×16×16, fp32 accumulate). f32 uses TF32 tensor
// cores (WMMA 16×16×8, each operand rounded to TF32, fp32 accumulate) when `tf32` is
// set, else an exact fp32 FMA kernel.
//
// With `splits` > 1 the batch is cut into `splits` parts processed by separate
// blocks; each part writes its Σ|·| into scratch[split, out, in] (size
// splits·out·in floats), and a second kernel adds them to omega in split order
// (deterministic, no atomics). `splits` = 1 needs no scratch.
cudaError_t launch_per_sample_abs(float* omega, const void* a, const void* b, DType type, bool tf32, int64_t nb,
                                  int64_t t, int64_t out, int64_t in, float alpha, int splits, float* scratch,
                                  cudaStream_t stream);

// How many batch splits launch_per_sample_abs should use to fill `num_sms`
// SMs, bounded by `max_scratch_bytes` of scratch.
int per_sample_splits(int64_t nb, int64_t out, int64_t in, int num_sms, std::size_t max_scratch_bytes);

// ---------------------------------------------------------------------------
// abs pre-pass of the abs-GEMM: dst[i] = |src[i]| converted to dst_type.
cudaError_t launch_abs_cast(const void* src, DType src_type, void* dst, DType dst_type, int64_t n,
                            cudaStream_t stream);

}  // namespace mas_local_cuda
