"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension built from ``csrc/``.

The extension registers the ops ``torch.ops.fusedaccum_native.*`` (see
``csrc/bindings.cpp``); this module loads it and wraps the ops in the signatures of
:mod:`fusedaccum.ops.reference`. Loading is lazy (nothing happens at ``import
fusedaccum``) and happens once per process, on the first op call or availability
query:

1. the ahead-of-time build ``fusedaccum/_native*.so`` made by ``setup.py``, if present;
2. else a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load`` and
   ninja (cached across processes in ``$TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions``): CPU sources always, the CUDA sources too when torch has
   CUDA, nvcc is found and a GPU is visible. torch holds a lock file in the build folder
   while it compiles, and a build waits for another's lock (saying so on stderr): one left
   by an interrupted build (Ctrl-C) is removed once it is 15 minutes old. A build that
   starts from nothing says so on stderr;
3. else the backends report why they cannot run, and ``"auto"`` falls back to the
   Triton/reference backends.

``FUSEDACCUM_NATIVE=jit`` skips the ahead-of-time build (e.g. a stale one),
``FUSEDACCUM_NATIVE=0`` disables the extension, ``FUSEDACCUM_NATIVE_VERBOSE=1`` shows
the compiler's output, ``FUSEDACCUM_CPU_ISA=baseline|avx2|avx512`` caps the instruction set
of the CPU loops (by default the widest the CPU has; results are bitwise the same).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from fusedaccum.ops.reference import (
    FLOAT_DTYPES,
    _check_flat,
    check_accumulate_args,
    check_adamw_inputs,
    check_many_args,
    check_norm_inputs,
    check_norm_type,
    check_sgd_inputs,
    device_scalar,
    many_stat,
    norm_value,
)

_NS = "fusedaccum_native"
_PKG_DIR = Path(__file__).resolve().parents[1]


def _find_csrc(pkg_dir: Path = _PKG_DIR) -> Path:
    """The C++/CUDA sources: the copy a wheel carries in ``fusedaccum/_csrc`` (setup.py's
    build_py puts it there), else the checkout's ``csrc/`` next to the package (editable
    installs, running from the source tree)."""
    for path in (pkg_dir / "_csrc", pkg_dir.parent / "csrc"):
        if (path / "bindings.cpp").is_file():
            return path
    return pkg_dir.parent / "csrc"


_CSRC = _find_csrc()
_HINT = ("it needs ninja (`pip install ninja`) and a C++ compiler; or build it ahead of time "
         "with `pip install --no-build-isolation -e .` from a source checkout")


class _State:
    """What loading the extension gave: the ops, or why not."""

    def __init__(self, error: str | None = None, cuda: bool = False,
                 cuda_error: str | None = None, how: str = "", path: str | None = None):
        self.error = error  # None when the CPU ops are registered
        self.disabled = False  # True when FUSEDACCUM_NATIVE turned it off (no warning)
        self.cuda = cuda  # the CUDA kernels are registered too
        self.cuda_error = cuda_error  # why not, when known
        self.how = how  # "ahead-of-time build <path>" or "JIT build <path>"
        self.path = path  # the library loaded
        self.ops = None
        self.hooks = None  # the library imported as a Python module (hooks.cpp), once asked


_state: _State | None = None
_lock = threading.Lock()


_NATIVE_MODES = ("", "0", "off", "false", "no", "1", "on", "true", "yes", "jit")
_OFF = ("0", "off", "false", "no")


