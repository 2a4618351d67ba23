"""Randomized differential test: the wrapper against plain torch on random training runs.

Each seed draws a run: the param dtype, fp32 masters or none (``master_weights=False``),
the inner optimizer (fused path and generic), one or two param groups, an LR scheduler,
the window length (fixed or a callable), clipping, the norm (2 or inf), a static or
dynamic loss scale, token-weighted windows (``num_items``), which of a model's branches
each micro-batch reaches (so params miss micro-batches and whole windows), a user's
gradient hook, ``torch.autograd.grad`` calls beside the window, how ``.grad`` is cleared
between micro-batches (also ``set_to_none=False``), windows poisoned with inf, dropped
windows (``reset_accumulation``), a resume from a state dict (mid-window or after an
update), the batching limits of the hooks and the C++ hook on or off. The same
micro-batches train the plain-torch emulation of tests/_models.py (fp32 masters of the half
params, ``clip_grad_norm_``, the torch optimizer and scheduler), its loss scaled as torch's
GradScaler would.

Checked after every backward: ``p.main_grad`` is the window's sum so far, exactly; before
each one the loss scale. After every window: ``opt.stepped``, ``skipped_steps``,
``grad_norm``, the stepped fp32 tensors, the model's params and every optimizer state
entry. The emulation then takes the wrapper's values (lockstep), so each window is
compared from the same start and one window's rounding does not grow into the next.
Each element may differ by one window's rounding (MASTER_TOL) plus how far the emulation's
update moves when every gradient element changes by 2^-20 of the magnitude of the terms it
sums, or by the two clip norms' relative difference if larger (``_sensitivity``): the
wrapper's gradient is the emulation's up to a few ulps of that, and an update that
amplifies them (a gradient nearly cancelling an L2 decay term, then normalized by RMSprop)
is told apart from a wrong one. One seed in five has a wider model (``_WIDTHS``), one
half model in five keeps a layer in fp32 (``fp32_head``), and one run in five with masters
has a step pre-hook on its torch optimizer that rewrites ``.grad`` (``_INNER_HOOKS``: every
one scaled out of place, or the first set to None).

The same runs through torch.amp.GradScaler's accumulation loop (accumulation_steps=1,
the user's boundaries) are compared with GradScaler on the emulation (half as many seeds).
The same runs on 2 Gloo ranks, with and without ZeRO-1, are compared with the
emulation trained on every rank's micro-batches (``FUSEDACCUM_FUZZ_DP_SEEDS``, default
10: about 10 s).

``FUSEDACCUM_FUZZ_SEEDS`` sets the number of seeds, ``FUSEDACCUM_FUZZ_FIRST`` the first one
(the defaults, the whole file: about 10 s on the 2-core CPU, 30 s with the Triton
interpreter).
"""

from __future__ import annotations

import copy
import math
import os
import random

import pytest
import torch
import torch.nn as nn
from _models import (
    HALF_TOL,
    MASTER_TOL,
    OPTIMIZERS,
    MasterEmulation,
    _backend_runs_on,
    group_tensors,
    mse,
    sum_loss,
    wrap,
)

from fusedaccum import accumulator

SEEDS = int(os.environ.get("FUSEDACCUM_FUZZ_SEEDS", "40"))
FIRST = int(os.environ.get("FUSEDACCUM_FUZZ_FIRST", "0"))

# the fused path's optimizers, and one of the generic path (the rest: _GENERIC)
_OPTIMIZERS = ["adamw", "adam", "adam_amsgrad", "adam_maximize", "sgd", "sgd_momentum",
               "sgd_nesterov", "sgd_maximize", "rmsprop"]
# the other torch optimizers, drawn from the extra stream (Run)
_GENERIC = ["adagrad", "adamax", "nadam", "radam", "adadelta", "rprop", "asgd", "adafactor"]
# the model's width: 6, or in some seeds wider, so that the kernels' tensors span many
# blocks, vector lanes and threads (the trunk: 67^2 = 4489 and 300^2 = 90000 elements)
_WIDTHS = [6] * 8 + [67, 300]


class Branches(nn.Module):
    """A trunk and three heads: each micro-batch's loss goes through a chosen subset."""

    def __init__(self, width: int):
        super().__init__()
        self.trunk = nn.Linear(width, width)
        self.heads = nn.ModuleList([nn.Linear(width, 3), nn.Linear(width, 3, bias=False),
                                    nn.Linear(width, 3)])

    def forward(self, x, trunk: bool, heads: list[int]):
        h = torch.tanh(self.trunk(x)) if trunk else x
        # (a head kept in fp32 in a half model: its input and output cast, as autocast would)
        return sum(self.heads[i](h.to(self.heads[i].weight.dtype)).to(x.dtype)
                   for i in heads)


def _model(run, device, seed):
    torch.manual_seed(1000 + seed)
    model = Branches(run.width).to(device=device, dtype=run.dtype)
    if run.fp32_head:  # (a half model with one fp32 layer, as norms often stay)
        model.heads[2].float()
    if run.grad_hook:  # a user's tensor hook that changes the gradient (before wrapping)
        model.heads[0].weight.register_hook(lambda g: g * 0.5)
    return model


