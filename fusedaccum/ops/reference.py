"""The reference backend: plain PyTorch, the definition of every op's math.

Every other backend is tested against these functions. They favour clarity over
speed, but never sync with the host: device-side scalars (``grad_mult``,
``found_inf``) stay tensors, and a skipped step is expressed with ``torch.where``.
"""

from __future__ import annotations

import math

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, *HALF_DTYPES)
_F32 = (torch.float32,)


def unavailable_reason(name: str, device: torch.device | None) -> str | None:
    return None  # plain PyTorch runs wherever torch does


def _check_flat(name: str, t: torch.Tensor, dtypes, numel: int | None = None, device=None,
                written: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_allowed(dtypes)}, got "
                        f"{_dtype_name(t.dtype)}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if written and t.requires_grad and torch.is_grad_enabled():
        _refuse_requires_grad(name, t)


def _refuse_requires_grad(name: str, t: torch.Tensor):
    """A tensor an op writes in place requires grad while grad mode is on: the ops write
    without autograd (the cpu and triton kernels could not be recorded), so every backend
    refuses, as torch refuses in-place writes to a leaf that requires grad. Under
    ``torch.no_grad()`` (how optimizers step parameters) the write is allowed."""
    what = "a leaf tensor" if t.is_leaf else "a tensor"
    raise RuntimeError(
        f"{name} is {what} that requires grad, and the op writes it in place, which autograd "
        f"cannot record: pass one that does not require grad (e.g. {name}.detach()), or call "
        "the op under torch.no_grad()")


def _check_step_inputs(param, acc, extra: dict, model_out):
    _check_flat("param", param, FLOAT_DTYPES)
    n, dev = param.numel(), param.device
    _check_flat("acc", acc, (torch.float32,), n, dev)
    for name, t in extra.items():
        if t is not None:
            _check_flat(name, t, (torch.float32,), n, dev)
    if model_out is not None:
        _check_flat("model_out", model_out, HALF_DTYPES, n, dev)
    if torch.is_grad_enabled():  # (the wrapper steps under no_grad: one call there)
        if param.requires_grad:
            _refuse_requires_grad("param", param)
        if acc.requires_grad:
            _refuse_requires_grad("acc", acc)
        for name, t in extra.items():
            if t is not None and t.requires_grad:
                _refuse_requires_grad(name, t)
        if model_out is not None and model_out.requires_grad:
            _refuse_requires_grad("model_out", model_out)


