// The wrapper's batching post-accumulate-grad hook, in C++ (Python C API).
//
// FusedAccumulator registers a Python post-accumulate-grad hook on every param. For a
// small half param the hook only moves the fresh .grad into its bucket's batch (lists
// the end-of-backward flush accumulates in one op call) and clears .grad: a few list
// appends, but through torch's Python hook machinery and a Python frame, once per param
// per backward, which dominates the host time of models of many small tensors on GPUs.
// BatchHook does that common case here and leaves every other case to the Python hook
// (the first hook of a backward, a full batch, a second backward before the flush,
// create_graph, other hooks on the param...), so both paths share the Python state and
// the Python hook stays the definition. For a larger half param (direct mode) it calls
// the extension's accumulate_ op itself, and a batch the gradient fills it accumulates
// with the extension's accumulate_many_ op (native flush), unless a norm statistic is
// asked for. On the triton backend (table flush) it builds that batch's (or that larger
// gradient's) kernel table here and hands it to one small Python launcher (ops/triton.py,
// _launch_table): the Python flush's bookkeeping and table, tens of microseconds of
// Python per flush, cost several times that inside a backward, whose work has evicted the
// interpreter's caches. With ops/triton.py _LAUNCH = "cxx" or "auto" (the default; a CUDA
// build) it launches Triton's compiled kernel itself (cuda/triton_launch.cu) once
// ops/triton.py has registered it, and runs no Python.
//
// BatchPreHook, a tensor pre-hook, hands BatchHook the gradient before AccumulateGrad sees it:
// where BatchHook takes it, AccumulateGrad receives nothing and makes no .grad.
//
// torch keeps one C++ post-accumulate-grad hook per tensor: the one running the tensor's
// dict of Python hooks (tensor._post_accumulate_grad_hooks). BatchHook takes its place
// and owns it: when the dict holds anything besides the wrapper's own hook, or the
// wrapper's hook was removed, it runs that dict hook, so every Python hook runs, in
// registration order, as without it. Hooks registered later are added to the same dict.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#ifdef FUSEDACCUM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

namespace {

using torch::autograd::PostAccumulateGradHook;
using torch::autograd::Variable;

std::atomic<int64_t> g_hits{0}, g_flushes{0}, g_flushed_grads{0};
// gradients BatchPreHook took before AccumulateGrad (also counted in g_hits)
std::atomic<int64_t> g_pre_hits{0};
// the param whose gradient BatchPreHook took last on this thread, until its BatchHook runs
// (the engine calls the param's post-accumulate-grad hook even when AccumulateGrad
// received nothing)
thread_local c10::TensorImpl* t_pre_taken = nullptr;
// batches accumulated by flush_batch called from Python, and their gradients
std::atomic<int64_t> g_called_flushes{0}, g_called_grads{0};
// host time (ns) of the hook's full-batch flushes, of flush_batch called from Python, and
// of the hook's direct adds, with how many direct adds (bench/window_phases.py reads them
// per window: where a backend's backward spends its time)
std::atomic<int64_t> g_flush_ns{0}, g_called_ns{0}, g_direct_ns{0}, g_direct_adds{0};

// nanoseconds since an arbitrary start (steady)
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// interned attribute names
PyObject *s_flush_queued, *s_hook_fields, *s_pg, *s_micro_step, *s_window_k, *s_acc,
    *s_wants_callback, *s_launch_setting, *s_cxx, *s_auto;

// Kernels Triton compiled for the table flush that are launched here, through the CUDA
// driver, instead of by the Python launcher (ops/triton.py _LAUNCH = "cxx" or "auto").
// ops/triton.py registers each (device, grad_kind, LOG_T, BLOCK) variant after Triton's
// launcher ran it once, and keeps its CompiledKernel (which owns the function) alive. Used
// only while g_settings._LAUNCH is "cxx" or "auto", read at each flush as the Python
// launcher reads it.
struct TritonKernel {
  void* function;
  int num_warps, shared;
};
std::mutex g_kernels_lock;
std::map<std::array<int64_t, 4>, TritonKernel> g_kernels;  // (device, kind, log_t, block)
std::atomic<int64_t> g_kernel_count{0}, g_cxx_launches{0};
std::string g_cxx_error;  // (g_kernels_lock) why the registry was dropped, if it was
#ifdef FUSEDACCUM_WITH_CUDA
PyObject* g_settings = nullptr;  // owned: the module whose _LAUNCH is read (ops/triton.py)
#endif

// Bucket.hook_fields: the positions of fusedaccum/buffers.py's HOOK_FIELDS
enum Field { RELEASED, IS_PENDING, STATS, EXPOSED, TOUCHED, STEPPED, MAIN_GRADS, PENDING,
             PENDING_ACCS, PENDING_GRADS, PENDING_BYTES, RIDE_NORM, STATS_VERSION,
             CLEAN_VERSION, DIRTY, PENDING_OW, N_FIELDS };

// an owned reference
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
  PyObject* get() const { return p; }
  explicit operator bool() const { return p != nullptr; }
};

// Strong references to borrowed objects for a while (the GIL released: another thread
// could drop the lists that own them)
struct Held {
  PyObject* objs[5];
  Held(PyObject* a, PyObject* b, PyObject* c, PyObject* d, PyObject* e) : objs{a, b, c, d, e} {
    for (PyObject* o : objs) Py_INCREF(o);
  }
  Held(const Held&) = delete;
  Held& operator=(const Held&) = delete;
  ~Held() {
    for (PyObject* o : objs) Py_DECREF(o);
  }
};

// The pending Python error thrown as a C++ exception that keeps it: the autograd engine
// may rethrow it on another thread (a GPU's device thread runs the hooks), where the
// Python error indicator is not set; torch persists its own hooks' errors the same way.
// GIL held.
[[noreturn]] void raise_python_error() {
  python_error err;
  err.persist();
  throw std::move(err);
}

// Run f without the GIL, as an op called from Python runs (a CPU accumulation takes
// long); the GIL is back when f returns or throws.
template <class F>
void without_gil(F&& f) {
  PyThreadState* thread = PyEval_SaveThread();
  try {
    f();
  } catch (...) {
    PyEval_RestoreThread(thread);
    throw;
  }
  PyEval_RestoreThread(thread);
}

// fields[f] as a long long (-1 if it is not an int)
long long int_field(PyObject* fields, int f) {
  PyObject* v = PyList_GET_ITEM(fields, f);
  const long long x = PyLong_CheckExact(v) ? PyLong_AsLongLong(v) : -1;
  PyErr_Clear();
  return x;
}

// fields[f] := now where it was `before` (after one of our own writes to the accumulator:
// FusedAccumulator's _note_write keeps stats_version and clean_version so)
void keep_version(PyObject* fields, int f, int64_t before, int64_t now) {
  const long long v = int_field(fields, f);
  if (v < 0 || v != before || now == before) return;
  Ref x(PyLong_FromLongLong(static_cast<long long>(now)));
  if (x) {
    PyList_SetItem(fields, f, x.p);  // steals the reference
    x.p = nullptr;
  }
  PyErr_Clear();
}

// fields[f] if it is a list of at least n items, else null (borrowed)
PyObject* list_field(PyObject* fields, int f, Py_ssize_t n) {
  PyObject* v = PyList_GET_ITEM(fields, f);
  return PyList_CheckExact(v) && PyList_GET_SIZE(v) >= n ? v : nullptr;
}

// How C++ accumulates a bucket's batch of half gradients: the extension's
// accumulate_many_ op (no launcher), or the triton backend's _accumulate_many_kernel with
// a table built here, launched by `launcher(table, n_tensors, blocks, grad_kind, block)`
// (ops/triton.py _launch_table) with `block` elements per program; grad_kind: the gradients'
// dtype as ops/triton.py's _KIND (0 fp32, 1 fp16, 2 bf16).
struct FlushMode {
  PyObject* launcher;  // borrowed; null: the native op
  long long block;
  int grad_kind;
};