def _copy_of(model, run, device, seed):
    m = _model(run, device, seed)
    m.load_state_dict(model.state_dict())
    return m


class _Emulation(MasterEmulation):
    """The master emulation, also summing each accumulator's terms' magnitudes (``mag``):
    what an fp32 sum of them may be off by in another order scales with that, not with the
    sum (the data-parallel runs sum the ranks' windows in another order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mag = [torch.zeros_like(a) for a in self.acc]

    def take_grads(self):
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.mag[i] += p.grad.float().abs()
        super().take_grads()

    def drop(self):
        """reset_accumulation() on the emulation: its partial window forgotten."""
        for a, m in zip(self.acc, self.mag):
            a.zero_()
            m.zero_()
        self.got = [False] * len(self.got)

    def finish(self):
        super().finish()
        for m in self.mag:
            m.zero_()


class Run:
    """One seed's draws."""

    def __init__(self, seed: int):
        r = random.Random(seed)
        self.r = r
        self.dtype = r.choice([torch.float32, torch.bfloat16, torch.float16])
        self.opt_name = r.choice(_OPTIMIZERS)
        self.ks = [r.randint(1, 4) for _ in range(r.choice([1, 3]))]  # 1: a fixed k
        self.windows = r.randint(2, 4)
        self.max_grad_norm = r.choice([None, None, 0.05, 1.0])
        self.loss_scale = r.choice([None, None, 128.0, "dynamic"])
        # no fp32 masters for half params: updated in place (fp32 math)
        self.master_weights = False if self.dtype != torch.float32 and r.random() < 0.25 \
            else None
        self.groups = r.random() < 0.5  # the heads 1 and 2 in a second group, own lr and wd
        self.scheduler = r.random() < 0.3  # StepLR, stepped after every applied update
        self.grad_hook = r.random() < 0.2
        self.token_weighted = r.random() < 0.3
        self.batch_max_numel = r.choice([None, 16])  # 16: larger params go one at a time
        self.flush_bytes = r.choice([None, 64])  # 64: batches flushed inside backward
        self.resume_at = r.randrange(self.windows) if r.random() < 0.3 else None
        self.cxx_hooks = r.random() < 0.75  # the C++ hook where it runs, or Python's only
        # (drawn from a stream of their own, so that the draws above and the micro-batches
        # each seed gives stay as they were)
        extra = random.Random(f"{seed}/extra")
        self.norm_type = extra.choice([2.0, 2.0, math.inf])
        if extra.random() < 0.2:
            self.opt_name = extra.choice(["adamw_amsgrad", "adam_decoupled"])
        elif extra.random() < 0.15:  # the rest of torch.optim, on the generic path
            self.opt_name = extra.choice(_GENERIC)
        self.width = random.Random(f"{seed}/width").choice(_WIDTHS)
        self.fp32_head = self.dtype != torch.float32 and \
            random.Random(f"{seed}/fp32_head").random() < 0.2
        # an inner optimizer step pre-hook that rewrites .grad (_INNER_HOOKS); its hooks see
        # no .grad on half params without masters (docs/usage.md), so not there
        self.inner_hook = random.Random(f"{seed}/inner_hook").choice(
            [None] * 8 + sorted(_INNER_HOOKS)) if self.master_weights is None else None

    def k(self, w: int) -> int:
        return self.ks[w % len(self.ks)]

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if k != "r")


def _micro_batch(r: random.Random, run: Run, device, poisoned: bool):
    dtype, width = run.dtype, run.width
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(r.randrange(1 << 30)))
    y = torch.randn(3, 3, generator=torch.Generator().manual_seed(r.randrange(1 << 30)))
    if poisoned:
        x[r.randrange(3), r.randrange(width)] = float("inf")
    heads = r.sample(range(3), r.randint(1, 3))
    return x.to(device, dtype), y.to(device, dtype), r.random() < 0.75, heads


def _scale_grads(o, args, kwargs):
    """A user's gradient transform in a step pre-hook: every .grad replaced out of place."""
    for group in o.param_groups:
        for t in group["params"]:
            if t.grad is not None:
                t.grad = t.grad * 0.75


def _drop_first_grad(o, args, kwargs):
    """A step pre-hook that leaves the first param with a .grad out of the update."""
    t = next((t for group in o.param_groups for t in group["params"] if t.grad is not None),
             None)
    if t is not None:
        t.grad = None


_INNER_HOOKS = {"scale_grads": _scale_grads, "drop_first_grad": _drop_first_grad}