def check_adamw_inputs(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, *,
                       grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
                       decoupled_weight_decay, amsgrad, maximize, zero_acc) -> tuple:
    """The argument checks every backend's adamw_step_ makes before touching anything:
    the tensors (_check_step_inputs), ``grad_mult`` and ``found_inf`` (check_scalar_arg),
    the flags (bools), the hyperparameters (real numbers, in the ranges torch.optim.AdamW
    accepts), ``step`` (an integer >= 1) and no tensor the op writes sharing memory with
    another argument (check_no_overlap). Returns ``(lr, beta1, beta2, eps, weight_decay,
    step)`` as floats and an int, how the backends use them."""
    _check_step_inputs(param, acc, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
                                    "max_exp_avg_sq": max_exp_avg_sq}, model_out)
    check_scalar_arg("grad_mult", grad_mult)
    check_scalar_arg("found_inf", found_inf)
    for name, flag in (("decoupled_weight_decay", decoupled_weight_decay),
                       ("amsgrad", amsgrad), ("maximize", maximize), ("zero_acc", zero_acc)):
        check_flag(name, flag)
    if amsgrad and max_exp_avg_sq is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sq")
    step = check_step(step)
    lr, beta1, beta2, eps, weight_decay = (check_number(name, x) for name, x in (
        ("lr", lr), ("beta1", beta1), ("beta2", beta2), ("eps", eps),
        ("weight_decay", weight_decay)))
    # torch.optim.Adam(W)'s own conditions (`not 0.0 <= x`: NaN is refused too)
    for name, x, torch_says in (("lr", lr, "Invalid learning rate"),
                                ("eps", eps, "Invalid epsilon value"),
                                ("weight_decay", weight_decay, "Invalid weight_decay value")):
        if not 0.0 <= x:
            raise ValueError(f"{name} must be >= 0, got {x} (torch.optim.AdamW refuses it "
                             f"too: {torch_says})")
    for i, (name, x) in enumerate((("beta1", beta1), ("beta2", beta2))):
        if not 0.0 <= x < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {x} (torch.optim.AdamW refuses "
                             f"it too: Invalid beta parameter at index {i})")
    check_no_overlap(("param", param, True), ("acc", acc, bool(zero_acc)),
                     ("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, True),
                     ("max_exp_avg_sq", max_exp_avg_sq if amsgrad else None, True),
                     ("model_out", model_out, True),
                     ("grad_mult", grad_mult, False), ("found_inf", found_inf, False))
    return lr, beta1, beta2, eps, weight_decay, step


def check_sgd_inputs(param, acc, momentum_buffer, model_out, *, grad_mult, found_inf, lr,
                     momentum, dampening, weight_decay, nesterov, maximize, first_step,
                     zero_acc) -> tuple:
    """The argument checks every backend's sgd_step_ makes before touching anything (as
    check_adamw_inputs, in the ranges torch.optim.SGD accepts). Returns ``(lr, momentum,
    dampening, weight_decay)`` as floats."""
    _check_step_inputs(param, acc, {"momentum_buffer": momentum_buffer}, model_out)
    check_scalar_arg("grad_mult", grad_mult)
    check_scalar_arg("found_inf", found_inf)
    for name, flag in (("nesterov", nesterov), ("maximize", maximize),
                       ("first_step", first_step), ("zero_acc", zero_acc)):
        check_flag(name, flag)
    lr, momentum, dampening, weight_decay = (check_number(name, x) for name, x in (
        ("lr", lr), ("momentum", momentum), ("dampening", dampening),
        ("weight_decay", weight_decay)))
    # torch.optim.SGD's own conditions (`x < 0.0`: NaN passes, as there)
    for name, x, torch_says in (("lr", lr, "Invalid learning rate"),
                                ("momentum", momentum, "Invalid momentum value"),
                                ("weight_decay", weight_decay, "Invalid weight_decay value")):
        if x < 0.0:
            raise ValueError(f"{name} must be >= 0, got {x} (torch.optim.SGD refuses it "
                             f"too: {torch_says})")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening == 0, got momentum="
                         f"{momentum} and dampening={dampening} (torch.optim.SGD refuses it "
                         "too: Nesterov momentum requires a momentum and zero dampening)")
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("momentum != 0 needs momentum_buffer")
    check_no_overlap(("param", param, True), ("acc", acc, bool(zero_acc)),
                     ("momentum_buffer", momentum_buffer if momentum != 0 else None, True),
                     ("model_out", model_out, True),
                     ("grad_mult", grad_mult, False), ("found_inf", found_inf, False))
    return lr, momentum, dampening, weight_decay


_compiling = torch.compiler.is_compiling


def check_no_overlap(*args) -> None:
    """ValueError naming both arguments where a tensor the op writes shares memory with
    another tensor argument: the kernels read and write in parallel, in no set order, so
    the backends would disagree with one another (and a GPU with itself). ``args``:
    ``(name, value, written)`` triples, the value a tensor, a list or tuple of tensors
    (``name[i]``) or anything else (None, a number: no memory); tensors that are only read
    may share memory. Compares the data_ptr ranges of the (contiguous) tensors: no device
    sync. Skipped while torch.compile traces, where tensors have no data pointers."""
    if _compiling():
        return
    spans = []  # (start, bytes, position in args, index in its list or -1)
    for k, (_, ts, _) in enumerate(args):
        if isinstance(ts, torch.Tensor):
            spans.append((ts.data_ptr(), ts.nbytes, k, -1))
        elif isinstance(ts, (list, tuple)):
            spans += [(t.data_ptr(), t.nbytes, k, i) for i, t in enumerate(ts)]
    spans.sort()
    # a span overlaps an earlier one (in address order) iff one of those reaches past its
    # start: the one reaching furthest, of all of them (where it is written) or of those
    # written. Empty spans and null pointers (meta tensors) share nothing.
    written = [w for _, _, w in args]
    end_all = end_written = 0  # (the spans reaching furthest: far_all, far_written)
    far_all = far_written = None
    for span in spans:
        start, size, k, _ = span
        if not size or not start:
            continue
        if (end_all if written[k] else end_written) > start:
            _overlap_error(args, span, far_all if written[k] else far_written)
        end = start + size
        if end > end_all:
            end_all, far_all = end, span
        if written[k] and end > end_written:
            end_written, far_written = end, span