// The gradient that fills a batch, accumulated with it: the param's accumulator view
struct Extra {
  at::Tensor acc, grad;
  bool overwrite;
};

// The int64 table of the triton backend's _accumulate_many_kernel for these pairs, as
// ops/triton.py's _many_table makes it: [acc address x T, grad address x T, numel x T
// (negated where the pair overwrites its acc), 0, block starts x T] over the T non-empty
// pairs, on the pairs' device. On a GPU it is written into a reused host buffer and
// copied with one cudaMemcpyAsync on the current stream into a tensor of the caching
// allocator, as _upload_table's "pageable" uploads (the driver stages pageable memory
// before the call returns): not through a CPU tensor and ATen's to(), whose dispatch and
// TensorIterator cost host time at every flush. False, with nothing changed, for pairs it
// does not take (the kernel reads fp32 accumulators and one gradient dtype, contiguous,
// all on one device), or where the upload failed (Python flushes).
bool make_table(const FlushMode& mode, const std::vector<at::Tensor>& accs,
                const std::vector<at::Tensor>& grads, const std::vector<int64_t>& flags,
                at::Tensor& out, int64_t& n_tensors, int64_t& blocks) {
  const c10::ScalarType grad_type =
      mode.grad_kind == 2 ? at::kBFloat16 : mode.grad_kind == 1 ? at::kHalf : at::kFloat;
  const c10::Device device = accs.front().device();
  std::vector<int64_t> rows;
  for (size_t j = 0; j < accs.size(); ++j) {
    const at::Tensor &a = accs[j], &g = grads[j];
    if (a.scalar_type() != at::kFloat || g.scalar_type() != grad_type || !a.is_contiguous() ||
        !g.is_contiguous() || a.device() != device || g.device() != device ||
        a.numel() != g.numel())
      return false;
    if (a.numel() > 0) rows.push_back(static_cast<int64_t>(j));
  }
  const int64_t t = static_cast<int64_t>(rows.size());
  n_tensors = t;
  blocks = 0;
  if (t == 0) return true;
  const int64_t size = 4 * t + 1;
#ifdef FUSEDACCUM_WITH_CUDA
  const bool upload = device.is_cuda();  // one cudaMemcpyAsync from a reused host buffer
#else
  const bool upload = false;
#endif
  thread_local std::vector<int64_t> t_entries;  // (one autograd thread per device)
  try {
    at::Tensor host;
    int64_t* e;
    if (upload) {
      t_entries.resize(static_cast<size_t>(size));
      e = t_entries.data();
    } else {
      host = at::empty({size}, at::TensorOptions().dtype(at::kLong));
      e = host.data_ptr<int64_t>();
    }
    e[3 * t] = 0;
    for (int64_t r = 0; r < t; ++r) {
      const at::Tensor &a = accs[rows[r]], &g = grads[rows[r]];
      const int64_t n = a.numel();
      e[r] = reinterpret_cast<int64_t>(a.data_ptr());
      e[t + r] = reinterpret_cast<int64_t>(g.data_ptr());
      e[2 * t + r] = flags[rows[r]] != 0 ? -n : n;
      blocks += (n + mode.block - 1) / mode.block;
      e[3 * t + 1 + r] = blocks;
    }
    if (!upload) {
      out = device.is_cpu() ? host : host.to(device, at::kLong, /*non_blocking=*/true);
      return true;
    }
#ifdef FUSEDACCUM_WITH_CUDA
    c10::cuda::CUDAGuard guard(device);
    at::Tensor table = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
    if (fa::cuda::copy_to_device(table.data_ptr(), e, static_cast<size_t>(size) * sizeof(int64_t),
                                 c10::cuda::getCurrentCUDAStream(device.index()).stream()) != 0)
      return false;  // (nothing launched: Python flushes, and reports what fails there)
    out = table;
#endif
  } catch (const std::exception&) {  // (out of memory): Python flushes
    return false;
  }
  return true;
}

#ifdef FUSEDACCUM_WITH_CUDA
// g_settings._LAUNCH is "cxx" or "auto" (GIL held)
bool cxx_launch_on() {
  if (g_settings == nullptr) return false;
  Ref v(PyObject_GetAttr(g_settings, s_launch_setting));
  if (!v) {
    PyErr_Clear();
    return false;
  }
  return PyUnicode_Check(v.get()) && (PyUnicode_Compare(v.get(), s_cxx) == 0 ||
                                      PyUnicode_Compare(v.get(), s_auto) == 0);
}

// The table's kernel launched here, on the current stream of the table's device, if a
// compiled kernel for it is registered and "cxx" launches are on; false (nothing done)
// otherwise. A launch the driver refuses (nothing ran) drops every registered kernel and
// records why (triton_cxx_error): this flush and the later ones go to the Python
// launcher, which reports it.
bool launch_here(const FlushMode& mode, const at::Tensor& table, int64_t n_tensors,
                 int64_t blocks) {
  if (g_kernel_count.load(std::memory_order_relaxed) == 0 || n_tensors > INT32_MAX ||
      blocks > INT32_MAX || !cxx_launch_on())
    return false;
  // LOG_T = ceil(log2(n_tensors)), as ops/triton.py _launch_table: (n_tensors - 1).bit_length()
  int64_t log_t = 0;
  for (int64_t v = n_tensors - 1; v > 0; v >>= 1) ++log_t;
  TritonKernel k{};
  {
    std::lock_guard<std::mutex> lock(g_kernels_lock);
    auto it = g_kernels.find({table.device().index(), mode.grad_kind, log_t, mode.block});
    if (it == g_kernels.end()) return false;
    k = it->second;
  }
  c10::cuda::CUDAGuard guard(table.device());
  fa::TritonManyLaunch p;
  p.function = k.function;
  p.blocks = blocks;
  p.num_warps = k.num_warps;
  p.shared = k.shared;
  p.table = table.data_ptr<int64_t>();
  p.n_tensors = static_cast<int32_t>(n_tensors);
  p.scale = 1.f;
  p.stream = c10::cuda::getCurrentCUDAStream(table.device().index()).stream();
  int err = 0;
  without_gil([&] { err = fa::cuda::triton_many_launch(p); });
  if (err != 0) {
    std::lock_guard<std::mutex> lock(g_kernels_lock);
    g_kernels.clear();
    g_kernel_count.store(0);
    g_cxx_error = std::string(fa::cuda::driver_error_string(err)) + " (CUDA driver error " +
                  std::to_string(err) + ")";
    return false;
  }
  g_cxx_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}
#endif

// The table's kernel launched: here where a compiled kernel is registered for it (see
// g_kernels), else by mode.launcher(table, n_tensors, blocks, grad_kind, block); then the
// version of the accumulator it wrote bumped, as an in-place op's write does. A launch
// or launcher that fails throws (backward() raises its error, or flush_batch called from
// Python).
void launch(const FlushMode& mode, const at::Tensor& table, int64_t n_tensors, int64_t blocks,
            const at::Tensor& written) {
#ifdef FUSEDACCUM_WITH_CUDA
  if (table.is_cuda() && launch_here(mode, table, n_tensors, blocks)) {
    torch::autograd::impl::bump_version(written);
    return;
  }
#endif
  Ref t(THPVariable_Wrap(table));
  if (!t) raise_python_error();
  Ref done(PyObject_CallFunction(mode.launcher, "OLLiL", t.get(),
                                 static_cast<long long>(n_tensors),
                                 static_cast<long long>(blocks), mode.grad_kind, mode.block));
  if (!done) raise_python_error();
  torch::autograd::impl::bump_version(written);
}

