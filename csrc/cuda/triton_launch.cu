// Launches a kernel Triton compiled (ops/triton.py _accumulate_many_kernel, its CUfunction
// handle from Triton's CompiledKernel) through the CUDA driver, for csrc/hooks.cpp's table
// flushes: the launch Triton's own launcher makes, minus the Python around it (tens of
// microseconds per flush inside a backward). The driver's entry points come from the
// CUDA runtime (cudaGetDriverEntryPoint*), so the extension needs no -lcuda. Also the
// upload of those flushes' tables (copy_to_device). No torch here.
#include <cuda.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace fa {
namespace cuda {
namespace {

using LaunchKernelFn = CUresult(CUDAAPI*)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                          unsigned, unsigned, unsigned, CUstream, void**,
                                          void**);
using GetErrorStringFn = CUresult(CUDAAPI*)(CUresult, const char**);

// the driver's `name` (its CUDA 12.0 ABI), or null
void* driver_entry(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t err = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#endif
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // (not left for the next runtime call to report)
    return nullptr;
  }
  return found == cudaDriverEntryPointSuccess ? fn : nullptr;
}

}  // namespace

int triton_many_launch(const TritonManyLaunch& p) {
  static const auto launch_kernel = reinterpret_cast<LaunchKernelFn>(driver_entry("cuLaunchKernel"));
  if (launch_kernel == nullptr) return kNoDriverEntry;
  if (p.blocks <= 0) return 0;
  CUdeviceptr table = reinterpret_cast<CUdeviceptr>(p.table);
  int32_t n_tensors = p.n_tensors;
  float scale = p.scale;
  CUdeviceptr global_scratch = 0, profile_scratch = 0;
  void* args[] = {&table, &n_tensors, &scale, &global_scratch, &profile_scratch};
  const CUresult err = launch_kernel(
      static_cast<CUfunction>(p.function), static_cast<unsigned>(p.blocks), 1, 1,
      static_cast<unsigned>(32 * p.num_warps), 1, 1, static_cast<unsigned>(p.shared),
      static_cast<CUstream>(p.stream), args, nullptr);
  return static_cast<int>(err);
}

int copy_to_device(void* dst, const void* src, size_t bytes, void* stream) {
  const cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                                          static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) (void)cudaGetLastError();
  return static_cast<int>(err);
}

const char* driver_error_string(int err) {
  if (err == kNoDriverEntry) return "the CUDA driver's cuLaunchKernel could not be found";
  static const auto get = reinterpret_cast<GetErrorStringFn>(driver_entry("cuGetErrorString"));
  const char* text = nullptr;
  if (get == nullptr || get(static_cast<CUresult>(err), &text) != CUDA_SUCCESS ||
      text == nullptr)
    return "unknown CUDA driver error";
  return text;
}

}  // namespace cuda
}  // namespace fa
