// The binding layer: input checks, filling the plain parameter structs, and operator
// registration (namespace fusedaccum_native). No math lives here: it is in math.h, run by
// cpu/*.cpp and cuda/*.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "params.h"

#ifdef FUSEDACCUM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

namespace {

using at::Tensor;

// Messages format numbers, shapes and devices here, never through std::ostream: on one
// GPU image (2026-11-26) the compiler wrapper linked a static libstdc++ into this library,
// and an ostream formatting a number in it (c10::str) crashed in the locale facets shared
// with torch's libstdc++ (the "exp_avg_sq has 11 elements" check segfaulted). Streams of
// strings were fine there; std::to_string and snprintf use no locale facets.
template <class T>
std::string num(T v) {
  return std::to_string(v);
}
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
std::string shape(at::IntArrayRef sizes) {  // as torch prints a shape: [2, 5]
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
std::string dev(const at::Device& d) { return d.str(); }

const char* dtype_list(bool halves_only, bool fp32_only) {
  if (fp32_only) return "float32";
  return halves_only ? "float16 or bfloat16" : "float32, float16 or bfloat16";
}

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return fa::kFloat16;
    case at::kBFloat16: return fa::kBFloat16;
    default: return fa::kFloat32;
  }
}

// The checks of fusedaccum/ops/reference.py: dtype (TypeError), contiguous 1-D, size and
// device (ValueError). `like` gives the expected size and device, if any.
void check_flat(const char* name, const Tensor& t, bool allow_fp32, bool allow_half,
                const Tensor* like = nullptr) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  const auto st = t.scalar_type();
  const bool ok = (allow_fp32 && st == at::kFloat) ||
                  (allow_half && (st == at::kHalf || st == at::kBFloat16));
  TORCH_CHECK_TYPE(ok, name, " must have dtype ", dtype_list(!allow_fp32, !allow_half), ", got ",
                   st);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name,
                    " must be a contiguous 1-D tensor, got shape ", shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), name,
                    " must be a CPU or CUDA tensor, got device ", dev(t.device()));
  if (like != nullptr) {
    TORCH_CHECK_VALUE(t.numel() == like->numel(), name, " has ", num(t.numel()),
                      " elements, expected ", num(like->numel()));
    TORCH_CHECK_VALUE(t.device() == like->device(), name, " is on ", dev(t.device()),
                      ", expected ", dev(like->device()));
  }
}

// grad_mult / found_inf: one fp32 value on the param's device (read there, never synced).
void check_scalar(const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be a float32 tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == 1, name, " must hold exactly one value, got shape ",
                    shape(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", dev(t.device()),
                    ", expected the param's device ", dev(like.device()));
}

int norm_mode(double norm_type) {
  if (norm_type == 2.0) return fa::kNormL2;
  if (std::isinf(norm_type) && norm_type > 0) return fa::kNormInf;
  TORCH_CHECK_VALUE(false, "norm_type must be 2.0 or inf, got ", num(norm_type));
  return fa::kNoNorm;
}

void* stream_of(const Tensor& t) {
#ifdef FUSEDACCUM_WITH_CUDA
  if (t.is_cuda()) return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#endif
  (void)t;
  return nullptr;
}

#ifdef FUSEDACCUM_WITH_CUDA
void cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, "fusedaccum_native::", what, ": CUDA kernel launch failed: ",
              fa::cuda::error_string(err));
}
#define FA_RUN(what, fn, params, t)                     \
  do {                                                  \
    if ((t).is_cuda()) {                                \
      cuda_check(fa::cuda::fn(params), what);           \
    } else {                                            \
      fa::cpu::fn(params);                              \
    }                                                   \
  } while (0)
#else
#define FA_RUN(what, fn, params, t)                                                       \
  do {                                                                                    \
    TORCH_CHECK(!(t).is_cuda(), "fusedaccum_native::", what,                              \
                ": this build of the extension has no CUDA support (built without nvcc " \
                "or without a CUDA build of torch)");                                     \
    fa::cpu::fn(params);                                                                  \
  } while (0)
#endif

