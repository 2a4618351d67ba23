// Device helpers shared by the CUDA kernels: 8-element vector loads/stores (16-byte
// transactions when every pointer is 16-byte aligned, else element by element with the
// same element order), a deterministic block reduction, launch geometry. No torch here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../math.h"
#include "../params.h"

namespace fa {
namespace cuda {

constexpr int kVec = kCudaVec;          // elements per thread per iteration
constexpr int kThreads = kCudaThreads;  // threads per block
constexpr int kWarps = kThreads / 32;
static_assert(kVec == 8, "the vector I/O below moves 8 elements");

inline dim3 grid(int64_t blocks) { return dim3(static_cast<unsigned>(blocks)); }

// Largest gridDim.x.
constexpr int64_t kMaxGridX = 0x7fffffff;

// Grid of the element-wise kernels without a norm (accumulate_ without norm_type, the
// optimizer steps): one kVec-element unit per thread over the whole buffer, so every
// thread's grid-stride loop runs once, in a single pass with no ragged second wave. The
// loop stays as the fallback for a buffer past kMaxGridX blocks. (The norm kernels keep
// cuda_blocks: their partial count must depend on n only.)
inline int64_t cover_blocks(int64_t n) {
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t b = (units + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b < kMaxGridX ? b : kMaxGridX);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// First unit (of kVec elements) of this thread and the grid stride, in int64.
__device__ __forceinline__ int64_t first_unit() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t unit_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Loads/stores of the 8 elements of unit u of a DT buffer as fp32. `full`: the unit lies
// inside the buffer and the pointers are aligned (16-byte path); otherwise element by
// element, elements past n reading as 0 and not written.
template <int DT>
struct Vec8;

template <>
struct Vec8<kFloat32> {
  static __device__ __forceinline__ void load(const float* p, int64_t u, int64_t n, bool full,
                                              float (&x)[8]) {
    if (full) {
      const float4* q = reinterpret_cast<const float4*>(p + u * 8);
      const float4 a = q[0], b = q[1];
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = u * 8 + j < n ? p[u * 8 + j] : 0.f;
    }
  }
  static __device__ __forceinline__ void store(float* p, int64_t u, int64_t n, bool full,
                                               const float (&x)[8]) {
    if (full) {
      float4* q = reinterpret_cast<float4*>(p + u * 8);
      q[0] = make_float4(x[0], x[1], x[2], x[3]);
      q[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (u * 8 + j < n) p[u * 8 + j] = x[j];
      }
    }
  }
};

template <int DT>
struct Vec8Half {  // fp16 / bf16, stored as raw 16-bit patterns
  static __device__ __forceinline__ void load(const uint16_t* p, int64_t u, int64_t n, bool full,
                                              float (&x)[8]) {
    if (full) {
      const uint4 r = *reinterpret_cast<const uint4*>(p + u * 8);
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        x[2 * k] = Cvt<DT>::load(static_cast<uint16_t>(w[k] & 0xffffu));
        x[2 * k + 1] = Cvt<DT>::load(static_cast<uint16_t>(w[k] >> 16));
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = u * 8 + j < n ? Cvt<DT>::load(p[u * 8 + j]) : 0.f;
    }
  }
  static __device__ __forceinline__ void store(uint16_t* p, int64_t u, int64_t n, bool full,
                                               const float (&x)[8]) {
    if (full) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        w[k] = static_cast<uint32_t>(Cvt<DT>::store(x[2 * k])) |
               (static_cast<uint32_t>(Cvt<DT>::store(x[2 * k + 1])) << 16);
      }
      *reinterpret_cast<uint4*>(p + u * 8) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (u * 8 + j < n) p[u * 8 + j] = Cvt<DT>::store(x[j]);
      }
    }
  }
};
template <>
struct Vec8<kFloat16> : Vec8Half<kFloat16> {};
template <>
struct Vec8<kBFloat16> : Vec8Half<kBFloat16> {};

// Sum (L2) or integer max (inf) over the block, in a fixed order (shuffle tree within each
// warp, then warp 0 over the warp results). The result is valid in thread 0.
template <int MODE>
__device__ __forceinline__ typename Reduce<MODE>::T block_reduce(typename Reduce<MODE>::T v) {
  using R = Reduce<MODE>;
  __shared__ typename R::T warp_result[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = R::combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_result[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_result[lane] : R::zero();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v = R::combine(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
  }
  return v;
}

// Stage two of every norm: one block combines `count` finished partials in a fixed order
// and writes the total (its square root with sqrt_out) to *out.
template <int MODE>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const float* __restrict__ partials, int64_t count, float* __restrict__ out,
                    bool sqrt_out) {
  using R = Reduce<MODE>;
  typename R::T v = R::zero();
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    v = R::combine(v, R::from_float(partials[i]));
  }
  v = block_reduce<MODE>(v);
  if (threadIdx.x == 0) {
    const float total = R::finish(v);
    *out = sqrt_out ? sqrtf(total) : total;
  }
}

inline int launch_finalize(int mode, const float* partials, int64_t count, float* out,
                           bool sqrt_out, cudaStream_t stream) {
  if (mode == kNormInf) {
    finalize_kernel<kNormInf><<<1, kThreads, 0, stream>>>(partials, count, out, sqrt_out);
  } else {
    finalize_kernel<kNormL2><<<1, kThreads, 0, stream>>>(partials, count, out, sqrt_out);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fa