// Accumulate bucket b's batch (and `extra`, if any) as FusedAccumulator._flush does
// without a statistic: the batch emptied first (new lists: the old ones may be held
// elsewhere, as Python's flush rebinds them), then one op call or launch, then
// _note_write(made_stats=False). f: b.hook_fields. The number of pairs accumulated, or -1,
// with nothing changed, where the fields are not what they should be or the table cannot
// take the pairs; an op or launch that fails raises (the batch is gone then, as in
// Python's flush).
int64_t flush_batch(PyObject* b, PyObject* f, const FlushMode& mode, const Extra* extra) {
  PyObject *pending = list_field(f, PENDING, 0), *accs = list_field(f, PENDING_ACCS, 0),
           *grads = list_field(f, PENDING_GRADS, 0), *ows = list_field(f, PENDING_OW, 0),
           *is_pending = list_field(f, IS_PENDING, 0);
  if (!pending || !accs || !grads || !ows || !is_pending) return -1;
  const Py_ssize_t n = PyList_GET_SIZE(pending);
  if (PyList_GET_SIZE(accs) != n || PyList_GET_SIZE(grads) != n || PyList_GET_SIZE(ows) != n)
    return -1;
  if (n == 0 && extra == nullptr) return 0;  // nothing waits
  std::vector<at::Tensor> acc_list, grad_list;
  std::vector<int64_t> flags;
  acc_list.reserve(n + 1);
  grad_list.reserve(n + 1);
  flags.reserve(n + 1);
  bool any_overwrite = false;
  for (Py_ssize_t j = 0; j < n; ++j) {
    PyObject *a = PyList_GET_ITEM(accs, j), *g = PyList_GET_ITEM(grads, j),
             *idx = PyList_GET_ITEM(pending, j), *ow = PyList_GET_ITEM(ows, j);
    if (!THPVariable_Check(a) || !THPVariable_Check(g) || !PyLong_CheckExact(idx) ||
        !PyLong_CheckExact(ow))
      return -1;
    const Py_ssize_t k = PyLong_AsSsize_t(idx);
    const long o = PyLong_AsLong(ow);
    if (k < 0 || k >= PyList_GET_SIZE(is_pending) || (o != 0 && o != 1)) {
      PyErr_Clear();
      return -1;
    }
    acc_list.push_back(THPVariable_Unpack(a));
    grad_list.push_back(THPVariable_Unpack(g));
    flags.push_back(o);
    any_overwrite = any_overwrite || o != 0;
  }
  if (extra != nullptr) {
    acc_list.push_back(extra->acc);
    grad_list.push_back(extra->grad);
    flags.push_back(extra->overwrite ? 1 : 0);
    any_overwrite = any_overwrite || extra->overwrite;
  }
  Ref acc_obj(PyObject_GetAttr(b, s_acc));
  if (!acc_obj || !THPVariable_Check(acc_obj.get())) {
    PyErr_Clear();
    return -1;
  }
  // (the table before anything changes: pairs it cannot take leave the batch to Python)
  int64_t n_tensors = 0, blocks = 0;
  at::Tensor table;
  if (mode.launcher != nullptr &&
      !make_table(mode, acc_list, grad_list, flags, table, n_tensors, blocks))
    return -1;
  if (!any_overwrite) flags.clear();
  const at::Tensor acc = THPVariable_Unpack(acc_obj.get());
  const int64_t before = static_cast<int64_t>(acc._version());
  Ref empty[4] = {Ref(PyList_New(0)), Ref(PyList_New(0)), Ref(PyList_New(0)),
                  Ref(PyList_New(0))};
  Ref zero(PyLong_FromLong(0));
  if (!empty[0] || !empty[1] || !empty[2] || !empty[3] || !zero) {
    PyErr_Clear();
    return -1;
  }
  // the old lists keep the gradients alive until the op has run
  PyObject* batch[4] = {pending, accs, grads, ows};
  for (PyObject* list : batch) Py_INCREF(list);
  Ref old[4] = {Ref(pending), Ref(accs), Ref(grads), Ref(ows)};
  for (Py_ssize_t j = 0; j < n; ++j) {
    Py_INCREF(Py_False);
    PyList_SetItem(is_pending, PyLong_AsSsize_t(PyList_GET_ITEM(pending, j)), Py_False);
  }
  const int slots[4] = {PENDING, PENDING_ACCS, PENDING_GRADS, PENDING_OW};
  for (int j = 0; j < 4; ++j) {
    PyList_SetItem(f, slots[j], empty[j].p);  // steals the reference
    empty[j].p = nullptr;
  }
  PyList_SetItem(f, PENDING_BYTES, zero.p);
  zero.p = nullptr;
  if (mode.launcher != nullptr) {
    if (n_tensors > 0) launch(mode, table, n_tensors, blocks, acc);
  } else {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fusedaccum_native::accumulate_many_", "")
                         .typed<void(at::TensorList, at::TensorList, double, at::IntArrayRef)>();
    without_gil([&] { op.call(acc_list, grad_list, 1.0, flags); });
  }
  // _note_write(b, before, made_stats=False): valid statistics stay valid, and so does the
  // knowledge of zeros
  const int64_t now = static_cast<int64_t>(acc._version());
  keep_version(f, STATS_VERSION, before, now);
  keep_version(f, CLEAN_VERSION, before, now);
  return static_cast<int64_t>(acc_list.size());
}

struct BatchHook final : PostAccumulateGradHook {
  BatchHook(std::unique_ptr<PostAccumulateGradHook> inner, PyObject* dict, PyObject* key,
            PyObject* owner_ref, PyObject* bucket_ref, Py_ssize_t index, long long nbytes,
            long long flush_bytes, bool direct, bool native_flush, PyObject* launcher,
            long long block, int grad_kind)
      : inner(std::move(inner)), dict(dict), key(key), owner_ref(owner_ref),
        bucket_ref(bucket_ref), index(index), nbytes(nbytes), flush_bytes(flush_bytes),
        direct(direct), native_flush(native_flush), launcher(launcher), block(block),
        grad_kind(grad_kind) {
    Py_INCREF(dict);
    Py_INCREF(key);
    Py_INCREF(owner_ref);
    Py_INCREF(bucket_ref);
    Py_XINCREF(launcher);
  }

  ~BatchHook() override {
    if (!Py_IsInitialized()) return;  // interpreter gone: the objects went with it
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_DECREF(dict);
    Py_DECREF(key);
    Py_DECREF(owner_ref);
    Py_DECREF(bucket_ref);
    Py_XDECREF(launcher);
    PyGILState_Release(gil);
  }

  void operator()(const Variable& param) override {
    // AccumulateGrad received nothing because BatchPreHook took the gradient on this
    // thread just before (its dict held only our hook then): nothing to do
    if (t_pre_taken == param.unsafeGetTensorImpl()) {
      t_pre_taken = nullptr;
      if (!param.grad().defined()) return;
    }
    if (!take_with_gil(param, param.grad())) (*inner)(param);  // the Python hooks
  }

  // take() with the GIL held for it (the hooks run on autograd's threads without it); an
  // accumulation that fails (direct mode) throws, and backward() raises its error
  bool take_with_gil(const Variable& param, const at::Tensor& grad) {
    PyGILState_STATE gil = PyGILState_Ensure();
    bool done;
    try {
      done = take(param, grad);
    } catch (...) {
      PyGILState_Release(gil);
      throw;
    }
    PyGILState_Release(gil);
    return done;
  }