// Every tensor an op may write gets its version counter bumped, once its checks have
// passed and before it is written, as torch's in-place ops (and the other backends) do:
// autograd then refuses a backward through a tensor saved before the write instead of
// reading the new values. Here in the entry points, not as ADInplaceOrView kernels: a
// boxed fallback there would box every call of the C++ autograd hook.
void bump(const Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }
void bump(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) bump(*t);
}

fa::AccumulateParams accumulate_params(const Tensor& acc, const Tensor& grad, double scale,
                                       bool overwrite) {
  check_flat("acc", acc, true, false);
  check_flat("grad", grad, true, true, &acc);
  fa::AccumulateParams p;
  p.acc = acc.data_ptr<float>();
  p.grad = grad.const_data_ptr();
  p.grad_dtype = dtype_code(grad);
  p.n = acc.numel();
  p.scale = static_cast<float>(scale);
  p.overwrite = overwrite;
  p.stream = stream_of(acc);
  return p;
}

void accumulate_op(const Tensor& acc, const Tensor& grad, double scale, bool overwrite) {
  fa::AccumulateParams p = accumulate_params(acc, grad, scale, overwrite);
  c10::DeviceGuard guard(acc.device());
  bump(acc);
  FA_RUN("accumulate_", accumulate, p, acc);
}

// Python's name of a dtype ("float16", "int32").
// (a copy: torch 2.11's getDtypeNames returns its pair of strings by value, and a view of
// that temporary dangled -- "grads[0] has float16" for a bf16 grads[0]; 2.13's views static
// names)
std::string dtype_name(const Tensor& t) {
  return std::string(c10::getDtypeNames(t.scalar_type()).first);
}

// The checked arguments of accumulate_many_ and the pointer arrays its params point to.
struct ManyArgs {
  c10::SmallVector<float*, 64> acc_ptrs;
  c10::SmallVector<const void*, 64> grad_ptrs;
  c10::SmallVector<int64_t, 64> numels;
  fa::AccumulateManyParams p;
};

// accs[i] = (0 if overwrite[i] else accs[i]) + scale * grads[i] for every i: the element
// math of accumulate_, one call for many pairs. Any shapes, each tensor contiguous with
// grads[i].numel() == accs[i].numel(); accs fp32; grads of one dtype; one device;
// overwrite empty (no pair) or one 0/1 flag per pair.
void fill_many(ManyArgs& m, at::TensorList accs, at::TensorList grads, double scale,
               at::IntArrayRef overwrite) {
  TORCH_CHECK_VALUE(accs.size() == grads.size(), "accs and grads must have the same length, got ",
                    num(accs.size()), " accs and ", num(grads.size()), " grads");
  TORCH_CHECK_VALUE(overwrite.empty() || overwrite.size() == accs.size(),
                    "overwrite must be empty or have one flag per pair, got ",
                    num(overwrite.size()), " flags for ", num(accs.size()), " pairs");
  for (size_t i = 0; i < overwrite.size(); ++i)
    TORCH_CHECK_VALUE(overwrite[i] == 0 || overwrite[i] == 1, "overwrite[", num(i),
                      "] must be 0 or 1, got ", overwrite[i]);
  const size_t count = accs.size();
  if (count == 0) return;
  const Tensor& grad0 = grads[0];
  TORCH_CHECK_VALUE(accs[0].defined() && grad0.defined(),
                    "accs and grads must hold tensors, got an undefined tensor");
  const at::Device device = accs[0].device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(),
                    "accs[0] must be a CPU or CUDA tensor, got device ", dev(device));
  const auto gst = grad0.scalar_type();
  TORCH_CHECK_TYPE(gst == at::kFloat || gst == at::kHalf || gst == at::kBFloat16,
                   "grads[0] must have dtype ", dtype_list(false, false), ", got ",
                   dtype_name(grad0));
  auto& acc_ptrs = m.acc_ptrs;
  auto& grad_ptrs = m.grad_ptrs;
  auto& numels = m.numels;
  acc_ptrs.reserve(count);
  grad_ptrs.reserve(count);
  numels.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const Tensor& a = accs[i];
    const Tensor& g = grads[i];
    TORCH_CHECK_VALUE(a.defined(), "accs[", num(i), "] must be a tensor, got an undefined tensor");
    TORCH_CHECK_VALUE(g.defined(), "grads[", num(i), "] must be a tensor, got an undefined tensor");
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "accs[", num(i), "] must have dtype float32, got ",
                     dtype_name(a));
    TORCH_CHECK_TYPE(g.scalar_type() == gst, "grads[", num(i), "] has dtype ", dtype_name(g),
                     ", but grads[0] has ", dtype_name(grad0),
                     " (all grads of one call share a dtype)");
    TORCH_CHECK_VALUE(a.device() == device, "accs[", num(i), "] is on ", dev(a.device()),
                      ", expected ", dev(device), " (the device of accs[0])");
    TORCH_CHECK_VALUE(g.device() == device, "grads[", num(i), "] is on ", dev(g.device()),
                      ", expected ", dev(device), " (the device of accs[0])");
    TORCH_CHECK_VALUE(a.is_contiguous(), "accs[", num(i), "] must be contiguous, got shape ",
                      shape(a.sizes()), " and strides ", shape(a.strides()));
    TORCH_CHECK_VALUE(g.is_contiguous(), "grads[", num(i), "] must be contiguous, got shape ",
                      shape(g.sizes()), " and strides ", shape(g.strides()));
    TORCH_CHECK_VALUE(g.numel() == a.numel(), "grads[", num(i), "] has ", num(g.numel()),
                      " elements, expected ", num(a.numel()), " (accs[", num(i), "])");
    acc_ptrs.push_back(static_cast<float*>(a.data_ptr()));
    grad_ptrs.push_back(g.const_data_ptr());
    numels.push_back(a.numel());
  }
  fa::AccumulateManyParams& p = m.p;
  p.accs = acc_ptrs.data();
  p.grads = grad_ptrs.data();
  p.numels = numels.data();
  p.overwrite = overwrite.empty() ? nullptr : overwrite.data();
  p.num_tensors = static_cast<int64_t>(count);
  p.grad_dtype = dtype_code(grad0);
  p.scale = static_cast<float>(scale);
  p.stream = stream_of(accs[0]);
}

