// acc = (0 if overwrite else acc) + scale * grad on the GPU, one launch per flat buffer;
// with a norm, each block also reduces the updated acc (fixed order) into one partial and
// a one-block second launch combines the partials: deterministic, no atomics, no sync.
#include "common.cuh"
#include "launchers.h"

namespace fa {
namespace cuda {
namespace {

template <int GDT, int MODE, bool OVERWRITE>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(AccumulateParams p, bool aligned) {
  using GT = typename Cvt<GDT>::T;
  using R = Reduce<MODE == kNoNorm ? kNormL2 : MODE>;
  const GT* __restrict__ grad = static_cast<const GT*>(p.grad);
  float* __restrict__ acc = p.acc;
  const int64_t n = p.n;
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t full_units = aligned ? n / kVec : 0;
  typename R::T stat = R::zero();
  for (int64_t u = first_unit(); u < units; u += unit_stride()) {
    const bool full = u < full_units;
    float a[kVec], g[kVec];
    Vec8<GDT>::load(grad, u, n, full, g);
    if (!OVERWRITE) Vec8<kFloat32>::load(acc, u, n, full, a);
#pragma unroll
    for (int j = 0; j < kVec; ++j) a[j] = accumulate_value(OVERWRITE ? 0.f : a[j], g[j], p.scale,
                                                          OVERWRITE);
    Vec8<kFloat32>::store(acc, u, n, full, a);
    if (MODE != kNoNorm) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (full || u * kVec + j < n) stat = R::fold(stat, a[j]);  // skip padding past n
      }
    }
  }
  if (MODE != kNoNorm) {
    stat = block_reduce<MODE == kNoNorm ? kNormL2 : MODE>(stat);
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

}  // namespace

int accumulate(const AccumulateParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  if (p.norm_mode == kNoNorm && p.n == 0) return 0;
  const int64_t blocks = cuda_blocks(p.n);  // norm_partials(n): the binding sized partials
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

const char* error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace cuda
}  // namespace fa
