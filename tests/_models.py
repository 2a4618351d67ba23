"""Shared helpers for the black-box tests of ``fusedaccum.FusedAccumulator``.

Tiny seeded models and data, a plain-torch reference that trains on the equivalent
big batch, a plain-torch emulation of fp16/bf16 params with fp32 master weights, and
comparison helpers. Nothing here looks inside the wrapper: it only uses the public
contract of DESIGN.md sections 1-3.
"""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKEND = os.environ.get("FUSEDACCUM_TEST_BACKEND", "reference")


def _backend_runs_on(dev: str) -> bool:
    from fusedaccum import ops

    return BACKEND in ("auto", "reference") or ops.unavailable_reason(BACKEND, dev) is None


# the devices BACKEND runs on (e.g. backend "cuda" only on "cuda"); the first is the default
DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if _backend_runs_on(d)] or ["cpu"]
DEFAULT_DEVICE = DEVICES[0]
HALF_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = math.inf
NAN = math.nan

# fp32 params trained by the wrapper vs plain torch: only summation order differs.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
# masters of half params vs the plain-torch emulation (fp32 math, same half grads).
MASTER_TOL = dict(rtol=1e-5, atol=1e-6)
# ... and clipped over several windows: the clip coefficient comes from a norm summed in
# another order (1 ulp apart), which can round a half weight the other way and with it
# change later gradients (an H100, cuda backend, fp16 SGD with momentum: 1 element of 27
# off by 2.3e-5 relative, the same in every run).
MASTER_TOL_CLIPPED = dict(rtol=1e-4, atol=1e-5)
# the half params themselves (one rounding of a master that may differ in the last bit).
HALF_TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float32: FP32_TOL,
}
# resuming from a state dict repeats exactly the same operations.
RESUME_TOL = dict(rtol=1e-6, atol=1e-8)

IN, HID, OUT = 4, 6, 3


def wrap(inner, **kwargs):
    """``fusedaccum.FusedAccumulator(inner, backend=BACKEND, **kwargs)``."""
    import fusedaccum

    kwargs.setdefault("backend", BACKEND)
    return fusedaccum.FusedAccumulator(inner, **kwargs)


# ----------------------------------------------------------------------------- models


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FailInBackward(torch.autograd.Function):
    """The identity, whose backward raises out of memory while armed: autograd has then
    handed the layers after it their gradients, and not the layers before it."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if FailInBackward.armed:
            raise torch.OutOfMemoryError("out of memory (injected)")
        return g


class FailsMidBackward(TinyMLP):
    """TinyMLP whose backward fails between fc2 and fc1 while FailInBackward is armed."""

    def forward(self, x):
        return self.fc2(FailInBackward.apply(torch.tanh(self.fc1(x))))


def backward_failing_part_way(loss) -> None:
    """``loss.backward()`` of a FailsMidBackward with FailInBackward armed: it must raise
    torch.OutOfMemoryError once fc2 has its gradients and fc1 not."""
    FailInBackward.armed = True
    try:
        loss.backward()
    except torch.OutOfMemoryError:
        return
    finally:
        FailInBackward.armed = False
    raise AssertionError("the backward did not fail")


class ChannelsLast(nn.Module):
    """A conv net in channels_last (torch's memory format for fast convolutions) and a
    transposed matrix: params that are dense but not row-major."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(IN, 27)
        self.conv = nn.Conv2d(3, 4, 2)
        self.out_t = nn.Parameter(torch.randn(OUT, 16).t() * 0.25)  # strides (1, 16)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).view(-1, 3, 3, 3).contiguous(
            memory_format=torch.channels_last)
        return torch.tanh(self.conv(h)).flatten(1) @ self.out_t


def _seeded(seed, ctor):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ctor()


def make_model(seed=0, dtype=torch.float32, device=DEFAULT_DEVICE, cls=TinyMLP):
    """A fresh seeded model; two calls with the same arguments give equal params."""
    return _seeded(seed, cls).to(device=device, dtype=dtype)