  // compiled autograd traces the Python hooks (const since torch 2.6)
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
#else
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) override {
#endif
    inner->compiled_args(args);
  }
  void apply_with_saved(Variable& tensor,
                        torch::dynamo::autograd::SwapSavedVariables& saved) override {
    inner->apply_with_saved(tensor, saved);
  }

  // The Python hook (accumulator.py, post_hook) for a half param's gradient in the case
  // where it does nothing else: batched (small params) the gradient joins the bucket's
  // batch; direct (the others) it is accumulated at once by the extension's accumulate_
  // op, with no statistic. True when done, false (nothing changed) to run the Python hooks.
  // grad: param.grad, or (BatchPreHook) the gradient AccumulateGrad is about to receive
  bool take(const Variable& param, const at::Tensor& grad) {
    if (!PyDict_Check(dict) || PyDict_GET_SIZE(dict) != 1) return false;  // an OrderedDict
    if (PyDict_GetItemWithError(dict, key) == nullptr) {  // our hook was removed
      PyErr_Clear();
      return false;
    }
    if (!grad.defined() || grad.layout() != c10::kStrided || grad.requires_grad() ||
        !grad.is_contiguous())
      return false;
    PyObject *owner_raw = nullptr, *bucket_raw = nullptr;
    if (PyWeakref_GetRef(owner_ref, &owner_raw) != 1) {
      PyErr_Clear();
      return false;
    }
    Ref owner(owner_raw);
    if (PyWeakref_GetRef(bucket_ref, &bucket_raw) != 1) {
      PyErr_Clear();
      return false;
    }
    Ref b(bucket_raw);
    bool needs_callback = !direct;
    if (direct) {  // a wrapper with fp32 params or dirty accumulators wants the callback too
      Ref wants(PyObject_GetAttr(owner.get(), s_wants_callback));
      if (!wants) PyErr_Clear();
      needs_callback = !wants || wants.get() != Py_False;
    }
    if (needs_callback) {
      // the first hook of a backward queues the end-of-backward callback: Python's job.
      // The owner holds the id of the graph task it queued it in (a backward that raised
      // never ran its callback: the next one must queue again)
      Ref queued(PyObject_GetAttr(owner.get(), s_flush_queued));
      if (!queued) PyErr_Clear();
      if (!queued || !PyLong_CheckExact(queued.get()) ||
          PyLong_AsLong(queued.get()) != torch::autograd::get_current_graph_task_id()) {
        PyErr_Clear();
        return false;
      }
    }
    Ref fields(PyObject_GetAttr(b.get(), s_hook_fields));
    if (!fields) PyErr_Clear();
    if (!fields || !PyList_CheckExact(fields.get()) || PyList_GET_SIZE(fields.get()) != N_FIELDS)
      return false;
    const Py_ssize_t i = index, n = index + 1;
    PyObject* f = fields.get();
    PyObject *released = list_field(f, RELEASED, n), *is_pending = list_field(f, IS_PENDING, n),
             *stats = list_field(f, STATS, n), *exposed = list_field(f, EXPOSED, n),
             *touched = list_field(f, TOUCHED, n), *stepped = list_field(f, STEPPED, n),
             *main_grads = list_field(f, MAIN_GRADS, n), *pending = list_field(f, PENDING, 0),
             *accs = list_field(f, PENDING_ACCS, 0), *grads = list_field(f, PENDING_GRADS, 0),
             *dirty = list_field(f, DIRTY, n), *ows = list_field(f, PENDING_OW, 0);
    if (!released || !is_pending || !stats || !exposed || !touched || !stepped || !main_grads ||
        !pending || !accs || !grads || !dirty || !ows)
      return false;
    PyObject* dirty_i = PyList_GET_ITEM(dirty, i);
    if (dirty_i != Py_True && dirty_i != Py_False) return false;
    // the window's first gradient of a dirty param (an earlier window's sum) overwrites it
    const bool is_dirty = dirty_i == Py_True;
    if (PyList_GET_ITEM(released, i) != Py_False ||
        PyList_GET_ITEM(is_pending, i) != Py_False ||  // second backward: flush first
        PyList_GET_ITEM(stats, i) != Py_None)          // its statistic would go stale
      return false;
    PyObject* view = PyList_GET_ITEM(main_grads, i);
    PyObject* exposed_i = PyList_GET_ITEM(exposed, i);
    PyObject* stepped_i = PyList_GET_ITEM(stepped, i);
    if ((exposed_i != Py_True && exposed_i != Py_False) || !THPVariable_Check(view) ||
        !THPVariable_Check(stepped_i))
      return false;
    Fresh fresh{touched, exposed, dirty};
    if (direct) return accumulate(param, grad, owner.get(), f, view, stepped_i, fresh, is_dirty);
    PyObject* bytes_obj = PyList_GET_ITEM(f, PENDING_BYTES);
    if (!PyLong_CheckExact(bytes_obj)) return false;
    const long long bytes = PyLong_AsLongLong(bytes_obj);
    if (bytes == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (bytes + nbytes >= flush_bytes) {  // the batch is full
      if (!native_flush && launcher == nullptr) return false;  // Python flushes
      return flush(param, grad, owner.get(), b.get(), f, view, stepped_i, fresh, is_dirty);
    }
    // commit (only a failed allocation can fail here; then undo and let Python do it)
    Ref idx(PyLong_FromSsize_t(i)), g(THPVariable_Wrap(grad)),
        new_bytes(PyLong_FromLongLong(bytes + nbytes)), ow(PyLong_FromLong(is_dirty ? 1 : 0));
    if (!idx || !g || !new_bytes || !ow) {
      PyErr_Clear();
      return false;
    }
    PyObject* lists[4] = {pending, accs, grads, ows};
    PyObject* items[4] = {idx.get(), view, g.get(), ow.get()};
    for (int k = 0; k < 4; ++k) {
      if (PyList_Append(lists[k], items[k]) != 0) {
        PyErr_Clear();
        for (int j = 0; j < k; ++j) {
          Py_ssize_t len = PyList_GET_SIZE(lists[j]);
          PyList_SetSlice(lists[j], len - 1, len, nullptr);
        }
        return false;
      }
    }
    PyList_SetItem(f, PENDING_BYTES, new_bytes.p);  // steals the reference
    new_bytes.p = nullptr;
    Py_INCREF(Py_True);
    PyList_SetItem(is_pending, i, Py_True);  // steals the reference
    finish(param, view, stepped_i, fresh);
    return true;
  }

  // The per-param lists finish() updates when it is the param's first gradient of the
  // window (touched, exposed, dirty; checked by take())
  struct Fresh {
    PyObject *touched, *exposed, *dirty;
  };

  // Direct mode: no statistic may be asked for (the norm rides on the accumulations of a
  // window's last micro-batch on CPU buckets, and the statistics must not be stale-marked).
  // The extension's accumulate_ op, or on the triton backend its accumulate_many kernel
  // over a one-pair table (the same element math as its accumulate_).
  // The window's first gradient of the param overwrites its accumulator where it holds an
  // earlier window (dirty) or the bucket knows the untouched params' accumulators hold
  // zeros (clean_version, as post_hook).
  bool accumulate(const Variable& param, const at::Tensor& grad, PyObject* owner, PyObject* f,
                  PyObject* view, PyObject* stepped_i, const Fresh& fresh, bool is_dirty) {
    PyObject* version = PyList_GET_ITEM(f, STATS_VERSION);
    if (!PyLong_CheckExact(version) || PyLong_AsLong(version) != -1) {
      PyErr_Clear();
      return false;
    }
    if (may_ride(owner, f)) return false;
    const at::Tensor& acc_view = THPVariable_Unpack(view);
    if (acc_view.scalar_type() != at::kFloat || !acc_view.is_contiguous() ||
        acc_view.numel() != grad.numel() || acc_view.device() != grad.device())
      return false;
    const at::Tensor acc_flat = acc_view.view({-1}), grad_flat = grad.view({-1});
    // (a view shares its base's version counter)
    const int64_t before = static_cast<int64_t>(acc_view._version());
    const bool overwrite = PyList_GET_ITEM(fresh.touched, index) == Py_False &&
                           (is_dirty || int_field(f, CLEAN_VERSION) == before);
    Held held(view, stepped_i, fresh.touched, fresh.exposed, fresh.dirty);  // finish()'s
    const int64_t t0 = now_ns();
    if (launcher != nullptr) {  // the triton backend: a table of one pair, its launcher
      const FlushMode mode{launcher, block, grad_kind};
      at::Tensor table;
      int64_t n_tensors = 0, blocks = 0;
      if (!make_table(mode, {acc_flat}, {grad_flat}, {overwrite ? 1 : 0}, table, n_tensors,
                      blocks))
        return false;
      if (n_tensors > 0) launch(mode, table, n_tensors, blocks, acc_view);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("fusedaccum_native::accumulate_", "")
                           .typed<void(const at::Tensor&, const at::Tensor&, double, bool)>();
      without_gil([&] { op.call(acc_flat, grad_flat, 1.0, overwrite); });
    }
    g_direct_ns.fetch_add(now_ns() - t0, std::memory_order_relaxed);
    g_direct_adds.fetch_add(1, std::memory_order_relaxed);
    keep_version(f, CLEAN_VERSION, before, static_cast<int64_t>(acc_view._version()));
    finish(param, view, stepped_i, fresh);
    return true;
  }

  // True unless the bucket's norm statistic surely does not ride on this accumulation
  // (ride_norm False, or not the window's last micro-batch), the cases Python decides
  bool may_ride(PyObject* owner, PyObject* f) {
    PyObject* ride_norm = PyList_GET_ITEM(f, RIDE_NORM);
    if (ride_norm == Py_False) return false;
    if (ride_norm != Py_True) return true;
    // FusedAccumulator._ride_norm(): no process group and the window's last micro-batch
    Ref pg(PyObject_GetAttr(owner, s_pg)), step(PyObject_GetAttr(owner, s_micro_step)),
        k(PyObject_GetAttr(owner, s_window_k));
    if (!pg || !step || !k || !PyLong_CheckExact(step.get()) || !PyLong_CheckExact(k.get())) {
      PyErr_Clear();
      return true;
    }
    return pg.get() == Py_None && PyLong_AsLong(step.get()) + 1 >= PyLong_AsLong(k.get());
  }

  // Native or table flush: the gradient fills the batch; accumulate the batch and it in
  // C++ (flush_batch), when no statistic rides on it.
  // batch: the lists (checked by take()) of the fields PENDING, PENDING_ACCS, PENDING_GRADS,
  // PENDING_OW
  bool flush(const Variable& param, const at::Tensor& grad, PyObject* owner, PyObject* b,
             PyObject* f, PyObject* view, PyObject* stepped_i, const Fresh& fresh,
             bool is_dirty) {
    PyObject* version = PyList_GET_ITEM(f, STATS_VERSION);
    if (!PyLong_CheckExact(version) || may_ride(owner, f)) return false;
    const FlushMode mode{native_flush ? nullptr : launcher, block, grad_kind};
    const Extra extra{THPVariable_Unpack(view), grad, is_dirty};
    Held held(view, stepped_i, fresh.touched, fresh.exposed, fresh.dirty);  // finish()'s
    const int64_t t0 = now_ns();
    // (the batch's lists, which flush_batch replaces: checked by take())
    PyObject *pending = PyList_GET_ITEM(f, PENDING), *ows = PyList_GET_ITEM(f, PENDING_OW);
    Held batch(pending, ows, b, owner, view);
    int64_t pairs;
    try {
      pairs = flush_batch(b, f, mode, &extra);
    } catch (...) {
      // the batch is gone: its params as Python's _flush leaves them when it raises
      // (FusedAccumulator._flush_failed; the gradient filling it never joined it)
      PyObject *type, *value, *trace;
      PyErr_Fetch(&type, &value, &trace);
      Ref done(PyObject_CallMethod(owner, "_flush_failed", "OOO", b, pending, ows));
      PyErr_Clear();
      PyErr_Restore(type, value, trace);
      throw;
    }
    if (pairs < 0) return false;
    g_flush_ns.fetch_add(now_ns() - t0, std::memory_order_relaxed);
    g_flushes.fetch_add(1, std::memory_order_relaxed);
    g_flushed_grads.fetch_add(pairs, std::memory_order_relaxed);
    finish(param, view, stepped_i, fresh);
    return true;
  }

  // .grad released; the window's first gradient exposes it (FusedAccumulator._expose_grad)
  void finish(const Variable& param, PyObject* view, PyObject* stepped_i, const Fresh& fresh) {
    param.mutable_grad().reset();
    if (PyList_GET_ITEM(fresh.exposed, index) == Py_False) {
      Py_INCREF(Py_True);
      PyList_SetItem(fresh.touched, index, Py_True);
      Py_INCREF(Py_True);
      PyList_SetItem(fresh.exposed, index, Py_True);
      Py_INCREF(Py_False);
      PyList_SetItem(fresh.dirty, index, Py_False);
      const at::Tensor& master = THPVariable_Unpack(stepped_i);
      if (master.scalar_type() == at::kFloat)  // an fp32 master sees the window as .grad
        master.mutable_grad() = THPVariable_Unpack(view);
    }
    g_hits.fetch_add(1, std::memory_order_relaxed);
  }

  std::unique_ptr<PostAccumulateGradHook> inner;
  PyObject *dict, *key, *owner_ref, *bucket_ref;
  Py_ssize_t index;
  long long nbytes, flush_bytes;
  bool direct;        // accumulate at once instead of batching
  bool native_flush;  // a full batch is accumulated here (the extension's op), not in Python
  // table flush: a full batch's table (direct: the gradient's) is built here and launched
  // by launcher(table, n_tensors, blocks, grad_kind, block) (owned; null: the native ops),
  // `block` elements per program; grad_kind: the gradients' dtype as ops/triton.py's
  // _KIND (0 fp32, 1 fp16, 2 bf16)
  PyObject* launcher;
  long long block;
  int grad_kind;
};

