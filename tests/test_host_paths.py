"""The host paths run every micro-batch or window: step()'s hooks and profiler range, the
optimizer state kept after each update, and zero_grad().

step() keeps torch.optim.Optimizer's step semantics (pre/post hooks, the profiler range
``Optimizer.step#<class>.step``) without entering ``record_function`` when no profiler
records. The state entries after an update are what the inner optimizer would show:
``step`` counts and live views of the wrapper's state, also after the state was replaced
or loaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from _models import (
    BACKEND,
    HALF_DTYPES,
    IN,
    OUT,
    adamw,
    assert_params_close,
    assert_states_close,
    big_batch_update,
    group_tensors,
    make_batches,
    make_model,
    make_windows,
    mse,
    reference_big_batch,
    run_managed,
    wrap,
)
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import fusedaccum


def _backward(model, seed=0):
    (x, y), = make_batches(1, seed=seed, dtype=next(model.parameters()).dtype,
                           device=next(model.parameters()).device)
    mse(model(x), y).backward()


# ------------------------------------------------------------------------ step hooks


def test_step_hooks_fire_on_every_call_in_torch_order(device):
    k = 3
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    calls = []

    def hook(name):
        def f(o, args, kwargs):
            calls.append((name, o, args, dict(kwargs), o.micro_step))
        return f

    handles = [register_optimizer_step_pre_hook(hook("global_pre")),
               opt.register_step_pre_hook(hook("pre")),
               opt.register_step_post_hook(hook("post")),
               register_optimizer_step_post_hook(hook("global_post"))]
    try:
        for i in range(k):
            _backward(model, seed=i)
            opt.step(num_items=4)
        assert opt.stepped
    finally:
        for h in handles:
            h.remove()
    order = ["global_pre", "pre", "post", "global_post"]
    assert [c[0] for c in calls] == order * k
    for j, (name, o, args, kwargs, micro) in enumerate(calls):
        assert o is opt and args == (opt,) and kwargs == {"num_items": 4}
        i = j // 4
        # pre hooks see the micro-batch before it is counted, post hooks after
        assert micro == (i if name.endswith("pre") else (i + 1) % k)
    opt.step()  # removed hooks no longer fire
    assert len(calls) == 4 * k


@pytest.mark.parametrize("opt_name", ["adamw", "rmsprop", "adagrad"])
def test_global_step_hooks_fire_once_per_step_call(device, opt_name):
    """torch.optim's global step hooks fire once per user step() call, on the fused path
    and on the generic one (whose inner.step() must not fire them again); the inner
    optimizer's own hooks fire once per applied update."""
    from _models import OPTIMIZERS

    k = 2
    model = make_model(device=device)
    inner = OPTIMIZERS[opt_name](model.parameters())
    calls = []
    inner.register_step_pre_hook(lambda o, args, kwargs: calls.append("inner_pre"))
    inner.register_step_post_hook(lambda o, args, kwargs: calls.append("inner_post"))
    opt = wrap(inner, accumulation_steps=k)
    handles = [register_optimizer_step_pre_hook(lambda o, a, kw: calls.append(("pre", o))),
               register_optimizer_step_post_hook(lambda o, a, kw: calls.append(("post", o)))]
    try:
        for i in range(2 * k):
            _backward(model, seed=i)
            opt.step()
    finally:
        for h in handles:
            h.remove()
    assert opt.update_count == 2
    one = [("pre", opt), ("post", opt)]
    update = [("pre", opt), "inner_pre", "inner_post", ("post", opt)]
    assert calls == (one * (k - 1) + update) * 2


@pytest.mark.parametrize("patch", ["instance, then a scheduler", "class, with wraps"])
def test_a_patched_inner_step_is_called_as_torch_calls_it(device, patch, monkeypatch):
    """The generic path looks through torch's own step wrapper only: a step the user (or a
    library) patched on the instance, under an LR scheduler's wrapper, or on the class
    with functools.wraps (which copies the wrapper's attributes), still runs, once."""
    import functools

    calls = []
    model = make_model(device=device)
    inner = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    if patch.startswith("instance"):
        bound = inner.step

        def patched(self, *args, **kwargs):
            calls.append("patched")
            return bound(*args, **kwargs)

        inner.step = patched.__get__(inner)  # (a bound method, which schedulers need)
        torch.optim.lr_scheduler.StepLR(inner, step_size=10)  # wraps the patched step
    else:
        orig = torch.optim.RMSprop.step

        @functools.wraps(orig)
        def patched(self, *args, **kwargs):
            calls.append("patched")
            return orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.optim.RMSprop, "step", patched)
    opt = wrap(inner, accumulation_steps=2)
    for i in range(4):
        _backward(model, seed=i)
        opt.step()
    assert opt.update_count == 2 and calls == ["patched"] * 2


