// Per-sample abs accumulation: omega[out, in] += alpha Σ_b |A_bᵀ B_b|, with A [nb, T, out]
// and B [nb, T, in] row-major, without materialising the [nb, out, in] products.
//
// Each block owns one Ω tile and a contiguous range of samples (blockIdx.z picks the
// range when the batch is split). For every sample it computes the tile of A_bᵀ B_b
// over T in steps of 16, takes |·| of the finished tile in registers and adds it to
// a second register accumulator, the Ω-tile sum, which lives across the whole batch
// loop. Only at the end is the sum added to Ω (or written to the split scratch).
//
// Tensor cores (WMMA, fp32 accumulate): bf16/fp16 inputs as 16×16×16 fragments, fp32
// inputs as TF32 16×16×8 fragments (each element rounded to TF32 after the load from
// shared memory). Block tile 128 (out) × 128 (in), 8 warps as 4 × 2, each warp
// 32 × 64 = 2 × 4 fragments. Exact fp32: FMA kernel, block tile 64 × 64, 256 threads
// with 4 × 4 outputs each.
// Both stage T-slices of A and B through shared memory, double buffered, with the
// next slice's global loads (16-byte packs when aligned, zero-filled at ragged
// edges) issued before the current slice's math.
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace mas_local_cuda {
namespace {

// Loads a ROWS × COLS tile (rows = t, cols = out or in) of one sample's [T, ld]
// matrix into registers, PER consecutive elements per thread; zero outside
// [rows_valid, cols_valid).
template <typename T, int ROWS, int COLS, int THREADS>
struct TileRegs {
  static constexpr int PER = ROWS * COLS / THREADS;
  static_assert(ROWS * COLS % THREADS == 0 && COLS % PER == 0, "tile does not split evenly");
  Pack<T, PER> r;

  __device__ __forceinline__ void load(const T* __restrict__ base, int64_t ld, int64_t row0, int64_t rows_valid,
                                       int64_t col0, int64_t cols_valid, bool vec_ok) {
    const int idx = threadIdx.x * PER;
    const int64_t gr = row0 + idx / COLS, gc = col0 + idx % COLS;
    if (vec_ok && gr < rows_valid && gc + PER <= cols_valid) {
      r = *reinterpret_cast<const Pack<T, PER>*>(base + gr * ld + gc);
    } else {
#pragma unroll
      for (int k = 0; k < PER; ++k)
        r.v[k] = (gr < rows_valid && gc + k < cols_valid) ? base[gr * ld + gc + k] : from_float<T>(0.f);
    }
  }

  __device__ __forceinline__ void store(T* smem, int sld) const {
    const int idx = threadIdx.x * PER;
    *reinterpret_cast<Pack<T, PER>*>(smem + (idx / COLS) * sld + idx % COLS) = r;
  }
};

// Adds (or stores into the split scratch) one value of the finished Ω tile.
__device__ __forceinline__ void emit(float* __restrict__ omega, float* __restrict__ scratch, int64_t in, int64_t o,
                                     int64_t i, float s, float alpha) {
  if (scratch != nullptr) {
    scratch[o * in + i] = s;
  } else {
    omega[o * in + i] += alpha * s;
  }
}

// ---------------------------------------------------------------------------
// Tensor-core kernel (bf16 / fp16 / fp32 as TF32).
constexpr int kWM = 128, kWN = 128, kWK = 16, kWThreads = 256;
constexpr int kWPad = 8;  // keeps fragment and pack addresses aligned (32 B / 16 B) and spreads banks
constexpr int kWLdA = kWM + kWPad, kWLdB = kWN + kWPad;

// The WMMA fragment element type and k-extent of one mma for a storage type.
template <typename T>
struct Mma {
  using Frag = T;
  static constexpr int kK = 16;
};
template <>
struct Mma<float> {
  using Frag = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <typename Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& f) {
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = nvcuda::wmma::__float_to_tf32(f.x[e]);
}

template <typename T>
__global__ void __launch_bounds__(kWThreads)
    per_sample_abs_wmma(float* __restrict__ omega, const T* __restrict__ a, const T* __restrict__ b, int64_t nb,
                        int64_t t_len, int64_t out, int64_t in, float alpha, int splits, float* __restrict__ scratch,
                        bool vec_a, bool vec_b) {
  using namespace nvcuda;
  using Frag = typename Mma<T>::Frag;
  constexpr int kK = Mma<T>::kK;
  __shared__ __align__(128) T sa[2][kWK * kWLdA];
  __shared__ __align__(128) T sb[2][kWK * kWLdB];
  __shared__ __align__(128) float stage[kWThreads / 32][16 * 16];

  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kWM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kWN;
  const int64_t b_begin = nb * blockIdx.z / splits, b_end = nb * (blockIdx.z + 1) / splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 64;  // warp tile origin inside the block tile

  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2][4], sum[2][4];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) wmma::fill_fragment(sum[x][y], 0.f);

  const int64_t ktiles = (t_len + kWK - 1) / kWK;
  const int64_t steps = (b_end - b_begin) * ktiles;
  TileRegs<T, kWK, kWM, kWThreads> ra;
  TileRegs<T, kWK, kWN, kWThreads> rb;
  auto fetch = [&](int64_t step) {
    const int64_t bi = b_begin + step / ktiles, t0 = (step % ktiles) * kWK;
    ra.load(a + bi * t_len * out, out, t0, t_len, o0, out, vec_a);
    rb.load(b + bi * t_len * in, in, t0, t_len, i0, in, vec_b);
  };

  if (steps > 0) {
    fetch(0);
    ra.store(sa[0], kWLdA);
    rb.store(sb[0], kWLdB);
    __syncthreads();
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s % ktiles == 0) {
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) wmma::fill_fragment(acc[x][y], 0.f);
    }
    if (s + 1 < steps) fetch(s + 1);

    // A_bᵀ tile: element (o, t) sits at sa[t * ld + o], i.e. column-major.
