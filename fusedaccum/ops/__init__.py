"""The ops the wrapper calls, and the backend registry.

Every op works on flat, contiguous 1-D tensors (the per-group buffers of
:mod:`fusedaccum.buffers`, or slices of them) and takes ``backend=``:

* ``"auto"`` (default, overridden by the ``FUSEDACCUM_BACKEND`` environment
  variable): for CUDA tensors ``cuda``, else ``triton``, else ``reference``; for
  CPU tensors ``cpu``, else ``reference``.
* ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``: that backend, or
  ``RuntimeError`` saying why it cannot run on the tensors' device.

Signatures (identical for every backend; the reference module is the definition):

``accumulate_(acc, grad, scale=1.0, *, overwrite=False, norm_type=None) -> Tensor | None``
    ``acc = (0 if overwrite else acc) + scale * float32(grad)`` in place. ``acc`` is
    fp32, ``grad`` fp16/bf16/fp32 with the same number of elements. With
    ``norm_type=2.0`` returns a 0-dim fp32 tensor holding the sum of squares of the
    updated ``acc``; with ``norm_type=inf`` its largest absolute value (NaN if any
    element is NaN); otherwise ``None``.

``accumulate_many_(accs, grads, scale=1.0, *, overwrite=None, norm_type=None) -> Tensor | None``
    For every i, ``accs[i] = (0 if overwrite[i] else accs[i]) + scale * float32(grads[i])``
    in place: exactly ``accumulate_(accs[i], grads[i], scale, overwrite=overwrite[i])``,
    bitwise, but in one call (the Triton backend: one kernel launch); ``overwrite`` is
    None (no pair overwrites) or a list of one bool per pair. With ``norm_type`` returns
    the statistic of all updated accs together, as ``accumulate_`` for one (0 for an
    empty list): fused into the loop on ``cpu``, a separate pass elsewhere. ``accs`` is
    a list of fp32 tensors (in practice 1-D views into one flat buffer; they must not overlap one
    another), ``grads`` a list of as many fp16/bf16/fp32 tensors, all of one dtype, with
    ``grads[i].numel() == accs[i].numel()``; all contiguous (any shape: only element
    counts must agree), on one device. An empty list does nothing; zero-element tensors
    are allowed. Everything is checked before anything is written
    (``reference.check_many_args``: ValueError/TypeError naming the argument and index).

``grad_norm(tensors, norm_type=2.0) -> Tensor``
    0-dim fp32 tensor: the total 2-norm or inf-norm over all elements of the fp32
    tensors, in a fixed reduction order (two calls give bitwise the same value).
    Any NaN gives NaN, any inf (and no NaN) gives inf.

``adamw_step_(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None, *,
grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
decoupled_weight_decay=True, amsgrad=False, maximize=False, zero_acc=True) -> None``
    torch.optim.AdamW (``decoupled_weight_decay=True``) or Adam math with
    ``g = acc * grad_mult``; ``step`` is the step number after this update (>= 1).
    ``param`` is fp32 (a master or an fp32 param) or fp16/bf16 (updated with fp32
    math, rounded to nearest even). ``model_out``, if given, receives the updated
    param rounded to its dtype (fp16/bf16). ``grad_mult`` and ``found_inf`` are 0-dim
    fp32 tensors on the device (every backend also takes any one-element real tensor, or
    a Python number: ``reference.check_scalar_arg``): when ``found_inf != 0`` nothing but
    ``acc`` is written. With ``zero_acc`` ``acc`` is zeroed in both cases.

``sgd_step_(param, acc, momentum_buffer=None, model_out=None, *, grad_mult, found_inf,
lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, zero_acc=True)``
    torch.optim.SGD math with ``g = acc * grad_mult``; ``momentum_buffer`` is required
    when ``momentum != 0``; ``first_step`` says the buffer holds no history yet (torch
    then sets it to the gradient, without dampening). Otherwise as ``adamw_step_``.

Every backend checks the arguments alike (the reference module's checks), before anything
is written: TypeError or ValueError naming the argument for a wrong type, dtype, shape,
size or device (``norm_type``: 2.0 or inf, or None where no statistic is asked for; the
numbers ``scale``, ``lr``, ``beta1``, ...: a real number or a one-element real tensor, not
a string; the flags ``overwrite``, ``amsgrad``, ...: bools; ``step``: an integer >= 1,
3.0 included); ValueError for hyperparameters torch.optim.AdamW / SGD refuse at
construction (``beta1``/``beta2`` outside [0, 1), a negative ``lr``, ``eps``,
``weight_decay`` or ``momentum``, ``nesterov`` without momentum or with dampening);
ValueError naming both arguments where a tensor the op writes shares memory with another
tensor argument (``reference.check_no_overlap``: tensors only read may alias); and
RuntimeError for a tensor the op writes (``acc``, ``accs[i]``, ``param``, the state
buffers, ``model_out``) that requires grad while grad mode is on, as torch refuses in-place
writes to such leaves: the ops write without autograd (under ``torch.no_grad()`` they may).
The step ops' ``trusted=True`` (the wrapper's own buffers) skips these checks.
"""

from __future__ import annotations

import importlib
import os

import torch