// The same common case one step earlier: a tensor pre-hook on the param (the last one) that
// hands the gradient AccumulateGrad is about to receive to the param's BatchHook and, where
// it takes it, lets AccumulateGrad receive nothing. AccumulateGrad then returns at once: no
// .grad is made (a copy of the gradient wherever it cannot take the gradient itself, an
// allocation and a kernel on a GPU), set and cleared again, and no post-accumulate-grad hook
// runs. Everything else goes through AccumulateGrad and BatchHook as before: a .grad already
// there (AccumulateGrad adds to it), create_graph (grad mode on), a backward that does not
// run every AccumulateGrad (inputs=, torch.autograd.grad: the gradient is captured, not
// accumulated), a tensor hook after this one, hooks on the AccumulateGrad node itself
// (DistributedDataParallel's), a post-accumulate-grad slot that is not a BatchHook, and every
// case BatchHook::take leaves to Python. Compiled autograd does not see it (compiled_args
// adds nothing): its traced AccumulateGrad and post-accumulate-grad hooks do the work.
struct BatchPreHook final : torch::autograd::FunctionPreHook {
  // The param owns this hook (its autograd metadata holds it), so the param outlives every
  // call: a plain pointer, not a reference that would keep the param alive.
  explicit BatchPreHook(c10::TensorImpl* param) : param(param) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grads) override {
    if (grads.size() != 1 || at::GradMode::is_enabled()) return grads;
    const at::Tensor& grad = grads[0];
    const Variable var(
        c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim_copy(param));
    if (!grad.defined() || var.grad().defined() || grad.scalar_type() != var.scalar_type() ||
        grad.device() != var.device() || !grad.sizes().equals(var.sizes()))
      return grads;
    const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
    if (exec_info == nullptr || !exec_info->empty()) return grads;
    auto& tensor_hooks = torch::autograd::impl::hooks(var);
    if (tensor_hooks.empty() || tensor_hooks.back().get() != this) return grads;
    auto* post = dynamic_cast<BatchHook*>(torch::autograd::impl::post_acc_grad_hooks(var).get());
    if (post == nullptr) return grads;
    const auto node = torch::autograd::impl::try_get_grad_accumulator(var);
    if (node.get() == nullptr || !node->pre_hooks().empty() || !node->post_hooks().empty())
      return grads;
    if (!post->take_with_gil(var, grad)) return grads;
    t_pre_taken = param;
    g_pre_hits.fetch_add(1, std::memory_order_relaxed);
    return {at::Tensor()};  // AccumulateGrad receives nothing
  }

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 6)
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {}
#else
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) override {}
#endif

  c10::TensorImpl* param;
};

