"""Loss scaling: the wrapper's own (``loss_scale``) and ``torch.amp.GradScaler``.

DESIGN.md section 2, "loss scaling" and "non-finite gradients".
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from _models import (
    DEFAULT_DEVICE,
    HALF_DTYPES,
    HALF_TOL,
    INF,
    MASTER_TOL,
    OPTIMIZERS,
    MasterEmulation,
    adamw,
    as_float,
    assert_params_close,
    assert_states_close,
    assert_unchanged,
    group_tensors,
    make_batches,
    make_model,
    make_windows,
    mse,
    poison,
    reference_big_batch,
    snapshot,
    wrap,
)

# ------------------------------------------------------------------ wrapper loss scale


def test_no_loss_scale_returns_loss_unchanged(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()))
    x, y = make_batches(1, device=device)[0]
    loss = mse(model(x), y)
    assert as_float(opt.loss_scale) == 1.0
    scaled = opt.scale_loss(loss)
    assert torch.equal(scaled, loss)
    assert scaled.requires_grad


def test_dynamic_scale_starts_at_2_16_and_multiplies(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), loss_scale="dynamic")
    x, y = make_batches(1, device=device)[0]
    loss = mse(model(x), y)
    assert as_float(opt.loss_scale) == 2.0**16
    scaled = opt.scale_loss(loss)
    assert scaled.requires_grad
    torch.testing.assert_close(scaled.float().reshape(()), loss.detach() * 2.0**16,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", ["dynamic", 1024.0])
def test_loss_scale_equals_unscaled_training_fp32(device, scale):
    k = 3
    windows = make_windows(3, k, device=device)
    a_model, b_model = make_model(device=device), make_model(device=device)
    a = wrap(adamw(a_model.parameters()), accumulation_steps=k, max_grad_norm=0.5,
             loss_scale=scale)
    b = wrap(adamw(b_model.parameters()), accumulation_steps=k, max_grad_norm=0.5)
    expected_scale = 2.0**16 if scale == "dynamic" else scale
    for window in windows:
        for x, y in window:
            a.scale_loss(mse(a_model(x), y)).backward()
            mse(b_model(x), y).backward()
            # the accumulator holds the gradient of the scaled loss
            for p, q in zip(a_model.parameters(), b_model.parameters()):
                torch.testing.assert_close(p.main_grad, q.main_grad * expected_scale,
                                           rtol=1e-6, atol=0)
            a.step()
            b.step()
            a.zero_grad()
            b.zero_grad()
        assert a.stepped and b.stepped
        torch.testing.assert_close(a.grad_norm, b.grad_norm, rtol=1e-6, atol=1e-8)
    assert a.skipped_steps == 0 and as_float(a.loss_scale) == expected_scale
    assert_params_close(a_model, b_model, rtol=1e-6, atol=1e-8)
    assert_states_close(a, b, rtol=1e-6, atol=1e-8)
    ref = make_model(device=device)
    reference_big_batch(ref, adamw, windows, max_grad_norm=0.5)
    assert_params_close(a_model, ref)


def _overflows_fp32(model) -> bool:
    """Whether the fp32 sum of squares of the model's accumulators is inf while every
    accumulated value is finite (the scaled 2-norm past about 1.8e19)."""
    accs = [p.main_grad for p in model.parameters()]
    return all(bool(torch.isfinite(a).all()) for a in accs) and \
        bool(torch.isinf(torch.stack([a.square().sum() for a in accs]).sum()))


@pytest.mark.parametrize("path", ["fused", "hooked", "generic"])
def test_a_window_whose_scaled_norm_overflows_fp32_is_applied(device, path):
    """loss_scale=2^70: every accumulated value stays finite, but their fp32 sum of
    squares overflows. torch removes the scale before any norm, so the window is applied,
    clipped by its true norm, as without a scale; on each way the boundary goes (the
    flag read after the update is queued, inner step hooks, the generic path). A window
    with an inf in it is still skipped, and changes nothing."""
    k, clip, bad_window = 2, 0.5, 1
    windows = make_windows(3, k, device=device)
    make = OPTIMIZERS["rmsprop"] if path == "generic" else adamw
    a_model, b_model = make_model(device=device), make_model(device=device)
    a_inner = make(a_model.parameters())
    if path == "hooked":
        a_inner.register_step_pre_hook(lambda o, args, kwargs: None)
    a = wrap(a_inner, accumulation_steps=k, max_grad_norm=clip, loss_scale=2.0**70)
    b = wrap(make(b_model.parameters()), accumulation_steps=k, max_grad_norm=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the skip's)
        for w, window in enumerate(windows):
            for i, (x, y) in enumerate(window):
                bad = (w, i) == (bad_window, 0)
                for m, o in ((a_model, a), (b_model, b)):
                    handle = m.fc1.weight.register_hook(poison(INF)) if bad else None
                    o.scale_loss(mse(m(x), y)).backward()
                    if handle is not None:
                        handle.remove()
                if w == bad_window and i == k - 1:
                    snap = snapshot(a_model, a)
                elif i == k - 1:
                    assert _overflows_fp32(a_model)  # (else this test tests nothing)
                a.step()
                b.step()
                a.zero_grad()
                b.zero_grad()
            if w == bad_window:
                assert not a.stepped and not b.stepped and a.skipped_steps == 1
                assert_unchanged(snap, a_model, a)
            else:
                assert a.stepped and b.stepped
                assert 0 < float(a.grad_norm) < INF
                torch.testing.assert_close(a.grad_norm, b.grad_norm, rtol=1e-6, atol=0)
    assert a.update_count == b.update_count == 2
    # (a's norm is taken in float64, the retry's, b's in fp32: the two clip coefficients
    # may differ in their last bit, as the norms did in window 2 on an AMD EPYC. Where a
    # value ends near 0 as the sum of larger terms, that bit is a larger relative
    # difference: 5e-6 in one element of RMSprop's momentum buffer there (-0.0945 from
    # terms near 4), 2.7e-6 in one param with backend=triton)
    assert_params_close(a_model, b_model, rtol=1e-5, atol=1e-8)
    assert_states_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dynamic_loss_scale_half_params_equals_emulation(device, dtype):
    k = 2
    windows = make_windows(3, k, dtype=dtype, device=device, x_scale=0.5, y_scale=0.2)
    model = make_model(dtype=dtype, device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k, max_grad_norm=0.5,
               loss_scale="dynamic")
    emu = MasterEmulation(make_model(dtype=dtype, device=device), adamw)
    s = 2.0**16
    for window in windows:
        for x, y in window:
            # loss computed in fp32 from half activations (the usual recipe)
            opt.scale_loss(mse(model(x).float(), y.float())).backward()
            emu.backward(mse(emu.model(x).float(), y.float()) * s)
            opt.step()
            opt.zero_grad()
        norm, applied = emu.step(k, max_grad_norm=0.5, loss_scale=s)
        assert applied and opt.stepped
        torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=1e-7)
    assert opt.skipped_steps == 0
    assert_params_close(group_tensors(opt), emu.masters, **MASTER_TOL)
    assert_params_close(model, emu.model, **HALF_TOL[dtype])


@pytest.mark.parametrize("opt_name", ["adamw", "rmsprop"], ids=["fused", "generic"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
def test_dynamic_loss_scale_half_params_without_masters_equals_emulation(device, dtype,
                                                                          opt_name):
    """README "What works today": GradScaler is refused with master_weights=False and half
    params; loss_scale="dynamic" is what to use there. It trains as the emulation without
    masters (fp32 math, the scale removed before the update) on the fused and the generic
    path; a window with an inf is skipped (the half params untouched) and halves the
    scale, as GradScaler's policy."""
    k = 2
    make_opt = OPTIMIZERS[opt_name]
    windows = make_windows(3, k, dtype=dtype, device=device, x_scale=0.5, y_scale=0.2)
    model = make_model(dtype=dtype, device=device)
    opt = wrap(make_opt(model.parameters()), accumulation_steps=k, master_weights=False,
               loss_scale="dynamic")
    emu = MasterEmulation(make_model(dtype=dtype, device=device), make_opt,
                          master_weights=False)
    s = 2.0**16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for w, window in enumerate(windows):
            for i, (x, y) in enumerate(window):
                hooks = [m.fc1.bias.register_hook(poison(INF)) for m in (model, emu.model)] \
                    if (w, i) == (1, 0) else []
                opt.scale_loss(mse(model(x).float(), y.float())).backward()
                emu.backward(mse(emu.model(x).float(), y.float()) * s)
                for h in hooks:
                    h.remove()
                if (w, i) == (1, k - 1):
                    snap = snapshot(model, opt)
                opt.step()
                opt.zero_grad()
            norm, applied = emu.step(k, loss_scale=s)
            assert opt.stepped == applied == (w != 1), w
            if applied:
                torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-5, atol=1e-7)
            else:
                assert_unchanged(snap, model, opt)
                s /= 2
            assert as_float(opt.loss_scale) == s, w
    assert opt.update_count == 2 and opt.skipped_steps == 1
    assert all(a is b for a, b in zip(group_tensors(opt), model.parameters()))  # no masters
    assert_params_close(model, emu.model, **HALF_TOL[dtype])
    assert_states_close(opt, emu.opt, **MASTER_TOL)


