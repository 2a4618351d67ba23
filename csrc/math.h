// Element math shared by the CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// Plain C++ only: no torch, no CUDA headers. Every function is FA_HD: __host__ __device__
// under nvcc, plain inline for the host compiler. Half types travel as their raw bits
// (uint16_t) so that neither side needs a half type.
//
// The math follows fusedaccum/ops/reference.py operation by operation, in fp32, with the
// host-side constants (decay factors, bias corrections) computed in double and rounded to
// fp32 once, as torch does for Python scalars. Where torch's CPU kernels fuse a multiply-add
// (add(x, y, alpha=a), lerp, addcmul: ATen's vec::fmadd on x86 CPUs with AVX2) the math
// here calls fmaf (one rounding), and every other operation rounds once on its own: the
// host build has -ffp-contract=off and nvcc --fmad=false (left to itself, nvcc fused the
// norm's sum of squares, which the CPU loops round twice), so an element comes out of the
// CPU loops and the CUDA kernels with the same bits, and out of the Triton kernels too
// (which round the other products with libdevice's mul_rn, never fused).
// An SGD step is bitwise torch.optim.SGD's on CPU (foreach=False); Adam's differs in
// an ulp where torch's CPU sqrt (SLEEF) is not correctly rounded. Flags that choose between
// two formulas are passed as bit masks and applied with select(): no branches, so CPU loops
// vectorize and GPU threads never diverge, and the result is bit-exact (no 0 * inf tricks).
//
// Never put csrc/ itself on the include path: this file would then shadow the system
// <math.h>. Our sources include each other by relative path ("../math.h").
//
// The functions live in the inline namespace FA_ISA (default `base`): a CPU translation
// unit compiled for another instruction set (cpu/loops_avx2.cpp, cpu/loops_avx512.cpp)
// defines FA_ISA so that its copies never collide with the baseline ones at link time.
// Types stay outside it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: a call left inside a CPU loop would stop its vectorization
#define FA_HD inline __attribute__((always_inline))
#else
#define FA_HD inline
#endif

#ifndef FA_ISA
#define FA_ISA base
#endif