def _inner(run: Run, params):
    """The run's torch optimizer over ``params`` (the model's order): one group, or the
    last four tensors (heads 1 and 2) in a second group with their own lr and no weight
    decay; with the run's step pre-hook, if any (stateless: the probe re-runs updates)."""
    params = list(params)
    if not run.groups:
        opt = OPTIMIZERS[run.opt_name](params)
    else:
        opt = OPTIMIZERS[run.opt_name]([{"params": params[:-4]},
                                        {"params": params[-4:], "weight_decay": 0.0}])
        opt.param_groups[1]["lr"] *= 0.5
    if run.inner_hook is not None:
        opt.register_step_pre_hook(_INNER_HOOKS[run.inner_hook])
    return opt


def _wrapper(run: Run, model, **kwargs):
    k = run.ks[0] if len(run.ks) == 1 else run.k
    return wrap(_inner(run, model.parameters()), accumulation_steps=k,
                max_grad_norm=run.max_grad_norm, norm_type=run.norm_type,
                loss_scale=run.loss_scale,
                master_weights=run.master_weights, **kwargs)


def _scheduler(run: Run, opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if run.scheduler \
        else None


def _local_view(run: Run, opt):
    """Per param: the wrapper's fp32 tensor it steps (None where that is the half param
    itself: master_weights=False) and that tensor's optimizer state."""
    stepped = group_tensors(opt)
    masters = stepped if run.master_weights is None else [None] * len(stepped)
    return masters, [opt.state.get(t, {}) for t in stepped]


def _assert_close(got, want, tol: dict, spread, where: str) -> None:
    """``assert_close(got, want, **tol)`` in fp32, each element also allowed its
    ``spread`` (the emulation's sensitivity there: _sensitivity; None: none)."""
    got, want = got.detach().float(), want.detach().float()
    if spread is None:
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{where}: {m}")
        return
    assert got.shape == want.shape, (where, got.shape, want.shape)
    allowed = tol["atol"] + tol["rtol"] * want.abs() + spread
    excess = ((got - want).abs() - allowed).nan_to_num(math.inf)  # (NaN: never close)
    if excess.numel() and bool((excess > 0).any()):
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{where}: {int((excess > 0).sum())} of {want.numel()} elements differ by more "
            f"than atol + rtol * |want| + the emulation's spread; the worst, flat index {i}: "
            f"got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}, allowed "
            f"{allowed.flatten()[i].item():.3g} (spread {spread.flatten()[i].item():.3g})")