def _overlap_error(args, a, b):
    a, b = sorted([a[2:], b[2:]])  # (k, i): in argument order
    names = [args[k][0] if i < 0 else f"{args[k][0]}[{i}]" for k, i in (a, b)]
    what = " and ".join(name for name, (k, _) in zip(names, (a, b)) if args[k][2])
    raise ValueError(f"{names[0]} and {names[1]} share memory, and the op writes {what} (its "
                     "kernels read and write in no set order): pass tensors that do not "
                     "overlap (e.g. a .clone())")


def check_flag(name: str, x) -> bool:
    """A flag argument (``overwrite``, ``amsgrad``, ...): a bool (or the int 0 or 1);
    TypeError naming it otherwise (a string such as "no" is truthy)."""
    if x is True or x is False:
        return x
    if isinstance(x, int) and x in (0, 1):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r:.40}")


def check_number(name: str, x) -> float:
    """A hyperparameter (``scale``, ``lr``, ``beta1``, ...) as a Python float: a real
    number or a one-element real tensor (check_scalar_arg; a tensor's value is read on the
    host, as float() reads it)."""
    if type(x) is float:
        return x
    return float(check_scalar_arg(name, x))


_MAX_STEP = 2**63 - 1  # (the C++ ops take an int64)


def check_step(step) -> int:
    """adamw_step_'s ``step`` (the step number after this update) as an int: an integer
    >= 1, given as an int, an integral float (3.0, what torch's float step tensors hold) or
    a one-element tensor holding one (read on the host). TypeError for other types,
    ValueError for other values, both naming step."""
    if type(step) is not int:
        if isinstance(step, (bool, str, bytes)) or step is None:
            raise TypeError(f"step must be an integer (int, or an integral float), got "
                            f"{type(step).__name__} {step!r:.40}")
        value = check_number("step", step)
        if not value.is_integer():
            raise ValueError(f"step must be an integer (the step number after this update), "
                             f"got {step!r:.40}")
        step = int(value)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the step number after this update), got {step}")
    if step > _MAX_STEP:
        raise ValueError(f"step must be < 2**63 (the C++ ops take an int64), got {step}")
    return step


def norm_value(norm_type) -> float:
    """``norm_type`` as a statistic's float: 2.0 or inf (anything ``float()`` turns into
    one of them, e.g. 2 or "inf"); ValueError naming norm_type otherwise (None, 1, -inf,
    "fro", ...)."""
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        value = None
    if value != 2.0 and value != math.inf:
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    return value


def check_norm_type(norm_type) -> None:
    """None (no statistic), 2.0 or inf; ValueError otherwise (see norm_value)."""
    if norm_type is not None:
        norm_value(norm_type)