void accumulate_many_op(at::TensorList accs, at::TensorList grads, double scale,
                        at::IntArrayRef overwrite) {
  ManyArgs m;
  fill_many(m, accs, grads, scale, overwrite);
  if (m.p.num_tensors == 0) return;
  c10::DeviceGuard guard(accs[0].device());
  for (const Tensor& acc : accs) bump(acc);
  FA_RUN("accumulate_many_", accumulate_many, m.p, accs[0]);
}

// accumulate_many_ that also returns the norm statistic of all updated accs together (sum
// of squares, or max |acc| with NaN winning), as accumulate_norm_ does for one. CPU only.
Tensor accumulate_many_norm_op(at::TensorList accs, at::TensorList grads, double scale,
                               double norm_type, at::IntArrayRef overwrite) {
  ManyArgs m;
  fill_many(m, accs, grads, scale, overwrite);
  m.p.norm_mode = norm_mode(norm_type);
  const at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
  if (m.p.num_tensors == 0) return at::zeros({}, f32);
  TORCH_CHECK_VALUE(accs[0].device().is_cpu(),
                    "accumulate_many_norm_ runs on CPU tensors only, got device ",
                    dev(accs[0].device()));
  Tensor out = at::empty({}, f32);
  m.p.out = out.data_ptr<float>();
  for (const Tensor& acc : accs) bump(acc);
  fa::cpu::accumulate_many(m.p);
  return out;
}

Tensor accumulate_norm_op(const Tensor& acc, const Tensor& grad, double scale, bool overwrite,
                          double norm_type) {
  fa::AccumulateParams p = accumulate_params(acc, grad, scale, overwrite);
  p.norm_mode = norm_mode(norm_type);
  c10::DeviceGuard guard(acc.device());
  Tensor out = at::empty({}, acc.options());
  Tensor partials;
  p.out = out.data_ptr<float>();
  if (acc.is_cuda()) {
    partials = at::empty({fa::norm_partials(p.n)}, acc.options());
    p.partials = partials.data_ptr<float>();
  }
  bump(acc);
  FA_RUN("accumulate_norm_", accumulate, p, acc);
  return out;
}