def _check_window(run: Run, model, opt, emu, applied: bool, norm, w: int, fresh: bool,
                  masters, states, spread=None):
    """One window's outcome against the emulation's. ``masters``/``states``: per param the
    wrapper's stepped fp32 tensor (None: not compared) and its state entries. ``fresh``:
    ``opt`` was made after the window's update (its step() made none). ``spread``: the
    emulation's sensitivity (_sensitivity), added to the tolerance element by element."""
    where = f"window {w}"
    if not fresh:
        assert opt.stepped == applied, where
        if applied:
            torch.testing.assert_close(opt.grad_norm.float().cpu(), norm.float().cpu(),
                                       rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{where} grad_norm: {m}")
        else:
            assert not torch.isfinite(opt.grad_norm).all(), (where, opt.grad_norm)
    # (one window's rounding, clipped or not: what the update's conditioning adds to it is
    # in the spread. None: a skipped window, which leaves both sides as they were)
    tol = MASTER_TOL
    if spread is None:
        spread = [(None, {}, None)] * len(emu.masters)
    assert len(masters) == len(states) == len(emu.masters) == len(spread)
    for i, (a, sa, b, (sm, ss, _)) in enumerate(zip(masters, states, emu.masters, spread)):
        if a is not None:
            assert a.dtype == torch.float32, (where, i, a.dtype)
            _assert_close(a, b, tol, sm, f"{where}, stepped tensor {i}")
        sa = {key: v for key, v in sa.items() if v is not None}
        sb = {key: v for key, v in emu.opt.state.get(b, {}).items() if v is not None}
        assert sa.keys() == sb.keys(), (where, i, sorted(sa), sorted(sb))
        for key, vb in sb.items():
            va = sa[key]
            if key == "step":
                assert float(va) == float(vb), (where, i, va, vb)
            elif isinstance(vb, torch.Tensor):
                _assert_close(va, vb, tol, ss.get(key), f"{where}, state {i}.{key}")
    # (fp32 params are the stepped tensors: the same tolerance)
    for i, (p, q, (_, _, sp)) in enumerate(zip(model.parameters(), emu.model.parameters(),
                                               spread)):
        param_tol = tol if p.dtype == torch.float32 else HALF_TOL[p.dtype]
        _assert_close(p, q, param_tol, sp, f"{where}, model param {i}")


@torch.no_grad()
def _lockstep(model, emu, masters, states):
    """The emulation goes on from the wrapper's values (as _check_window takes them)."""
    for p, a, sa, b in zip(model.parameters(), masters, states, emu.masters):
        b.copy_(a if a is not None else p)
        for key, vb in emu.opt.state.get(b, {}).items():
            if isinstance(vb, torch.Tensor) and isinstance(sa.get(key), torch.Tensor):
                vb.copy_(sa[key])
    for p, q in zip(model.parameters(), emu.model.parameters()):
        q.copy_(p)


def _resume(run: Run, model, opt, sched, device, seed, **kwargs):
    """A new model, wrapper and scheduler from the state dicts a training script saves
    (the wrapper's: with the partial window, mid-window)."""
    saved = opt.state_dict()
    model = _copy_of(model, run, device, seed)
    opt = _wrapper(run, model, **kwargs)
    opt.load_state_dict(saved)
    if sched is not None:
        sched_state = sched.state_dict()
        sched = _scheduler(run, opt)
        sched.load_state_dict(sched_state)
    return model, opt, sched


# The change of every gradient element by which the emulation's update is probed, relative
# to the magnitude of the terms it sums (_Emulation.mag, scaled as the gradient is). The
# wrapper's gradient is the emulation's up to a few ulps of that (2^-24 each: 1/(D*scale)
# applied as a product, a clip coefficient from a norm summed in another order, the ranks'
# windows summed in another order): 2^-20 covers 16. Clipped windows add the difference of
# the two norms the clip coefficients come from (_probe_size).
_PROBE = 2.0 ** -20


def _probe_size(run: Run, got_norm, want_norm) -> float:
    """_PROBE, or where the window is clipped twice the relative difference of the
    wrapper's norm ``got_norm`` (None: not known) and the emulation's ``want_norm``, if that
    is larger: the clipped gradients differ by as much. (_check_window checks the norms
    within 1e-5 of each other; over 90000 elements they were 2.2e-6 apart, the sums of
    squares taken in another order.)"""
    if run.max_grad_norm is None or got_norm is None:
        return _PROBE
    got, want = float(got_norm), float(want_norm)
    if not (math.isfinite(got) and math.isfinite(want) and want > 0):
        return _PROBE
    return max(_PROBE, 2 * abs(got - want) / want)


def _emulated_norm(emu, divisor, scale: float, norm_type):
    """The norm the emulation's step() is about to clip with (as it computes it)."""
    return torch.nn.utils.get_total_norm(
        [a / (divisor * scale) for a, got in zip(emu.acc, emu.got) if got], norm_type)


def _emulated_outcome(emu) -> list:
    """Per param: its master, its optimizer state's tensors and the half param, cloned."""
    return [(m.detach().clone(),
             {key: v.detach().clone() for key, v in emu.opt.state.get(m, {}).items()
              if isinstance(v, torch.Tensor)},
             p.detach().clone())
            for m, p in zip(emu.masters, emu.params)]


@torch.no_grad()
def _sensitivity(emu, end_window, size: float = _PROBE) -> list | None:
    """How far the emulation's update moves each element when every gradient element the
    optimizer reads changes by ``size`` times its terms' magnitude, either way (an
    ``_Emulation``: the gradients are its accumulators times one factor): per param, (master,
    {state key: tensor}, half param) of elementwise spreads. None where the window is
    skipped. ``end_window()`` ends the emulation's window and returns whether it updated.
    An ill-conditioned element (a gradient that nearly cancels an L2 weight-decay
    term, then normalized by RMSprop's or Adam's denominator: fuzz seeds 20845, 26003,
    612538) turns the wrapper's one-ulp gradient difference into 1e-4 relative; its spread
    says so, and a well-conditioned element's spread is ~1e-6 of its update. The
    emulation's masters, state, accumulators and half params are put back after each
    probe."""
    def copied(st: dict) -> dict:
        return {key: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for key, v in st.items()}

    saved = ([a.clone() for a in emu.acc + emu.mag], list(emu.got),
             [(m.detach().clone(), p.detach().clone()) for m, p in zip(emu.masters, emu.params)],
             {m: copied(st) for m, st in emu.opt.state.items()})
    outcomes = []
    for sign in (1.0, -1.0):
        def perturb(opt, args, kwargs, sign=sign):
            for m, a, mag in zip(emu.masters, emu.acc, emu.mag):
                if m.grad is not None:
                    norm = float(a.norm())  # (grad = acc * (1 / (D * scale), clipped))
                    mult = float(m.grad.norm()) / norm if norm > 0 else 0.0
                    m.grad.add_(mag, alpha=sign * size * mult)

        handle = emu.opt.register_step_pre_hook(perturb)
        try:
            applied = end_window()
            outcomes.append(_emulated_outcome(emu))
        finally:
            handle.remove()
            acc, got, values, state = saved
            for a, b in zip(emu.acc + emu.mag, acc):
                a.copy_(b)
            emu.got = list(got)
            emu.opt.state.clear()
            for m, st in state.items():
                emu.opt.state[m] = copied(st)
            for m, p, (m0, p0) in zip(emu.masters, emu.params, values):
                m.copy_(m0)
                m.grad = None
                p.copy_(p0)
        if not applied:
            return None
    plus, minus = outcomes
    return [((ma - mb).abs(), {key: (sa[key] - sb[key]).abs() for key in sa},
             (pa.float() - pb.float()).abs())
            for (ma, sa, pa), (mb, sb, pb) in zip(plus, minus)]


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "rmsprop", "adam"])
def test_the_sensitivity_probe_leaves_the_emulation_as_it_was(opt_name):
    """_sensitivity widens the fuzz's tolerance, so it is tested itself: the emulation's
    update after a probe is bitwise the one without it (masters, state, half params), and
    SGD's momentum buffer, linear in the gradient (buf = 0.9 buf + 0.7 g in the second
    window), spreads by 0.7 * 2 * _PROBE * mag * (the clip coefficient / D)."""
    run = Run(0)
    run.dtype, run.opt_name, run.max_grad_norm, run.groups = \
        torch.bfloat16, opt_name, 0.05, False
    run.width = 6
    emus = []
    for _ in range(2):
        model = _model(run, "cpu", 0)
        emu = _Emulation(model, lambda ps: _inner(run, ps))
        for w in range(2):  # (the second window has optimizer state to put back)
            for i in range(3):
                x, y, trunk, heads = _micro_batch(random.Random(f"{w}/{i}"), run, "cpu",
                                                  False)
                emu.backward(mse(model(x, trunk, heads), y))
            grads, mags = [a / 3 for a in emu.acc], [m.clone() for m in emu.mag]
            spread = _sensitivity(emu, lambda emu=emu: emu.step(
                3, max_grad_norm=run.max_grad_norm)[1]) if emus else None
            emu.step(3, max_grad_norm=run.max_grad_norm)
        emus.append((emu, spread))
    (plain, _), (probed, spread) = emus
    for a, b in zip(_emulated_outcome(probed), _emulated_outcome(plain)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
        torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert spread is not None and len(spread) == len(grads)
    if opt_name == "sgd_momentum":
        coef = min(1.0, run.max_grad_norm / (float(torch.cat([g.flatten() for g in grads])
                                                      .norm()) + 1e-6))
        assert coef < 1  # (clipped: the probe comes after clipping)
        for (_, ss, _), mag, g, m in zip(spread, mags, grads, plain.masters):
            want = 0.7 * 2 * _PROBE * mag * coef / 3
            buf = plain.opt.state[m]["momentum_buffer"]
            # (each probe rounds g + 0.01 p, its 0.7 times and the buffer to fp32: up to
            # half an ulp of each)
            slack = 0.01 * want + torch.finfo(torch.float32).eps * (
                buf.abs() + 2 * (coef * g + 0.01 * m).abs())
            assert bool(((ss["momentum_buffer"] - want).abs() <= slack).all()), \
                (ss["momentum_buffer"], want)
            assert bool((want > 4 * slack).any())  # (the check sees the probe's size)
    else:  # (Adam's update barely moves when every g scales alike; its moments do)
        for _, ss, _ in spread:
            assert ss.keys() - {"step"}
            assert all(bool((st > 0).any()) for key, st in ss.items() if key != "step")


def _end_emulated_window(run: Run, emu, emu_sched, divisor, scale: float, got_norm):
    """The emulation's update (or skip): (norm, applied, the loss scale after it, the
    update's sensitivity: _sensitivity). ``got_norm``: the wrapper's norm of the window
    (None: not known)."""
    def end_window():
        return emu.step(divisor, max_grad_norm=run.max_grad_norm, norm_type=run.norm_type,
                        loss_scale=scale)

    size = _probe_size(run, got_norm, _emulated_norm(emu, divisor, scale, run.norm_type))
    spread = _sensitivity(emu, lambda: end_window()[1], size)
    norm, applied = end_window()
    if applied and emu_sched is not None:
        emu_sched.step()
    if not applied and run.loss_scale == "dynamic":  # (GradScaler's backoff)
        scale /= 2
    return norm, applied, scale, spread


def _check_main_grads(model, emu, where):
    for i, (p, acc) in enumerate(zip(model.parameters(), emu.acc)):
        mg = p.main_grad
        # (one order of fp32 additions of the same gradients on both sides: exact)
        torch.testing.assert_close(mg, acc, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, i=i: f"{where}, main_grad {i}: {m}")


def _hook_settings(run: Run, monkeypatch) -> None:
    """The run's batching limits and hook (read when a wrapper installs its hooks)."""
    if run.batch_max_numel is not None:
        monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", run.batch_max_numel)
    if run.flush_bytes is not None:
        monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES_CPU", run.flush_bytes)
        monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", run.flush_bytes)
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if run.cxx_hooks else "0")