def _tiny():
    """A two-element model: the cheapest thing that has a gradient."""
    p = nn.Parameter(torch.tensor([0.5, -0.25], device=DEFAULT_DEVICE))
    c = torch.tensor([1.0, 2.0], device=DEFAULT_DEVICE)
    return p, c


def test_dynamic_scale_halves_on_skip_and_doubles_after_2000_clean_updates():
    p, c = _tiny()
    opt = wrap(torch.optim.SGD([p], lr=1e-4), loss_scale="dynamic")

    def clean(n):
        for _ in range(n):
            opt.scale_loss((p * c).sum()).backward()
            opt.step()
            opt.zero_grad()

    def skipped():
        handle = p.register_hook(poison(INF))
        opt.scale_loss((p * c).sum()).backward()
        handle.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        opt.zero_grad()
        assert not opt.stepped

    clean(1000)
    assert as_float(opt.loss_scale) == 2.0**16
    before = opt.loss_scale
    skipped()
    assert as_float(opt.loss_scale) == 2.0**15 and opt.skipped_steps == 1
    assert as_float(before) == 2.0**16  # a value read before is not the live scale
    clean(1999)  # 2999 clean in all: no growth, the skip restarted the count
    assert as_float(opt.loss_scale) == 2.0**15
    clean(1)
    assert as_float(opt.loss_scale) == 2.0**16
    assert opt.update_count == 3000 and opt.skipped_steps == 1
    # the scale never leaked into the update: plain SGD on the unscaled gradient
    want = torch.tensor([0.5, -0.25], device=DEFAULT_DEVICE)
    for _ in range(3000):
        want.add_(c, alpha=-1e-4)
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_dynamic_scale_does_not_grow_past_the_largest_float(device):
    """A growth that would overflow the scale leaves it as it is and restarts the count,
    as torch.amp.GradScaler's update does; an infinite scale would make every later
    window non-finite, skipped, and the halved scale still infinite. Only windows of tiny
    gradients get there (111 growths from 2^16): the window's fp32 2-norm with the scale
    in overflows above about 1.8e19, which skips the window and halves the scale first
    (docs/usage.md, "Known differences in the numbers"), so these are about 1e-20."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0], device=device))
    c = torch.tensor([1e-20, 2e-20], device=device)
    opt = wrap(torch.optim.SGD([p], lr=1e-4), loss_scale="dynamic")
    sd = opt.state_dict()
    sd["fusedaccum"]["loss_scale"]["scale"] = torch.tensor(2.0**127)
    sd["fusedaccum"]["loss_scale"]["growth_tracker"] = 1999
    opt.load_state_dict(sd)
    # the reference: torch.amp.GradScaler's update op on the same scale and count
    ref_scale = torch.tensor(2.0**127, device=device)
    ref_tracker = torch.tensor(1999, dtype=torch.int32, device=device)
    for _ in range(3):
        opt.scale_loss((p * c).sum()).backward()
        opt.step()
        opt.zero_grad()
        assert opt.stepped
        assert torch.isfinite(p).all()
        torch._amp_update_scale_(ref_scale, ref_tracker, torch.zeros((), device=device),
                                 2.0, 0.5, 2000)  # (no inf found)
        assert as_float(opt.loss_scale) == as_float(ref_scale) == 2.0**127
    assert opt.update_count == 3 and opt.skipped_steps == 0
    assert opt.state_dict()["fusedaccum"]["loss_scale"]["growth_tracker"] == 2


def test_loss_scaler_with_its_own_factors_follows_torchs_update_op():
    """fusedaccum.scaling.LossScaler with a growth factor, backoff factor and interval of
    its own (the wrapper uses GradScaler's defaults, which a factor hard-coded to 2 or 0.5
    would pass) against the op torch.amp.GradScaler.update runs: the same scale and growth
    tracker after every window; then from a loaded tracker past the interval, which torch
    never grows from (it grows when the count reaches the interval exactly)."""
    from fusedaccum.scaling import LossScaler

    factors = dict(growth_factor=3.0, backoff_factor=0.25, growth_interval=3)
    scaler = LossScaler("dynamic", torch.device("cpu"), init_scale=8.0, **factors)
    ref_scale, ref_tracker = torch.tensor(8.0), torch.tensor(0, dtype=torch.int32)

    def both(skipped, where):
        scaler.update(skipped)
        torch._amp_update_scale_(ref_scale, ref_tracker, torch.tensor(float(skipped)),
                                 factors["growth_factor"], factors["backoff_factor"],
                                 factors["growth_interval"])
        assert as_float(scaler.scale) == as_float(ref_scale), where
        assert scaler.growth_tracker == int(ref_tracker), where

    for w, skipped in enumerate([0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]):
        both(bool(skipped), f"window {w}")
    assert as_float(ref_scale) == 8.0 * 3**3 * 0.25**2  # (three growths, two backoffs)
    scaler.load_state_dict({"dynamic": True, "scale": torch.tensor(8.0), "growth_tracker": 5},
                           window_open=False)
    ref_scale.fill_(8.0)
    ref_tracker.fill_(5)
    for w in range(3):
        both(False, f"window {w} after the load")
    assert as_float(ref_scale) == 8.0


def test_dynamic_scale_skip_discards_window_and_halves(device):
    k = 2
    windows = make_windows(3, k, device=device)
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k, loss_scale="dynamic")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w, window in enumerate(windows):
            for i, (x, y) in enumerate(window):
                handle = model.fc1.bias.register_hook(poison(INF)) if (w, i) == (1, 0) else None
                opt.scale_loss(mse(model(x), y)).backward()
                if handle is not None:
                    handle.remove()
                if w == 1 and i == k - 1:
                    snap = snapshot(model, opt)
                opt.step()
                opt.zero_grad()
            if w == 1:
                assert not opt.stepped and opt.skipped_steps == 1
                assert_unchanged(snap, model, opt)
                assert as_float(opt.loss_scale) == 2.0**15
            else:
                assert opt.stepped
    assert sum(issubclass(c.category, RuntimeWarning) for c in caught) == 1
    ref = make_model(device=device)
    reference_big_batch(ref, adamw, [windows[0], windows[2]])
    assert_params_close(model, ref)


def test_static_loss_scale_does_not_change_on_skip(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), loss_scale=256.0)
    x, y = make_batches(1, device=device)[0]
    loss = mse(model(x), y)
    assert as_float(opt.loss_scale) == 256.0
    torch.testing.assert_close(opt.scale_loss(loss).float().reshape(()), loss.detach() * 256,
                               rtol=1e-6, atol=0)
    handle = model.fc2.weight.register_hook(poison(INF))
    opt.scale_loss(loss).backward()
    handle.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert not opt.stepped and opt.skipped_steps == 1
    assert as_float(opt.loss_scale) == 256.0


# ----------------------------------------------------------------------- GradScaler


def test_wrapper_declares_amp_scaling_support():
    model = make_model()
    opt = wrap(adamw(model.parameters()))
    assert getattr(opt, "_step_supports_amp_scaling", False) is True


@pytest.mark.parametrize("init_scale", [2.0**16, 2.0**70], ids=["scale16", "scale70"])
@pytest.mark.parametrize("mode", ["plain", "unscale_clip", "wrapper_clip"])
def test_gradscaler_fp32_params_documented_accumulation_pattern(device, mode, init_scale):
    """The tutorial loop under GradScaler (accumulation_steps=1), against the same loop on
    plain torch, with an inf in one micro-batch: clipped by the user after unscale_, or by
    the wrapper (the scale still in: torch's loop unscales and clips). At 2^70 the scaled
    window's fp32 sum of squares overflows with every value finite: GradScaler sees no inf
    and keeps its scale, and the window must be applied (skipping it stopped training for
    good once a growing scale got there)."""
    k, clip, bad_window = 2, 0.05, 2
    unscale_and_clip = mode == "unscale_clip"
    windows = make_windows(4, k, device=device)
    model, ref = make_model(device=device), make_model(device=device)
    # accumulation_steps=1
    opt = wrap(adamw(model.parameters()), max_grad_norm=clip if mode == "wrapper_clip" else None)
    ref_opt = adamw(ref.parameters())
    scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    ref_scaler = torch.amp.GradScaler(device, init_scale=init_scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for w, window in enumerate(windows):
            for i, (x, y) in enumerate(window):
                for m, s in ((model, scaler), (ref, ref_scaler)):
                    loss = mse(m(x), y) / k
                    bad = (w, i) == (bad_window, 1)
                    handle = m.fc2.weight.register_hook(poison(INF)) if bad else None
                    s.scale(loss).backward()
                    if handle is not None:
                        handle.remove()
            scale_before = scaler.get_scale()
            if w == bad_window:
                snap = snapshot(model, opt)
            if init_scale > 2.0**64 and w != bad_window and not unscale_and_clip:
                assert _overflows_fp32(model)  # (else the 2^70 case tests nothing)
            for m, o, s in ((model, opt, scaler), (ref, ref_opt, ref_scaler)):
                if unscale_and_clip or (o is ref_opt and mode == "wrapper_clip"):
                    s.unscale_(o)
                    torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
                s.step(o)
                s.update()
                o.zero_grad()
            assert scaler.get_scale() == ref_scaler.get_scale()
            if w == bad_window:
                assert not opt.stepped and opt.skipped_steps == 1
                assert scaler.get_scale() == scale_before / 2
                assert_unchanged(snap, model, opt)
            else:
                assert opt.stepped
    assert sum(issubclass(c.category, RuntimeWarning) for c in caught) == 1
    assert opt.update_count == 3
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)


@pytest.mark.parametrize("opt_name", ["adamw", "rmsprop"], ids=["fused", "generic"])
def test_gradscaler_found_inf_skips_the_window_after_unscale_made_the_grads_finite(
        device, opt_name):
    """GradScaler's found_inf is honoured (DESIGN.md section 2, loss scaling): unscale_
    found an inf, so scaler.step skips the window as it skips plain torch's step, also
    when the user made every .grad finite again (nan_to_num_) before scaler.step."""
    model, ref = make_model(device=device), make_model(device=device)
    opt, ref_opt = wrap(OPTIMIZERS[opt_name](model.parameters())), \
        OPTIMIZERS[opt_name](ref.parameters())
    scaler, ref_scaler = torch.amp.GradScaler(device), torch.amp.GradScaler(device)
    (x, y), = make_batches(1, device=device)
    snap = snapshot(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for m, o, s in ((model, opt, scaler), (ref, ref_opt, ref_scaler)):
            handle = m.fc2.weight.register_hook(poison(INF))
            s.scale(mse(m(x), y)).backward()
            handle.remove()
            s.unscale_(o)
            for p in m.parameters():
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            s.step(o)
            s.update()
            o.zero_grad()
    assert ref_scaler.get_scale() == scaler.get_scale() == 2.0**15
    assert not opt.stepped and opt.skipped_steps == 1 and opt.update_count == 0
    assert_unchanged(snap, model, opt)
    assert_params_close(model, ref)


@pytest.mark.parametrize("clear", ["opt", "model", "opt_compiled_autograd"])
def test_gradscaler_sees_the_window_of_a_param_zero_grad_cleared(device, clear):
    """The wrapper keeps the window through zero_grad(), so a loop may call it every
    micro-batch; an fp32 param that got its gradient before that zero_grad() only gets its
    .grad (the window's view) back at the end of the next backward, so that unscale_ and
    clip_grad_norm_ act on the whole window. Before, unscale_ skipped it (its .grad was
    None), and its update used the gradient times the loss scale."""
    k = 2
    model, ref = make_model(device=device), make_model(device=device)
    opt = wrap(adamw(model.parameters()))  # accumulation_steps=1
    ref_opt = adamw(ref.parameters())
    scaler, ref_scaler = torch.amp.GradScaler(device), torch.amp.GradScaler(device)
    for window in make_windows(3, k, device=device):
        for i, (x, y) in enumerate(window):
            for m, s in ((model, scaler), (ref, ref_scaler)):
                m.fc2.requires_grad_(i == 0)  # fc2 only in the window's first micro-batch
                loss = s.scale(mse(m(x), y) / k)
                if clear.endswith("compiled_autograd") and m is model:
                    # (compiled autograd runs no callback queued on the engine)
                    from torch._dynamo import compiled_autograd

                    with compiled_autograd._enable(torch.compile(backend="eager")):
                        loss.backward()
                else:
                    loss.backward()
            if i < k - 1:  # between micro-batches: the window stays (ref keeps p.grad)
                (model if clear == "model" else opt).zero_grad()
        for p in model.parameters():
            assert p.grad is not None
        for m, o, s in ((model, opt, scaler), (ref, ref_opt, ref_scaler)):
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            s.step(o)
            s.update()
            o.zero_grad()
        assert opt.stepped
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)


@pytest.mark.parametrize("fast", [True, False], ids=["cpp_hook", "python_hook"])
def test_cleared_fp32_grad_comes_back_after_a_backward_of_large_half_params(device, fast,
                                                                           monkeypatch):
    """A backward that reaches only half params accumulated one at a time (above the
    batching limit) still gives the fp32 params of the window their .grad view back."""
    import fusedaccum.accumulator as acc_mod

    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    monkeypatch.setattr(acc_mod, "_BATCH_MAX_NUMEL", 2)  # no half param batched
    fp32 = nn.Linear(3, 3).to(device)
    half = nn.Linear(3, 3).to(device, torch.bfloat16)
    opt = wrap(adamw([*fp32.parameters(), *half.parameters()]), accumulation_steps=2)
    x = torch.randn(2, 3, device=device)
    half(fp32(x).bfloat16()).float().sum().backward()
    opt.step()
    opt.zero_grad()
    assert fp32.weight.grad is None
    half(x.bfloat16()).float().sum().backward()  # the half params' weights only
    assert fp32.weight.grad is fp32.weight.main_grad
    assert fp32.bias.grad is fp32.bias.main_grad


def test_gradscaler_under_compiled_autograd_past_dynamos_recompile_limit(device):
    """Compiled autograd runs no callback queued on the engine, and past Dynamo's recompile
    limit it runs the hooks untraced: a bf16 gradient then waited in its batch until
    step(), after unscale_ had read the masters' .grad, and was applied times the scale."""
    from torch._dynamo import compiled_autograd

    # (config.patch, not monkeypatch: on torch 2.11 monkeypatch's undo deleted the
    # option, and every later compile in the process failed)
    @torch._dynamo.config.patch(recompile_limit=1)
    def run(compiled):
        model = make_model(device=device)
        model.fc2.to(torch.bfloat16)
        opt = wrap(adamw(model.parameters()))
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        torch._dynamo.reset()
        try:
            for window in make_windows(2, 2, device=device):
                for x, y in window:
                    out = model.fc2(torch.tanh(model.fc1(x)).bfloat16()).float()
                    loss = scaler.scale(mse(out, y) / 2)
                    if compiled:
                        with compiled_autograd._enable(torch.compile(backend="eager")):
                            loss.backward()
                    else:
                        loss.backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        finally:
            torch._dynamo.reset()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "fp32_and_bf16"])