Tensor grad_norm_op(at::TensorList tensors, double norm_type) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_norm needs at least one tensor");
  const int mode = norm_mode(norm_type);
  const Tensor& first = tensors[0];
  std::vector<const float*> ptrs;
  std::vector<int64_t> numels;
  int64_t num_partials = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_flat(name.c_str(), tensors[i], true, false);
    TORCH_CHECK_VALUE(tensors[i].device() == first.device(), name, " is on ",
                      dev(tensors[i].device()), ", expected ", dev(first.device()));
    ptrs.push_back(tensors[i].const_data_ptr<float>());
    numels.push_back(tensors[i].numel());
    num_partials += fa::norm_partials(tensors[i].numel());
  }
  c10::DeviceGuard guard(first.device());
  Tensor out = at::empty({}, first.options());
  Tensor partials;
  fa::NormParams p;
  p.tensors = ptrs.data();
  p.numels = numels.data();
  p.num_tensors = static_cast<int64_t>(ptrs.size());
  p.norm_mode = mode;
  p.out = out.data_ptr<float>();
  if (first.is_cuda()) {
    partials = at::empty({num_partials}, first.options());
    p.partials = partials.data_ptr<float>();
  }
  p.stream = stream_of(first);
  FA_RUN("grad_norm", norm, p, first);
  return out;
}

fa::StepCommon step_common(const Tensor& param, const Tensor& acc,
                           const std::optional<Tensor>& model_out, const Tensor& grad_mult,
                           const Tensor& found_inf, bool zero_acc) {
  check_flat("param", param, true, true);
  check_flat("acc", acc, true, false, &param);
  check_scalar("grad_mult", grad_mult, param);
  check_scalar("found_inf", found_inf, param);
  fa::StepCommon c;
  c.param = param.data_ptr();
  c.param_dtype = dtype_code(param);
  c.acc = acc.data_ptr<float>();
  if (model_out.has_value() && model_out->defined()) {
    check_flat("model_out", *model_out, false, true, &param);
    c.model_out = model_out->data_ptr();
    c.out_dtype = dtype_code(*model_out);
  }
  c.n = param.numel();
  c.grad_mult = grad_mult.const_data_ptr<float>();
  c.found_inf = found_inf.const_data_ptr<float>();
  c.zero_acc = zero_acc;
  c.stream = stream_of(param);
  return c;
}

float* optional_state(const char* name, const std::optional<Tensor>& t, const Tensor& param) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_flat(name, *t, true, false, &param);
  return t->data_ptr<float>();
}

void adamw_step_op(const Tensor& param, const Tensor& acc, const Tensor& exp_avg,
                   const Tensor& exp_avg_sq, const std::optional<Tensor>& max_exp_avg_sq,
                   const std::optional<Tensor>& model_out, const Tensor& grad_mult,
                   const Tensor& found_inf, double lr, double beta1, double beta2, double eps,
                   double weight_decay, int64_t step, bool decoupled_weight_decay, bool amsgrad,
                   bool maximize, bool zero_acc) {
  fa::AdamParams p;
  p.c = step_common(param, acc, model_out, grad_mult, found_inf, zero_acc);
  check_flat("exp_avg", exp_avg, true, false, &param);
  check_flat("exp_avg_sq", exp_avg_sq, true, false, &param);
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.max_exp_avg_sq = optional_state("max_exp_avg_sq", max_exp_avg_sq, param);
  TORCH_CHECK_VALUE(!amsgrad || (max_exp_avg_sq.has_value() && max_exp_avg_sq->defined()),
                    "amsgrad=True needs max_exp_avg_sq");
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the step number after this update), got ",
                    num(step));
  // Host constants in double, rounded to fp32 once (as torch does with Python scalars).
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  fa::AdamScalars& s = p.s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.weight_decay = static_cast<float>(weight_decay);
  s.beta1_weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_m_beta2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.decoupled = fa::mask_of(decoupled_weight_decay && weight_decay != 0.0);
  s.l2 = fa::mask_of(!decoupled_weight_decay && weight_decay != 0.0);
  s.maximize = fa::mask_of(maximize);
  s.lerp_low = fa::mask_of(std::abs(s.beta1_weight) < 0.5f);
  p.amsgrad = amsgrad;
  c10::DeviceGuard guard(param.device());
  for (const Tensor* t : {&param, &acc, &exp_avg, &exp_avg_sq}) bump(*t);
  bump(max_exp_avg_sq);
  bump(model_out);
  FA_RUN("adamw_step_", adam_step, p, param);
}