// install_batch_hook(param, hooks_dict, key, owner_ref, bucket_ref, index, nbytes,
//                    flush_bytes, direct=False, native_flush=False, launcher=None,
//                    block=0, grad_kind=0, pre_hook=False): after
// param.register_post_accumulate_grad_hook returned a handle with id `key` into
// `hooks_dict` (param._post_accumulate_grad_hooks). direct: accumulate with the
// extension's accumulate_ op instead of batching; native_flush: accumulate a batch the
// gradient fills with the extension's accumulate_many_ op (the bucket's backend uses it);
// launcher (a callable; not with native_flush): accumulate such a batch, or (direct) the
// gradient, by building the kernel's table here and calling launcher(table, n_tensors,
// blocks, grad_kind, block) (the triton backend's), `block` elements per program;
// pre_hook: also take the common case before AccumulateGrad (BatchPreHook; without it, a
// BatchPreHook installed before is removed).
PyObject* install_batch_hook(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *param, *dict, *key, *owner_ref, *bucket_ref;
  Py_ssize_t index;
  long long nbytes, flush_bytes;
  int direct = 0, native_flush = 0, grad_kind = 0, pre_hook = 0;
  PyObject* launcher = Py_None;
  long long block = 0;
  if (!PyArg_ParseTuple(args, "OO!OO!O!nLL|ppOLip", &param, &PyDict_Type, &dict, &key,
                        &_PyWeakref_RefType, &owner_ref, &_PyWeakref_RefType, &bucket_ref,
                        &index, &nbytes, &flush_bytes, &direct, &native_flush, &launcher,
                        &block, &grad_kind, &pre_hook))
    return nullptr;
  if (launcher == Py_None) {
    launcher = nullptr;
  } else if (!PyCallable_Check(launcher) || native_flush || block <= 0 || grad_kind < 0 ||
             grad_kind > 2) {
    PyErr_SetString(PyExc_ValueError,
                    "install_batch_hook: a launcher needs no native_flush, block > 0 and "
                    "grad_kind 0, 1 or 2");
    return nullptr;
  }
  if (!THPVariable_Check(param)) {
    PyErr_SetString(PyExc_TypeError, "install_batch_hook: param must be a tensor");
    return nullptr;
  }
  if (index < 0 || nbytes < 0 || flush_bytes <= 0) {
    PyErr_SetString(PyExc_ValueError, "install_batch_hook: bad index, nbytes or flush_bytes");
    return nullptr;
  }
  PyObject* attr = PyObject_GetAttrString(param, "_post_accumulate_grad_hooks");
  if (attr == nullptr) return nullptr;
  Py_DECREF(attr);  // still owned by the param
  if (attr != dict || PyDict_GetItemWithError(dict, key) == nullptr) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_ValueError,
                      "install_batch_hook: key is not in param._post_accumulate_grad_hooks");
    return nullptr;
  }
  const Variable& var = THPVariable_Unpack(param);
  std::unique_ptr<PostAccumulateGradHook>& slot = torch::autograd::impl::post_acc_grad_hooks(var);
  if (!slot) {
    PyErr_SetString(PyExc_RuntimeError, "install_batch_hook: the param has no hook to wrap");
    return nullptr;
  }
  std::unique_ptr<PostAccumulateGradHook> inner = std::move(slot);
  if (auto* prev = dynamic_cast<BatchHook*>(inner.get())) {  // a former wrapper's: unwrap
    std::unique_ptr<PostAccumulateGradHook> innermost = std::move(prev->inner);
    inner = std::move(innermost);
  }
  torch::autograd::impl::set_post_acc_grad_hooks(
      var, std::make_unique<BatchHook>(std::move(inner), dict, key, owner_ref, bucket_ref,
                                       index, nbytes, flush_bytes, direct != 0,
                                       native_flush != 0, launcher, block, grad_kind));
  // the tensor pre-hook: one per param, the last of its tensor hooks (a former one goes).
  // Appended to the list itself: impl::add_hook insists on an empty list, the param's one
  // Python or C++ hook list; autograd runs every hook in it, and torch clears it all
  // before it puts a first Python or C++ hook list there after ours.
  std::vector<std::unique_ptr<torch::autograd::FunctionPreHook>>& tensor_hooks =
      torch::autograd::impl::hooks(var);
  // (C++17: torch 2.11 builds extensions with -std=c++17)
  tensor_hooks.erase(std::remove_if(tensor_hooks.begin(), tensor_hooks.end(),
                                    [](const auto& h) {
                                      return dynamic_cast<BatchPreHook*>(h.get()) != nullptr;
                                    }),
                     tensor_hooks.end());
  if (pre_hook)
    tensor_hooks.push_back(std::make_unique<BatchPreHook>(var.unsafeGetTensorImpl()));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// flush_batch(bucket, launcher=None, block=0, grad_kind=0) -> bool: FusedAccumulator._flush
// of a batch that needs no statistic, in C++ (the end-of-backward flush, and a full batch
// the hook left to Python), with the extension's op or (a launcher) the triton backend's
// kernel as install_batch_hook takes them. False where it leaves the batch to Python.
PyObject* flush_batch_py(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *b, *launcher = Py_None;
  long long block = 0;
  int grad_kind = 0;
  if (!PyArg_ParseTuple(args, "O|OLi", &b, &launcher, &block, &grad_kind)) return nullptr;
  if (launcher != Py_None &&
      (!PyCallable_Check(launcher) || block <= 0 || grad_kind < 0 || grad_kind > 2)) {
    PyErr_SetString(PyExc_ValueError,
                    "flush_batch: a launcher needs block > 0 and grad_kind 0, 1 or 2");
    return nullptr;
  }
  Ref fields(PyObject_GetAttr(b, s_hook_fields));
  if (!fields) return nullptr;
  if (!PyList_CheckExact(fields.get()) || PyList_GET_SIZE(fields.get()) != N_FIELDS) {
    PyErr_SetString(PyExc_TypeError, "flush_batch: the bucket's hook_fields is not its list");
    return nullptr;
  }
  const FlushMode mode{launcher == Py_None ? nullptr : launcher, block, grad_kind};
  const int64_t t0 = now_ns();
  const int64_t pairs = flush_batch(b, fields.get(), mode, nullptr);
  if (pairs > 0) {
    g_called_ns.fetch_add(now_ns() - t0, std::memory_order_relaxed);
    g_called_flushes.fetch_add(1, std::memory_order_relaxed);
    g_called_grads.fetch_add(pairs, std::memory_order_relaxed);
  }
  return PyBool_FromLong(pairs >= 0);
  END_HANDLE_TH_ERRORS
}

// register_triton_kernel(settings, device, grad_kind, log_t, block, function, num_warps,
// shared) -> bool: a compiled _accumulate_many_kernel (ops/triton.py checked that its
// arguments and launch are what triton_many_launch passes) for table flushes of that
// (device index, grad_kind, LOG_T, BLOCK), launched here while settings._LAUNCH is "cxx" or
// "auto".
// The caller keeps the kernel loaded. False, registering nothing, in a build without CUDA.
PyObject* register_triton_kernel(PyObject*, PyObject* args) {
  PyObject* settings;
  long long device, kind, log_t, block;
  unsigned long long function;
  int num_warps, shared;
  if (!PyArg_ParseTuple(args, "OLLLLKii", &settings, &device, &kind, &log_t, &block, &function,
                        &num_warps, &shared))
    return nullptr;
  if (device < 0 || kind < 0 || kind > 2 || log_t < 0 || log_t > 62 || block <= 0 ||
      function == 0 || num_warps <= 0 || num_warps > 32 || shared < 0) {
    PyErr_SetString(PyExc_ValueError,
                    "register_triton_kernel: bad device, grad_kind, log_t, block, function, "
                    "num_warps or shared");
    return nullptr;
  }
#ifdef FUSEDACCUM_WITH_CUDA
  if (g_settings != settings) {  // (the GIL guards g_settings)
    Py_INCREF(settings);
    Py_XSETREF(g_settings, settings);
  }
  std::lock_guard<std::mutex> lock(g_kernels_lock);
  g_kernels[{device, kind, log_t, block}] = {
      reinterpret_cast<void*>(static_cast<uintptr_t>(function)), num_warps, shared};
  g_kernel_count.store(static_cast<int64_t>(g_kernels.size()));
  Py_RETURN_TRUE;
#else
  (void)settings;
  Py_RETURN_FALSE;
#endif
}

