// CUDA launchers (accumulate.cu, norm.cu, step.cu): plain structs in, an error code out
// (0 = cudaSuccess, else a cudaError_t value; error_string() names it). They enqueue on
// the stream in the struct and never wait for the device. Plain C++: the bindings include
// this without CUDA headers, the kernels are compiled without torch.
#pragma once

#include <cstddef>

#include "../params.h"

namespace fa {
namespace cuda {

int accumulate(const AccumulateParams& p);
int accumulate_many(const AccumulateManyParams& p);
int norm(const NormParams& p);
int adam_step(const AdamParams& p);
int sgd_step(const SgdParams& p);
const char* error_string(int err);

// Triton's compiled kernel launched through the CUDA driver (triton_launch.cu): 0, or a
// CUresult value, or kNoDriverEntry where the driver's cuLaunchKernel could not be found;
// driver_error_string() names it.
constexpr int kNoDriverEntry = -1;
int triton_many_launch(const TritonManyLaunch& p);
const char* driver_error_string(int err);

// `bytes` of host memory copied to device memory, queued on `stream` (a cudaStream_t):
// cudaMemcpyAsync, without ATen's copy machinery around it. The host buffer may be reused
// once this returns (pageable memory is staged by then). 0, or the cudaError_t value
// (cleared, so that the next runtime call does not report it).
int copy_to_device(void* dst, const void* src, size_t bytes, void* stream);

}  // namespace cuda
}  // namespace fa
