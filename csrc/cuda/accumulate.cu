// acc = (0 if overwrite else acc) + scale * grad on the GPU, one launch per flat buffer;
// with a norm, each block also reduces the updated acc (fixed order) into one partial and
// a one-block second launch combines the partials: deterministic, no atomics, no sync.
// Without a norm the grid covers the buffer (cover_blocks), one 8-element unit per thread,
// block by block in chunks as accumulate_many (accumulate_chunk).
//
// accumulate_many: the same update (no norm; overwrite per pair) for many (acc, grad) pairs, one
// launch per group of up to kManyMaxTensors pairs. The pointers, sizes and a prefix sum of
// blocks per pair travel by value in the kernel's parameters (no H2D copy); each block
// finds its pair by binary search over the prefix sum and handles one kThreads * kVec
// chunk of it: with 16-byte vectors where the chunk is whole and aligned, else element by
// element, coalesced (accumulate_strided).
#include "common.cuh"
#include "launchers.h"

namespace fa {
namespace cuda {
namespace {

// Unit u of acc (+)= scale * grad; the updated values are left in a. Shared by both
// kernels, so that they compile the element math identically (bitwise equal results).
template <int GDT, bool OVERWRITE>
__device__ __forceinline__ void accumulate_unit(float* __restrict__ acc,
                                                const typename Cvt<GDT>::T* __restrict__ grad,
                                                int64_t u, int64_t n, bool full, float scale,
                                                float (&a)[kVec]) {
  float g[kVec];
  Vec8<GDT>::load(grad, u, n, full, g);
  if (!OVERWRITE) Vec8<kFloat32>::load(acc, u, n, full, a);
#pragma unroll
  for (int j = 0; j < kVec; ++j) a[j] = accumulate_value(OVERWRITE ? 0.f : a[j], g[j], scale,
                                                        OVERWRITE);
  Vec8<kFloat32>::store(acc, u, n, full, a);
}

// The elements e0 + j * kThreads (j < kVec, those below n) of acc (+)= scale * grad, one by
// one, with the element math of accumulate_unit: where the 16-byte path cannot run
// (misaligned pointers, a buffer's last chunk), consecutive threads then touch consecutive
// elements, so a warp's loads and stores coalesce. (Unit by unit, each thread walked its own
// 8 elements: 57-65% of the copy bandwidth on misaligned pairs, an H100, 2026-11-27.)
template <int GDT, bool OVERWRITE>
__device__ __forceinline__ void accumulate_strided(float* __restrict__ acc,
                                                   const typename Cvt<GDT>::T* __restrict__ grad,
                                                   int64_t e0, int64_t n, float scale) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int64_t e = e0 + static_cast<int64_t>(j) * kThreads;
    if (e < n) {
      acc[e] = accumulate_value(OVERWRITE ? 0.f : acc[e], Cvt<GDT>::load(grad[e]), scale,
                                OVERWRITE);
    }
  }
}

// One chunk of kThreads units, from unit u0 on: 16-byte vectors where all of its units are
// whole and aligned (full_units: 0 for misaligned pointers), else element by element,
// coalesced.
template <int GDT, bool OVERWRITE>
__device__ __forceinline__ void accumulate_chunk(float* __restrict__ acc,
                                                 const typename Cvt<GDT>::T* __restrict__ grad,
                                                 int64_t u0, int64_t full_units, int64_t n,
                                                 float scale) {
  if (u0 + kThreads <= full_units) {
    float a[kVec];
    accumulate_unit<GDT, OVERWRITE>(acc, grad, u0 + threadIdx.x, n, true, scale, a);
  } else {
    accumulate_strided<GDT, OVERWRITE>(acc, grad, u0 * kVec + threadIdx.x, n, scale);
  }
}

template <int GDT, int MODE, bool OVERWRITE>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateParams p, bool aligned) {
  using GT = typename Cvt<GDT>::T;
  const GT* __restrict__ grad = static_cast<const GT*>(p.grad);
  float* __restrict__ acc = p.acc;
  const int64_t n = p.n;
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t full_units = aligned ? n / kVec : 0;
  if constexpr (MODE == kNoNorm) {  // chunk by chunk (the norm's blocks keep their units)
    for (int64_t c = blockIdx.x; c * kThreads < units; c += gridDim.x) {
      accumulate_chunk<GDT, OVERWRITE>(acc, grad, c * kThreads, full_units, n, p.scale);
    }
  } else {
    using R = Reduce<MODE>;
    typename R::T stat = R::zero();
    for (int64_t u = first_unit(); u < units; u += unit_stride()) {
      const bool full = u < full_units;
      float a[kVec];
      accumulate_unit<GDT, OVERWRITE>(acc, grad, u, n, full, p.scale, a);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (full || u * kVec + j < n) stat = R::fold(stat, a[j]);  // skip padding past n
      }
    }
    stat = block_reduce<MODE>(stat);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = R::finish(stat);
  }
}

template <int GDT, int MODE>
void launch(const AccumulateParams& p, int64_t blocks, bool aligned, cudaStream_t stream) {
  if (p.overwrite) {
    accumulate_kernel<GDT, MODE, true><<<grid(blocks), kThreads, 0, stream>>>(p, aligned);
  } else {
    accumulate_kernel<GDT, MODE, false><<<grid(blocks), kThreads, 0, stream>>>(p, aligned);
  }
}

template <int MODE>
void launch_dtype(const AccumulateParams& p, int64_t blocks, bool aligned, cudaStream_t stream) {
  switch (p.grad_dtype) {
    case kFloat16: return launch<kFloat16, MODE>(p, blocks, aligned, stream);
    case kBFloat16: return launch<kBFloat16, MODE>(p, blocks, aligned, stream);
    default: return launch<kFloat32, MODE>(p, blocks, aligned, stream);
  }
}