#pragma unroll
    for (int kk = 0; kk < kWK; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Frag, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, Frag, wmma::row_major> fb[4];
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        wmma::load_matrix_sync(fa[x], sa[buf] + kk * kWLdA + wm + 16 * x, kWLdA);
        if constexpr (std::is_same_v<T, float>) round_to_tf32(fa[x]);
      }
#pragma unroll
      for (int y = 0; y < 4; ++y) {
        wmma::load_matrix_sync(fb[y], sb[buf] + kk * kWLdB + wn + 16 * y, kWLdB);
        if constexpr (std::is_same_v<T, float>) round_to_tf32(fb[y]);
      }
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) wmma::mma_sync(acc[x][y], fa[x], fb[y], acc[x][y]);
    }

    if (s % ktiles == ktiles - 1) {  // sample finished: Σ|·| in registers
#pragma unroll
      for (int x = 0; x < 2; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y)
#pragma unroll
          for (int e = 0; e < acc[x][y].num_elements; ++e) sum[x][y].x[e] += fabsf(acc[x][y].x[e]);
    }
    if (s + 1 < steps) {
      ra.store(sa[buf ^ 1], kWLdA);
      rb.store(sb[buf ^ 1], kWLdB);
    }
    __syncthreads();
  }

  // Epilogue: each warp stages its fragments one at a time and adds them to Ω.
  float* part = splits > 1 ? scratch + static_cast<int64_t>(blockIdx.z) * out * in : nullptr;
  float* st = stage[warp];
#pragma unroll
  for (int x = 0; x < 2; ++x)
#pragma unroll
    for (int y = 0; y < 4; ++y) {
      wmma::store_matrix_sync(st, sum[x][y], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t o = o0 + wm + 16 * x + e / 16, i = i0 + wn + 16 * y + e % 16;
        if (o < out && i < in) emit(omega, part, in, o, i, st[e], alpha);
      }
      __syncwarp();
    }
}

// ---------------------------------------------------------------------------
// FMA kernel (fp32).
constexpr int kFM = 64, kFN = 64, kFK = 16, kFThreads = 256;
constexpr int kFPad = 4;
constexpr int kFLdA = kFM + kFPad, kFLdB = kFN + kFPad;

__global__ void __launch_bounds__(kFThreads)
    per_sample_abs_fma(float* __restrict__ omega, const float* __restrict__ a, const float* __restrict__ b,
                       int64_t nb, int64_t t_len, int64_t out, int64_t in, float alpha, int splits,
                       float* __restrict__ scratch, bool vec_a, bool vec_b) {
  __shared__ __align__(16) float sa[2][kFK * kFLdA];
  __shared__ __align__(16) float sb[2][kFK * kFLdB];
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kFM;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kFN;
  const int64_t b_begin = nb * blockIdx.z / splits, b_end = nb * (blockIdx.z + 1) / splits;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;  // 4 rows ty*4.., 4 cols tx*4..

  float acc[4][4], sum[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) sum[r][c] = 0.f;

  const int64_t ktiles = (t_len + kFK - 1) / kFK;
  const int64_t steps = (b_end - b_begin) * ktiles;
  TileRegs<float, kFK, kFM, kFThreads> ra;
  TileRegs<float, kFK, kFN, kFThreads> rb;
  auto fetch = [&](int64_t step) {
    const int64_t bi = b_begin + step / ktiles, t0 = (step % ktiles) * kFK;
    ra.load(a + bi * t_len * out, out, t0, t_len, o0, out, vec_a);
    rb.load(b + bi * t_len * in, in, t0, t_len, i0, in, vec_b);
  };
  if (steps > 0) {
    fetch(0);
    ra.store(sa[0], kFLdA);
    rb.store(sb[0], kFLdB);
    __syncthreads();
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s % ktiles == 0) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
    }
    if (s + 1 < steps) fetch(s + 1);
