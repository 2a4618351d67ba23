// Per-range CPU loops over the element math of ../math.h. Included by loops_base.cpp,
// loops_avx2.cpp and loops_avx512.cpp, which compile it for different instruction sets:
// keep it free of anything but <cstdint>, <cstring> and our own headers (no std
// containers, no torch), so that no function of another library gets compiled for the
// wider instruction set.
//
// Everything sits in an anonymous namespace (internal linkage); the loops are plain
// counted loops over __restrict__ pointers with the per-call flags as template
// arguments or masks, a shape the compiler vectorizes.
#pragma once

#include <cstdint>
#include <cstring>

#include "../math.h"
#include "../params.h"
#include "kernels.h"

namespace fa {
namespace cpu {
namespace {

// Independent accumulators per reduction: a fixed shape the compiler vectorizes and a
// fixed order (the result depends on the range only, never on threads or ISA).
constexpr int kLanes = 16;

// Each loop stays its own function (the dispatch switches below would otherwise inline
// dozens of them into one body, past the inliner's budget, leaving calls in the loops).
#if defined(__GNUC__)
#define FA_LOOP __attribute__((noinline))
#else
#define FA_LOOP
#endif

// The kLanes partial results live in registers: vectors of the GCC/clang vector extension,
// FA_VEC_BYTES wide (the including file sets the width of its instruction set). Written
// as an array of scalars, GCC kept them in memory and the 2-norm ran at a quarter of the
// speed of a plain sum. Lane j folds elements begin + j, begin + j + kLanes, ... in order,
// the tail is folded separately, and the lanes are combined as a tree: the same order as
// the scalar loop of other compilers, so every instruction set gives bitwise the same
// result.
#ifndef FA_VEC_BYTES
#define FA_VEC_BYTES 16
#endif
#if defined(__GNUC__)
constexpr int kVecWidth = FA_VEC_BYTES / 4;  // lanes per vector
constexpr int kVecs = kLanes / kVecWidth;
static_assert(kVecs * kVecWidth == kLanes, "kLanes must be a multiple of the vector width");
typedef float VecF __attribute__((vector_size(FA_VEC_BYTES)));
typedef int32_t VecI __attribute__((vector_size(FA_VEC_BYTES)));

template <int MODE>
struct VecFold;
template <>
struct VecFold<kNormL2> {
  using V = VecF;
  static V fold(V s, VecF x) { return s + x * x; }
};
template <>
struct VecFold<kNormInf> {
  using V = VecI;
  static V fold(V s, VecF x) {
    VecI b;
    std::memcpy(&b, &x, sizeof b);
    b &= 0x7fffffff;
    const VecI keep = s > b;  // -1 where s wins, 0 elsewhere
    return (s & keep) | (b & ~keep);
  }
};
#endif

// block(i, x) computes elements i .. i + kLanes - 1 into x (loading all its inputs before
// it stores anything, so that the compiler can vectorize it without alias checks);
// elem(i) computes element i alone (the tail).
template <int MODE, class Block, class Elem>
inline float reduce_range(int64_t begin, int64_t end, Block&& block, Elem&& elem) {
  using R = Reduce<MODE>;
  typename R::T lanes[kLanes];
  int64_t i = begin;
#if defined(__GNUC__)
  using F = VecFold<MODE>;
  typename F::V v[kVecs] = {};
  for (; i + kLanes <= end; i += kLanes) {
    float x[kLanes];
    block(i, x);
    for (int k = 0; k < kVecs; ++k) {
      VecF xv;
      std::memcpy(&xv, x + k * kVecWidth, sizeof xv);
      v[k] = F::fold(v[k], xv);
    }
  }
  for (int j = 0; j < kLanes; ++j) lanes[j] = v[j / kVecWidth][j % kVecWidth];
#else
  for (int j = 0; j < kLanes; ++j) lanes[j] = R::zero();
  for (; i + kLanes <= end; i += kLanes) {
    float x[kLanes];
    block(i, x);
    for (int j = 0; j < kLanes; ++j) lanes[j] = R::fold(lanes[j], x[j]);
  }
#endif
  typename R::T tail = R::zero();
  for (; i < end; ++i) tail = R::fold(tail, elem(i));
  for (int w = kLanes / 2; w >= 1; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] = R::combine(lanes[j], lanes[j + w]);
  }
  return R::finish(R::combine(lanes[0], tail));
}

// ---- accumulate -------------------------------------------------------------------------

template <int GDT, int MODE, bool OVERWRITE, class GT>
FA_LOOP float accumulate_loop(float* __restrict__ acc, const GT* __restrict__ grad,
                              const float scale, int64_t begin, int64_t end) {
  auto elem = [=](int64_t i) {
    const float a = accumulate_value(OVERWRITE ? 0.f : acc[i], Cvt<GDT>::load(grad[i]), scale,
                                     OVERWRITE);
    acc[i] = a;
    return a;
  };
  if (MODE == kNoNorm) {
    for (int64_t i = begin; i < end; ++i) elem(i);
    return 0.f;
  }
  // a block computes all its sums before it stores any: the captured pointers lose
  // __restrict__, and a store between loads would need alias checks (GCC then gave up
  // vectorizing, and the fused pass ran 5x slower than accumulate and norm apart)
  auto block = [=](int64_t i, float* __restrict__ x) {
    for (int j = 0; j < kLanes; ++j) {
      x[j] = accumulate_value(OVERWRITE ? 0.f : acc[i + j], Cvt<GDT>::load(grad[i + j]), scale,
                              OVERWRITE);
    }
    for (int j = 0; j < kLanes; ++j) acc[i + j] = x[j];
  };
  return reduce_range<MODE == kNoNorm ? kNormL2 : MODE>(begin, end, block, elem);
}

template <int GDT, int MODE, bool OVERWRITE>
float accumulate_typed(const AccumulateParams& p, int64_t begin, int64_t end) {
  using GT = typename Cvt<GDT>::T;
  return accumulate_loop<GDT, MODE, OVERWRITE>(p.acc, static_cast<const GT*>(p.grad), p.scale,
                                               begin, end);
}

template <int MODE>
float accumulate_dispatch(const AccumulateParams& p, int64_t begin, int64_t end) {
  switch (p.grad_dtype * 2 + (p.overwrite ? 1 : 0)) {
    case kFloat16 * 2: return accumulate_typed<kFloat16, MODE, false>(p, begin, end);
    case kFloat16 * 2 + 1: return accumulate_typed<kFloat16, MODE, true>(p, begin, end);
    case kBFloat16 * 2: return accumulate_typed<kBFloat16, MODE, false>(p, begin, end);
    case kBFloat16 * 2 + 1: return accumulate_typed<kBFloat16, MODE, true>(p, begin, end);
    case kFloat32 * 2 + 1: return accumulate_typed<kFloat32, MODE, true>(p, begin, end);
    default: return accumulate_typed<kFloat32, MODE, false>(p, begin, end);
  }
}

void accumulate_range(const AccumulateParams& p, int64_t begin, int64_t end) {
  accumulate_dispatch<kNoNorm>(p, begin, end);
}

float accumulate_norm_range(const AccumulateParams& p, int64_t begin, int64_t end) {
  return p.norm_mode == kNormInf ? accumulate_dispatch<kNormInf>(p, begin, end)
                                 : accumulate_dispatch<kNormL2>(p, begin, end);
}

// ---- norm -------------------------------------------------------------------------------

FA_LOOP float norm_range(const float* __restrict__ x, int mode, int64_t begin, int64_t end) {
  auto elem = [x](int64_t i) { return x[i]; };
  auto block = [x](int64_t i, float* __restrict__ out) {
    for (int j = 0; j < kLanes; ++j) out[j] = x[i + j];
  };
  return mode == kNormInf ? reduce_range<kNormInf>(begin, end, block, elem)
                          : reduce_range<kNormL2>(begin, end, block, elem);
}

// ---- optimizer steps --------------------------------------------------------------------

// The pointers are __restrict__ function parameters: compilers honour restrict there (GCC
// ignores it on local variables and would then need more run-time alias checks than it is
// willing to emit). OUT: 0 for no model copy, else the DType of model_out.
template <int PDT, int OUT, bool AMSGRAD, bool ZERO, bool PLAIN, class PT, class OT>
FA_LOOP void adam_loop(PT* __restrict__ param, float* __restrict__ acc, float* __restrict__ m,
                       float* __restrict__ v, float* __restrict__ vmax, OT* __restrict__ out,
                       const AdamScalars s, const float gm, int64_t begin, int64_t end) {
  constexpr int ODT = OUT == 0 ? kFloat16 : OUT;
  for (int64_t i = begin; i < end; ++i) {
    float mi = m[i], vi = v[i], vmi = AMSGRAD ? vmax[i] : 0.f;
    const float np =
        adam_update<AMSGRAD, PLAIN>(Cvt<PDT>::load(param[i]), acc[i] * gm, mi, vi, vmi, s);
    m[i] = mi;
    v[i] = vi;
    if (AMSGRAD) vmax[i] = vmi;
    param[i] = Cvt<PDT>::store(np);
    if (OUT != 0) out[i] = Cvt<ODT>::store(np);
    if (ZERO) acc[i] = 0.f;
  }
}

template <int PDT, int OUT, bool MOMENTUM, bool ZERO, class PT, class OT>
FA_LOOP void sgd_loop(PT* __restrict__ param, float* __restrict__ acc, float* __restrict__ buf,
                      OT* __restrict__ out, const SgdScalars s, const float gm, int64_t begin,
                      int64_t end) {
  constexpr int ODT = OUT == 0 ? kFloat16 : OUT;
  for (int64_t i = begin; i < end; ++i) {
    float bi = MOMENTUM ? buf[i] : 0.f;
    const float np = sgd_update<MOMENTUM>(Cvt<PDT>::load(param[i]), acc[i] * gm, bi, s);
    if (MOMENTUM) buf[i] = bi;
    param[i] = Cvt<PDT>::store(np);
    if (OUT != 0) out[i] = Cvt<ODT>::store(np);
    if (ZERO) acc[i] = 0.f;
  }
}

// Runtime (param dtype, model_out dtype, flag, zero_acc) -> template arguments.
template <template <int, int, bool, bool> class Loop, class P>
void step_dispatch(const P& p, bool flag, float gm, int64_t begin, int64_t end) {
  const int out = p.c.model_out == nullptr ? 0 : p.c.out_dtype;
  const int key = ((p.c.param_dtype * 3 + out) * 2 + (flag ? 1 : 0)) * 2 + (p.c.zero_acc ? 1 : 0);
  switch (key) {
#define FA_CASE(PDT, OUT, F, Z)           \
  case ((PDT * 3 + OUT) * 2 + F) * 2 + Z: \
    return Loop<PDT, OUT, F != 0, Z != 0>::run(p, gm, begin, end);
#define FA_CASES_PO(PDT, OUT) \
  FA_CASE(PDT, OUT, 0, 0) FA_CASE(PDT, OUT, 0, 1) FA_CASE(PDT, OUT, 1, 0) FA_CASE(PDT, OUT, 1, 1)
#define FA_CASES_P(PDT) FA_CASES_PO(PDT, 0) FA_CASES_PO(PDT, 1) FA_CASES_PO(PDT, 2)
    FA_CASES_P(0) FA_CASES_P(1) FA_CASES_P(2)
#undef FA_CASES_P
#undef FA_CASES_PO
#undef FA_CASE
    default: return;
  }
}

template <int PDT, int OUT, bool F, bool Z>
struct AdamLoop {
  static void run(const AdamParams& p, float gm, int64_t b, int64_t e) {
    using PT = typename Cvt<PDT>::T;
    using OT = typename Cvt<OUT == 0 ? kFloat16 : OUT>::T;
    // AdamW as usually configured: the loop without the selects (bitwise the same)
    auto loop = adam_is_plain(p.s) ? adam_loop<PDT, OUT, F, Z, true, PT, OT>
                                   : adam_loop<PDT, OUT, F, Z, false, PT, OT>;
    loop(static_cast<PT*>(p.c.param), p.c.acc, p.exp_avg, p.exp_avg_sq, p.max_exp_avg_sq,
         static_cast<OT*>(p.c.model_out), p.s, gm, b, e);
  }
};
template <int PDT, int OUT, bool F, bool Z>
struct SgdLoop {
  static void run(const SgdParams& p, float gm, int64_t b, int64_t e) {
    using PT = typename Cvt<PDT>::T;
    using OT = typename Cvt<OUT == 0 ? kFloat16 : OUT>::T;
    sgd_loop<PDT, OUT, F, Z>(static_cast<PT*>(p.c.param), p.c.acc, p.momentum_buffer,
                             static_cast<OT*>(p.c.model_out), p.s, gm, b, e);
  }
};

void adam_range(const AdamParams& p, float gm, int64_t begin, int64_t end) {
  step_dispatch<AdamLoop>(p, p.amsgrad, gm, begin, end);
}

void sgd_range(const SgdParams& p, float gm, int64_t begin, int64_t end) {
  step_dispatch<SgdLoop>(p, p.has_momentum, gm, begin, end);
}

}  // namespace
}  // namespace cpu
}  // namespace fa

// Defines the loop table NAME of this translation unit.
#define FA_DEFINE_CPU_LOOPS(NAME, LABEL)                                                    \
  namespace fa {                                                                            \
  namespace cpu {                                                                           \
  const CpuLoops NAME = {LABEL, &accumulate_range, &accumulate_norm_range, &norm_range,     \
                         &adam_range, &sgd_range};                                          \
  }                                                                                         \
  }
