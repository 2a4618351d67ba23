// Fused AdamW/Adam and SGD steps on the GPU, one launch per flat buffer with a grid that
// covers it (one 8-element unit per thread, cover_blocks): read acc, param and state,
// write param, state, the optional fp16/bf16 model copy and the zeroed acc.
// grad_mult and found_inf are read on the device (no host sync); with found_inf != 0 the
// kernel only zeroes acc (when zero_acc).
#include "common.cuh"
#include "launchers.h"

namespace fa {
namespace cuda {
namespace {

// Zero acc (the only write of a skipped step). Returns true if the step is skipped.
__device__ __forceinline__ bool skipped(const StepCommon& c, bool aligned) {
  if (*c.found_inf == 0.f) return false;  // NaN != 0: skipped too
  if (c.zero_acc) {
    const int64_t units = (c.n + kVec - 1) / kVec;
    const int64_t full_units = aligned ? c.n / kVec : 0;
    const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t u = first_unit(); u < units; u += unit_stride()) {
      Vec8<kFloat32>::store(c.acc, u, c.n, u < full_units, zeros);
    }
  }
  return true;
}

// The loop both steps share, over this thread's 8-element units: load param and acc,
// let the optimizer (Opt::units: its state, the update of w) do its part, store param,
// the optional model copy and the zeroed acc. OUT: 0 for no model copy, else the DType of
// model_out.
template <int PDT, int OUT, class Opt>
__device__ __forceinline__ void step_units(const StepCommon& c, const Opt& opt, bool aligned) {
  constexpr int ODT = OUT == 0 ? kFloat16 : OUT;
  using PT = typename Cvt<PDT>::T;
  using OT = typename Cvt<ODT>::T;
  if (skipped(c, aligned)) return;
  const float gm = *c.grad_mult;
  PT* param = static_cast<PT*>(c.param);
  OT* out = static_cast<OT*>(c.model_out);
  const int64_t n = c.n;
  const int64_t units = (n + kVec - 1) / kVec;
  const int64_t full_units = aligned ? n / kVec : 0;
  for (int64_t u = first_unit(); u < units; u += unit_stride()) {
    const bool full = u < full_units;
    float w[kVec], g[kVec];
    Vec8<PDT>::load(param, u, n, full, w);
    Vec8<kFloat32>::load(c.acc, u, n, full, g);
    opt.units(u, n, full, gm, w, g);
    Vec8<PDT>::store(param, u, n, full, w);
    if (OUT != 0) Vec8<ODT>::store(out, u, n, full, w);
    if (c.zero_acc) {
      const float zeros[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      Vec8<kFloat32>::store(c.acc, u, n, full, zeros);
    }
  }
}

// Adam/AdamW's part of one unit: exp_avg, exp_avg_sq (and max_exp_avg_sq) in and out.
template <bool AMSGRAD>
struct AdamUnits {
  const AdamParams& p;
  __device__ __forceinline__ void units(int64_t u, int64_t n, bool full, float gm, float* w,
                                        const float* g) const {
    float m[kVec], v[kVec], vmax[kVec];
    Vec8<kFloat32>::load(p.exp_avg, u, n, full, m);
    Vec8<kFloat32>::load(p.exp_avg_sq, u, n, full, v);
    if (AMSGRAD) Vec8<kFloat32>::load(p.max_exp_avg_sq, u, n, full, vmax);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      w[j] = adam_update<AMSGRAD>(w[j], g[j] * gm, m[j], v[j], vmax[j], p.s);
    }
    Vec8<kFloat32>::store(p.exp_avg, u, n, full, m);
    Vec8<kFloat32>::store(p.exp_avg_sq, u, n, full, v);
    if (AMSGRAD) Vec8<kFloat32>::store(p.max_exp_avg_sq, u, n, full, vmax);
  }
};

// SGD's part of one unit: the momentum buffer in and out (with MOMENTUM).
template <bool MOMENTUM>
struct SgdUnits {
  const SgdParams& p;
  __device__ __forceinline__ void units(int64_t u, int64_t n, bool full, float gm, float* w,
                                        const float* g) const {
    float buf[kVec];
    if (MOMENTUM) Vec8<kFloat32>::load(p.momentum_buffer, u, n, full, buf);
#pragma unroll
    for (int j = 0; j < kVec; ++j) w[j] = sgd_update<MOMENTUM>(w[j], g[j] * gm, buf[j], p.s);
    if (MOMENTUM) Vec8<kFloat32>::store(p.momentum_buffer, u, n, full, buf);
  }
};

template <int PDT, int OUT, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads) adam_kernel(AdamParams p, bool aligned) {
  step_units<PDT, OUT>(p.c, AdamUnits<AMSGRAD>{p}, aligned);
}

template <int PDT, int OUT, bool MOMENTUM>
__global__ void __launch_bounds__(kThreads) sgd_kernel(SgdParams p, bool aligned) {
  step_units<PDT, OUT>(p.c, SgdUnits<MOMENTUM>{p}, aligned);
}

bool all_aligned(const StepCommon& c, const float* a, const float* b, const float* d) {
  const void* ptrs[] = {c.param, c.acc, c.model_out, a, b, d};
  for (const void* ptr : ptrs) {
    if (ptr != nullptr && !aligned16(ptr)) return false;
  }
  return true;
}

// Runtime (param dtype, model_out dtype, flag) -> template arguments, then one launch.
template <template <int, int, bool> class K, class P>
int launch_step(const P& p, bool flag, bool aligned) {
  if (p.c.n == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(p.c.stream);
  const int64_t blocks = cover_blocks(p.c.n);  // one unit per thread, no norm
  const int out = p.c.model_out == nullptr ? 0 : p.c.out_dtype;
  const int key = (p.c.param_dtype * 3 + out) * 2 + (flag ? 1 : 0);
  switch (key) {
#define FA_CASE(PDT, OUT, F) \
  case (PDT * 3 + OUT) * 2 + F: K<PDT, OUT, F != 0>::launch(p, aligned, blocks, stream); break;
#define FA_CASES(PDT) \
  FA_CASE(PDT, 0, 0) FA_CASE(PDT, 0, 1) FA_CASE(PDT, 1, 0) FA_CASE(PDT, 1, 1) \
  FA_CASE(PDT, 2, 0) FA_CASE(PDT, 2, 1)
    FA_CASES(0) FA_CASES(1) FA_CASES(2)
#undef FA_CASES
#undef FA_CASE
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <int PDT, int OUT, bool F>
struct AdamLaunch {
  static void launch(const AdamParams& p, bool aligned, int64_t blocks, cudaStream_t stream) {
    adam_kernel<PDT, OUT, F><<<grid(blocks), kThreads, 0, stream>>>(p, aligned);
  }
};
template <int PDT, int OUT, bool F>
struct SgdLaunch {
  static void launch(const SgdParams& p, bool aligned, int64_t blocks, cudaStream_t stream) {
    sgd_kernel<PDT, OUT, F><<<grid(blocks), kThreads, 0, stream>>>(p, aligned);
  }
};

}  // namespace

int adam_step(const AdamParams& p) {
  const bool aligned = all_aligned(p.c, p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq);
  return launch_step<AdamLaunch>(p, p.amsgrad, aligned);
}

int sgd_step(const SgdParams& p) {
  const bool aligned = all_aligned(p.c, p.momentum_buffer, nullptr, nullptr);
  return launch_step<SgdLaunch>(p, p.has_momentum, aligned);
}

}  // namespace cuda
}  // namespace fa