// forget every registered kernel (before their CompiledKernels may be dropped) and the
// error that dropped them, if any
PyObject* clear_triton_kernels(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(g_kernels_lock);
  g_kernels.clear();
  g_kernel_count.store(0);
  g_cxx_error.clear();
  Py_RETURN_NONE;
}

// why a launch from C++ failed and every registered kernel was dropped, or None
PyObject* triton_cxx_error(PyObject*, PyObject*) {
  std::string error;
  {
    std::lock_guard<std::mutex> lock(g_kernels_lock);
    error = g_cxx_error;
  }
  if (error.empty()) Py_RETURN_NONE;
  return PyUnicode_FromStringAndSize(error.data(), static_cast<Py_ssize_t>(error.size()));
}

PyObject* triton_cxx_launches(PyObject*, PyObject*) {
  return PyLong_FromLongLong(g_cxx_launches.load(std::memory_order_relaxed));
}

PyObject* batch_flush_calls(PyObject*, PyObject*) {
  return Py_BuildValue("(LL)",
                       static_cast<long long>(g_called_flushes.load(std::memory_order_relaxed)),
                       static_cast<long long>(g_called_grads.load(std::memory_order_relaxed)));
}

PyObject* batch_hook_hits(PyObject*, PyObject*) {
  return PyLong_FromLongLong(g_hits.load(std::memory_order_relaxed));
}

PyObject* batch_prehook_hits(PyObject*, PyObject*) {
  return PyLong_FromLongLong(g_pre_hits.load(std::memory_order_relaxed));
}

PyObject* batch_hook_times(PyObject*, PyObject*) {
  return Py_BuildValue("(LLLL)", static_cast<long long>(g_flush_ns.load(std::memory_order_relaxed)),
                       static_cast<long long>(g_called_ns.load(std::memory_order_relaxed)),
                       static_cast<long long>(g_direct_ns.load(std::memory_order_relaxed)),
                       static_cast<long long>(g_direct_adds.load(std::memory_order_relaxed)));
}

PyObject* batch_hook_flushes(PyObject*, PyObject*) {
  return Py_BuildValue("(LL)", static_cast<long long>(g_flushes.load(std::memory_order_relaxed)),
                       static_cast<long long>(g_flushed_grads.load(std::memory_order_relaxed)));
}

// -- The boundary's walks over a bucket's params (FusedAccumulator._check_buckets,
// _bump_updated_params, _end_window, zero_grad): what the Python loops there do, without a
// Python attribute read per param (about 60 ns each on the 2-core CPU, several reads per
// param per boundary). Only plain tensors and Parameters (THPVariable_CheckExact) are
// looked at here: for anything else (a subclass's attributes may be its own) they answer
// "look in Python" (False), and the Python loop, the definition, decides.

bool plain(PyObject* obj) { return THPVariable_CheckExact(obj); }

// params_in_place(params, ptrs, dtype, versions or None) -> bool: every param's data_ptr()
// is ptrs[i] and its dtype is dtype, and with versions its _version is versions[i]
// (Bucket.check_params: True means nothing to do)
PyObject* params_in_place(PyObject*, PyObject* args) {
  PyObject *params, *ptrs, *dtype, *versions;
  if (!PyArg_ParseTuple(args, "O!O!OO", &PyList_Type, &params, &PyList_Type, &ptrs, &dtype,
                        &versions))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const bool check_versions = versions != Py_None;
  if (!THPDtype_Check(dtype) || PyList_GET_SIZE(ptrs) != n ||
      (check_versions && (!PyList_Check(versions) || PyList_GET_SIZE(versions) != n)))
    Py_RETURN_FALSE;
  const at::ScalarType type = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain(obj)) Py_RETURN_FALSE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    void* ptr = PyLong_AsVoidPtr(PyList_GET_ITEM(ptrs, i));
    if (ptr == nullptr && PyErr_Occurred()) return nullptr;
    if (t.is_inference() || t.scalar_type() != type || !t.has_storage() || t.data_ptr() != ptr)
      Py_RETURN_FALSE;
    if (check_versions) {
      long long seen = PyLong_AsLongLong(PyList_GET_ITEM(versions, i));
      if (seen == -1 && PyErr_Occurred()) return nullptr;
      if (static_cast<long long>(t._version()) != seen) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

// bump_versions(params, versions) -> bool: every param's version counter bumped, as
// torch.autograd.graph.increment_version, and its new version written to versions[i];
// False, with nothing done, where one is not plain (or an inference tensor)
PyObject* bump_versions(PyObject*, PyObject* args) {
  PyObject *params, *versions;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &params, &PyList_Type, &versions))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  if (PyList_GET_SIZE(versions) != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(params, i);
    if (!plain(obj) || THPVariable_Unpack(obj).is_inference()) Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(params, i));
    torch::autograd::impl::bump_version(t);
    PyObject* v = PyLong_FromLongLong(static_cast<long long>(t._version()));
    if (v == nullptr) return nullptr;
    PyList_SetItem(versions, i, v);  // steals the reference
  }
  Py_RETURN_TRUE;
}

// TypeError naming fn unless seq is a list (of tensors, looked at item by item)
bool tensor_list(PyObject* seq, const char* fn) {
  if (PyList_Check(seq)) return true;
  PyErr_Format(PyExc_TypeError, "%s takes a list of tensors", fn);
  return false;
}

// clear_grads(tensors): t.grad = None for each (as Python's setter, for a plain tensor)
PyObject* clear_grads(PyObject*, PyObject* seq) {
  if (!tensor_list(seq, "clear_grads")) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    PyObject* obj = PyList_GET_ITEM(seq, i);
    if (plain(obj)) {
      THPVariable_Unpack(obj).mutable_grad().reset();
    } else {
      Ref held((Py_INCREF(obj), obj));  // (a setter of its own could change the list)
      if (PyObject_SetAttrString(obj, "grad", Py_None) < 0) return nullptr;
    }
  }
  Py_RETURN_NONE;
}