#pragma unroll
    for (int k = 0; k < kFK; ++k) {
      const float4 av = *reinterpret_cast<const float4*>(sa[buf] + k * kFLdA + ty * 4);
      const float4 bv = *reinterpret_cast<const float4*>(sb[buf] + k * kFLdB + tx * 4);
      const float ar[4] = {av.x, av.y, av.z, av.w};
      const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(ar[r], br[c], acc[r][c]);
    }
    if (s % ktiles == ktiles - 1) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) sum[r][c] += fabsf(acc[r][c]);
    }
    if (s + 1 < steps) {
      ra.store(sa[buf ^ 1], kFLdA);
      rb.store(sb[buf ^ 1], kFLdB);
    }
    __syncthreads();
  }
  float* part = splits > 1 ? scratch + static_cast<int64_t>(blockIdx.z) * out * in : nullptr;
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t o = o0 + ty * 4 + r, i = i0 + tx * 4 + c;
      if (o < out && i < in) emit(omega, part, in, o, i, sum[r][c], alpha);
    }
}

// Ω += alpha Σ_z scratch[z], z in order.
__global__ void reduce_splits(float* __restrict__ omega, const float* __restrict__ scratch, int64_t m, int splits,
                              float alpha) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < m;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += scratch[z * m + j];
    omega[j] += alpha * s;
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

int per_sample_splits(int64_t nb, int64_t out, int64_t in, int num_sms, std::size_t max_scratch_bytes) {
  // Enough blocks for two waves of 1 block per SM; every split costs out·in floats.
  const int64_t tiles = static_cast<int64_t>(ceil_div(out, kWM)) * ceil_div(in, kWN);
  int64_t want = (2 * static_cast<int64_t>(num_sms) + tiles - 1) / tiles;
  const int64_t by_memory = static_cast<int64_t>(max_scratch_bytes / (sizeof(float) * std::max<int64_t>(1, out * in)));
  want = std::min(want, std::min(nb, by_memory));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, 64)));
}

cudaError_t launch_per_sample_abs(float* omega, const void* a, const void* b, DType type, bool tf32, int64_t nb,
                                  int64_t t, int64_t out, int64_t in, float alpha, int splits, float* scratch,
                                  cudaStream_t stream) {
  if (nb <= 0 || out <= 0 || in <= 0) return cudaSuccess;
  if (splits < 1 || (splits > 1 && scratch == nullptr)) return cudaErrorInvalidValue;
  if (splits > nb) splits = static_cast<int>(nb);
  if (type == DType::F32 && !tf32) {
    const dim3 grid(ceil_div(in, kFN), ceil_div(out, kFM), splits);
    const auto* fa = static_cast<const float*>(a);
    const auto* fb = static_cast<const float*>(b);
    per_sample_abs_fma<<<grid, kFThreads, 0, stream>>>(omega, fa, fb, nb, t, out, in, alpha, splits, scratch,
                                                       out % 4 == 0 && aligned(a, 16), in % 4 == 0 && aligned(b, 16));
  } else {
    const dim3 grid(ceil_div(in, kWN), ceil_div(out, kWM), splits);
    // TileRegs loads 8 consecutive elements per thread: 16 bytes (16-bit) or 32 bytes (fp32).
    const int pack = type == DType::F32 ? 32 : 16;
    const bool va = out % 8 == 0 && aligned(a, pack), vb = in % 8 == 0 && aligned(b, pack);
    if (type == DType::F32) {
      per_sample_abs_wmma<float><<<grid, kWThreads, 0, stream>>>(omega, static_cast<const float*>(a),
                                                                 static_cast<const float*>(b), nb, t, out, in, alpha,
                                                                 splits, scratch, va, vb);
    } else if (type == DType::BF16) {
      per_sample_abs_wmma<__nv_bfloat16><<<grid, kWThreads, 0, stream>>>(
          omega, static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), nb, t, out, in, alpha,
          splits, scratch, va, vb);
    } else {
      per_sample_abs_wmma<__half><<<grid, kWThreads, 0, stream>>>(omega, static_cast<const __half*>(a),
                                                                  static_cast<const __half*>(b), nb, t, out, in,
                                                                  alpha, splits, scratch, va, vb);
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t m = out * in;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((m + threads - 1) / threads, 65535));
  reduce_splits<<<blocks, threads, 0, stream>>>(omega, scratch, m, splits, alpha);
  return cudaGetLastError();
}

}  // namespace mas_local_cuda
