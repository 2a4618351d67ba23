// The CPU loops compiled a third time, for AVX-512 (F, BW, VL, DQ) + F16C with 512-bit
// vectors (x86-64 with GCC or clang only), picked at run time by kernels.cpp when the CPU
// has them. Measured on this project's 2-core AMD EPYC, 16M elements, five alternating
// runs each: AdamW (its sqrt and divide are the limit) 57-75 GB/s against 50-54 GB/s with
// the AVX2 loops; accumulate and norm unchanged (memory-bound). As in loops_avx2.cpp, only
// our own code is compiled for the wider set: the standard headers come first, outside
// the target region, and math.h puts its functions in the namespace fa::avx512 (FA_ISA).
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif

#define FA_ISA avx512
#define FA_VEC_BYTES 64
#include "loops.h"

FA_DEFINE_CPU_LOOPS(kLoopsAvx512, "avx512")

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
