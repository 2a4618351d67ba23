// The CPU loops compiled a second time for AVX2 + F16C (x86-64 with GCC or clang only),
// picked at run time by kernels.cpp when the CPU has them. Only our own code is compiled
// for AVX2: the standard headers come first, outside the target region, and math.h puts
// its functions in the namespace fa::avx2 (FA_ISA), so no AVX2 instruction can reach a
// function that the baseline build shares with this file.
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define FA_ISA avx2
#define FA_VEC_BYTES 32
#include "loops.h"

FA_DEFINE_CPU_LOOPS(kLoopsAvx2, "avx2")

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