def check_scalar_arg(name: str, x):
    """``grad_mult`` / ``found_inf`` as every backend takes them, checked before anything
    is written: a one-element real tensor (any shape, dtype or device; returned as is) or
    a real number (anything ``float()`` takes but a string: float, int, bool, numpy scalar;
    returned as a float). A tensor of more than one element is a ValueError, a complex or
    other value (a string too) a TypeError, both naming the argument. No device sync."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must hold exactly one value (a number or a one-element "
                             f"tensor), got a tensor of shape {tuple(x.shape)}")
        if x.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got "
                            f"a {_dtype_name(x.dtype)} tensor")
        return x
    if not isinstance(x, (str, bytes, bytearray)):  # (float() would parse "2")
        try:
            return float(x)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name} must be a real number or a one-element real tensor, got "
                    f"{type(x).__name__} {x!r:.40}")


def device_scalar(name: str, x, device: torch.device) -> torch.Tensor:
    """``grad_mult`` / ``found_inf`` (check_scalar_arg) as a one-element fp32 tensor on
    ``device``, without a sync: how the cpu, cuda and triton backends pass them on."""
    if isinstance(x, torch.Tensor) and x.dtype is torch.float32 and x.numel() == 1:  # usual
        return x if x.device == device else x.to(device, non_blocking=True)
    x = check_scalar_arg(name, x)
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32, non_blocking=True)
    return torch.full((), x, dtype=torch.float32, device=device)


def check_accumulate_args(acc, grad, scale, overwrite) -> tuple[float, bool]:
    """accumulate_'s checks after those of its tensors and norm_type: ``scale`` a real
    number (check_number), ``overwrite`` a bool (check_flag), and ``acc`` sharing no memory
    with ``grad``. Returns ``(scale, overwrite)`` as a float and a bool."""
    if type(scale) is not float:
        scale = check_number("scale", scale)
    if overwrite is not False and overwrite is not True:
        overwrite = check_flag("overwrite", overwrite)
    if not _compiling():  # (check_no_overlap's test for two tensors, inline: the hot path)
        a, g = acc.data_ptr(), grad.data_ptr()
        if a < g + grad.nbytes and g < a + acc.nbytes:
            check_no_overlap(("acc", acc, True), ("grad", grad, False))
    return scale, overwrite


def accumulate_(acc, grad, scale=1.0, *, overwrite=False, norm_type=None):
    _check_flat("acc", acc, _F32, None, None, True)  # (True: it is written)
    _check_flat("grad", grad, FLOAT_DTYPES, acc.numel(), acc.device)
    check_norm_type(norm_type)
    scale, overwrite = check_accumulate_args(acc, grad, scale, overwrite)
    _accumulate(acc, grad, scale, overwrite)
    if norm_type is None:
        return None
    return _norm_stat(acc, float(norm_type))


def _accumulate(acc, grad, scale, overwrite) -> None:
    g = grad.float()
    if overwrite:
        torch.mul(g, scale, out=acc)
    else:
        acc.add_(g, alpha=scale)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _allowed(dtypes) -> str:
    """``float32``, ``float16 or bfloat16``, ``float32, float16 or bfloat16``."""
    names = [_dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check_contiguous(name: str, t, dtypes, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = _allowed(dtypes)
        raise TypeError(f"{name} must have dtype {allowed}, got {_dtype_name(t.dtype)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} and strides "
                         f"{t.stride()}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of accs[0])")


def check_many_inputs(accs, grads) -> None:
    """The argument checks every backend's accumulate_many_ makes before touching anything.

    ``accs`` and ``grads`` are lists (or tuples) of the same length; ``accs[i]`` is a
    contiguous fp32 tensor, ``grads[i]`` a contiguous fp16/bf16/fp32 tensor with as many
    elements (any shapes: only the element count must agree); every grad has the dtype of
    ``grads[0]``; all are on the device of ``accs[0]``. Errors name the argument and the
    index: TypeError for types and dtypes, ValueError otherwise; RuntimeError for an acc
    that requires grad while grad mode is on (the ops write the accs in place).
    """
    for name, seq in (("accs", accs), ("grads", grads)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(accs) != len(grads):
        raise ValueError(f"accs and grads must have the same length, got {len(accs)} accs and "
                         f"{len(grads)} grads")
    if not accs:
        return
    _check_contiguous("accs[0]", accs[0], (torch.float32,), None)
    device = accs[0].device
    _check_contiguous("grads[0]", grads[0], FLOAT_DTYPES, device)
    grad_dtype = grads[0].dtype
    # One pass that only says whether everything is fine (the batched op exists to save
    # host time, ~1 us per pair here); when it is not, the loop below finds what is wrong.
    f32, tensor = torch.float32, torch.Tensor
    grad_mode = torch.is_grad_enabled()
    if all(isinstance(a, tensor) and isinstance(g, tensor) and a.dtype is f32
           and g.dtype is grad_dtype and a.numel() == g.numel() and a.device == device
           and g.device == device and a.is_contiguous() and g.is_contiguous()
           for a, g in zip(accs, grads)) \
            and not (grad_mode and any([a.requires_grad for a in accs])):
        return
    f32 = (torch.float32,)
    for i, (acc, grad) in enumerate(zip(accs, grads)):
        _check_contiguous(f"accs[{i}]", acc, f32, device)
        if grad_mode and acc.requires_grad:
            _refuse_requires_grad(f"accs[{i}]", acc)
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"grads[{i}] must be a tensor, got {type(grad).__name__}")
        if grad.dtype != grad_dtype:
            raise TypeError(f"grads[{i}] has dtype {_dtype_name(grad.dtype)}, but grads[0] has "
                            f"{_dtype_name(grad_dtype)} (all grads of one call share a dtype)")
        _check_contiguous(f"grads[{i}]", grad, (grad_dtype,), device)
        if grad.numel() != acc.numel():
            raise ValueError(f"grads[{i}] has {grad.numel()} elements, expected "
                             f"{acc.numel()} (accs[{i}])")


def check_many_overwrite(overwrite, n: int) -> list[int] | None:
    """accumulate_many_'s ``overwrite`` as the ops take it: None (no pair overwrites) or
    one 0/1 int per pair. It may be None or a list or tuple of ``n`` bools (or 0/1 ints);
    TypeError/ValueError otherwise."""
    if overwrite is None:
        return None
    if not isinstance(overwrite, (list, tuple)):
        raise TypeError("overwrite must be None or a list of bools (one per pair), got "
                        f"{type(overwrite).__name__}")
    if len(overwrite) != n:
        raise ValueError(f"overwrite has {len(overwrite)} flags for {n} pairs (one per pair)")
    flags = []
    for i, o in enumerate(overwrite):
        if not isinstance(o, (bool, int)) or o not in (0, 1):
            raise TypeError(f"overwrite[{i}] must be a bool, got {o!r}")
        flags.append(1 if o else 0)
    return flags if any(flags) else None


def check_many_args(accs, grads, scale, overwrite) -> tuple:
    """Every check of accumulate_many_ but norm_type's: check_many_inputs,
    check_many_overwrite, ``scale`` a real number (check_number) and no acc sharing memory
    with another acc or a grad (check_no_overlap). Returns ``(scale, overwrite)`` as the
    backends take them: a float, and None or 0/1 ints."""
    check_many_inputs(accs, grads)
    overwrite = check_many_overwrite(overwrite, len(accs))
    if type(scale) is not float:
        scale = check_number("scale", scale)
    check_no_overlap(("accs", accs, True), ("grads", grads, False))
    return scale, overwrite


def accumulate_many_(accs, grads, scale=1.0, *, overwrite=None, norm_type=None, trusted=False):
    """``accumulate_(accs[i], grads[i], scale, overwrite=overwrite[i])`` for every i.

    The batched form of accumulate_: ``accs[i] = (0 if overwrite[i] else accs[i]) + scale
    * float32(grads[i])`` in place, bitwise what the per-pair calls give (``overwrite``:
    None, no pair overwrites, or one bool per pair). Arguments as
    :func:`check_many_inputs` and :func:`check_many_overwrite` check them, all before
    anything is written; the accs must not overlap one another or a grad
    (:func:`check_many_args`). An empty list does nothing. ``trusted=True`` skips those
    checks: the caller guarantees them, and passes ``overwrite`` as None or 0/1 ints (the
    wrapper's batches do by construction; the host time matters there).

    With ``norm_type`` (2.0 or inf) returns the statistic of all updated accs together,
    as accumulate_ does for one: a 0-dim fp32 tensor holding the sum of squares, or the
    largest |x| (NaN if any element is NaN); 0 for an empty list. Otherwise None.
    """
    check_norm_type(norm_type)
    if not trusted:
        scale, overwrite = check_many_args(accs, grads, scale, overwrite)
    flags = overwrite or (0,) * len(accs)
    for acc, grad, ow in zip(accs, grads, flags):
        _accumulate(acc.view(-1), grad.view(-1), scale, ow)
    return None if norm_type is None else many_stat(accs, norm_type)


def many_stat(accs, norm_type) -> torch.Tensor:
    """The norm statistic of several fp32 tensors together (see accumulate_many_)."""
    if not accs:
        return torch.zeros((), dtype=torch.float32)
    stats = torch.stack([_norm_stat(a.reshape(-1), float(norm_type)) for a in accs])
    return stats.amax() if float(norm_type) == math.inf else stats.sum()


def _norm_stat(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Sum of squares (2-norm) or largest |x| (inf-norm) of one fp32 tensor."""
    if norm_type == 2.0:
        return t.square().sum(dtype=torch.float32)
    if norm_type == math.inf:
        if t.numel() == 0:
            return torch.zeros((), dtype=torch.float32, device=t.device)
        return t.abs().amax()
    raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")


def check_norm_inputs(tensors) -> list:
    """The argument checks every backend's grad_norm makes; returns ``tensors`` as a list."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grad_norm needs at least one tensor")
    _check_flat("tensors[0]", tensors[0], (torch.float32,))
    device = tensors[0].device
    for i in range(1, len(tensors)):
        _check_flat(f"tensors[{i}]", tensors[i], (torch.float32,), device=device)
    return tensors


def grad_norm(tensors, norm_type=2.0):
    tensors = check_norm_inputs(tensors)
    norm_type = norm_value(norm_type)
    stats = torch.stack([_norm_stat(t, norm_type) for t in tensors])
    if norm_type == 2.0:
        return stats.sum().sqrt()
    return stats.amax()


def _scalar(name: str, x, device: torch.device):
    """grad_mult / found_inf checked (check_scalar_arg): a float, or a 0-dim tensor on
    ``device`` (a one-element tensor of another shape would broadcast the results)."""
    x = check_scalar_arg(name, x)
    if isinstance(x, torch.Tensor):
        if x.dim() != 0:
            x = x.reshape(())
        if x.device != device:
            x = x.to(device, non_blocking=True)
    return x


def _keep_mask(found_inf, device: torch.device) -> torch.Tensor:
    if isinstance(found_inf, torch.Tensor):
        return found_inf == 0
    return torch.tensor(found_inf == 0.0, device=device)  # (where takes no bool)


def _commit(dst: torch.Tensor, new: torch.Tensor, keep) -> None:
    """dst = new where the step is kept, else dst unchanged (no host sync)."""
    dst.copy_(torch.where(keep, new.to(dst.dtype), dst))


def adamw_step_(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None, *,
                grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
                decoupled_weight_decay=True, amsgrad=False, maximize=False, zero_acc=True,
                trusted=False):
    if not trusted:  # (the wrapper's own flat buffers: it guarantees what these check)
        lr, beta1, beta2, eps, weight_decay, step = check_adamw_inputs(
            param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, grad_mult=grad_mult,
            found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, zero_acc=zero_acc)
    grad_mult = _scalar("grad_mult", grad_mult, param.device)
    keep = _keep_mask(_scalar("found_inf", found_inf, param.device), param.device)
    g = acc * grad_mult
    if maximize:
        g = -g
    p = param.float()
    new_p = p
    if weight_decay != 0:
        if decoupled_weight_decay:
            new_p = p * (1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)  # (torch's form: one multiply-add on CPU/CUDA)
    m = exp_avg.lerp(g, 1 - beta1)
    v = (exp_avg_sq * beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if amsgrad:
        vmax = torch.maximum(max_exp_avg_sq, v)
        denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
        _commit(max_exp_avg_sq, vmax, keep)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    new_p = new_p.addcdiv(m, denom, value=-(lr / bias_correction1))
    _commit(exp_avg, m, keep)
    _commit(exp_avg_sq, v, keep)
    _commit(param, new_p, keep)
    if model_out is not None:
        _commit(model_out, new_p, keep)
    if zero_acc:
        acc.zero_()


def sgd_step_(param, acc, momentum_buffer=None, model_out=None, *, grad_mult, found_inf,
              lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
              zero_acc=True, trusted=False):
    if not trusted:
        lr, momentum, dampening, weight_decay = check_sgd_inputs(
            param, acc, momentum_buffer, model_out, grad_mult=grad_mult, found_inf=found_inf,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=first_step, zero_acc=zero_acc)
    grad_mult = _scalar("grad_mult", grad_mult, param.device)
    keep = _keep_mask(_scalar("found_inf", found_inf, param.device), param.device)
    g = acc * grad_mult
    if maximize:
        g = -g
    p = param.float()
    # torch.optim.SGD's own forms: add(..., alpha=) is one multiply-add on CPU and CUDA
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = g if first_step else (momentum_buffer * momentum).add_(g, alpha=1 - dampening)
        _commit(momentum_buffer, buf, keep)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    new_p = p.add(g, alpha=-lr)
    _commit(param, new_p, keep)
    if model_out is not None:
        _commit(model_out, new_p, keep)
    if zero_acc:
        acc.zero_()