def _first_lines(exc: BaseException, limit: int = 4) -> str:
    """The first error lines of a failed build, on one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln.lower() or "error " in ln.lower()[:12]]
    errors = [ln for ln in errors if not ln.startswith(("[", "FAILED", "Error building"))]
    picked = (errors or lines)[:limit]
    text = " | ".join(picked) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _aot_library() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PKG_DIR / f"_native{suffix}"
        if path.is_file():
            return path
    return None


def _tool_path() -> None:
    """Put the ninja this Python has (the package's dependency, in its environment's bin
    folder, or the ninja wheel's own) on PATH, where torch looks for it: a virtual
    environment's python run by its path, without activating it, does not have it there."""
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja

        folders.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    current = os.environ.get("PATH")
    path = (os.defpath if current is None else current).split(os.pathsep)
    extra = [f for f in folders
             if f and f not in path and os.path.isfile(os.path.join(f, "ninja"))]
    if extra:  # (PATH otherwise as it was: unset stays unset)
        os.environ["PATH"] = os.pathsep.join([*path, *dict.fromkeys(extra)])


def _missing_compiler() -> str | None:
    """Why the first-use build cannot start, named plainly (the build's own error would
    bury it under compile commands), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.strip() else "c++") is None:
        return f"no C++ compiler found (`{cxx}` is not on PATH; set CXX or install one)"
    if shutil.which("ninja") is None:
        return "ninja is not on PATH (`pip install ninja` into this Python's environment)"
    return None


# torch's first-use build holds a file "lock" in its build directory while it compiles; a
# lock older than this was left by a build that was interrupted (one of these sources takes
# 20 s to a few minutes)
_STALE_LOCK_S = 15 * 60


def _build_folder(name: str) -> Path | None:
    """torch's build folder for ``name`` (where ``cpp_extension.load`` compiles, caches and
    keeps its lock), or None where torch no longer has the private helper that names it."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_build_directory", None)
    return None if get is None else Path(get(name, False))


def _check_build_lock(folder: Path, poll_s: float = 0.5) -> None:
    """Before ``cpp_extension.load``, which waits for the lock to go forever and silently:
    an interrupted build (Ctrl-C, a killed job) leaves it. A lock is waited for here
    instead, with a line on stderr naming it, until it goes (another process's build
    finished) or is older than any build; then it is removed, with a warning."""
    lock = folder / "lock"
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # no lock (the common case), or it went
            return
        if age > _STALE_LOCK_S:
            warnings.warn(f"fusedaccum: removing {lock}, left {age / 60:.0f} minutes ago by "
                          "an interrupted first-use build of the C++ extension (a build "
                          "waits for it to go); compiling again", RuntimeWarning, stacklevel=2)
            lock.unlink(missing_ok=True)
            return
        if not said:
            print(f"fusedaccum: waiting for another process's build of the C++ extension to "
                  f"finish (its lock {lock} is {age:.0f} s old; one left by an interrupted "
                  f"build is removed at {_STALE_LOCK_S // 60} minutes, or delete it)",
                  file=sys.stderr)
            said = True
        time.sleep(poll_s)


def _build_name(with_cuda: bool) -> str:
    """The first-use build's name (and its folder's, in torch's extension cache): one per
    checkout, since checkouts sharing that cache would otherwise rebuild it each time
    another one had built there."""
    tag = hashlib.sha1(str(_CSRC).encode()).hexdigest()[:8]
    return f"fusedaccum_native_{'cuda' if with_cuda else 'cpu'}_{tag}"


def _jit_build(with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    sources = [str(_CSRC / "bindings.cpp"), str(_CSRC / "hooks.cpp"),
               *sorted(str(p) for p in _CSRC.glob("cpu/*.cpp"))]
    cflags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    ldflags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is inline: without OpenMP here it would run on one thread
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cuda_flags = ["-O3", "--fmad=false"]  # (as -ffp-contract=off: math.h's fmaf only)
    if with_cuda:
        sources += sorted(str(p) for p in _CSRC.glob("cuda/*.cu"))
        cflags.append("-DFUSEDACCUM_WITH_CUDA")
    name = _build_name(with_cuda)
    folder = _build_folder(name)
    if folder is not None:
        _check_build_lock(folder)
        if not (folder / f"{name}.so").exists():  # (a silent minute looks like a hang)
            print(f"fusedaccum: compiling the C++ extension{' with CUDA' if with_cuda else ''} "
                  f"on first use (about a minute, once; cached in {folder})", file=sys.stderr)
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=ldflags,
        is_python_module=False,
        verbose=os.environ.get("FUSEDACCUM_NATIVE_VERBOSE", "") not in ("", "0"),
    )