@pytest.mark.filterwarnings("ignore:fusedaccum. non-finite gradients:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # NumPy
@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS))
def test_random_run_matches_plain_torch(seed, device, monkeypatch):
    run = Run(seed)
    r = run.r
    _hook_settings(run, monkeypatch)
    model = _model(run, device, seed)
    emu = _Emulation(_copy_of(model, run, device, seed),
                          lambda ps: _inner(run, ps),
                          master_weights=run.master_weights is None)
    opt = _wrapper(run, model)
    sched, emu_sched = _scheduler(run, opt), _scheduler(run, emu.opt)
    # torch GradScaler's policy: 2^16, halved on a skipped window (2000 clean ones to
    # double it are more than a run has)
    scale = {None: 1.0, "dynamic": 2.0 ** 16}.get(run.loss_scale, run.loss_scale)
    skipped = 0
    for w in range(run.windows):
        k = run.k(w)
        poisoned = r.random() < 0.15
        items = r.randint(1, 12) if run.token_weighted else None
        reset_after = r.randrange(k) if r.random() < 0.1 else None
        # (after the window's last micro-batch: a state dict saved after the update)
        resume_after = r.randrange(k) if run.resume_at == w else None
        resumed = None
        i = 0
        while i < k:
            where = f"seed {seed} ({run.describe()}), window {w}, micro-batch {i}"
            x, y, trunk, heads = _micro_batch(r, run, device, poisoned and i == 0)
            loss_fn = sum_loss if run.token_weighted else mse
            loss = loss_fn(model(x, trunk, heads), y)
            assert float(opt.loss_scale) == scale, where
            # (scale_loss: the loss times a tensor, the same on both sides)
            scaled = opt.scale_loss(loss)
            if r.random() < 0.1:  # a gradient read beside the window (logging, penalties)
                torch.autograd.grad(scaled, list(model.parameters()), retain_graph=True,
                                    allow_unused=True)
            scaled.backward()
            emu.backward(opt.scale_loss(loss_fn(emu.model(x, trunk, heads), y)))
            _check_main_grads(model, emu, where)
            if reset_after == i:  # the partial window dropped, on both sides
                opt.reset_accumulation()
                emu.drop()
                reset_after, poisoned, i = None, False, 0
                continue
            opt.step(num_items=items)
            if i == k - 1:  # (the boundary: a resume below makes another wrapper)
                got_norm = opt.grad_norm.detach().clone()
            if opt.stepped and sched is not None:  # (DESIGN.md section 1's loop)
                sched.step()
            choice = r.randrange(4)
            if choice == 0:
                opt.zero_grad()
            elif choice == 1:
                model.zero_grad()
            elif choice == 2:
                # zeroes the fp32 params' .grad, the window's storage: drops their window
                # as in plain torch (they stay in the update, with what comes next); half
                # params hold no .grad then, nor any param after the window's update
                model.zero_grad(set_to_none=False)
                if i < k - 1:
                    for p, a, m in zip(model.parameters(), emu.acc, emu.mag):
                        if p.dtype == torch.float32:
                            a.zero_()
                            m.zero_()
            if resume_after == i:
                # resume from a state dict (mid-window: with the partial window it saved):
                # a new model, optimizer and wrapper
                model, opt, sched = _resume(run, model, opt, sched, device, seed)
                assert opt.micro_step == (i + 1) % k, where
                resume_after, resumed = None, i
            i += 1
        norm, applied, scale, spread = _end_emulated_window(
            run, emu, emu_sched, items if items is not None else k, scale, got_norm)
        skipped += not applied
        view = _local_view(run, opt)
        _check_window(run, model, opt, emu, applied, norm, w, resumed == k - 1, *view,
                      spread=spread)
        assert opt.skipped_steps == skipped
        _lockstep(model, emu, *view)


