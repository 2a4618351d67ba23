// CPU entry points: split the work with at::parallel_for and run the loop table of the
// best instruction set this CPU has (loops.h). Norms are reduced in fixed-size chunks
// whose results are combined pairwise in index order, so every result depends on the
// input only: not on the number of threads, nor on the instruction set.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../math.h"
#include "kernels.h"

namespace fa {
namespace cpu {
namespace {

// Elements per parallel task of the element-wise loops (torch's grain size).
constexpr int64_t kGrain = 32768;
// Elements per norm chunk (one partial result each).
constexpr int64_t kChunk = 8192;

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

bool cpu_has_avx2() {
#if defined(FA_CPU_HAVE_AVX2)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(FA_CPU_HAVE_AVX2)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The widest loops this CPU runs. FUSEDACCUM_CPU_ISA=baseline|avx2|avx512 caps the choice
// (e.g. to compare them: they give bitwise the same results).
const CpuLoops& pick_loops() {
  const char* env = std::getenv("FUSEDACCUM_CPU_ISA");
  const std::string cap = env == nullptr ? "avx512" : env;
#if defined(FA_CPU_HAVE_AVX2)
  if (cap == "avx512" && cpu_has_avx512()) return kLoopsAvx512;
  if ((cap == "avx512" || cap == "avx2") && cpu_has_avx2()) return kLoopsAvx2;
#endif
  return kLoopsBaseline;
}

const CpuLoops& loops() {
  static const CpuLoops& chosen = pick_loops();
  return chosen;
}

// Pairwise combination of finished partials x[0..n), in a fixed order.
template <int MODE>
typename Reduce<MODE>::T combine_tree(const float* x, int64_t n) {
  using R = Reduce<MODE>;
  if (n == 0) return R::zero();
  if (n <= 8) {
    typename R::T r = R::from_float(x[0]);
    for (int64_t i = 1; i < n; ++i) r = R::combine(r, R::from_float(x[i]));
    return r;
  }
  const int64_t h = n / 2;
  return R::combine(combine_tree<MODE>(x, h), combine_tree<MODE>(x + h, n - h));
}

float combine(const std::vector<float>& partials, int mode) {
  const int64_t n = static_cast<int64_t>(partials.size());
  if (mode == kNormInf) return Reduce<kNormInf>::finish(combine_tree<kNormInf>(partials.data(), n));
  return Reduce<kNormL2>::finish(combine_tree<kNormL2>(partials.data(), n));
}

void zero(float* acc, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    std::memset(acc + b, 0, static_cast<size_t>(e - b) * sizeof(float));
  });
}

// A norm statistic over several buffers in a fixed order: every buffer is cut into chunks
// of kChunk elements, one chunk table over all of them (so that a single parallel_for
// covers everything), chunk_stat(t, begin, end) gives the statistic of elements
// [begin, end) of buffer t, and the chunks' results are combined pairwise in index order.
template <class ChunkStat>
float reduce_chunks(const int64_t* numels, int64_t num_tensors, int mode,
                    ChunkStat&& chunk_stat) {
  std::vector<int64_t> first(static_cast<size_t>(num_tensors) + 1, 0);
  for (int64_t t = 0; t < num_tensors; ++t) first[t + 1] = first[t] + num_chunks(numels[t]);
  std::vector<float> partials(static_cast<size_t>(first[num_tensors]), 0.f);
  const int64_t chunks = static_cast<int64_t>(partials.size());
  at::parallel_for(0, chunks, kGrain / kChunk, [&](int64_t cb, int64_t ce) {
    int64_t t = std::upper_bound(first.begin(), first.end(), cb) - first.begin() - 1;
    for (int64_t c = cb; c < ce; ++c) {
      while (first[t + 1] <= c) ++t;
      const int64_t b = (c - first[t]) * kChunk;
      partials[c] = chunk_stat(t, b, b + kChunk < numels[t] ? b + kChunk : numels[t]);
    }
  });
  return combine(partials, mode);
}

}  // namespace

const char* isa() { return loops().name; }

void accumulate(const AccumulateParams& p) {
  const CpuLoops& L = loops();
  if (p.norm_mode == kNoNorm) {
    at::parallel_for(0, p.n, kGrain, [&](int64_t b, int64_t e) { L.accumulate(p, b, e); });
    return;
  }
  *p.out = reduce_chunks(&p.n, 1, p.norm_mode, [&](int64_t, int64_t b, int64_t e) {
    return L.accumulate_norm(p, b, e);
  });
}

void accumulate_many(const AccumulateManyParams& p) {
  if (p.num_tensors == 0) {
    if (p.norm_mode != kNoNorm) *p.out = 0.f;
    return;
  }
  const CpuLoops& L = loops();
  auto pair = [&](int64_t t) {  // the single-buffer params of pair t
    AccumulateParams q;
    q.acc = p.accs[t];
    q.grad = p.grads[t];
    q.grad_dtype = p.grad_dtype;
    q.n = p.numels[t];
    q.scale = p.scale;
    q.overwrite = p.overwrite != nullptr && p.overwrite[t] != 0;
    q.norm_mode = p.norm_mode;
    return q;
  };
  if (p.norm_mode != kNoNorm) {  // each chunk's statistic from the fused loop
    *p.out = reduce_chunks(p.numels, p.num_tensors, p.norm_mode,
                           [&](int64_t t, int64_t b, int64_t e) {
                             return L.accumulate_norm(pair(t), b, e);
                           });
    return;
  }
  // One element range over all pairs, concatenated: a single parallel_for with torch's
  // grain, so a call with only small tensors runs inline on this thread; each task runs
  // the accumulate loop over the pieces of the pairs its range covers.
  std::vector<int64_t> first(static_cast<size_t>(p.num_tensors) + 1, 0);
  for (int64_t t = 0; t < p.num_tensors; ++t) first[t + 1] = first[t] + p.numels[t];
  at::parallel_for(0, first.back(), kGrain, [&](int64_t b, int64_t e) {
    // the pair holding element b: the last t with first[t] <= b (skips empty pairs)
    int64_t t = std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
    while (b < e) {
      while (first[t + 1] <= b) ++t;
      const int64_t end = std::min(e, first[t + 1]);
      L.accumulate(pair(t), b - first[t], end - first[t]);
      b = end;
    }
  });
}

void norm(const NormParams& p) {
  const CpuLoops& L = loops();
  const float total = reduce_chunks(p.numels, p.num_tensors, p.norm_mode,
                                    [&](int64_t t, int64_t b, int64_t e) {
                                      return L.norm(p.tensors[t], p.norm_mode, b, e);
                                    });
  *p.out = p.norm_mode == kNormInf ? total : std::sqrt(total);
}

void adam_step(const AdamParams& p) {
  if (*p.c.found_inf != 0.f) {  // NaN != 0 too: skip
    if (p.c.zero_acc) zero(p.c.acc, p.c.n);
    return;
  }
  const CpuLoops& L = loops();
  const float gm = *p.c.grad_mult;
  at::parallel_for(0, p.c.n, kGrain, [&](int64_t b, int64_t e) { L.adam(p, gm, b, e); });
}

void sgd_step(const SgdParams& p) {
  if (*p.c.found_inf != 0.f) {
    if (p.c.zero_acc) zero(p.c.acc, p.c.n);
    return;
  }
  const CpuLoops& L = loops();
  const float gm = *p.c.grad_mult;
  at::parallel_for(0, p.c.n, kGrain, [&](int64_t b, int64_t e) { L.sgd(p, gm, b, e); });
}

}  // namespace cpu
}  // namespace fa
