// CPU backend: the entry points the bindings call (kernels.cpp: threading with
// at::parallel_for, fixed-order reductions) and the table of per-range loops over the
// element math of ../math.h that they run (loops.h), compiled once for the baseline
// instruction set and, on x86-64, once more for AVX2 (chosen at run time).
// Plain structs in, no torch types.
#pragma once

#include <cstdint>

#include "../params.h"

namespace fa {
namespace cpu {

void accumulate(const AccumulateParams& p);
void accumulate_many(const AccumulateManyParams& p);
void norm(const NormParams& p);
void adam_step(const AdamParams& p);
void sgd_step(const SgdParams& p);

// The instruction set the loops run with ("avx512", "avx2" or "baseline").
const char* isa();

// Loops over the element range [begin, end) of one buffer.
struct CpuLoops {
  const char* name;
  // acc update without a norm
  void (*accumulate)(const AccumulateParams& p, int64_t begin, int64_t end);
  // acc update, returning the range's norm statistic (Reduce<mode>::finish)
  float (*accumulate_norm)(const AccumulateParams& p, int64_t begin, int64_t end);
  // norm statistic of x[begin, end)
  float (*norm)(const float* x, int mode, int64_t begin, int64_t end);
  void (*adam)(const AdamParams& p, float grad_mult, int64_t begin, int64_t end);
  void (*sgd)(const SgdParams& p, float grad_mult, int64_t begin, int64_t end);
};

extern const CpuLoops kLoopsBaseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FA_CPU_HAVE_AVX2 1
extern const CpuLoops kLoopsAvx2;
extern const CpuLoops kLoopsAvx512;
#endif

}  // namespace cpu
}  // namespace fa