# ---------------------------------------------------------------- torch.amp.GradScaler


@pytest.mark.filterwarnings("ignore:fusedaccum. non-finite gradients:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # NumPy
@pytest.mark.parametrize("seed", range(FIRST, FIRST + SEEDS // 2))
def test_random_grad_scaler_runs_match_plain_torch(seed, device, monkeypatch):
    """The tutorial loop with torch.amp.GradScaler (DESIGN.md section 2, loss scaling): the
    wrapper with accumulation_steps=1, the user's loss divided by k, scaler.step(opt) and
    scaler.update() at the user's boundaries, scaler.unscale_(opt) and clip_grad_norm_ over
    the optimizer's tensors before it or the wrapper's max_grad_norm; against the same loop
    of GradScaler on the emulation's masters. The runs of the first test, without
    num_items, the wrapper's own loss scale, master_weights=False or resumes (a GradScaler
    has its own state dict). Both scalers start at 2^10 and grow every 3 clean steps."""
    run = Run(seed)
    r = run.r
    _hook_settings(run, monkeypatch)
    clip = r.choice(["user", "wrapper"]) if run.max_grad_norm is not None else None
    unscale = clip == "user" or r.random() < 0.3
    run.loss_scale = run.master_weights = None
    model = _model(run, device, seed)
    emu = _Emulation(_copy_of(model, run, device, seed), lambda ps: _inner(run, ps))
    opt = wrap(_inner(run, model.parameters()), norm_type=run.norm_type,
               max_grad_norm=run.max_grad_norm if clip == "wrapper" else None)
    sched, emu_sched = _scheduler(run, opt), _scheduler(run, emu.opt)
    scaler, emu_scaler = (torch.amp.GradScaler(device, init_scale=2.0 ** 10,
                                               growth_interval=3) for _ in range(2))
    for w in range(run.windows):
        k = run.k(w)
        poisoned = r.random() < 0.15
        for i in range(k):
            where = f"seed {seed} ({run.describe()}, clip={clip}), window {w}, micro-batch {i}"
            x, y, trunk, heads = _micro_batch(r, run, device, poisoned and i == 0)
            scaler.scale(mse(model(x, trunk, heads), y) / k).backward()
            emu.backward(emu_scaler.scale(mse(emu.model(x, trunk, heads), y) / k))
            _check_main_grads(model, emu, where)
            if i < k - 1 and r.random() < 0.5:  # (the window stays; not after the last)
                (opt if r.random() < 0.5 else model).zero_grad()
        before = scaler.get_scale()
        if unscale:
            scaler.unscale_(opt)
        if clip == "user":  # in place, on the window the wrapper then steps and measures
            torch.nn.utils.clip_grad_norm_(
                [t for g in opt.param_groups for t in g["params"]], run.max_grad_norm,
                run.norm_type)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

        def end_window(emu_scaler, before=before):
            """The same on the emulation: (norm, applied)."""
            live = emu.prepare()  # the masters' .grad: the scaled window, as the wrapper's
            emu_unscaled = unscale or clip is not None  # (clipping acts on the unscaled one)
            if emu_unscaled:
                emu_scaler.unscale_(emu.opt)
            if clip == "user":
                torch.nn.utils.clip_grad_norm_(live, run.max_grad_norm, run.norm_type)
            norm = torch.nn.utils.get_total_norm([m.grad for m in live], run.norm_type) / (
                1.0 if emu_unscaled else before)
            if clip == "wrapper":
                torch.nn.utils.clip_grad_norm_(live, run.max_grad_norm, run.norm_type)
            emu_scaler.step(emu.opt)
            emu_scaler.update()
            emu.finish()
            return norm, emu_scaler.get_scale() >= before  # (it backs off only on inf/NaN)

        def scaler_copy():
            # (a GradScaler copies without its scale tensors, re-made by its first scale())
            copied = copy.deepcopy(emu_scaler)
            copied.scale(torch.zeros((), device=device))
            return copied

        size = _probe_size(run, opt.grad_norm if clip == "wrapper" else None,
                           _emulated_norm(emu, 1.0, before, run.norm_type))
        spread = _sensitivity(emu, lambda: end_window(scaler_copy())[1], size)
        norm, applied = end_window(emu_scaler)
        assert scaler.get_scale() == emu_scaler.get_scale(), where
        if applied and sched is not None:
            sched.step()
            emu_sched.step()
        view = _local_view(run, opt)
        _check_window(run, model, opt, emu, applied, norm, w, False, *view, spread=spread)
        _lockstep(model, emu, *view)


# ------------------------------------------------------------------------ data parallel

DP_SEEDS = int(os.environ.get("FUSEDACCUM_FUZZ_DP_SEEDS", "10"))
_DP_WORLD = 2


def _dp_data(seed: int, w: int, i: int, rank: int, attempt: int, run: Run, device, poisoned):
    """Rank ``rank``'s micro-batch ``i`` of window ``w``: every rank makes every rank's (the
    emulation trains on all of them)."""
    r = random.Random(f"{seed}/{w}/{i}/{rank}/{attempt}")
    return _micro_batch(r, run, device, poisoned)


def _dp_view(model, sd):
    """_local_view of a data-parallel wrapper, from its state dict ``sd`` (masters and state
    gathered from the shards with ZeRO-1), matched to the params by index."""
    masters, params = sd["fusedaccum"]["masters"], list(model.parameters())
    return ([masters.get(idx, p) for idx, p in enumerate(params)],
            [sd["state"].get(idx, {}) for idx in range(len(params))])


def _dp_seed(seed, rank, world, device, group, monkeypatch):
    """One random run on every rank; the emulation trains on all ranks' micro-batches.
    Every rank makes the same calls that are collectives (the boundaries, state_dict(),
    load_state_dict()) whatever its checks find; returns the first failure, or None."""
    run = Run(seed)
    r = run.r  # (decisions every rank takes alike)
    _hook_settings(run, monkeypatch)
    run.master_weights = None  # (not with ZeRO-1's shards of masters; the local fuzz has it)
    # (ZeRO-1 needs the fused path)
    shard = run.opt_name not in ("rmsprop", *_GENERIC) and r.random() < 0.5
    if shard:  # (with ZeRO-1 the inner hooks see no .grad: docs/usage.md)
        run.inner_hook = None
    kw = dict(process_group=group, shard_optimizer_state=shard)
    model = _model(run, device, seed)
    emu = _Emulation(_copy_of(model, run, device, seed), lambda ps: _inner(run, ps))
    opt = _wrapper(run, model, **kw)
    sched, emu_sched = _scheduler(run, opt), _scheduler(run, emu.opt)
    scale = {None: 1.0, "dynamic": 2.0 ** 16}.get(run.loss_scale, run.loss_scale)
    failure = None
    skipped = 0
    for w in range(run.windows):
        k = run.k(w)
        poisoned_rank = r.randrange(world) if r.random() < 0.15 else None
        items = [r.randint(1, 12) for _ in range(world)] if run.token_weighted else None
        reset_after = r.randrange(k) if r.random() < 0.1 else None
        resume_after = r.randrange(k) if run.resume_at == w else None
        resumed = None
        i = attempt = 0
        while i < k:
            where = f"seed {seed} ({run.describe()}, shard={shard}), rank {rank}, " \
                    f"window {w}, micro-batch {i}"
            loss_fn = sum_loss if run.token_weighted else mse
            for rr in range(world):
                x, y, trunk, heads = _dp_data(seed, w, i, rr, attempt, run, device,
                                              poisoned_rank == rr and i == 0)
                emu.backward(opt.scale_loss(loss_fn(emu.model(x, trunk, heads), y)))
                if rr == rank:
                    opt.scale_loss(loss_fn(model(x, trunk, heads), y)).backward()
            if failure is None and float(opt.loss_scale) != scale:
                failure = f"{where}: loss scale {float(opt.loss_scale)}, expected {scale}"
            if reset_after == i:
                opt.reset_accumulation()
                emu.drop()
                reset_after, poisoned_rank, i = None, None, 0
                attempt += 1
                continue
            opt.step(num_items=None if items is None else items[rank])
            if i == k - 1:
                got_norm = opt.grad_norm.detach().clone()
            if opt.stepped and sched is not None:
                sched.step()
            if random.Random(f"{seed}/{w}/{i}/{rank}/zero").random() < 0.5:  # (per rank)
                opt.zero_grad()
            else:
                model.zero_grad()
            if resume_after == i:  # every rank: a collective state dict, then a new wrapper
                model, opt, sched = _resume(run, model, opt, sched, device, seed, **kw)
                resume_after, resumed = None, i
            i += 1
        norm, applied, scale, spread = _end_emulated_window(
            run, emu, emu_sched, sum(items) if items is not None else k * world, scale,
            got_norm)
        skipped += not applied
        # (state_dict(): a collective with ZeRO-1, so every rank, every window)
        view = _dp_view(model, opt.state_dict())
        if failure is None:
            try:
                _check_window(run, model, opt, emu, applied, norm, w, resumed == k - 1,
                              *view, spread=spread)
                assert opt.skipped_steps == skipped, (opt.skipped_steps, skipped)
            except AssertionError as exc:
                failure = f"{where}: {exc}"
        _lockstep(model, emu, *view)
    return failure


def _dp_worker(rank, world, init, device, first, seeds, out_dir):
    from datetime import timedelta

    from test_distributed import _finish

    # (a collective that one rank never reaches fails after a minute instead of hanging)
    torch.distributed.init_process_group("gloo", init_method=init,
                                         rank=rank, world_size=world,
                                         timeout=timedelta(seconds=60))
    failures = []
    for seed in range(first, first + seeds):
        try:
            with pytest.MonkeyPatch.context() as monkeypatch:
                failure = _dp_seed(seed, rank, world, device, torch.distributed.group.WORLD,
                                   monkeypatch)
        except Exception as exc:  # noqa: BLE001 - reported, then this rank ends at once:
            # the other rank may wait in a collective, which then fails instead of hanging
            failures.append(f"seed {seed}, rank {rank}: {type(exc).__name__}: {exc}")
            _write_failures(out_dir, rank, failures)
            os._exit(3)
        if failure is not None:
            failures.append(failure)
    _write_failures(out_dir, rank, failures)
    _finish()


def _write_failures(out_dir, rank, failures):
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))


@pytest.mark.filterwarnings("ignore:fusedaccum. non-finite gradients:RuntimeWarning")
def test_random_data_parallel_runs_match_plain_torch(tmp_path):
    """DP_SEEDS random runs (as above, without master_weights=False) on 2 Gloo ranks, with
    and without ZeRO-1: each rank trains on its own micro-batches, the emulation on all of
    them (the window's gradient is the sum over the ranks, D = k * ranks or the ranks'
    num_items summed)."""
    from test_distributed import DEVICE, _rendezvous, spawn_ranks

    if not _backend_runs_on(DEVICE):
        pytest.skip("the backend runs on no device here")
    failures = []
    try:
        spawn_ranks(_dp_worker, args=(_DP_WORLD, _rendezvous(tmp_path), DEVICE, FIRST, DP_SEEDS,
                                      str(tmp_path)),
                    nprocs=_DP_WORLD)
    except Exception as exc:  # noqa: BLE001 - a rank that failed says why in its file
        failures.append(f"{type(exc).__name__}: {str(exc)[-2000:]}")
    for rank in range(_DP_WORLD):
        path = tmp_path / f"rank{rank}.txt"
        if path.exists():
            failures += [line for line in path.read_text().split("\n") if line]
    assert not failures, "\n".join(failures[:6])