def test_gradscaler_after_zero_grad_past_the_last_backward(device, mixed):
    """zero_grad() between the last backward and scaler.step(): GradScaler saw no .grad
    of the fp32 params (with only those, it hands over found_inf = 0, a plain int).
    Without unscale_ the wrapper still gets the scale and steps the window it kept; after
    unscale_ those params' windows are still scaled (the bf16 params' masters were
    unscaled): refused with an error naming one, nothing changed, and a later step()
    without the scaler is not refused, nor skipped by the found_inf of the refused one
    (fp32_and_bf16: an inf in the window GradScaler saw)."""
    for unscale in (False, True):
        model, ref = make_model(device=device), make_model(device=device)
        if mixed:
            model.fc2.to(torch.bfloat16)
            ref.fc2.to(torch.bfloat16)
        opt = wrap(adamw(model.parameters()))
        ref_opt = wrap(adamw(ref.parameters()))
        scaler = torch.amp.GradScaler(device)
        (x, y), = make_batches(1, device=device)

        def loss(m, x=x, y=y):
            return mse(m.fc2(torch.tanh(m.fc1(x)).to(m.fc2.weight.dtype)).float(), y)

        scaler.scale(loss(model)).backward()
        loss(ref).backward()
        opt.zero_grad()
        if unscale:
            if mixed:  # (an inf in a master's window: GradScaler's found_inf is set)
                with torch.no_grad():
                    group_tensors(opt)[-1].grad[0] = float("inf")
            scaler.unscale_(opt)
            snap = snapshot(model, opt)
            with pytest.raises(RuntimeError, match=r"could not see the window of parameter"):
                scaler.step(opt)
            assert_unchanged(snap, model, opt)
            assert opt.update_count == 0
            opt.reset_accumulation()
            loss(model).backward()
            opt.step()  # (no GradScaler attributes left behind: not unscaled again)
            ref_opt.step()
            assert opt.stepped
            assert_params_close(model, ref, rtol=1e-5, atol=1e-5)
        else:
            scaler.step(opt)
            ref_opt.step()
            assert opt.stepped
            assert_params_close(model, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("unscale", [False, True], ids=["plain", "unscale"])
def test_gradscaler_half_params(device, dtype, unscale):
    k, clip, bad_window = 2, 0.05, 1
    windows = make_windows(3, k, dtype=dtype, device=device, x_scale=0.5, y_scale=0.2)
    model = make_model(dtype=dtype, device=device)
    opt = wrap(adamw(model.parameters()), max_grad_norm=clip)  # half params clip here
    emu = MasterEmulation(make_model(dtype=dtype, device=device), adamw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    emu_scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for w, window in enumerate(windows):
            for i, (x, y) in enumerate(window):
                bad = (w, i) == (bad_window, 0)
                handle = model.fc1.weight.register_hook(poison(INF)) if bad else None
                scaler.scale(mse(model(x).float(), y.float()) / k).backward()
                if handle is not None:
                    handle.remove()
                handle = emu.params[0].register_hook(poison(INF)) if bad else None
                emu.backward(emu_scaler.scale(mse(emu.model(x).float(), y.float()) / k))
                if handle is not None:
                    handle.remove()
            if w == bad_window:
                snap = snapshot(model, opt)
            if unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            live = emu.prepare()
            emu_scaler.unscale_(emu.opt)
            torch.nn.utils.clip_grad_norm_(live, clip)
            emu_scaler.step(emu.opt)
            emu_scaler.update()
            emu.finish()
            assert scaler.get_scale() == emu_scaler.get_scale()
            if w == bad_window:
                assert not opt.stepped and opt.skipped_steps == 1
                assert scaler.get_scale() == 2.0**11
                assert_unchanged(snap, model, opt)
            else:
                assert opt.stepped
    assert opt.update_count == 2
    assert_params_close(group_tensors(opt), emu.masters, **MASTER_TOL)
    assert_states_close(opt, emu.opt, **MASTER_TOL)
    assert_params_close(model, emu.model, **HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("unscale", [False, True], ids=["plain", "unscale"])
@pytest.mark.parametrize("with_fp32", [False, True], ids=["half", "mixed"])
def test_gradscaler_refuses_half_params_without_masters(device, dtype, unscale, with_fp32):
    """A half param without a master has no .grad the scaler could unscale or check: a
    RuntimeError at step, nothing changed (before: an AttributeError on found_inf, or,
    beside fp32 params and after unscale_, an update still multiplied by the scale)."""
    model = make_model(dtype=dtype, device=device)
    extra = torch.nn.Linear(4, 4, device=device)  # fp32 params beside them
    params = list(model.parameters()) + (list(extra.parameters()) if with_fp32 else [])
    opt = wrap(adamw(params), master_weights=False)
    scaler = torch.amp.GradScaler(device, init_scale=256.0)
    x, y = make_batches(1, dtype=dtype, device=device)[0]
    loss = mse(model(x).float(), y.float())
    if with_fp32:
        loss = loss + extra(torch.ones(4, device=device)).sum()
    scaler.scale(loss).backward()
    held = [p.main_grad.clone() for p in params]
    snap = snapshot(model, opt)
    if unscale:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="master_weights=False"):
        scaler.step(opt)
    assert_unchanged(snap, model, opt)
    assert opt.update_count == 0 and not opt.stepped
    for p, h in zip(model.parameters(), held):  # (unscale_ did scale the fp32 ones)
        assert torch.equal(p.main_grad, h)
    # the scaler's attributes went with the refusal: the window steps without it
    opt.step()
    assert opt.stepped and opt.update_count == 1


def test_gradscaler_with_accumulation_steps_above_one_raises(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    scaler = torch.amp.GradScaler(device)
    x, y = make_batches(1, device=device)[0]
    scaler.scale(mse(model(x), y)).backward()
    snap = snapshot(model, opt)
    held = [p.main_grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError):
        scaler.step(opt)
    assert_unchanged(snap, model, opt)
    assert opt.micro_step == 0 and not opt.stepped and opt.update_count == 0
    for p, h in zip(model.parameters(), held):
        assert torch.equal(p.main_grad, h)
    opt.step()  # the window goes on without the scaler (its attributes are gone)
    assert opt.micro_step == 1


@pytest.mark.parametrize("own", ["dynamic", 128.0])
def test_gradscaler_together_with_own_loss_scale_raises(device, own):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), loss_scale=own)
    scaler = torch.amp.GradScaler(device)
    x, y = make_batches(1, device=device)[0]
    scaler.scale(mse(model(x), y)).backward()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError):
        scaler.step(opt)
    assert_unchanged(snap, model, opt)
    assert opt.update_count == 0 and not opt.stepped