void sgd_step_op(const Tensor& param, const Tensor& acc,
                 const std::optional<Tensor>& momentum_buffer,
                 const std::optional<Tensor>& model_out, const Tensor& grad_mult,
                 const Tensor& found_inf, double lr, double momentum, double dampening,
                 double weight_decay, bool nesterov, bool maximize, bool first_step,
                 bool zero_acc) {
  fa::SgdParams p;
  p.c = step_common(param, acc, model_out, grad_mult, found_inf, zero_acc);
  p.momentum_buffer = optional_state("momentum_buffer", momentum_buffer, param);
  TORCH_CHECK_VALUE(momentum == 0.0 || (momentum_buffer.has_value() && momentum_buffer->defined()),
                    "momentum != 0 needs momentum_buffer");
  fa::SgdScalars& s = p.s;
  s.lr = static_cast<float>(lr);
  s.momentum = static_cast<float>(momentum);
  s.one_m_dampening = static_cast<float>(1.0 - dampening);
  s.weight_decay = static_cast<float>(weight_decay);
  s.has_weight_decay = fa::mask_of(weight_decay != 0.0);
  s.nesterov = fa::mask_of(nesterov);
  s.maximize = fa::mask_of(maximize);
  s.first_step = fa::mask_of(first_step);
  p.has_momentum = momentum != 0.0;
  c10::DeviceGuard guard(param.device());
  bump(param);
  bump(acc);
  bump(momentum_buffer);
  bump(model_out);
  FA_RUN("sgd_step_", sgd_step, p, param);
}

// "cpu,cpu-isa=<loops in use>[,cuda]": what this build of the extension can run.
std::string build_info() {
  std::string info = std::string("cpu,cpu-isa=") + fa::cpu::isa();
#ifdef FUSEDACCUM_WITH_CUDA
  info += ",cuda";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(fusedaccum_native, m) {
  m.def("accumulate_(Tensor(a!) acc, Tensor grad, float scale, bool overwrite) -> ()");
  m.def(
      "accumulate_norm_(Tensor(a!) acc, Tensor grad, float scale, bool overwrite, "
      "float norm_type) -> Tensor");
  m.def(
      "accumulate_many_(Tensor(a!)[] accs, Tensor[] grads, float scale=1.0, "
      "int[] overwrite=[]) -> ()");
  m.def(
      "accumulate_many_norm_(Tensor(a!)[] accs, Tensor[] grads, float scale, float norm_type, "
      "int[] overwrite=[]) -> Tensor");
  m.def("grad_norm(Tensor[] tensors, float norm_type) -> Tensor");
  m.def(
      "adamw_step_(Tensor(a!) param, Tensor(b!) acc, Tensor(c!) exp_avg, "
      "Tensor(d!) exp_avg_sq, Tensor(e!)? max_exp_avg_sq, Tensor(f!)? model_out, "
      "Tensor grad_mult, Tensor found_inf, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, bool decoupled_weight_decay, bool amsgrad, "
      "bool maximize, bool zero_acc) -> ()");
  m.def(
      "sgd_step_(Tensor(a!) param, Tensor(b!) acc, Tensor(c!)? momentum_buffer, "
      "Tensor(d!)? model_out, Tensor grad_mult, Tensor found_inf, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "bool zero_acc) -> ()");
  m.def("build_info() -> str", &build_info);
}

// The same entry points for both devices: they check inputs and pick the CPU loops or
// the CUDA launchers by the tensors' device.
static void impl_ops(torch::Library& m) {
  m.impl("accumulate_", &accumulate_op);
  m.impl("accumulate_norm_", &accumulate_norm_op);
  m.impl("accumulate_many_", &accumulate_many_op);
  m.impl("accumulate_many_norm_", &accumulate_many_norm_op);
  m.impl("grad_norm", &grad_norm_op);
  m.impl("adamw_step_", &adamw_step_op);
  m.impl("sgd_step_", &sgd_step_op);
}

TORCH_LIBRARY_IMPL(fusedaccum_native, CPU, m) { impl_ops(m); }

#ifdef FUSEDACCUM_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedaccum_native, CUDA, m) { impl_ops(m); }
#endif
