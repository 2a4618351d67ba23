// Total 2-norm / inf-norm over several fp32 buffers on the GPU: one stage-one launch per
// buffer (each block reduces its grid-stride share into one partial, the grid size
// depending on the buffer's size only), then one block combines all partials, buffer by
// buffer, in a fixed order. Deterministic, no atomics, the result stays on the device.
#include "common.cuh"
#include "launchers.h"

namespace fa {
namespace cuda {
namespace {

template <int MODE>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const float* __restrict__ x, int64_t n, bool aligned,
                float* __restrict__ partials) {
  using R = Reduce<MODE>;
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t full_units = aligned ? n / kVec : 0;
  typename R::T stat = R::zero();
  for (int64_t u = first_unit(); u < units; u += unit_stride()) {
    float a[kVec];
    Vec8<kFloat32>::load(x, u, n, u < full_units, a);  // past n: 0, neutral for both
#pragma unroll
    for (int j = 0; j < kVec; ++j) stat = R::fold(stat, a[j]);
  }
  stat = block_reduce<MODE>(stat);
  if (threadIdx.x == 0) partials[blockIdx.x] = R::finish(stat);
}

}  // namespace

int norm(const NormParams& p) {
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  int64_t offset = 0;
  for (int64_t t = 0; t < p.num_tensors; ++t) {
    // empty buffers launch too: their one block writes a neutral partial
    const int64_t n = p.numels[t];
    const int64_t blocks = norm_partials(n);
    const bool aligned = aligned16(p.tensors[t]);
    if (p.norm_mode == kNormInf) {
      norm_kernel<kNormInf><<<grid(blocks), kThreads, 0, stream>>>(p.tensors[t], n, aligned,
                                                              p.partials + offset);
    } else {
      norm_kernel<kNormL2><<<grid(blocks), kThreads, 0, stream>>>(p.tensors[t], n, aligned,
                                                             p.partials + offset);
    }
    const int err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
    offset += blocks;
  }
  return launch_finalize(p.norm_mode, p.partials, offset, p.out, p.norm_mode == kNormL2, stream);
}

}  // namespace cuda
}  // namespace fa