def _load_uncached() -> _State:
    mode = os.environ.get("FUSEDACCUM_NATIVE", "").strip().lower()
    if mode not in _NATIVE_MODES:
        warnings.warn(f"fusedaccum: FUSEDACCUM_NATIVE={mode!r} is not one of "
                      f"{', '.join(repr(m) for m in _NATIVE_MODES if m)} (or unset); ignored",
                      RuntimeWarning, stacklevel=2)
    isa = os.environ.get("FUSEDACCUM_CPU_ISA")
    if isa is not None and isa not in ("avx512", "avx2", "baseline"):
        warnings.warn(f"fusedaccum: FUSEDACCUM_CPU_ISA={isa!r} is not one of 'avx512', 'avx2', "
                      "'baseline' (lower case): the CPU loops fall back to baseline, the "
                      "slowest", RuntimeWarning, stacklevel=2)
    if mode in _OFF:
        state = _State(f"the C++ extension is disabled by FUSEDACCUM_NATIVE={mode}; unset it")
        state.disabled = True
        return state
    aot_error = None
    aot = None if mode == "jit" else _aot_library()
    if aot is not None:
        try:
            torch.ops.load_library(str(aot))
            state = _State(how=f"ahead-of-time build {aot}", path=str(aot))
            state.cuda = "cuda" in torch.ops.fusedaccum_native.build_info().split(",")
            if not state.cuda:
                state.cuda_error = (
                    f"the ahead-of-time build {aot.name} was built without CUDA (no nvcc or "
                    "no CUDA build of torch at build time); rebuild it where both exist, or "
                    "delete it to compile on first use"
                )
            return state
        except Exception as exc:  # e.g. built against another torch
            aot_error = f"the ahead-of-time build {aot} failed to load ({_first_lines(exc, 2)})"
    if not (_CSRC / "bindings.cpp").is_file():
        why = aot_error or "no ahead-of-time build of the C++ extension is installed"
        return _State(f"{why}, and its sources ({_CSRC}) are not there to compile it; install "
                      "fusedaccum from a source checkout with a C++ compiler present")
    from torch.utils import cpp_extension

    _tool_path()
    cuda_error = None
    if torch.version.cuda is None:
        cuda_error = "the extension was built without CUDA (torch is a CPU-only build)"
    elif cpp_extension.CUDA_HOME is None:
        cuda_error = ("the extension was built without CUDA (nvcc not found; set CUDA_HOME "
                      "or put nvcc on PATH)")
    elif not torch.cuda.is_available():
        cuda_error = "no CUDA device, so the extension was built without CUDA"
    else:
        try:
            path = _jit_build(with_cuda=True)
            return _State(cuda=True, how=f"JIT build {path}", path=path)
        except Exception as exc:
            cuda_error = ("the CUDA part of the C++ extension failed to compile: "
                          f"{_first_lines(exc)}")
    prefix = f"{aot_error}; then the " if aot_error else ""
    missing = _missing_compiler()
    if missing is not None:
        return _State(f"{prefix}C++ extension cannot be compiled on first use: {missing}; or "
                      "build it ahead of time with `pip install --no-build-isolation -e .` "
                      "from a source checkout")
    try:
        path = _jit_build(with_cuda=False)
    except Exception as exc:
        return _State(f"{prefix}C++ extension failed to compile: {_first_lines(exc)}; {_HINT}")
    return _State(cuda_error=cuda_error, how=f"JIT build {path}", path=path)


def _register_fakes() -> None:
    """Shape-only kernels so that torch.compile / FakeTensor can trace the ops."""
    lib = _NS

    @torch.library.register_fake(f"{lib}::accumulate_norm_")
    def _accumulate_norm_fake(acc, grad, scale, overwrite, norm_type):
        return acc.new_empty(())

    @torch.library.register_fake(f"{lib}::accumulate_many_norm_")
    def _accumulate_many_norm_fake(accs, grads, scale, norm_type, overwrite=()):
        return torch.empty((), dtype=torch.float32)  # the op runs on CPU tensors only

    @torch.library.register_fake(f"{lib}::grad_norm")
    def _grad_norm_fake(tensors, norm_type):
        return tensors[0].new_empty(())

    def _no_output(*args, **kwargs):
        return None

    for op in ("accumulate_", "accumulate_many_", "adamw_step_", "sgd_step_"):
        torch.library.register_fake(f"{lib}::{op}", _no_output)


