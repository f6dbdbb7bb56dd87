// Multi-tensor penalty: grad += 2λ Ω (θ − θ*) over many tensors in one launch, with
// the value λ Σ Ω (θ − θ*)² reduced deterministically.
//
// Work is described by a chunk table (device memory, built by the caller): each
// chunk is up to kPenaltyChunk consecutive elements of one tensor. A block takes
// chunks in a grid-stride loop; each thread walks its elements in packs, with 16-byte
// loads and stores when the tensor's pointers are aligned and element by element
// otherwise (the same elements, in the same order, either way), keeps its partial in
// float (≤ 256 products), and the block reduces the thread partials in double in a
// fixed tree into partials[chunk]. A one-block kernel then sums the chunk partials in a
// fixed order. No float atomics: the value is bit-identical from run to run, for any
// grid size and any alignment of the tensors.
#include "common.cuh"

namespace mas_local_cuda {
namespace {

constexpr int kPenaltyThreads = 256;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename G, typename P, typename O, int VEC>
__global__ void __launch_bounds__(kPenaltyThreads)
    penalty_kernel(const PenaltyTensor* __restrict__ tensors, const PenaltyChunk* __restrict__ chunks,
                   int64_t num_chunks, float two_lam, double* __restrict__ partials) {
  __shared__ double warp_totals[kPenaltyThreads / 32];
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const PenaltyChunk ch = chunks[c];
    const PenaltyTensor t = tensors[ch.tensor];
    G* __restrict__ g = static_cast<G*>(t.grad) + ch.start;
    const P* __restrict__ p = static_cast<const P*>(t.param) + ch.start;
    const P* __restrict__ a = static_cast<const P*>(t.anchor) + ch.start;
    const O* __restrict__ o = static_cast<const O*>(t.omega) + ch.start;
    const int64_t len = ch.len;

    // Thread i owns the packs i, i + 256, … and then the tail elements i, i + 256, … past the
    // last whole pack, whether or not the tensor is aligned for 16-byte accesses: the
    // summation order, hence the value, does not depend on the tensors' addresses.
    float acc = 0.f;
    const int64_t nvec = len / VEC;
    for (int64_t v = threadIdx.x; v < nvec; v += kPenaltyThreads) {
      Pack<P, VEC> pv, av;
      Pack<O, VEC> ov;
      Pack<G, VEC> gv;
      if (ch.vectorized) {
        pv = reinterpret_cast<const Pack<P, VEC>*>(p)[v];
        av = reinterpret_cast<const Pack<P, VEC>*>(a)[v];
        ov = reinterpret_cast<const Pack<O, VEC>*>(o)[v];
        gv = reinterpret_cast<const Pack<G, VEC>*>(g)[v];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pv.v[k] = p[v * VEC + k];
          av.v[k] = a[v * VEC + k];
          ov.v[k] = o[v * VEC + k];
          gv.v[k] = g[v * VEC + k];
        }
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = to_float(pv.v[k]) - to_float(av.v[k]);
        const float w = to_float(ov.v[k]) * d;
        gv.v[k] = from_float<G>(to_float(gv.v[k]) + two_lam * w);
        acc += w * d;
      }
      if (ch.vectorized) {
        reinterpret_cast<Pack<G, VEC>*>(g)[v] = gv;
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) g[v * VEC + k] = gv.v[k];
      }
    }
    for (int64_t i = nvec * VEC + threadIdx.x; i < len; i += kPenaltyThreads) {
      const float d = to_float(p[i]) - to_float(a[i]);
      const float w = to_float(o[i]) * d;
      g[i] = from_float<G>(to_float(g[i]) + two_lam * w);
      acc += w * d;
    }

    double v = warp_sum(static_cast<double>(acc));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      double s = 0.0;
#pragma unroll
      for (int w = 0; w < kPenaltyThreads / 32; ++w) s += warp_totals[w];
      partials[c] = s;
    }
    __syncthreads();  // warp_totals is reused by the next chunk
  }
}

constexpr int kFinishThreads = 512;

__global__ void __launch_bounds__(kFinishThreads)
    penalty_finish_kernel(const double* __restrict__ partials, int64_t n, double lam, float* __restrict__ out) {
  __shared__ double sdata[kFinishThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinishThreads) s += partials[i];
  sdata[threadIdx.x] = s;
  __syncthreads();
  for (int width = kFinishThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) sdata[threadIdx.x] += sdata[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(sdata[0] * lam);
}

template <typename G, typename P, typename O>
cudaError_t launch_typed(const PenaltyTensor* tensors, const PenaltyChunk* chunks, int64_t num_chunks, float two_lam,
                         double* partials, cudaStream_t stream) {
  constexpr int kVec = (sizeof(G) == 4 && sizeof(P) == 4 && sizeof(O) == 4) ? 4 : 8;
  const int64_t grid = num_chunks < (int64_t{1} << 20) ? num_chunks : (int64_t{1} << 20);
  penalty_kernel<G, P, O, kVec><<<static_cast<unsigned>(grid), kPenaltyThreads, 0, stream>>>(tensors, chunks,
                                                                                           num_chunks, two_lam,
                                                                                           partials);
  return cudaGetLastError();
}

template <typename G, typename P>
cudaError_t launch_omega(DType o, const PenaltyTensor* tensors, const PenaltyChunk* chunks, int64_t num_chunks,
                         float two_lam, double* partials, cudaStream_t stream) {
  switch (o) {
    case DType::F32:
      return launch_typed<G, P, float>(tensors, chunks, num_chunks, two_lam, partials, stream);
    case DType::BF16:
      return launch_typed<G, P, __nv_bfloat16>(tensors, chunks, num_chunks, two_lam, partials, stream);
    default:
      return cudaErrorInvalidValue;  // fp16 Ω is not an accepted Ω type
  }
}

template <typename G>
cudaError_t launch_param(DType p, DType o, const PenaltyTensor* tensors, const PenaltyChunk* chunks,
                         int64_t num_chunks, float two_lam, double* partials, cudaStream_t stream) {
  switch (p) {
    case DType::F32:
      return launch_omega<G, float>(o, tensors, chunks, num_chunks, two_lam, partials, stream);
    case DType::BF16:
      return launch_omega<G, __nv_bfloat16>(o, tensors, chunks, num_chunks, two_lam, partials, stream);
    case DType::F16:
      return launch_omega<G, __half>(o, tensors, chunks, num_chunks, two_lam, partials, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_penalty(const PenaltyTensor* tensors, const PenaltyChunk* chunks, int64_t num_chunks,
                           DType grad_type, DType param_type, DType omega_type, float two_lam, double* partials,
                           cudaStream_t stream) {
  if (num_chunks <= 0) return cudaSuccess;
  switch (grad_type) {
    case DType::F32:
      return launch_param<float>(param_type, omega_type, tensors, chunks, num_chunks, two_lam, partials, stream);
    case DType::BF16:
      return launch_param<__nv_bfloat16>(param_type, omega_type, tensors, chunks, num_chunks, two_lam, partials,
                                         stream);
    case DType::F16:
      return launch_param<__half>(param_type, omega_type, tensors, chunks, num_chunks, two_lam, partials, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_penalty_finish(const double* partials, int64_t n, double lam, float* out, cudaStream_t stream) {
  penalty_finish_kernel<<<1, kFinishThreads, 0, stream>>>(partials, n, lam, out);
  return cudaGetLastError();
}

}  // namespace mas_local_cuda