// any_grad(params) -> bool: some param has a .grad (None where one is not plain: look in
// Python)
PyObject* any_grad(PyObject*, PyObject* seq) {
  if (!tensor_list(seq, "any_grad")) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    PyObject* obj = PyList_GET_ITEM(seq, i);
    if (!plain(obj)) Py_RETURN_NONE;
    if (THPVariable_Unpack(obj).unsafeGetTensorImpl()->grad().defined()) Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

// node_hooked(params) -> bool: some param's AccumulateGrad node holds a post hook
// (DistributedDataParallel's reducer hooks every param there: FusedAccumulator's
// _check_late_ddp); None where one is not plain (Python cannot see a node's hooks)
PyObject* node_hooked(PyObject*, PyObject* seq) {
  if (!tensor_list(seq, "node_hooked")) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(seq); ++i) {
    PyObject* obj = PyList_GET_ITEM(seq, i);
    if (!plain(obj)) Py_RETURN_NONE;
    const auto node = torch::autograd::impl::try_get_grad_accumulator(THPVariable_Unpack(obj));
    if (node != nullptr && !node->post_hooks().empty()) Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

// entries_edited(state, snaps) -> list of ids, or None (look in Python): the ids of the
// keys of the optimizer's state dict that snaps (a dict: id -> (bucket, index, entry or
// None, the entry's values)) knows and whose entry is another object than it says, or
// holds other values (by identity, in order) (FusedAccumulator._edited_entries). The
// state dict's items are walked, so no tensor key is hashed (Tensor.__hash__ is Python).
PyObject* entries_edited(PyObject*, PyObject* args) {
  PyObject *state, *snaps;
  if (!PyArg_ParseTuple(args, "OO!", &state, &PyDict_Type, &snaps)) return nullptr;
  if (!PyDict_Check(state)) Py_RETURN_NONE;
  Ref out(PyList_New(0));
  if (!out) return nullptr;
  Py_ssize_t pos = 0;
  PyObject *key, *entry;
  // (nothing below runs Python code: int keys, identity tests)
  while (PyDict_Next(state, &pos, &key, &entry)) {
    Ref id(PyLong_FromVoidPtr(key));
    if (!id) return nullptr;
    PyObject* snap = PyDict_GetItemWithError(snaps, id.get());  // borrowed
    if (snap == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      continue;
    }
    if (!PyTuple_Check(snap) || PyTuple_GET_SIZE(snap) != 4 ||
        !PyTuple_Check(PyTuple_GET_ITEM(snap, 3)))
      Py_RETURN_NONE;
    PyObject* values = PyTuple_GET_ITEM(snap, 3);
    bool same = PyTuple_GET_ITEM(snap, 2) == entry && PyDict_Check(entry) &&
                PyDict_Size(entry) == PyTuple_GET_SIZE(values);
    Py_ssize_t at = 0, j = 0;
    PyObject *k, *v;
    while (same && PyDict_Next(entry, &at, &k, &v)) same = v == PyTuple_GET_ITEM(values, j++);
    if (!same && PyList_Append(out.get(), id.get()) < 0) return nullptr;
  }
  PyObject* result = out.get();
  Py_INCREF(result);
  return result;
}

// entries_unchanged(state, order) -> bool: True iff the optimizer's state dict holds, in
// its iteration order, exactly the items of order (a tuple of (key, entry, entry's values)
// per item, or (key, None, None) for a key the wrapper does not step), by identity: the
// boundary's usual case, answered with no allocation (entries_edited makes an int and a
// dict lookup per key). False: look with entries_edited.
PyObject* entries_unchanged(PyObject*, PyObject* args) {
  PyObject *state, *order;
  if (!PyArg_ParseTuple(args, "OO!", &state, &PyTuple_Type, &order)) return nullptr;
  if (!PyDict_Check(state) || PyDict_Size(state) != PyTuple_GET_SIZE(order)) Py_RETURN_FALSE;
  Py_ssize_t pos = 0, j = 0;
  PyObject *key, *entry;
  // (nothing below runs Python code: identity tests)
  while (PyDict_Next(state, &pos, &key, &entry)) {
    PyObject* item = PyTuple_GET_ITEM(order, j++);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || PyTuple_GET_ITEM(item, 0) != key)
      Py_RETURN_FALSE;
    PyObject* was = PyTuple_GET_ITEM(item, 1);
    if (was == Py_None) continue;  // not a key the wrapper steps
    PyObject* values = PyTuple_GET_ITEM(item, 2);
    if (was != entry || !PyDict_Check(entry) || !PyTuple_Check(values) ||
        PyDict_Size(entry) != PyTuple_GET_SIZE(values))
      Py_RETURN_FALSE;
    Py_ssize_t at = 0, k = 0;
    PyObject *name, *value;
    while (PyDict_Next(entry, &at, &name, &value))
      if (value != PyTuple_GET_ITEM(values, k++)) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"install_batch_hook", install_batch_hook, METH_VARARGS,
     "Put the C++ batching hook in front of a param's Python post-accumulate-grad hooks."},
    {"flush_batch", flush_batch_py, METH_VARARGS,
     "Accumulate a bucket's batch of half gradients in C++ (no statistic); False where "
     "it leaves the batch to Python."},
    {"register_triton_kernel", register_triton_kernel, METH_VARARGS,
     "Launch this compiled Triton table-flush kernel from C++ while settings._LAUNCH is "
     "'cxx' or 'auto'; False in a build without CUDA."},
    {"clear_triton_kernels", clear_triton_kernels, METH_NOARGS,
     "Forget every registered Triton kernel."},
    {"triton_cxx_error", triton_cxx_error, METH_NOARGS,
     "Why a launch from C++ failed and the registered Triton kernels were dropped, or None."},
    {"triton_cxx_launches", triton_cxx_launches, METH_NOARGS,
     "How many table flushes launched a registered Triton kernel from C++ (this process)."},
    {"batch_flush_calls", batch_flush_calls, METH_NOARGS,
     "(batches, gradients) accumulated by flush_batch called from Python (this process)."},
    {"batch_hook_hits", batch_hook_hits, METH_NOARGS,
     "How many gradients the C++ batching hook has taken (all params, this process)."},
    {"batch_prehook_hits", batch_prehook_hits, METH_NOARGS,
     "How many of those gradients the tensor pre-hook took before AccumulateGrad."},
    {"batch_hook_times", batch_hook_times, METH_NOARGS,
     "(full-batch flush ns, flush_batch-from-Python ns, direct add ns, direct adds): the "
     "host time the C++ batching hook and flush_batch spent accumulating (this process)."},
    {"batch_hook_flushes", batch_hook_flushes, METH_NOARGS,
     "(batches, gradients): how many full batches the C++ batching hook has accumulated "
     "(native flush, all params, this process) and how many gradients they held."},
    {"params_in_place", params_in_place, METH_VARARGS,
     "(params, ptrs, dtype, versions or None) -> True iff every param still views its "
     "pointer with that dtype (and version); False also where Python must look."},
    {"bump_versions", bump_versions, METH_VARARGS,
     "(params, versions) -> True after bumping every param's version counter and "
     "recording the new versions; False (nothing done) where Python must do it."},
    {"clear_grads", clear_grads, METH_O, "t.grad = None for every tensor of a list."},
    {"any_grad", any_grad, METH_O,
     "True if some tensor of the list has a .grad; None where Python must look."},
    {"node_hooked", node_hooked, METH_O,
     "True if some param's AccumulateGrad node holds a post hook (DDP's); None where "
     "Python must decide without it."},
    {"entries_edited", entries_edited, METH_VARARGS,
     "(state, snaps) -> the ids of the state entries that differ from their snapshot; "
     "None where Python must look."},
    {"entries_unchanged", entries_unchanged, METH_VARARGS,
     "(state, order) -> True iff the state dict's items are those of order, in order, by "
     "identity (entries and their values); False where entries_edited must look."},
    {nullptr, nullptr, 0, nullptr}};

#define FA_STR2(x) #x
#define FA_STR(x) FA_STR2(x)
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FA_STR(TORCH_EXTENSION_NAME),
                          "fusedaccum's C++ post-accumulate-grad hook", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

#define FA_CAT2(a, b) a##b
#define FA_CAT(a, b) FA_CAT2(a, b)
// the library is loaded by torch.ops.load_library for its ops and imported as a Python
// module (the same file) for this hook: PyInit_<name it was built under>
PyMODINIT_FUNC FA_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  s_flush_queued = PyUnicode_InternFromString("_flush_queued");
  s_hook_fields = PyUnicode_InternFromString("hook_fields");
  s_pg = PyUnicode_InternFromString("_pg");
  s_micro_step = PyUnicode_InternFromString("micro_step");
  s_window_k = PyUnicode_InternFromString("_window_k");
  s_acc = PyUnicode_InternFromString("acc");
  s_wants_callback = PyUnicode_InternFromString("_wants_callback");
  s_launch_setting = PyUnicode_InternFromString("_LAUNCH");
  s_cxx = PyUnicode_InternFromString("cxx");
  s_auto = PyUnicode_InternFromString("auto");
  PyObject* module = PyModule_Create(&module_def);
  // the field order this build reads, checked against buffers.HOOK_FIELDS on import
  PyObject* names = Py_BuildValue("(ssssssssssssssss)", "released", "is_pending", "stats",
                                  "exposed", "touched", "stepped", "main_grads", "pending",
                                  "pending_accs", "pending_grads", "pending_bytes", "ride_norm",
                                  "stats_version", "clean_version", "dirty", "pending_ow");
  if (module == nullptr || names == nullptr || PyModule_AddObject(module, "HOOK_FIELDS", names)) {
    Py_XDECREF(names);
    Py_XDECREF(module);
    return nullptr;
  }
  // install_batch_hook takes a launcher (table flush); checked on import
  if (PyModule_AddIntConstant(module, "TABLE_FLUSH", 1)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
