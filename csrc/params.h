// Plain parameter structs passed from the bindings to the CPU loops and the CUDA
// launchers (flash-attention style: kernels never see torch types). Pointers are raw
// device (or host) pointers to contiguous 1-D buffers; sizes are int64.
#pragma once

#include <cstdint>

#include "math.h"

namespace fa {

// acc = (0 if overwrite else acc) + scale * grad, optionally reducing the updated acc.
struct AccumulateParams {
  float* acc = nullptr;
  const void* grad = nullptr;
  int grad_dtype = kFloat32;  // DType
  int64_t n = 0;
  float scale = 1.f;
  bool overwrite = false;
  int norm_mode = kNoNorm;     // NormMode
  float* out = nullptr;        // 0-dim result (sum of squares or max |acc|) when norm_mode != 0
  float* partials = nullptr;   // CUDA only: norm_partials(n) floats of workspace
  void* stream = nullptr;      // CUDA only: cudaStream_t
};

// accs[i] = (0 if overwrite[i] else accs[i]) + scale * grads[i] for every i (accumulate,
// batched): one op call, on CUDA one launch per group of up to kCudaManyMaxTensors pairs. CPU only: with
// norm_mode != kNoNorm also the statistic of all updated accs together (sum of squares
// or max |acc|), reduced in fixed-size chunks of each pair combined in index order.
struct AccumulateManyParams {
  float* const* accs = nullptr;         // host array of num_tensors pointers
  const void* const* grads = nullptr;   // host array of num_tensors pointers, grad_dtype
  const int64_t* numels = nullptr;      // host array of num_tensors sizes
  const int64_t* overwrite = nullptr;   // null (add everywhere) or num_tensors 0/1 flags
  int64_t num_tensors = 0;
  int grad_dtype = kFloat32;  // DType, the same for every grad
  float scale = 1.f;
  int norm_mode = kNoNorm;    // NormMode (CPU only)
  float* out = nullptr;       // 0-dim result when norm_mode != kNoNorm
  void* stream = nullptr;  // CUDA only: cudaStream_t
};

// Total norm over several fp32 buffers.
struct NormParams {
  const float* const* tensors = nullptr;  // host array of num_tensors pointers
  const int64_t* numels = nullptr;        // host array of num_tensors sizes
  int64_t num_tensors = 0;
  int norm_mode = kNormL2;  // kNormL2 (returns sqrt of the sum of squares) or kNormInf
  float* out = nullptr;     // 0-dim result
  float* partials = nullptr;  // CUDA only: sum over tensors of norm_partials(numel) floats
  void* stream = nullptr;
};

// Fields common to both optimizer steps.
struct StepCommon {
  void* param = nullptr;  // param_dtype elements, updated in place
  int param_dtype = kFloat32;
  float* acc = nullptr;
  void* model_out = nullptr;  // optional fp16/bf16 copy of the updated param
  int out_dtype = kFloat16;
  int64_t n = 0;
  const float* grad_mult = nullptr;  // 0-dim, same device as param: g = acc * grad_mult
  const float* found_inf = nullptr;  // 0-dim, same device: != 0 means write nothing but acc
  bool zero_acc = true;
  void* stream = nullptr;
};

struct AdamParams {
  StepCommon c;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  float* max_exp_avg_sq = nullptr;  // required with amsgrad
  bool amsgrad = false;
  AdamScalars s;
};

struct SgdParams {
  StepCommon c;
  float* momentum_buffer = nullptr;  // required with momentum != 0
  bool has_momentum = false;
  SgdScalars s;
};

// One launch of the kernel Triton compiled for the triton backend's table flush,
// ops/triton.py _accumulate_many_kernel(table_ptr, n_tensors, scale), from C++
// (csrc/hooks.cpp; ops/triton.py _LAUNCH = "cxx"): the arguments as Triton's own launcher
// passes them (Triton 3.6 and 3.9: the non-constexpr arguments in order, *i64, i32, fp32,
// then its global and profile scratch pointers, null for a kernel that asks for no
// scratch). ops/triton.py checks the compiled kernel's signature and metadata first.
struct TritonManyLaunch {
  void* function = nullptr;   // CUfunction Triton loaded in the device's primary context
  int64_t blocks = 0;         // grid size (programs)
  int num_warps = 4;          // 32 threads each
  int shared = 0;             // dynamic shared memory bytes (the kernel's metadata)
  const int64_t* table = nullptr;  // device address of the int64 table
  int32_t n_tensors = 0;
  float scale = 1.f;
  void* stream = nullptr;     // cudaStream_t
};

// ---- shared launch geometry (host side; static: each translation unit its own copy) ---

// Elements per CUDA thread per iteration (16-byte vectors of fp32, or 16 bytes of halves
// for the 8-element case), threads per block, and the grid of the norm-producing kernels
// (accumulate_ with a norm, grad_norm): a block cap that depends on n only, so the
// reduction order (and hence every norm) is the same on every GPU. The element-wise
// kernels without a norm use a grid that covers the whole buffer instead (cuda/common.cuh
// cover_blocks).
constexpr int kCudaVec = 8;
constexpr int kCudaThreads = 256;
constexpr int64_t kCudaMaxBlocks = 2048;

static inline int64_t cuda_blocks(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kCudaThreads) * kCudaVec;
  int64_t b = (n + per_block - 1) / per_block;
  if (b < 1) b = 1;
  return b < kCudaMaxBlocks ? b : kCudaMaxBlocks;
}

// Number of per-block partial results the CUDA norm's first stage writes for n elements.
static inline int64_t norm_partials(int64_t n) { return cuda_blocks(n); }

}  // namespace fa