def make_batches(n, batch=4, *, seed=1, dtype=torch.float32, device=DEFAULT_DEVICE, sizes=None,
                 x_scale=1.0, y_scale=1.0):
    """``n`` seeded micro-batches ``(x, y)``; ``sizes`` gives each one's row count."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = sizes[i] if sizes is not None else batch
        x = torch.randn(rows, IN, generator=g) * x_scale
        y = torch.randn(rows, OUT, generator=g) * y_scale
        out.append((x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)))
    return out


def make_windows(n_windows, k, batch=4, *, seed=1, **kwargs):
    """``n_windows`` lists of ``k`` micro-batches each (all different data)."""
    flat = make_batches(n_windows * k, batch, seed=seed, **kwargs)
    return [flat[w * k:(w + 1) * k] for w in range(n_windows)]


def mse(out, y):
    """Mean over all items (the micro-batch loss of the managed loop)."""
    return F.mse_loss(out, y)


def sum_loss(out, y):
    """Sum over all items (token-weighted windows)."""
    return ((out - y) ** 2).sum()


# ------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "sgd_nesterov": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "sgd_maximize": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, maximize=True,
                                                weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adam_maximize": lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True, weight_decay=0.01),
    # (Adam's own switch to AdamW's decay: a group key AdamW's groups do not have)
    "adam_decoupled": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1,
                                                  decoupled_weight_decay=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(
        ps, lr=1e-2, momentum=0.5, centered=True, weight_decay=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, weight_decay=0.01,
                                              initial_accumulator_value=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=0.01),
    # the rest of torch.optim, on the generic path: state that is not shaped like the
    # params (Adafactor's row and column factors, ASGD's and NAdam's scalars)
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.01,
                                          decoupled_weight_decay=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.01),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=0.01),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-2),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=1e-2, t0=1),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


def adamw(ps):
    return OPTIMIZERS["adamw"](ps)


# -------------------------------------------------------------------------- reference


def group_tensors(opt):
    """The tensors an optimizer steps, in param-group order."""
    return [p for g in opt.param_groups for p in g["params"]]


def big_batch_update(model, opt, window, *, loss_fn=mse, num_items=None, max_grad_norm=None,
                     norm_type=2.0):
    """One plain-torch update on ``window``'s micro-batches concatenated into one batch.

    The loss is ``loss_fn`` over the big batch (a mean), or ``loss_fn(...) / num_items``
    when ``num_items`` is given (``loss_fn`` then sums). Clipping covers the optimizer's
    params only. Returns the total norm of the gradient before clipping.
    """
    x = torch.cat([x for x, _ in window])
    y = torch.cat([y for _, y in window])
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    if num_items is not None:
        loss = loss / num_items
    loss.backward()
    params = [p for p in group_tensors(opt) if p.grad is not None]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach().clone()


def reference_big_batch(model, make_opt, windows, *, loss_fn=mse, num_items=None,
                        max_grad_norm=None, norm_type=2.0, make_sched=None):
    """Train plain-torch ``model`` (fp32) in place, one update per window on its big batch.

    Returns ``(optimizer, norms)``; ``norms[w]`` is window ``w``'s total gradient norm
    before clipping. The scheduler (if any) is stepped after every update.
    """
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched is not None else None
    norms = []
    for w, window in enumerate(windows):
        norms.append(big_batch_update(
            model, opt, window, loss_fn=loss_fn,
            num_items=None if num_items is None else num_items[w],
            max_grad_norm=max_grad_norm, norm_type=norm_type))
        if sched is not None:
            sched.step()
    return opt, norms


def run_managed(model, opt, windows, *, loss_fn=mse, num_items=None, sched=None,
                zero="opt", check_stepped=True):
    """The loop of DESIGN.md section 1: step() and zero_grad() after every micro-batch.

    Returns the wrapper's ``grad_norm`` after every applied update.
    """
    norms = []
    for w, window in enumerate(windows):
        for i, (x, y) in enumerate(window):
            loss = loss_fn(model(x), y)
            loss.backward()
            if num_items is None:
                opt.step()
            else:
                opt.step(num_items=num_items[w])
            if zero == "opt":
                opt.zero_grad()
            elif zero == "model":
                model.zero_grad()
            if check_stepped:
                assert opt.stepped == (i == len(window) - 1), (w, i, opt.stepped)
            if opt.stepped:
                norms.append(opt.grad_norm.detach().clone())
                if sched is not None:
                    sched.step()
    return norms


class MasterEmulation:
    """Plain torch: a half model whose update runs on fp32 master copies.

    ``backward(loss)`` runs autograd on the half model and adds every fresh half grad,
    upcast, into an fp32 accumulator (then drops ``p.grad``). ``step(D, ...)`` divides
    by ``D * loss_scale``, clips with ``clip_grad_norm_``, runs the plain optimizer on
    the masters and rounds them back into the half params. With ``master_weights=False``
    the masters are re-read from the half params before every update (fp32 math, one
    rounding, no master kept between updates).
    """

    def __init__(self, model, make_opt, *, master_weights=True):
        self.model = model
        self.params = list(model.parameters())
        self.masters = [p.detach().float().clone() for p in self.params]
        self.opt = make_opt(self.masters)
        self.acc = [torch.zeros_like(m) for m in self.masters]
        self.got = [False] * len(self.params)
        self.master_weights = master_weights

    def backward(self, loss):
        loss.backward()
        self.take_grads()

    def take_grads(self):
        """Add the half grads a backward left in ``p.grad`` to the accumulators."""
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.acc[i] += p.grad.float()
                self.got[i] = True
                p.grad = None

    def prepare(self, divisor=1.0, loss_scale=1.0):
        """Give every master that got a gradient ``.grad = acc / (divisor * loss_scale)``."""
        if not self.master_weights:
            for m, p in zip(self.masters, self.params):
                m.copy_(p.detach().float())
        for m, a, got in zip(self.masters, self.acc, self.got):
            m.grad = a / (divisor * loss_scale) if got else None
        return [m for m in self.masters if m.grad is not None]

    def finish(self):
        """Round the masters into the half params and start a new window."""
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
        for i, (m, a) in enumerate(zip(self.masters, self.acc)):
            a.zero_()
            m.grad = None
            self.got[i] = False

    def step(self, divisor, *, max_grad_norm=None, norm_type=2.0, loss_scale=1.0):
        """End the window; returns ``(norm before clipping, applied)``."""
        live = self.prepare(divisor, loss_scale)
        grads = [m.grad for m in live]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        norm = torch.nn.utils.get_total_norm(grads, norm_type)
        if finite:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(live, max_grad_norm, norm_type)
            self.opt.step()
        self.finish()
        return norm.detach().clone(), finite


def run_with_emulation(model, opt, emu, windows, **step_kwargs):
    """The managed loop (step() and zero_grad() every micro-batch) for the wrapper, and the
    same micro-batches for the master emulation ``emu``, which ends each window with
    ``emu.step(k, **step_kwargs)``."""
    for window in windows:
        for x, y in window:
            mse(model(x), y).backward()
            emu.backward(mse(emu.model(x), y))
            opt.step()
            opt.zero_grad()
        emu.step(len(window), **step_kwargs)


# ------------------------------------------------------------------------- comparison


def assert_params_close(got, want, **tol):
    """Params of two models (or two lists of tensors), compared in fp32."""
    a = list(got.parameters()) if isinstance(got, nn.Module) else list(got)
    b = list(want.parameters()) if isinstance(want, nn.Module) else list(want)
    assert len(a) == len(b)
    tol = tol or FP32_TOL
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, (i, x.shape, y.shape)
        torch.testing.assert_close(x.detach().float(), y.detach().float(), **tol,
                                   msg=lambda m, i=i: f"param {i}: {m}")


def _norm_state(state):
    return {k: v for k, v in state.items() if v is not None}


def state_list(opt):
    """Per stepped tensor (group order) its optimizer state, without ``None`` entries."""
    return [_norm_state(opt.state.get(p, {})) for p in group_tensors(opt)]


def assert_states_close(got_opt, want_opt, check_dtype=True, **tol):
    """Optimizer states matched by position; step counts compared exactly."""
    tol = tol or FP32_TOL
    a, b = state_list(got_opt), state_list(want_opt)
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), (i, sorted(sa), sorted(sb))
        for key in sb:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb), (i, key, va, vb)
            elif isinstance(vb, torch.Tensor):
                assert isinstance(va, torch.Tensor), (i, key, type(va))
                if check_dtype:
                    assert va.dtype == vb.dtype, (i, key, va.dtype, vb.dtype)
                torch.testing.assert_close(va.detach().float(), vb.detach().float(), **tol,
                                           msg=lambda m, i=i, key=key: f"state {i}.{key}: {m}")
            else:
                assert va == vb, (i, key, va, vb)


def snapshot(model, opt):
    """Clones of everything a skipped or failed step must leave alone."""
    params = [p.detach().clone() for p in model.parameters()]
    stepped = [p.detach().clone() for p in group_tensors(opt)]
    state = [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
              for k, v in s.items()} for s in state_list(opt)]
    return params, stepped, state


def assert_unchanged(snap, model, opt):
    params, stepped, state = snap
    for i, (p, q) in enumerate(zip(model.parameters(), params)):
        assert torch.equal(p.detach(), q), f"model param {i} changed"
    for i, (p, q) in enumerate(zip(group_tensors(opt), stepped)):
        assert torch.equal(p.detach(), q), f"stepped (master) tensor {i} changed"
    now = state_list(opt)
    assert len(now) == len(state)
    for i, (sa, sb) in enumerate(zip(now, state)):
        assert sa.keys() == sb.keys(), (i, sorted(sa), sorted(sb))
        for k in sb:
            if isinstance(sb[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), f"state {i}.{k} changed"
            else:
                assert sa[k] == sb[k], f"state {i}.{k} changed"


def main_grad_is_clear(p):
    """After a boundary that discarded the window: no stale gradient left in it."""
    mg = getattr(p, "main_grad", None)
    return mg is None or int(torch.count_nonzero(mg)) == 0


def poison(value, index=0):
    """A tensor hook that puts ``value`` (inf/NaN) into one element of the gradient."""
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[index] = value
        return grad
    return hook


def as_float(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)