def _load() -> _State:
    global _state
    state = _state
    if state is None:
        with _lock:
            if _state is None:
                new = _load_uncached()
                if new.error is None:
                    try:
                        _register_fakes()
                        ns = torch.ops.fusedaccum_native
                        new.ops = {name: getattr(ns, name).default for name in (
                            "accumulate_", "accumulate_norm_", "accumulate_many_",
                            "accumulate_many_norm_", "grad_norm", "adamw_step_",
                            "sgd_step_")}
                    except Exception as exc:
                        new = _State(f"the C++ extension loaded but its ops are incomplete "
                                     f"({_first_lines(exc, 2)}); rebuild it")
                _state = new
                if new.error is not None and not new.disabled:
                    from fusedaccum.accumulator import _caller_stacklevel

                    # "auto" falls back quietly otherwise: say so once, with the reason,
                    # at the user's line that asked for a backend
                    warnings.warn(
                        "fusedaccum: the C++ extension is unavailable, so the cpu and cuda "
                        "backends cannot run and backend='auto' falls back to triton or the "
                        f"(slower) reference backend: {new.error}", RuntimeWarning,
                        stacklevel=_caller_stacklevel())
            state = _state
    return state


def hooks_module(load: bool = True):
    """The extension imported as a Python module, for its C++ batching hook (csrc/hooks.cpp),
    or None where it is unavailable. ``load=False``: only if the extension is loaded already
    or built ahead of time (never compile it just for the hook)."""
    if os.environ.get("FUSEDACCUM_FAST_HOOKS", "").strip().lower() in _OFF:
        return None
    state = _state
    if state is None:
        # (FUSEDACCUM_NATIVE=jit: an ahead-of-time build is skipped, so loading compiles)
        jit = os.environ.get("FUSEDACCUM_NATIVE", "").strip().lower() == "jit"
        if not load and (jit or _aot_library() is None):
            return None
        state = _load()
    if state.error is not None or state.path is None:
        return None
    if state.hooks is None:
        with _lock:
            if state.hooks is None:
                # built under TORCH_EXTENSION_NAME = the file's name up to the first dot
                name = Path(state.path).name.split(".")[0]
                try:
                    loader = importlib.machinery.ExtensionFileLoader(name, state.path)
                    spec = importlib.util.spec_from_loader(name, loader)
                    module = importlib.util.module_from_spec(spec)
                    loader.exec_module(module)
                    from fusedaccum.buffers import HOOK_FIELDS

                    # a build from before a change of the fields would misread them, one
                    # from before the native or the table flush takes fewer arguments (or
                    # has no flush_batch)
                    ok = getattr(module, "HOOK_FIELDS", None) == HOOK_FIELDS and all(
                        hasattr(module, name) for name in ("batch_hook_flushes",
                                                           "TABLE_FLUSH", "flush_batch"))
                    state.hooks = module if ok else False
                except ImportError:  # a build from before hooks.cpp
                    state.hooks = False
    return state.hooks or None


def build_info() -> str:
    """How the extension was (or was not) loaded, for ``python -m fusedaccum info``."""
    state = _load()
    if state.error is not None:
        return state.error
    isa = next((f.split("=", 1)[1] for f in torch.ops.fusedaccum_native.build_info().split(",")
                if f.startswith("cpu-isa=")), "unknown")
    return (f"{state.how} ({'CPU and CUDA' if state.cuda else 'CPU only'} kernels; CPU loops: "
            f"{isa})")


def unavailable_reason(name: str, device: torch.device | None) -> str | None:
    if name == "cpu":
        if device is not None and device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only, not {device.type}"
    elif name == "cuda":
        no_gpu = None
        if torch.version.cuda is None:
            no_gpu = ("this torch is a CPU-only build (install a CUDA build of torch on a "
                      "machine with an NVIDIA GPU)")
        elif not torch.cuda.is_available():
            no_gpu = "torch.cuda.is_available() is False"
        if device is not None and device.type != "cuda":
            return (f"the cuda backend runs on CUDA tensors only, not {device.type}"
                    + (f"; and there is no CUDA device here: {no_gpu}" if no_gpu else ""))
        if no_gpu is not None:
            return f"no CUDA device: {no_gpu}"
    else:
        return f"fusedaccum.ops.native provides the cpu and cuda backends, not {name!r}"
    state = _load()
    if state.error is not None:
        return state.error
    if name == "cuda" and not state.cuda:
        return state.cuda_error or (
            "the extension was built without CUDA (no nvcc/CUDA torch at build time)")
    return None