// ---- accumulate_many --------------------------------------------------------------------

// Pairs per launch: the by-value parameter struct below stays under 4 KB (about 1.8 KB).
constexpr int kManyMaxTensors = 64;
// Blocks of one pair in a launch at most (a larger pair's blocks stride over it), so that
// the prefix sums of a launch fit in int32 and stay below kMaxGridX.
constexpr int64_t kManyMaxBlocksPerTensor = int64_t{1} << 24;
static_assert(kManyMaxTensors * kManyMaxBlocksPerTensor < kMaxGridX, "grid overflow");

struct ManyArgs {
  float* acc[kManyMaxTensors];
  const void* grad[kManyMaxTensors];
  int64_t n[kManyMaxTensors];
  int32_t block_start[kManyMaxTensors + 1];  // pair t owns blocks [start[t], start[t + 1])
  uint64_t aligned;    // bit t: acc[t] and grad[t] are 16-byte aligned
  uint64_t overwrite;  // bit t: pair t overwrites acc[t] (does not read it)
  int32_t count;     // pairs in this launch, each with n > 0
  float scale;
};
static_assert(sizeof(ManyArgs) < 4096, "kernel parameters must stay under 4 KB");
static_assert(kManyMaxTensors <= 64, "the alignment mask is 64 bits");

template <int GDT>
__global__ void __launch_bounds__(kThreads) accumulate_many_kernel(const ManyArgs args) {
  using GT = typename Cvt<GDT>::T;
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  // the last pair whose first block is <= b (uniform across the block)
  int lo = 0, hi = args.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (args.block_start[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int t = lo;
  float* __restrict__ acc = args.acc[t];
  const GT* __restrict__ grad = static_cast<const GT*>(args.grad[t]);
  const int64_t n = args.n[t];
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t full_units = ((args.aligned >> t) & 1u) ? n / kVec : 0;
  // chunk c: units [c * kThreads, (c + 1) * kThreads) of the pair, one per thread
  const int64_t blocks = args.block_start[t + 1] - args.block_start[t];
  const int64_t first = b - args.block_start[t];  // runs once unless the pair was capped
  if ((args.overwrite >> t) & 1u) {  // (uniform across the block, as the chunk tests)
    for (int64_t c = first; c * kThreads < units; c += blocks) {
      accumulate_chunk<GDT, true>(acc, grad, c * kThreads, full_units, n, args.scale);
    }
  } else {
    for (int64_t c = first; c * kThreads < units; c += blocks) {
      accumulate_chunk<GDT, false>(acc, grad, c * kThreads, full_units, n, args.scale);
    }
  }
}

int launch_many(const ManyArgs& args, int grad_dtype, cudaStream_t stream) {
  const int64_t blocks = args.block_start[args.count];
  switch (grad_dtype) {
    case kFloat16:
      accumulate_many_kernel<kFloat16><<<grid(blocks), kThreads, 0, stream>>>(args);
      break;
    case kBFloat16:
      accumulate_many_kernel<kBFloat16><<<grid(blocks), kThreads, 0, stream>>>(args);
      break;
    default:
      accumulate_many_kernel<kFloat32><<<grid(blocks), kThreads, 0, stream>>>(args);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int accumulate(const AccumulateParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (p.norm_mode == kNoNorm && p.n == 0) return 0;
  // with a norm: norm_partials(n) blocks (the binding sized partials); else cover the buffer
  const int64_t blocks = p.norm_mode == kNoNorm ? cover_blocks(p.n) : cuda_blocks(p.n);
  const bool aligned = aligned16(p.acc) && aligned16(p.grad);
  switch (p.norm_mode) {
    case kNormL2: launch_dtype<kNormL2>(p, blocks, aligned, stream); break;
    case kNormInf: launch_dtype<kNormInf>(p, blocks, aligned, stream); break;
    default: launch_dtype<kNoNorm>(p, blocks, aligned, stream); break;
  }
  int err = static_cast<int>(cudaGetLastError());
  if (err != 0 || p.norm_mode == kNoNorm) return err;
  return launch_finalize(p.norm_mode, p.partials, blocks, p.out, false, stream);
}

int accumulate_many(const AccumulateManyParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  ManyArgs args;
  args.aligned = 0;
  args.overwrite = 0;
  args.count = 0;
  args.scale = p.scale;
  args.block_start[0] = 0;
  for (int64_t i = 0; i < p.num_tensors; ++i) {
    const int64_t n = p.numels[i];
    if (n == 0) continue;
    const int c = args.count;
    const int64_t units = (n + kVec - 1) / kVec;
    int64_t blocks = (units + kThreads - 1) / kThreads;
    if (blocks > kManyMaxBlocksPerTensor) blocks = kManyMaxBlocksPerTensor;
    args.acc[c] = p.accs[i];
    args.grad[c] = p.grads[i];
    args.n[c] = n;
    if (aligned16(p.accs[i]) && aligned16(p.grads[i])) args.aligned |= uint64_t{1} << c;
    if (p.overwrite != nullptr && p.overwrite[i] != 0) args.overwrite |= uint64_t{1} << c;
    args.block_start[c + 1] = args.block_start[c] + static_cast<int32_t>(blocks);
    args.count = c + 1;
    if (args.count == kManyMaxTensors) {
      const int err = launch_many(args, p.grad_dtype, stream);
      if (err != 0) return err;
      args.aligned = 0;
      args.overwrite = 0;
      args.count = 0;
    }
  }
  return args.count > 0 ? launch_many(args, p.grad_dtype, stream) : 0;
}

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace fa