namespace fa {

// Storage dtypes of the flat buffers.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// What accumulate/norm kernels reduce: nothing, sum of squares, or max |x| (NaN wins).
enum NormMode : int { kNoNorm = 0, kNormL2 = 1, kNormInf = 2 };

// Per-step Adam/AdamW scalars: computed on the host in double, rounded to fp32 once; flags
// as masks (see mask_of).
struct AdamScalars {
  float decay;          // 1 - lr * weight_decay
  float weight_decay;   // weight_decay
  float beta1_weight;   // 1 - beta1 (the lerp weight)
  float beta2;          // beta2
  float one_m_beta2;    // 1 - beta2
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;            // eps
  float neg_step_size;  // -(lr / (1 - beta1^step))
  uint32_t decoupled;   // mask: decoupled weight decay (AdamW), weight_decay != 0
  uint32_t l2;          // mask: L2 weight decay added to g (Adam), weight_decay != 0
  uint32_t maximize;    // mask
  uint32_t lerp_low;    // mask: |1 - beta1| < 0.5 (which of torch's two lerp forms)
};

// Per-step SGD scalars.
struct SgdScalars {
  float lr;
  float momentum;
  float one_m_dampening;      // 1 - dampening
  float weight_decay;
  uint32_t has_weight_decay;  // mask: weight_decay != 0
  uint32_t nesterov;          // mask
  uint32_t maximize;          // mask
  uint32_t first_step;        // mask: the momentum buffer holds no history, it becomes g
};

inline namespace FA_ISA {

// ---- bits -------------------------------------------------------------------------------

FA_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// All ones when b, else zero.
FA_HD uint32_t mask_of(bool b) { return b ? 0xffffffffu : 0u; }

// if_set where mask is all ones, if_clear where it is zero; bit-exact, branch-free.
FA_HD float select(uint32_t mask, float if_set, float if_clear) {
  return bits_f32((f32_bits(if_set) & mask) | (f32_bits(if_clear) & ~mask));
}

// ---- fp16 / bf16 <-> fp32 ---------------------------------------------------------------
// Signed int32 arithmetic wherever the values allow it: x86 SSE2 only has signed vector
// compares and int -> float conversions.

// Exact widening of an IEEE binary16 value.
FA_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int32_t exp = (h >> 10) & 0x1f;
  const int32_t mant = h & 0x3ff;
  // normal: shift exponent and mantissa into place, rebias the exponent from 15 to 127
  const uint32_t normal = sign | ((static_cast<uint32_t>(h & 0x7fffu) << 13) + 0x38000000u);
  // inf / NaN: all-ones exponent, payload kept
  const uint32_t special = sign | 0x7f800000u | (static_cast<uint32_t>(mant) << 13);
  // zero / subnormal: mant * 2^-24, exact in fp32
  const uint32_t subnormal = sign | f32_bits(static_cast<float>(mant) * 5.9604644775390625e-8f);
  return bits_f32(exp == 0 ? subnormal : (exp == 0x1f ? special : normal));
}

// fp32 -> binary16, round to nearest even (as torch's .to(torch.float16)); overflow gives
// inf, NaN stays NaN. Every case is computed, then selected: no branches, no variable
// shifts.
FA_HD uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t ax = static_cast<int32_t>(x & 0x7fffffffu);
  // normal half: rebias the exponent 127 -> 15 and drop 13 mantissa bits, rounding to
  // nearest even; a carry into the exponent gives the right result
  const int32_t base = ax - 0x38000000;
  const int32_t normal = (base + 0xfff + ((base >> 13) & 1)) >> 13;
  // subnormal half (|f| < 2^-14): in 0.5f + |f| the fp32 unit in the last place is 2^-24,
  // the half subnormal step, so the fp32 addition itself rounds |f| to nearest even in
  // that unit; the bits above those of 0.5f are the half's bits (0x400 when it rounds up
  // to the smallest normal, which is that number's encoding)
  const float magic = 0.5f;
#if defined(__CUDA_ARCH__)
  const float shifted = __fadd_rn(bits_f32(static_cast<uint32_t>(ax)), magic);
#else
  const float shifted = bits_f32(static_cast<uint32_t>(ax)) + magic;
#endif
  const int32_t sub = static_cast<int32_t>(f32_bits(shifted) - f32_bits(magic));
  int32_t r = ax >= 0x38800000 ? normal : sub;
  r = ax >= 0x477ff000 ? 0x7c00 : r;  // >= 65520 rounds to inf (the even neighbour); inf too
  r = ax > 0x7f800000 ? 0x7e00 : r;   // NaN: a quiet NaN
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(r));
}

FA_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// fp32 -> bfloat16, round to nearest even; NaN becomes the quiet NaN 0x7fc0 (as torch).
FA_HD uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// Loads and stores of one storage dtype as fp32.
template <int DT>
struct Cvt;
template <>
struct Cvt<kFloat32> {
  using T = float;
  static FA_HD float load(float x) { return x; }
  static FA_HD float store(float x) { return x; }
};
template <>
struct Cvt<kFloat16> {
  using T = uint16_t;
  static FA_HD float load(uint16_t x) { return f16_to_f32(x); }
  static FA_HD uint16_t store(float x) { return f32_to_f16(x); }
};
template <>
struct Cvt<kBFloat16> {
  using T = uint16_t;
  static FA_HD float load(uint16_t x) { return bf16_to_f32(x); }
  static FA_HD uint16_t store(float x) { return f32_to_bf16(x); }
};

// ---- reductions -------------------------------------------------------------------------

// torch.maximum: NaN from either side wins (fmaxf would drop it). Two single-compare
// selects, which compilers turn into vector blends.
FA_HD float nan_max(float a, float b) {
  const float m = a > b ? a : b;  // b when b is NaN
  return a != a ? a : m;
}

// A norm's running statistic. Reduce<kNormL2> sums squares in fp32. Reduce<kNormInf>
// keeps max |x| as an integer: for sign-cleared floats the bit patterns order like the
// values and every NaN pattern lies above inf, so an integer max gives NaN if any NaN,
// else inf if any inf, else the largest |x|, in one vectorizable instruction.
template <int MODE>
struct Reduce;
template <>
struct Reduce<kNormL2> {
  using T = float;
  static FA_HD T zero() { return 0.f; }
  static FA_HD T fold(T s, float x) { return s + x * x; }
  static FA_HD T combine(T a, T b) { return a + b; }
  static FA_HD float finish(T s) { return s; }
  static FA_HD T from_float(float f) { return f; }  // a finished partial back into T
};
template <>
struct Reduce<kNormInf> {
  using T = int32_t;
  static FA_HD T zero() { return 0; }
  static FA_HD T fold(T s, float x) {
    const T b = static_cast<T>(f32_bits(x) & 0x7fffffffu);
    return s > b ? s : b;
  }
  static FA_HD T combine(T a, T b) { return a > b ? a : b; }
  static FA_HD float finish(T s) { return bits_f32(static_cast<uint32_t>(s)); }
  static FA_HD T from_float(float f) { return static_cast<T>(f32_bits(f) & 0x7fffffffu); }
};