def _ops() -> dict:
    state = _state if _state is not None else _load()
    if state.ops is None:
        raise RuntimeError(f"fusedaccum C++ extension unavailable: {state.error}")
    return state.ops


# Every public op checks its arguments in Python first (the reference backend's checks,
# the same messages as the C++ ones), although the C++ binding checks them again: on one
# lent GPU machine (torch 2.11+cu130 built with gcc-toolset-13, the extension with the
# image's gcc 13.3) every error raised by this extension crashed the process with a
# segfault, while a one-function test extension raised fine. Cost: ~1 us per tensor.


_norm_type = norm_value  # 2.0 or inf, else ValueError naming norm_type


def accumulate_(acc, grad, scale=1.0, *, overwrite=False, norm_type=None):
    _check_flat("acc", acc, (torch.float32,), None, None, True)  # (True: it is written)
    _check_flat("grad", grad, FLOAT_DTYPES, acc.numel(), acc.device)
    norm = None if norm_type is None else _norm_type(norm_type)
    scale, overwrite = check_accumulate_args(acc, grad, scale, overwrite)
    ops = _ops()
    if norm is None:
        ops["accumulate_"](acc, grad, scale, overwrite)
        return None
    return ops["accumulate_norm_"](acc, grad, scale, overwrite, norm)


def accumulate_many_(accs, grads, scale=1.0, *, overwrite=None, norm_type=None,
                     trusted=False):
    """``accs[i] = (0 if overwrite[i] else accs[i]) + scale * grads[i]`` for every i
    (accumulate_, bitwise the same), in one op call: one C++ loop on CPU, one kernel
    launch per 64 pairs on CUDA. Lists (or tuples) of contiguous tensors of equal numel.
    ``trusted``: the caller guarantees what check_many_args checks (the wrapper's
    batches do), and gives ``overwrite`` as None or 0/1 ints. With ``norm_type`` also the
    statistic of all updated accs (reference.accumulate_many_): in the same loop on CPU;
    on CUDA by a separate pass."""
    check_norm_type(norm_type)
    if not trusted:
        scale, overwrite = check_many_args(accs, grads, scale, overwrite)
    if not accs:
        return None if norm_type is None else many_stat(accs, norm_type)
    ops = _ops()
    flags = overwrite or ()
    if norm_type is None or accs[0].device.type != "cpu":
        ops["accumulate_many_"](accs, grads, float(scale), flags)  # (CPU or CUDA kernel)
        return None if norm_type is None else many_stat(accs, norm_type)
    return ops["accumulate_many_norm_"](accs, grads, float(scale), _norm_type(norm_type), flags)


def grad_norm(tensors, norm_type=2.0):
    tensors = check_norm_inputs(tensors)
    return _ops()["grad_norm"](tensors, _norm_type(norm_type))


def adamw_step_(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None, *,
                grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
                decoupled_weight_decay=True, amsgrad=False, maximize=False, zero_acc=True,
                trusted=False):
    if not trusted:  # (the wrapper's own flat buffers; the C++ binding checks them anyway)
        lr, beta1, beta2, eps, weight_decay, step = check_adamw_inputs(
            param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, grad_mult=grad_mult,
            found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, zero_acc=zero_acc)
    ops = _ops()
    dev = param.device
    ops["adamw_step_"](
        param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out,
        device_scalar("grad_mult", grad_mult, dev), device_scalar("found_inf", found_inf, dev),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
        bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), bool(zero_acc),
    )


def sgd_step_(param, acc, momentum_buffer=None, model_out=None, *, grad_mult, found_inf,
              lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
              zero_acc=True, trusted=False):
    if not trusted:
        lr, momentum, dampening, weight_decay = check_sgd_inputs(
            param, acc, momentum_buffer, model_out, grad_mult=grad_mult, found_inf=found_inf,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=first_step, zero_acc=zero_acc)
    ops = _ops()
    dev = param.device
    ops["sgd_step_"](
        param, acc, momentum_buffer, model_out,
        device_scalar("grad_mult", grad_mult, dev), device_scalar("found_inf", found_inf, dev),
        float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(maximize), bool(first_step), bool(zero_acc),
    )