def test_step_pre_hook_may_replace_the_arguments(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)

    def give_closure(o, args, kwargs):
        return (args[0], lambda: "from the closure"), {**kwargs, "num_items": 3}

    seen = []
    h1 = opt.register_step_pre_hook(give_closure)
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: seen.append((args, kwargs)))
    try:
        _backward(model)
        assert opt.step() == "from the closure"
    finally:
        h1.remove()
        h2.remove()
    assert seen[0][0][0] is opt and seen[0][1] == {"num_items": 3}
    assert opt.micro_step == 1


def test_step_pre_hook_with_a_bad_return_raises_as_torch(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    h = opt.register_step_pre_hook(lambda o, args, kwargs: 5)
    with pytest.raises(RuntimeError, match=r"must return None or a tuple of "
                       r"\(new_args, new_kwargs\), but got 5\."):
        opt.step()
    h.remove()
    assert opt.micro_step == 0  # nothing was counted
    opt.step()
    assert opt.micro_step == 1


def test_a_failing_step_leaves_the_hooks_working(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    calls = []
    h = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(1))
    with pytest.raises(ValueError):
        opt.step(num_items=0)
    opt.step()
    h.remove()
    assert calls == [1, 1]


def test_step_profiler_range(device):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    for i in range(2):
        _backward(model, seed=i)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        names = [e.name for e in prof.events()]
        assert names.count("Optimizer.step#FusedAccumulator.step") == 1, names


class _CountingRecordFunction:
    entered = 0

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        type(self).entered += 1
        return self

    def __exit__(self, *exc):
        return False


def test_step_enters_no_record_function_without_a_profiler(device, monkeypatch):
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    monkeypatch.setattr(_CountingRecordFunction, "entered", 0)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", _CountingRecordFunction)
    for i in range(4):
        _backward(model, seed=i)
        opt.step()
        opt.zero_grad()
    assert opt.update_count == 2
    assert _CountingRecordFunction.entered == 0
    # ... and does when one is on (here faked)
    monkeypatch.setattr(torch.autograd, "_profiler_enabled", lambda: True)
    opt.step()
    assert _CountingRecordFunction.entered == 1


class _Counted(fusedaccum.FusedAccumulator):
    """A subclass with its own step, calling the wrapper's."""

    def step(self, closure=None, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return super().step(closure, **kwargs)


class _Plain(fusedaccum.FusedAccumulator):
    pass


@pytest.mark.parametrize("cls", [_Counted, _Plain])
def test_subclasses_keep_the_step_semantics(device, cls):
    k = 2
    windows = make_windows(2, k, device=device)
    model = make_model(device=device)
    opt = cls(adamw(model.parameters()), accumulation_steps=k, backend=BACKEND)
    assert getattr(type(opt).step, "hooked", False)
    calls = []
    h = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    g = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    try:
        run_managed(model, opt, windows)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
    finally:
        h.remove()
        g.remove()
    assert calls == ["pre", "post"] * (2 * k + 1)  # once per call, also through super()
    if cls is _Counted:
        assert opt.calls == 2 * k + 1
    names = [e.name for e in prof.events()]
    assert names.count(f"Optimizer.step#{cls.__name__}.step") == 1, names
    ref = make_model(device=device)
    reference_big_batch(ref, adamw, windows)
    assert_params_close(model, ref)


def test_torch_optimizers_keep_their_own_step_wrapper():
    wrap(adamw(make_model().parameters()))
    sgd = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sgd.step()
    assert "Optimizer.step#SGD.step" in [e.name for e in prof.events()]


# ------------------------------------------------------------------ state after updates


class _TwoHeads(nn.Module):
    """Window w uses head ``a`` always and head ``b`` only when w is even."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(IN, OUT)
        self.b = nn.Linear(IN, OUT)
        self.use_b = True

    def forward(self, x):
        return self.a(x) + (self.b(x) if self.use_b else 0)


def _train_two_heads(model, opt, windows, k, plain):
    for w, window in enumerate(windows):
        model.use_b = w % 2 == 0
        if plain:  # the equivalent big batch, plain torch
            x = torch.cat([x for x, _ in window])
            y = torch.cat([y for _, y in window])
            opt.zero_grad(set_to_none=True)
            mse(model(x), y).backward()
            opt.step()
            continue
        for x, y in window:
            mse(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert opt.stepped


@pytest.mark.parametrize("make_opt", [
    adamw,
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
], ids=["adamw", "adam_amsgrad", "sgd_momentum"])
def test_state_after_updates_is_the_inner_optimizers(device, make_opt):
    k = 2
    windows = make_windows(5, k, device=device)
    model = _TwoHeads().to(device)
    ref = copy.deepcopy(model)
    opt = wrap(make_opt(model.parameters()), accumulation_steps=k)
    ref_opt = make_opt(ref.parameters())
    _train_two_heads(model, opt, windows[:3], k, plain=False)
    _train_two_heads(ref, ref_opt, windows[:3], k, plain=True)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)
    entries = {id(t): dict(st) for t, st in opt.state.items()}
    for st in entries.values():
        if "step" in st:
            assert st["step"].shape == () and st["step"].dtype == torch.float32
            assert st["step"].device.type == "cpu"
    _train_two_heads(model, opt, windows[3:], k, plain=False)
    _train_two_heads(ref, ref_opt, windows[3:], k, plain=True)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)
    for t, st in opt.state.items():  # the same objects, updated in place
        for key, value in entries[id(t)].items():
            assert st[key] is value, key


def test_state_replaced_by_the_inner_optimizer_is_taken_back(device):
    """inner.load_state_dict replaces the state: the next update reads the loaded values
    (tests/test_state_dict.py: also other values than the wrapper's) and leaves entries
    that view the wrapper's buffers again, the same objects from then on."""
    k = 2
    windows = make_windows(4, k, device=device)
    model, ref = make_model(device=device), make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    run_managed(model, opt, windows[:2])
    opt.inner.load_state_dict(copy.deepcopy(opt.inner.state_dict()))
    run_managed(model, opt, windows[2:3])
    ref_opt, _ = reference_big_batch(ref, adamw, windows[:3])
    assert_states_close(opt, ref_opt)
    steps = [opt.state[t]["step"] for t in group_tensors(opt)]
    views = [opt.state[t]["exp_avg"] for t in group_tensors(opt)]
    run_managed(model, opt, windows[3:])
    reference_big_batch(ref, lambda ps: ref_opt, windows[3:])
    assert_states_close(opt, ref_opt)
    assert all(opt.state[t]["exp_avg"] is v for t, v in zip(group_tensors(opt), views))
    assert all(opt.state[t]["step"] is v for t, v in zip(group_tensors(opt), steps))
    assert_params_close(model, ref)


def test_deleted_state_entries_come_back_at_the_next_update(device):
    """Fresh, as torch makes them for a param whose state was deleted (step 1, zero
    moments); the entries are there again after the update."""
    k = 2
    windows = make_windows(3, k, device=device)
    model, ref = make_model(device=device), make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    run_managed(model, opt, windows[:2])
    ref_opt, _ = reference_big_batch(ref, adamw, windows[:2])
    del opt.state[group_tensors(opt)[0]]
    del ref_opt.state[group_tensors(ref_opt)[0]]
    run_managed(model, opt, windows[2:])
    big_batch_update(ref, ref_opt, windows[2])
    assert set(opt.state[group_tensors(opt)[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(opt.state[group_tensors(opt)[0]]["step"]) == 1
    assert_states_close(opt, ref_opt)
    assert_params_close(model, ref)


def test_amsgrad_switched_on_adds_its_state(device):
    k = 2
    windows = make_windows(2, k, device=device)
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    run_managed(model, opt, windows[:1])
    assert all("max_exp_avg_sq" not in st for st in opt.state.values())
    opt.param_groups[0]["amsgrad"] = True
    run_managed(model, opt, windows[1:])
    for t in group_tensors(opt):
        st = opt.state[t]
        assert float(st["step"]) == 2
        assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])  # first amsgrad step


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES)
def test_state_dict_round_trip_in_memory(device, dtype):
    """opt.load_state_dict(opt.state_dict()): the state dict views the live state."""
    k = 2
    windows = make_windows(4, k, device=device, dtype=dtype)
    model, ref = make_model(device=device, dtype=dtype), make_model(device=device, dtype=dtype)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    ref_opt = wrap(adamw(ref.parameters()), accumulation_steps=k)
    run_managed(model, opt, windows[:2])
    run_managed(ref, ref_opt, windows[:2])
    opt.load_state_dict(opt.state_dict())
    assert_states_close(opt, ref_opt)
    run_managed(model, opt, windows[2:])
    run_managed(ref, ref_opt, windows[2:])
    assert_states_close(opt, ref_opt, rtol=0, atol=0)
    assert_params_close(model, ref, rtol=0, atol=0)


def test_new_step_entries_follow_the_default_dtype(device):
    """As torch.tensor(float): float64 step counts under a float64 default dtype."""
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=1)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _backward(model)
        opt.step()
    finally:
        torch.set_default_dtype(before)
    for t in group_tensors(opt):
        assert opt.state[t]["step"].dtype == torch.float64
    _backward(model, seed=1)
    opt.step()
    assert all(float(opt.state[t]["step"]) == 2 for t in group_tensors(opt))


# ------------------------------------------------------------------------- zero_grad


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_a_grad_assigned_by_hand(device, dtype, set_to_none):
    k = 2
    model = make_model(device=device, dtype=dtype)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    _backward(model)
    window = [p.main_grad.clone() for p in model.parameters()]
    params = list(model.parameters())
    params[1].grad = torch.ones_like(params[1])
    params[3].grad = torch.ones_like(params[3])
    opt.zero_grad(set_to_none=set_to_none)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p.main_grad, w) for p, w in zip(params, window))
    opt.zero_grad(set_to_none=set_to_none)  # nothing left to clear
    assert all(p.grad is None for p in params)
    opt.step()
    _backward(model, seed=1)
    opt.step()
    assert opt.stepped and opt.update_count == 1


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum", "rmsprop"])
def test_inner_step_hooks_get_no_arguments_on_the_fused_path(device, opt_name):
    """docs/usage.md: the inner optimizer's step hooks run once per applied update; on the
    fused path (AdamW, SGD: no inner.step() call) with no arguments, args () and kwargs {},
    whatever step() got; on the generic path (RMSprop) as torch calls them around
    inner.step(): the optimizer itself as the first argument."""
    from _models import OPTIMIZERS

    k = 2
    model = make_model(device=device)
    inner = OPTIMIZERS[opt_name](model.parameters())
    calls = []
    inner.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", args, kwargs)))
    inner.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args, kwargs)))
    opt = wrap(inner, accumulation_steps=k)
    for i in range(2 * k):
        _backward(model, seed=i)
        opt.step(num_items=4)
    assert opt.update_count == 2
    assert [c[0] for c in calls] == ["pre", "post"] * 2
    for _, args, kwargs in calls:
        if opt_name == "rmsprop":
            assert args == (inner,) and kwargs == {}
        else:
            assert args == () and kwargs == {}


@pytest.mark.parametrize("k", [1, 3])
def test_step_hooks_read_from_stepped_whether_an_update_was_applied(device, k):
    """docs/usage.md: the wrapper's step hooks fire every micro-batch; a post-hook reads
    opt.stepped to tell a micro-batch that applied an update from one that did not (a
    skipped window included), and a pre-hook sees the previous call's value."""
    import warnings

    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o.stepped)))
    opt.register_step_post_hook(
        lambda o, args, kwargs: seen.append(("post", o.stepped, o.update_count)))
    n = 3 * k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the skip's)
        for i in range(n):
            (x, y), = make_batches(1, seed=i, device=device)
            loss = mse(model(x), y)
            (loss * float("inf") if i // k == 1 else loss).backward()  # window 1 skipped
            opt.step()
            opt.zero_grad()
    assert (opt.update_count, opt.skipped_steps) == (2, 1)
    applied = [i % k == k - 1 and i // k != 1 for i in range(n)]
    counts = [sum(applied[:i + 1]) for i in range(n)]
    assert seen[1::2] == [("post", a, c) for a, c in zip(applied, counts)]
    assert seen[0::2] == [("pre", False)] + [("pre", a) for a in applied[:-1]]
