// The pre-pass of the CUDA abs-GEMM: dst = |src| converted to dst's type, 16-byte
// packs where the pointers allow. The GEMM itself then runs in cuBLAS (see
// binding.cpp for why the abs is not fused into the GEMM's operand loads).
#include "common.cuh"

namespace mas_local_cuda {
namespace {

template <typename S, typename D, int VEC>
__global__ void abs_cast_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t first_scalar = 0;
  if (vec) {
    const int64_t nvec = n / VEC;
    for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec; v += stride) {
      const Pack<S, VEC> s = reinterpret_cast<const Pack<S, VEC>*>(src)[v];
      Pack<D, VEC> d;
#pragma unroll
      for (int k = 0; k < VEC; ++k) d.v[k] = from_float<D>(fabsf(to_float(s.v[k])));
      reinterpret_cast<Pack<D, VEC>*>(dst)[v] = d;
    }
    first_scalar = nvec * VEC;
  }
  for (int64_t i = first_scalar + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    dst[i] = from_float<D>(fabsf(to_float(src[i])));
}

template <typename S, typename D>
cudaError_t launch_typed(const void* src, void* dst, int64_t n, cudaStream_t stream) {
  constexpr int kVec = (sizeof(S) == 2 || sizeof(D) == 2) ? 8 : 4;
  const bool vec = reinterpret_cast<uintptr_t>(src) % (sizeof(S) * kVec) == 0 &&
                   reinterpret_cast<uintptr_t>(dst) % (sizeof(D) * kVec) == 0;
  const int threads = 256;
  const int64_t want = (n / kVec + threads - 1) / threads;
  const int blocks = static_cast<int>(want < 1 ? 1 : (want > 65535 ? 65535 : want));
  abs_cast_kernel<S, D, kVec><<<blocks, threads, 0, stream>>>(static_cast<const S*>(src), static_cast<D*>(dst), n,
                                                              vec);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch_dst(DType dst_type, const void* src, void* dst, int64_t n, cudaStream_t stream) {
  switch (dst_type) {
    case DType::F32:
      return launch_typed<S, float>(src, dst, n, stream);
    case DType::BF16:
      return launch_typed<S, __nv_bfloat16>(src, dst, n, stream);
    case DType::F16:
      return launch_typed<S, __half>(src, dst, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_abs_cast(const void* src, DType src_type, void* dst, DType dst_type, int64_t n,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (src_type) {
    case DType::F32:
      return launch_dst<float>(dst_type, src, dst, n, stream);
    case DType::BF16:
      return launch_dst<__nv_bfloat16>(dst_type, src, dst, n, stream);
    case DType::F16:
      return launch_dst<__half>(dst_type, src, dst, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mas_local_cuda