// ---- accumulate -------------------------------------------------------------------------

// acc = (0 if overwrite else acc) + scale * g   (torch: mul(g, scale) / add_(g, alpha=scale),
// whose add is one multiply-add in torch's CPU (vec::fmadd) and CUDA kernels)
FA_HD float accumulate_value(float acc, float g, float scale, bool overwrite) {
  return overwrite ? g * scale : fmaf(scale, g, acc);
}

// ---- torch.lerp -------------------------------------------------------------------------
// torch computes start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w),
// each a multiply-add rounded once (ATen's CPU lerp_vec: fmadd(w - 1, diff, end) for the
// second: w - 1 is exactly -(1 - w)); low_weight_mask = mask_of(|w| < 0.5) is decided once
// on the host.
FA_HD float lerp(float start, float end, float weight, uint32_t low_weight_mask) {
  const float diff = end - start;
  return select(low_weight_mask, fmaf(weight, diff, start), fmaf(weight - 1.0f, diff, end));
}

// ---- Adam / AdamW -----------------------------------------------------------------------

// One element of torch.optim.Adam(W), amsgrad as a template flag; g is acc * grad_mult.
// Returns the new param; m, v (and vmax with AMSGRAD) are updated in place.
// PLAIN: the caller has checked adam_is_plain(s) (AdamW as usually configured); the
// selects that case makes no-ops are left out: the same operations on the same values,
// so bitwise the same result, with about half the arithmetic (which limits the CPU loop
// once memory is fast).
template <bool AMSGRAD, bool PLAIN = false>
FA_HD float adam_update(float p, float g, float& m, float& v, float& vmax, const AdamScalars& s) {
  float new_p;
  if (PLAIN) {
    new_p = p * s.decay;
    m = fmaf(s.beta1_weight, g - m, m);  // lerp's low-weight form
  } else {
    g = select(s.maximize, -g, g);
    new_p = select(s.decoupled, p * s.decay, p);
    g = select(s.l2, fmaf(s.weight_decay, p, g), g);  // grad.add(param, alpha=wd)
    m = lerp(m, g, s.beta1_weight, s.lerp_low);
  }
  v = fmaf(s.one_m_beta2 * g, g, v * s.beta2);  // v.mul_(beta2).addcmul_(g, g, value=1-beta2)
  float vv = v;
  if (AMSGRAD) {
    vmax = nan_max(vmax, v);  // torch.maximum(max_exp_avg_sq, v)
    vv = vmax;
  }
  const float denom = sqrtf(vv) / s.bc2_sqrt + s.eps;
  return new_p + s.neg_step_size * m / denom;  // addcdiv: (value * m) / denom, two roundings
}

// Decoupled weight decay (AdamW, weight_decay != 0), no maximize, no L2 term, lerp weight
// 1 - beta1 below 0.5: the case adam_update<..., true> computes.
FA_HD bool adam_is_plain(const AdamScalars& s) {
  return s.decoupled != 0u && s.maximize == 0u && s.l2 == 0u && s.lerp_low != 0u;
}

// ---- SGD --------------------------------------------------------------------------------

// One element of torch.optim.SGD, momentum != 0 as a template flag; g is acc * grad_mult.
// Returns the new param; buf is updated in place with MOMENTUM.
template <bool MOMENTUM>
FA_HD float sgd_update(float p, float g, float& buf, const SgdScalars& s) {
  g = select(s.maximize, -g, g);
  // torch.optim.SGD's add(..., alpha=) forms, each one multiply-add
  g = select(s.has_weight_decay, fmaf(s.weight_decay, p, g), g);
  if (MOMENTUM) {
    buf = select(s.first_step, g, fmaf(s.one_m_dampening, g, buf * s.momentum));
    g = select(s.nesterov, fmaf(s.momentum, buf, g), buf);
  }
  return fmaf(-s.lr, g, p);  // param.add_(g, alpha=-lr)
}

}  // inline namespace FA_ISA
}  // namespace fa