from fusedaccum.ops.reference import (
    check_many_args,
    check_norm_type,
    many_stat,
)

BACKENDS = ("reference", "triton", "cuda", "cpu")
# the environment variables that change what the package does (`python -m fusedaccum info`
# and the benchmark reports list them)
ENV_VARS = ("FUSEDACCUM_BACKEND", "FUSEDACCUM_NATIVE", "FUSEDACCUM_CPU_ISA",
            "FUSEDACCUM_FAST_HOOKS", "FUSEDACCUM_TRITON_LAUNCH", "FUSEDACCUM_TRITON_OP",
            "TRITON_INTERPRET")
_MODULES = {
    "reference": "fusedaccum.ops.reference",
    "triton": "fusedaccum.ops.triton",
    "cuda": "fusedaccum.ops.native",
    "cpu": "fusedaccum.ops.native",
}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_loaded: dict[str, object] = {}


def _module(name: str):
    mod = _loaded.get(name)
    if mod is None:
        mod = importlib.import_module(_MODULES[name])
        _loaded[name] = mod
    return mod


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """None if backend ``name`` runs on ``device`` (default: this machine), else why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'"
    try:
        mod = _module(name)
    except ImportError as exc:  # the backend's module could not even be imported
        return f"its module failed to import ({exc})"
    return mod.unavailable_reason(name, None if device is None else torch.device(device))


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to None (runs here) or a sentence saying why not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


def resolve(backend: str | None, device: torch.device | str) -> str:
    """The concrete backend name that ``backend`` means for tensors on ``device``.

    Raises RuntimeError when an explicitly named backend cannot run there.
    """
    device = torch.device(device)
    if backend is None or backend == "auto":
        backend = os.environ.get("FUSEDACCUM_BACKEND", "auto") or "auto"
        if backend != "auto":
            source = "FUSEDACCUM_BACKEND"
        else:
            for name in _AUTO_ORDER.get(device.type, ("reference",)):
                if unavailable_reason(name, device) is None:
                    return name
            return "reference"
    else:
        source = "backend="
    why = unavailable_reason(backend, device)
    if why is not None:
        fix = ("Unset FUSEDACCUM_BACKEND (or set it to 'auto' or" if source != "backend="
               else "Use backend='auto' (or")
        raise RuntimeError(
            f"fusedaccum backend {backend!r} (from {source}) cannot run on {device.type} "
            f"tensors: {why}. {fix} one of the backends that `python -m fusedaccum info` "
            "lists as available)."
        )
    return backend


_router = None


def get(backend: str | None, device: torch.device | str):
    """The module implementing the ops for ``backend`` on ``device``.

    ``"auto"`` on CUDA tensors, where both the cuda and triton backends run, gives
    :class:`fusedaccum.ops.auto.Router`: each op and size to the one measured faster.
    """
    name = resolve(backend, device)
    if name == "cuda" and (backend is None or backend == "auto") \
            and os.environ.get("FUSEDACCUM_BACKEND", "auto") in ("", "auto") \
            and unavailable_reason("triton", device) is None:
        global _router
        if _router is None:
            from fusedaccum.ops.auto import Router

            _router = Router(_module("cuda"), _module("triton"))
        return _router
    return _module(name)


def _device(name: str, t) -> torch.device:
    """The device of tensor argument ``name`` (which picks the backend), or TypeError
    naming it: the backends check everything else."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    return t.device


def accumulate_(acc, grad, scale=1.0, *, overwrite=False, norm_type=None, backend="auto"):
    return get(backend, _device("acc", acc)).accumulate_(
        acc, grad, scale, overwrite=overwrite, norm_type=norm_type
    )


def accumulate_many_(accs, grads, scale=1.0, *, overwrite=None, norm_type=None,
                     backend="auto"):
    if not isinstance(accs, (list, tuple, torch.Tensor)):
        accs = list(accs)  # any other iterable; a tensor is refused by the checks
    if not isinstance(grads, (list, tuple, torch.Tensor)):
        grads = list(grads)
    check_norm_type(norm_type)
    if not isinstance(accs, (list, tuple)) or not accs or not isinstance(accs[0], torch.Tensor):
        check_many_args(accs, grads, scale, overwrite)  # raises unless both lists are empty
        return None if norm_type is None else many_stat([], norm_type)
    return get(backend, accs[0].device).accumulate_many_(accs, grads, scale,
                                                         overwrite=overwrite,
                                                         norm_type=norm_type)


def grad_norm(tensors, norm_type=2.0, *, backend="auto"):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grad_norm needs at least one tensor")
    return get(backend, _device("tensors[0]", tensors[0])).grad_norm(tensors, norm_type)


def adamw_step_(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None, *,
                backend="auto", **kwargs):
    return get(backend, _device("param", param)).adamw_step_(
        param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, **kwargs
    )


def sgd_step_(param, acc, momentum_buffer=None, model_out=None, *, backend="auto", **kwargs):
    return get(backend, _device("param", param)).sgd_step_(param, acc, momentum_buffer,
                                                           model_out, **kwargs)


__all__ = [
    "BACKENDS", "available_backends", "resolve", "get", "unavailable_reason",
    "accumulate_", "accumulate_many_", "grad_norm", "adamw_step_", "sgd_step_",
]
