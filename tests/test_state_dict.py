"""state_dict / load_state_dict: resuming (also mid-window), the inner optimizer's
format, fp32 state for half params and the shared group/state/defaults objects.

DESIGN.md section 2, ``state_dict()`` / ``load_state_dict(sd)``.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from _models import (
    ALL_DTYPES,
    INF,
    OPTIMIZERS,
    RESUME_TOL,
    ChannelsLast,
    FailsMidBackward,
    TinyMLP,
    adamw,
    as_float,
    assert_params_close,
    assert_states_close,
    assert_unchanged,
    backward_failing_part_way,
    big_batch_update,
    group_tensors,
    make_batches,
    make_model,
    make_windows,
    mse,
    poison,
    reference_big_batch,
    run_managed,
    snapshot,
    wrap,
)


def _through(sd, how):
    if how == "deepcopy":
        return copy.deepcopy(sd)
    if how == "torch_save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        # (torch's safe loader, its default since 2.6: a checkpoint must need no other)
        return torch.load(buf, weights_only=True)
    assert how == "pickle"
    return pickle.loads(pickle.dumps(sd))


def _micro(model, opt, batch):
    x, y = batch
    opt.scale_loss(mse(model(x), y)).backward()  # (the loss itself without a loss scale)
    opt.step()
    opt.zero_grad()


# the models the state-dict round trips run on: one with params in torch's default
# (row-major) layout, and one with params that keep another layout (channels_last, a
# transpose), whose flat buffers hold their elements in memory order
MODELS = pytest.mark.parametrize("cls", [TinyMLP, ChannelsLast], ids=["rowmajor", "channels_last"])


def _wrapped(dtype, device, seed=0, cls=TinyMLP, **kwargs):
    model = make_model(seed, dtype=dtype, device=device, cls=cls)
    kwargs.setdefault("accumulation_steps", 3)
    kwargs.setdefault("max_grad_norm", 0.5)
    return model, wrap(adamw(model.parameters()), **kwargs)


@MODELS
@pytest.mark.parametrize("how", ["deepcopy", "torch_save", "pickle"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_resume_mid_window_gives_the_same_trajectory(device, dtype, how, cls):
    micro = make_batches(9, dtype=dtype, device=device)  # three windows of 3
    cut = 5  # after window 0 and two micro-batches of window 1

    model_a, opt_a = _wrapped(dtype, device, cls=cls)
    for batch in micro:
        _micro(model_a, opt_a, batch)
    assert opt_a.update_count == 3

    model_b, opt_b = _wrapped(dtype, device, cls=cls)
    for batch in micro[:cut]:
        _micro(model_b, opt_b, batch)
    assert opt_b.micro_step == 2
    sd = opt_b.state_dict()
    assert "fusedaccum" in sd
    saved_opt = _through(sd, how)
    saved_model = _through(model_b.state_dict(), how)
    del model_b, opt_b

    # a fresh model with other values: everything must come from the saved state
    model_c, opt_c = _wrapped(dtype, device, seed=123, cls=cls)
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    assert opt_c.micro_step == 2 and opt_c.update_count == 1 and opt_c.skipped_steps == 0
    assert opt_c.accumulation_boundary
    for batch in micro[cut:]:
        _micro(model_c, opt_c, batch)
    assert opt_c.update_count == 3 and opt_c.stepped

    torch.testing.assert_close(opt_c.grad_norm, opt_a.grad_norm, **RESUME_TOL)
    assert_params_close(group_tensors(opt_c), group_tensors(opt_a), **RESUME_TOL)
    assert_params_close(model_c, model_a, **RESUME_TOL)
    assert_states_close(opt_c, opt_a, **RESUME_TOL)


@pytest.mark.parametrize("opt_name", ["adafactor", "asgd", "nadam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_mid_window_on_the_generic_path_with_state_unlike_the_params(device, dtype,
                                                                          opt_name):
    """Optimizers whose state is not shaped like the params (Adafactor's row and column
    factors, ASGD's eta and mu, NAdam's mu_product: the generic path keeps them as the
    inner optimizer made them) resume a mid-window checkpoint on the same trajectory, and
    the plain optimizer loads the same state dict."""
    make = OPTIMIZERS[opt_name]
    micro = make_batches(9, dtype=dtype, device=device)
    cut = 5

    def wrapped(seed):
        model = make_model(seed, dtype=dtype, device=device)
        return model, wrap(make(model.parameters()), accumulation_steps=3, max_grad_norm=0.5)

    model_a, opt_a = wrapped(0)
    for batch in micro:
        _micro(model_a, opt_a, batch)
    model_b, opt_b = wrapped(0)
    for batch in micro[:cut]:
        _micro(model_b, opt_b, batch)
    saved_opt = _through(opt_b.state_dict(), "torch_save")
    saved_model = _through(model_b.state_dict(), "torch_save")
    del model_b, opt_b

    make(make_model(device=device).parameters()).load_state_dict(copy.deepcopy(saved_opt))
    model_c, opt_c = wrapped(123)
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved_opt)
    for batch in micro[cut:]:
        _micro(model_c, opt_c, batch)
    assert opt_c.update_count == 3 and opt_c.stepped
    assert_params_close(model_c, model_a, **RESUME_TOL)
    assert_states_close(opt_c, opt_a, **RESUME_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_resume_half_loading_optimizer_before_model(device, dtype):
    micro = make_batches(7, dtype=dtype, device=device)
    model_a, opt_a = _wrapped(dtype, device)
    for batch in micro:
        _micro(model_a, opt_a, batch)
    model_b, opt_b = _wrapped(dtype, device)
    for batch in micro[:4]:
        _micro(model_b, opt_b, batch)
    saved_opt = copy.deepcopy(opt_b.state_dict())
    saved_model = copy.deepcopy(model_b.state_dict())
    model_c, opt_c = _wrapped(dtype, device, seed=7)
    opt_c.load_state_dict(saved_opt)
    model_c.load_state_dict(saved_model)
    for batch in micro[4:]:
        _micro(model_c, opt_c, batch)
    assert opt_c.update_count == opt_a.update_count == 2
    assert_params_close(group_tensors(opt_c), group_tensors(opt_a), **RESUME_TOL)
    assert_params_close(model_c, model_a, **RESUME_TOL)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_loading_a_checkpoint_after_a_backward_that_failed_resumes_it(device, dtype):
    """Out-of-memory recovery by reloading the last checkpoint: the backward that raised
    (the first of a window: fc2's gradients arrived, fc1's did not) left nothing behind
    that reaches the resumed window, which ends as the run that never failed."""
    micro = make_batches(7, dtype=dtype, device=device)
    model_a, opt_a = _wrapped(dtype, device, cls=FailsMidBackward)
    for batch in micro[:6]:
        _micro(model_a, opt_a, batch)
    model_b, opt_b = _wrapped(dtype, device, cls=FailsMidBackward)
    for batch in micro[:4]:
        _micro(model_b, opt_b, batch)
    saved_opt = copy.deepcopy(opt_b.state_dict())
    saved_model = copy.deepcopy(model_b.state_dict())
    for batch in micro[4:6]:
        _micro(model_b, opt_b, batch)
    x, y = micro[6]
    backward_failing_part_way(mse(model_b(x), y))
    model_b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    for batch in micro[4:6]:
        _micro(model_b, opt_b, batch)
    assert opt_b.update_count == opt_a.update_count == 2 and opt_b.stepped
    torch.testing.assert_close(opt_b.grad_norm, opt_a.grad_norm, **RESUME_TOL)
    assert_params_close(group_tensors(opt_b), group_tensors(opt_a), **RESUME_TOL)
    assert_params_close(model_b, model_a, **RESUME_TOL)
    assert_states_close(opt_b, opt_a, **RESUME_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loading_a_checkpoint_drops_the_loaders_own_partial_window(device, dtype):
    """Rolling back mid-window to a checkpoint saved at a boundary: the loader's partial
    window (a micro-batch that gave every param a gradient) is gone, its gradients and
    which params it touched. The next window, where fc1 gets no gradient, updates as in a
    wrapper that loaded the checkpoint fresh: fc1 untouched (no weight decay either)."""
    k = 2
    micro = make_batches(5, dtype=dtype, device=device)
    model, opt = _wrapped(dtype, device, accumulation_steps=k)
    for batch in micro[:2]:
        _micro(model, opt, batch)
    saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _micro(model, opt, micro[2])
    assert opt.micro_step == 1
    fresh, fresh_opt = _wrapped(dtype, device, seed=5, accumulation_steps=k)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m.load_state_dict(saved_model)
        o.load_state_dict(saved)
        for x, y in micro[3:]:
            mse(m.fc2(torch.tanh(m.fc1(x)).detach()), y).backward()
            o.step()
            o.zero_grad()
        assert o.stepped and o.update_count == 2
    assert torch.equal(model.fc1.weight, saved_model["fc1.weight"])
    assert_params_close(model, fresh, rtol=0, atol=0)
    assert_states_close(opt, fresh_opt, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_checkpoint_after_a_backward_that_failed_part_way_holds_its_gradients(device,
                                                                                 dtype):
    """A backward raised part way (fc2's gradients arrived, fc1's did not) and is kept,
    followed by a full one: a state dict taken between them holds fc2's gradients in its
    partial window (also those still waiting to be added in a batch), and the resumed
    window ends as the run that did not stop."""
    k = 2
    micro = make_batches(4, dtype=dtype, device=device)
    model, opt = _wrapped(dtype, device, cls=FailsMidBackward, accumulation_steps=k)
    for batch in micro[:3]:
        _micro(model, opt, batch)
    x, y = micro[3]
    backward_failing_part_way(mse(model(x), y))
    saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2, opt2 = _wrapped(dtype, device, seed=5, cls=FailsMidBackward, accumulation_steps=k)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (model2, opt2)):
        _micro(m, o, micro[3])
        assert o.stepped and o.update_count == 2
    torch.testing.assert_close(opt2.grad_norm, opt.grad_norm, **RESUME_TOL)
    assert_params_close(model2, model, **RESUME_TOL)
    assert_states_close(opt2, opt, **RESUME_TOL)


@pytest.mark.parametrize("first", ["state_dict", "load_state_dict"])
def test_a_group_added_to_the_inner_optimizer_is_built_by_the_state_dict_methods(device,
                                                                                 first):
    """A param group added to the wrapped optimizer directly (``inner.add_param_group``),
    then a checkpoint saved or loaded before any step(): the group is built first, as
    step() builds it (its bf16 params get fp32 masters), and the state dict holds, or
    loads, its masters and state."""
    dtype = torch.bfloat16
    model = make_model(dtype=dtype, device=device)
    inner = adamw(model.fc1.parameters())
    opt = wrap(inner, accumulation_steps=2)
    inner.add_param_group({"params": list(model.fc2.parameters())})
    if first == "state_dict":
        masters = opt.state_dict()["fusedaccum"]["masters"]
        assert sorted(masters) == [0, 1, 2, 3]
        assert all(torch.equal(masters[i], p.float()) for i, p in enumerate(model.parameters()))
    else:
        donor = make_model(5, dtype=dtype, device=device)
        donor_opt = wrap(adamw([{"params": donor.fc1.parameters()},
                                {"params": donor.fc2.parameters()}]), accumulation_steps=2)
        run_managed(donor, donor_opt, make_windows(1, 2, dtype=dtype, device=device))
        model.load_state_dict(donor.state_dict())
        opt.load_state_dict(copy.deepcopy(donor_opt.state_dict()))
        assert_params_close(group_tensors(opt), group_tensors(donor_opt), rtol=0, atol=0)
        assert_states_close(opt, donor_opt, rtol=0, atol=0)
    assert [t.dtype for t in group_tensors(opt)] == [torch.float32] * 4


def test_resume_keeps_loss_scale_and_counters(device):
    micro = make_batches(3, device=device)
    model, opt = _wrapped(torch.float32, device, accumulation_steps=1, loss_scale="dynamic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t, (x, y) in enumerate(micro):
            handle = model.fc1.weight.register_hook(poison(INF)) if t == 1 else None
            opt.scale_loss(mse(model(x), y)).backward()
            if handle is not None:
                handle.remove()
            opt.step()
            opt.zero_grad()
    assert (opt.update_count, opt.skipped_steps, as_float(opt.loss_scale)) == (2, 1, 2.0**15)
    saved = _through(opt.state_dict(), "torch_save")
    model2, opt2 = _wrapped(torch.float32, device, accumulation_steps=1, loss_scale="dynamic")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    assert (opt2.update_count, opt2.skipped_steps, as_float(opt2.loss_scale)) == (2, 1, 2.0**15)
    x, y = make_batches(1, seed=5, device=device)[0]
    for m, o in ((model, opt), (model2, opt2)):
        scaled = o.scale_loss(mse(m(x), y))
        scaled.backward()
        o.step()
    assert_params_close(model2, model, **RESUME_TOL)


@pytest.mark.parametrize("loading_k", [2, 4, "callable"])
def test_a_window_resumed_mid_way_keeps_the_length_it_started_with(device, loading_k):
    """A state dict saved part-way through a window of 3 and loaded into a wrapper with
    another accumulation_steps (a run resumed with a new setting): that window still ends
    after its 3 micro-batches, as it would have without stopping, and the windows after
    it take the loading wrapper's length."""
    k_new = 2 if loading_k == "callable" else loading_k
    micro = make_batches(6 + k_new, device=device)  # windows of 3, 3 (cut after 4), k_new
    model_a, opt_a = _wrapped(torch.float32, device)
    for batch in micro[:6]:
        _micro(model_a, opt_a, batch)
    assert opt_a.update_count == 2
    opt_a.accumulation_steps = k_new  # (between windows: the next one takes it)
    for batch in micro[6:]:
        _micro(model_a, opt_a, batch)
    assert opt_a.stepped and opt_a.update_count == 3

    model_b, opt_b = _wrapped(torch.float32, device)
    for batch in micro[:4]:
        _micro(model_b, opt_b, batch)
    saved, saved_model = copy.deepcopy(opt_b.state_dict()), copy.deepcopy(model_b.state_dict())
    model_c, opt_c = _wrapped(torch.float32, device, seed=7, accumulation_steps=(
        (lambda n: k_new) if loading_k == "callable" else k_new))
    model_c.load_state_dict(saved_model)
    opt_c.load_state_dict(saved)
    assert (opt_c.micro_step, opt_c.update_count, opt_c.accumulation_boundary) == (1, 1, False)
    stepped = []
    for batch in micro[4:]:
        _micro(model_c, opt_c, batch)
        stepped.append(opt_c.stepped)
    assert stepped == [False, True] + [False] * (k_new - 1) + [True]
    assert_params_close(model_c, model_a, **RESUME_TOL)
    assert_states_close(opt_c, opt_a, **RESUME_TOL)


@pytest.mark.parametrize("skipped_before_saving", [True, False])
def test_each_wrapper_warns_at_its_first_skipped_step_loaded_or_not(device,
                                                                    skipped_before_saving):
    """DESIGN: the first skipped step() of each wrapper raises one RuntimeWarning
    (opt.skipped_steps counts the rest). A wrapper that loaded a state dict is a wrapper of
    its own: it warns at its first skip whether or not the saved run had warned, and only
    once (the load does not reset its own flag either)."""
    micro = make_batches(2, device=device)

    def skip(model, opt):
        handle = model.fc1.weight.register_hook(poison(INF))
        _micro(model, opt, micro[1])
        handle.remove()
        assert not opt.stepped

    model, opt = _wrapped(torch.float32, device, accumulation_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _micro(model, opt, micro[0])
        if skipped_before_saving:
            skip(model, opt)
        saved = _through(opt.state_dict(), "torch_save")
        model2, opt2 = _wrapped(torch.float32, device, seed=3, accumulation_steps=1)
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(saved)
        skip(model2, opt2)
        opt2.load_state_dict(saved)
        skip(model2, opt2)
    assert sum(issubclass(c.category, RuntimeWarning) for c in caught) == (
        2 if skipped_before_saving else 1)
    assert opt2.skipped_steps == (2 if skipped_before_saving else 1)


@MODELS
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_state_dict_without_fusedaccum_entry_loads_into_plain_adamw(device, dtype, cls):
    k = 2
    windows = make_windows(3, k, dtype=dtype, device=device)
    model, opt = _wrapped(dtype, device, cls=cls, accumulation_steps=k, max_grad_norm=None)
    run_managed(model, opt, windows[:2])
    sd = opt.state_dict()
    inner_sd = {key: val for key, val in sd.items() if key != "fusedaccum"}
    assert set(inner_sd) == {"state", "param_groups"}
    for s in inner_sd["state"].values():
        for key, val in s.items():
            if isinstance(val, torch.Tensor) and key != "step":
                assert val.dtype == torch.float32, (key, val.dtype)  # never downcast

    # a plain AdamW over fp32 copies of the params loads it (the copies of the masters
    # for half params, so that the continued run can be compared)
    copies = [t.detach().clone().float() for t in group_tensors(opt)]
    plain = adamw(copies)
    plain.load_state_dict(copy.deepcopy(inner_sd))
    assert_states_close(plain, opt, rtol=0, atol=0)

    if dtype == torch.float32:
        ref = make_model(device=device, cls=cls)
        ref.load_state_dict(model.state_dict())
        ref_opt = adamw(ref.parameters())
        ref_opt.load_state_dict(copy.deepcopy(inner_sd))
        run_managed(model, opt, windows[2:])
        big_batch_update(ref, ref_opt, windows[2])
        assert_params_close(model, ref)
        assert_states_close(opt, ref_opt)


def test_loading_state_that_requires_grad_keeps_the_state_plain(device):
    """Loading runs without autograd: a checkpoint whose state tensors require grad must not
    make the flat state buffers part of a graph."""
    model, opt = _wrapped(torch.float32, device, accumulation_steps=1)
    for batch in make_batches(1, device=device):
        _micro(model, opt, batch)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["exp_avg"].requires_grad_(True)
    opt.load_state_dict(sd)
    for t in group_tensors(opt):
        assert not opt.state[t]["exp_avg"].requires_grad
    copy.deepcopy(opt.state_dict())
    for batch in make_batches(1, seed=3, device=device):
        _micro(model, opt, batch)
    assert opt.update_count == 2


@pytest.mark.parametrize("opt_name", ["adamw_amsgrad", "sgd_momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loading_its_own_state_dict_mid_window_changes_nothing(device, dtype, opt_name):
    """``opt.load_state_dict(opt.state_dict())`` with no copy in between (the returned
    state and window may share memory with what the load writes): the run goes on bitwise
    as without it, with the partial window, the moments and the step counts kept."""
    make = OPTIMIZERS[opt_name]
    micro = make_batches(7, dtype=dtype, device=device)  # windows of 3: reload after 2 of 3

    def run(reload):
        model = make_model(dtype=dtype, device=device)
        opt = wrap(make(model.parameters()), accumulation_steps=3)
        for t, batch in enumerate(micro):
            _micro(model, opt, batch)
            if reload and t == 4:
                assert opt.micro_step == 2
                opt.load_state_dict(opt.state_dict())
        assert opt.update_count == 2
        return model, opt

    (model_a, opt_a), (model_b, opt_b) = run(False), run(True)
    assert_params_close(group_tensors(opt_b), group_tensors(opt_a), rtol=0, atol=0)
    assert_params_close(model_b, model_a, rtol=0, atol=0)
    assert_states_close(opt_b, opt_a, rtol=0, atol=0)

@MODELS
def test_plain_adamw_state_dict_loads_into_wrapper(device, cls):
    k = 2
    windows = make_windows(4, k, device=device)
    ref = make_model(device=device, cls=cls)
    ref_opt, _ = reference_big_batch(ref, adamw, windows[:2])
    plain_sd = copy.deepcopy(ref_opt.state_dict())

    model = make_model(seed=3, device=device, cls=cls)
    model.load_state_dict(ref.state_dict())
    inner = adamw(model.parameters())
    opt = wrap(inner, accumulation_steps=k)
    opt.load_state_dict(plain_sd)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.micro_step == 0
    assert_states_close(opt, ref_opt, rtol=0, atol=0)

    run_managed(model, opt, windows[2:])
    for window in windows[2:]:
        big_batch_update(ref, ref_opt, window)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steps_saved_as_plain_numbers_are_read_as_torch_reads_them(device, dtype):
    """torch before 1.12 (and some checkpoint tools) saved Adam's step as a Python number:
    torch's load reads it as the same count, and so does the wrapper, which then goes on
    as plain AdamW (bias corrections of step 3, 4, ...)."""
    windows = make_windows(4, 1, device=device)
    ref = make_model(device=device)
    ref_opt, _ = reference_big_batch(ref, adamw, windows[:3])
    sd = copy.deepcopy(ref_opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    plain = make_model(device=device)
    plain.load_state_dict(ref.state_dict())
    plain_opt = adamw(plain.parameters())
    plain_opt.load_state_dict(copy.deepcopy(sd))
    model = make_model(seed=3, dtype=dtype, device=device)
    model.load_state_dict(ref.state_dict())
    opt = wrap(adamw(model.parameters()))
    opt.load_state_dict(sd)
    assert_states_close(opt, plain_opt, rtol=0, atol=0)
    run_managed(model, opt, [[(x.to(dtype), y.to(dtype)) for x, y in windows[3]]])
    big_batch_update(plain, plain_opt, windows[3])
    assert [float(opt.state[t]["step"]) for t in group_tensors(opt)] == [4.0] * 4
    if dtype == torch.float32:
        assert_params_close(model, plain)
        assert_states_close(opt, plain_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_checkpoint_tools_save_every_param(device, dtype, tmp_path):
    """Each param has a storage of its own (viewing the flat buffer's memory): tools that
    find tied weights by storage took a bucket's params for one tied weight. accelerate's
    save_model kept one param per bucket and silently dropped the rest; safetensors'
    save_model refused the model."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, opt = _wrapped(dtype, device, cls=ChannelsLast)
    for batch in make_batches(3, dtype=dtype, device=device):
        _micro(model, opt, batch)
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)
    want = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    safetensors_torch.save_model(model, str(tmp_path / "st.safetensors"))
    saves = {"safetensors": tmp_path / "st.safetensors"}
    accelerate = pytest.importorskip("accelerate")
    accelerate.Accelerator(cpu=True).save_model(model, str(tmp_path / "acc"))
    saves["accelerate"] = tmp_path / "acc" / "model.safetensors"
    for tool, path in saves.items():
        got = safetensors_torch.load_file(str(path))
        assert sorted(got) == sorted(want), tool
        for k, v in want.items():
            assert torch.equal(got[k], v), (tool, k)
    # and training goes on from the same buffers
    before = [p.detach().clone() for p in params]
    for batch in make_batches(3, seed=4, dtype=dtype, device=device):
        _micro(model, opt, batch)
    assert opt.update_count == 2
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fp32_state_stays_fp32_for_half_params(device, dtype):
    k = 2
    windows = make_windows(2, k, device=device)
    ref = make_model(device=device)
    ref_opt, _ = reference_big_batch(ref, adamw, windows)
    plain_sd = copy.deepcopy(ref_opt.state_dict())

    model = make_model(dtype=dtype, device=device)
    model.load_state_dict(ref.state_dict())
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    opt.load_state_dict(plain_sd)
    # not downcast on the way in: bitwise the fp32 values that were saved
    assert_states_close(opt, ref_opt, rtol=0, atol=0)
    for s in opt.state_dict()["state"].values():
        assert s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32

    half_windows = make_windows(1, k, seed=11, dtype=dtype, device=device)
    run_managed(model, opt, half_windows)
    sd = opt.state_dict()
    model2 = make_model(dtype=dtype, device=device)
    opt2 = wrap(adamw(model2.parameters()), accumulation_steps=k)
    opt2.load_state_dict(_through(sd, "torch_save"))
    for t in group_tensors(opt2):
        assert t.dtype == torch.float32
        assert opt2.state[t]["exp_avg"].dtype == torch.float32
        assert opt2.state[t]["exp_avg_sq"].dtype == torch.float32
    assert_states_close(opt2, opt, rtol=0, atol=0)


def test_shared_objects_survive_load_state_dict_and_add_param_group(device):
    model = make_model(device=device)
    inner = adamw(model.fc1.parameters())
    opt = wrap(inner, accumulation_steps=2)
    ref = make_model(device=device)
    ref_opt = adamw(ref.fc1.parameters())

    def same():
        assert opt.param_groups is inner.param_groups
        assert opt.state is inner.state
        assert opt.defaults is inner.defaults

    same()
    windows = make_windows(2, 2, device=device)
    run_managed(model, opt, windows[:1])
    big_batch_update(ref, ref_opt, windows[0])
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    same()
    for m in (model, ref):
        for p in m.fc2.parameters():
            p.grad = None
    opt.add_param_group({"params": list(model.fc2.parameters()), "lr": 1e-3})
    ref_opt.add_param_group({"params": list(ref.fc2.parameters()), "lr": 1e-3})
    same()
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 1e-3
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    same()
    before = [p.detach().clone() for p in model.fc2.parameters()]
    run_managed(model, opt, windows[1:])
    big_batch_update(ref, ref_opt, windows[1])
    same()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.fc2.parameters(), before))
    # the state of the stepped tensors is where torch keeps it, for both groups
    assert all(len(inner.state[t]) > 0 for t in group_tensors(inner))
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_mapped_checkpoint_loads_onto_cuda_params(dtype):
    """torch.load(map_location="cpu") of a CUDA run resumes on CUDA params."""
    micro = make_batches(9, dtype=dtype, device="cuda")
    model_a, opt_a = _wrapped(dtype, "cuda")
    for batch in micro:
        _micro(model_a, opt_a, batch)
    model_b, opt_b = _wrapped(dtype, "cuda")
    for batch in micro[:5]:
        _micro(model_b, opt_b, batch)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    model_c, opt_c = _wrapped(dtype, "cuda", seed=123)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    for batch in micro[5:]:
        _micro(model_c, opt_c, batch)
    assert_params_close(model_c, model_a, **RESUME_TOL)
    assert_states_close(opt_c, opt_a, **RESUME_TOL)
    for st in opt_c.state.values():
        for key, value in st.items():
            if key != "step" and isinstance(value, torch.Tensor):
                assert value.device.type == "cuda" and value.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bad", ["other model", "master shape", "window shape", "no counters",
                                 "group sizes", "no window length", "step not a number",
                                 "scaled window", "state not a dict", "state a list",
                                 "state a meta tensor", "state an int tensor", "master a string",
                                 "window a string", "window None", "masters a list",
                                 "negative step", "SGD's groups", "lr None",
                                 "window length reached", "negative count", "count a bool",
                                 "cleared grad of no param"])
def test_a_state_dict_that_does_not_fit_is_refused_and_changes_nothing(device, dtype, bad):
    """Everything is checked before anything is loaded: the error names what does not fit,
    and the wrapper (hyperparameters, state, masters, window, counters) is as before."""
    k = 2
    model, opt = _wrapped(dtype, device, accumulation_steps=k)
    windows = make_windows(3, k, dtype=dtype, device=device)
    run_managed(model, opt, windows[:1])
    x, y = windows[1][0]
    mse(model(x), y).backward()
    opt.step()  # a partial window
    sd = opt.state_dict()
    if bad == "other model":  # as many params, other shapes (a transposed layer)
        other = copy.deepcopy(sd)
        other["state"][0]["exp_avg"] = other["state"][0]["exp_avg"].t().contiguous()
        other["param_groups"][0]["lr"] = 0.5
        other.pop("fusedaccum")
        match = r"\['exp_avg'\] has shape"
    elif bad == "master shape":
        other = copy.deepcopy(sd)
        other["fusedaccum"]["masters"] = {0: torch.zeros(3)} if dtype != torch.float32 else {}
        other["fusedaccum"]["accumulators"][0] = torch.zeros(3)
        match = r"has shape \(3,\), but belongs to parameter"
    elif bad == "window shape":
        other = copy.deepcopy(sd)
        other["fusedaccum"]["accumulators"][0] = torch.zeros(3)
        match = r"\['accumulators'\]\[0\] has shape \(3,\)"
    elif bad == "no counters":
        other = copy.deepcopy(sd)
        del other["fusedaccum"]["update_count"]
        match = "lacks"
    elif bad == "no window length":  # saved mid-window: its length is needed
        other = copy.deepcopy(sd)
        del other["fusedaccum"]["window_k"]
        match = "window's length"
    elif bad == "step not a number":
        other = copy.deepcopy(sd)
        other["state"][1]["step"] = "3"
        match = r"\['step'\] is '3', not a number"
    elif bad == "scaled window":  # saved by a wrapper with a loss scale; this one has none
        other = copy.deepcopy(sd)
        other["fusedaccum"]["loss_scale"] = {"dynamic": True, "scale": torch.tensor(2.0**16),
                                             "growth_tracker": 0}
        match = r"partial window \(\d+ params' gradients\), scaled by the loss scale of"
    # (values of other types than the load copies: they failed half way through the load,
    # with the state already emptied or partly replaced)
    elif bad in ("state not a dict", "state a list", "state a meta tensor",
                 "state an int tensor"):
        other = copy.deepcopy(sd)
        value = other["state"][0]["exp_avg"]
        if bad == "state not a dict":
            other["state"][0] = [1]
            match = r"\['state'\]\[0\] is list, not a dict"
        else:
            other["state"][0]["exp_avg"] = {
                "state a list": [0.0], "state a meta tensor": value.to("meta"),
                "state an int tensor": value.long()}[bad]
            match = r"\['exp_avg'\] is (list|a meta tensor|a torch.int64 tensor), not a"
    elif bad in ("master a string", "window a string", "window None", "masters a list"):
        other = copy.deepcopy(sd)
        extra = other["fusedaccum"]
        if bad == "master a string":
            extra["masters"] = {0: "x"}
            match = r"\['masters'\]\[0\] is str, not a floating-point tensor"
        elif bad == "masters a list":
            extra["masters"] = [1]
            match = "has masters of type list, not a dict"
        else:
            extra["accumulators"][0] = "x" if bad == "window a string" else None
            match = r"\['accumulators'\]\[0\] is (str|NoneType), not a floating-point"
    elif bad == "negative step":
        other = copy.deepcopy(sd)
        other["state"][1]["step"] = torch.tensor(-3.0)
        match = r"\['step'\] is tensor\(-3\.\), not a count of steps"
    elif bad == "SGD's groups":  # a state dict of another optimizer, loaded by torch
        other = copy.deepcopy(sd)
        other["param_groups"] = [dict(torch.optim.SGD(model.parameters(), lr=0.1)
                                      .state_dict()["param_groups"][0],
                                      params=g["params"]) for g in sd["param_groups"]]
        match = "param group 0 has no 'betas' entry .*another optimizer than AdamW"
    elif bad == "lr None":
        other = copy.deepcopy(sd)
        other["param_groups"][0]["lr"] = None
        match = "param group 0: lr=None is not a number"
    elif bad == "window length reached":  # a window of 1 saved after its 1st micro-batch
        other = copy.deepcopy(sd)
        other["fusedaccum"]["window_k"] = other["fusedaccum"]["micro_step"]
        match = "window's length"
    elif bad == "cleared grad of no param":
        other = copy.deepcopy(sd)
        other["fusedaccum"]["cleared_grads"] = [0, 99]
        match = r"cleared_grads=\[0, 99\]: not a list of the saved params' ids"
    elif bad in ("negative count", "count a bool"):
        other = copy.deepcopy(sd)
        other["fusedaccum"]["skipped_steps"] = -1 if bad == "negative count" else True
        match = r"skipped_steps=(-1|True): not a count"
    else:
        other = copy.deepcopy(sd)
        other["param_groups"][0]["params"] = other["param_groups"][0]["params"][:-1]
        match = "params"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(other)
    after = opt.state_dict()
    assert after["param_groups"] == sd["param_groups"]
    assert_states_close(opt, _loaded(dtype, device, sd, k), rtol=0, atol=0)
    for key in ("masters", "accumulators"):
        got, want = after["fusedaccum"][key], sd["fusedaccum"][key]
        assert got.keys() == want.keys()
        assert all(torch.equal(got[i], want[i]) for i in want)
    assert {k: v for k, v in after["fusedaccum"].items() if k not in ("masters", "accumulators")} \
        == {k: v for k, v in sd["fusedaccum"].items() if k not in ("masters", "accumulators")}


@pytest.mark.parametrize("opt_name,key", [("sgd_momentum", "momentum_buffer"),
                                          ("adamw_amsgrad", "max_exp_avg_sq")])
def test_every_loaded_state_key_is_checked_against_its_params_shape(device, opt_name, key):
    """Also SGD's momentum_buffer and amsgrad's max_exp_avg_sq are copied into the flat
    buffers: one of another shape (here fc1.weight's transposed) is refused naming the key
    before anything is loaded, and the state is as a plain optimizer loads it from the
    state dict before."""
    make = OPTIMIZERS[opt_name]
    k = 2
    model = make_model(device=device)
    opt = wrap(make(model.parameters()), accumulation_steps=k)
    run_managed(model, opt, make_windows(1, k, device=device))
    sd = copy.deepcopy(opt.state_dict())
    other = copy.deepcopy(sd)
    other["state"][0][key] = other["state"][0][key].t().contiguous()
    other["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=rf"\['{key}'\] has shape \(4, 6\)"):
        opt.load_state_dict(other)
    assert opt.param_groups[0]["lr"] == sd["param_groups"][0]["lr"]
    plain = make([t.detach().clone() for t in group_tensors(opt)])
    plain.load_state_dict({n: v for n, v in sd.items() if n != "fusedaccum"})
    assert_states_close(opt, plain, rtol=0, atol=0)


@pytest.mark.parametrize("loading_k", [2, "callable"])
def test_a_state_dict_saved_at_a_boundary_takes_the_loaders_window_length(device, loading_k):
    """Saved at a boundary, no window is left to finish: the next window has the loading
    wrapper's length, and a callable is asked with the number of windows the saved run
    ended, the skipped one included (one applied, one skipped: 2 here; the saving run's
    next window had length 1)."""
    micro = make_batches(4, device=device)
    model, opt = _wrapped(torch.float32, device, accumulation_steps=1)
    _micro(model, opt, micro[0])
    handle = model.fc1.weight.register_hook(poison(INF))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _micro(model, opt, micro[1])
    handle.remove()
    assert (opt.update_count, opt.skipped_steps, opt.micro_step) == (1, 1, 0)
    saved = _through(opt.state_dict(), "torch_save")
    model2, opt2 = _wrapped(torch.float32, device, seed=3, accumulation_steps=(
        (lambda n: 2 if n >= 2 else 1) if loading_k == "callable" else loading_k))
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    assert not opt2.accumulation_boundary
    stepped = []
    for batch in micro[2:]:
        _micro(model2, opt2, batch)
        stepped.append(opt2.stepped)
    assert stepped == [False, True] and opt2.update_count == 2


def test_a_load_whose_window_length_callable_raises_changes_nothing(device):
    """Loaded at a boundary, the next window's length is asked of the loading wrapper's
    callable: where it raises (here an index past its list), before anything is loaded
    (it raised after the whole load, with the counters already the checkpoint's)."""
    k = 2
    windows = make_windows(3, k, device=device)
    model, opt = _wrapped(torch.float32, device, accumulation_steps=lambda n: k)
    run_managed(model, opt, windows[:2])
    sd = opt.state_dict()
    other, other_opt = _wrapped(torch.float32, device, seed=5,
                                accumulation_steps=lambda n: [k, k][n])
    snap = snapshot(other, other_opt)
    with pytest.raises(IndexError):
        other_opt.load_state_dict(sd)
    assert_unchanged(snap, other, other_opt)
    assert other_opt.update_count == 0 and other_opt.accumulation_boundary is False
    other_opt.accumulation_steps = lambda n: k
    other.load_state_dict(model.state_dict())
    other_opt.load_state_dict(sd)
    assert other_opt.update_count == 2
    run_managed(model, opt, windows[2:])
    run_managed(other, other_opt, windows[2:])
    assert_params_close(other, model, rtol=0, atol=0)


def _bf16_k2(device, loss_scale, seed=0):
    """A bf16 model and its wrapper (AdamW, accumulation_steps=2, this loss_scale), for the
    tests of loading across loss scales."""
    model = make_model(seed, dtype=torch.bfloat16, device=device)
    return model, wrap(adamw(model.parameters()), accumulation_steps=2, loss_scale=loss_scale)


@pytest.mark.parametrize("saved,loading", [("dynamic", None), (None, "dynamic"),
                                           (128.0, None)])
def test_a_partial_window_resumes_only_where_it_is_scaled_alike(device, saved, loading):
    """A partial window's accumulators hold the gradients as backward gave them: scaled
    by the saving wrapper's loss scale, or not. A wrapper that scales otherwise (one
    with a loss scale against one without) would apply them off by the scale (once by
    65536): refused, naming the mismatch, with nothing changed. Saved at a boundary,
    there is no window, and the state loads."""
    dtype = torch.bfloat16
    micro = make_batches(4, dtype=dtype, device=device)

    model_a, opt_a = _bf16_k2(device, saved)
    for batch in micro[:3]:
        _micro(model_a, opt_a, batch)
    mid = opt_a.state_dict()  # after 1 of window 2's 2 micro-batches
    model_b, opt_b = _bf16_k2(device, loading, seed=5)
    before = opt_b.state_dict()
    with pytest.raises(ValueError, match=r"partial window \(\d+ params' gradients\), "
                                         r"(scaled|not scaled).* Resume with loss_scale set "
                                         "as when it was saved"):
        opt_b.load_state_dict(mid)
    after = opt_b.state_dict()
    assert after["fusedaccum"]["micro_step"] == 0 and not after["fusedaccum"]["accumulators"]
    assert after["state"] == before["state"] == {}
    assert all(torch.equal(after["fusedaccum"]["masters"][i], before["fusedaccum"]["masters"][i])
               for i in before["fusedaccum"]["masters"])

    _micro(model_a, opt_a, micro[3])  # the window's end: an update, no window left
    at_boundary = opt_a.state_dict()
    assert not at_boundary["fusedaccum"]["accumulators"]
    opt_b.load_state_dict(at_boundary)
    model_b.load_state_dict(model_a.state_dict())
    for batch in micro[:2]:
        _micro(model_b, opt_b, batch)
    assert opt_b.update_count == 3 and opt_b.stepped


@pytest.mark.parametrize("mid_window", [False, True], ids=["boundary", "mid_window"])
def test_a_static_loss_scale_keeps_its_value_through_a_load(device, mid_window):
    """A wrapper built with loss_scale=128.0 that loads a state dict saved with another
    scale (a dynamic one at 2^16) keeps 128, as asked: at a boundary at once; a partial
    window resumes with the saved scale, which its saved gradients hold (its update is the
    one the saving run makes), and 128 comes back when that window ends. (It took the
    saved scale for good.)"""
    dtype = torch.bfloat16
    micro = make_batches(6, dtype=dtype, device=device)

    model_a, opt_a = _bf16_k2(device, "dynamic")
    cut = 3 if mid_window else 2
    for batch in micro[:cut]:
        _micro(model_a, opt_a, batch)
    saved = copy.deepcopy(opt_a.state_dict())
    model_b, opt_b = _bf16_k2(device, 128.0, seed=5)
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(saved)
    assert opt_b.loss_scale == (2.0**16 if mid_window else 128.0)
    for batch in micro[cut:4]:
        _micro(model_a, opt_a, batch)
        _micro(model_b, opt_b, batch)
    assert opt_a.stepped and opt_b.stepped and opt_b.update_count == 2
    # (the same update: the scale is a power of two, removed exactly either way)
    assert_params_close(model_b, model_a, rtol=0, atol=0)
    assert opt_b.loss_scale == 128.0
    for batch in micro[4:]:
        _micro(model_b, opt_b, batch)
    assert opt_b.stepped and opt_b.loss_scale == 128.0


@pytest.mark.parametrize("second", ["boundary", "mid_window_at_128"])
def test_a_static_loss_scale_comes_back_when_another_load_ends_a_loaded_window(device,
                                                                               second):
    """loss_scale=128.0 resumed a partial window saved at another scale (2^16, which the
    rest of that window takes), then loads another state dict before that window ended:
    one saved at a boundary, or a partial window saved at 128. Either brings 128 back (the
    loaded window is over, dropped), and it stays. (The 2^16 stayed for good: the second
    load only forgot that the static scale was to come back.)"""
    dtype = torch.bfloat16
    micro = make_batches(4, dtype=dtype, device=device)

    model_a, opt_a = _bf16_k2(device, "dynamic")
    _micro(model_a, opt_a, micro[0])
    model_b, opt_b = _bf16_k2(device, 128.0, seed=5)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.micro_step == 1 and opt_b.loss_scale == 2.0**16
    if second == "boundary":
        _micro(model_a, opt_a, micro[1])
        other = copy.deepcopy(opt_a.state_dict())
    else:
        model_c, opt_c = _bf16_k2(device, 128.0, seed=7)
        _micro(model_c, opt_c, micro[0])
        other = copy.deepcopy(opt_c.state_dict())
    opt_b.load_state_dict(other)
    assert opt_b.micro_step == (0 if second == "boundary" else 1)
    assert opt_b.loss_scale == 128.0
    for batch in micro[1:]:
        _micro(model_b, opt_b, batch)
    assert opt_b.update_count == 2 and opt_b.loss_scale == 128.0


@pytest.mark.parametrize("zero_grad", ["opt", "model", None])
def test_resume_mid_window_keeps_which_grads_zero_grad_cleared(device, zero_grad):
    """fp32 params: after zero_grad() mid-window p.grad is None (the window stays); a
    resume from a state dict taken there leaves it None too (it used to give the window's
    view back), so that model.zero_grad(set_to_none=False), a no-op then, drops nothing;
    without zero_grad() the view is back, as it was."""
    def run(resume):
        model = make_model(device=device)
        opt = wrap(adamw(model.parameters()), accumulation_steps=2)
        (x, y), (x2, y2) = make_windows(1, 2, device=device)[0]
        mse(model(x), y).backward()
        opt.step()
        if zero_grad is not None:
            (opt if zero_grad == "opt" else model).zero_grad()
        if resume:
            sd = copy.deepcopy(opt.state_dict())
            msd = copy.deepcopy(model.state_dict())
            model = make_model(seed=4, device=device)
            model.load_state_dict(msd)
            opt = wrap(adamw(model.parameters()), accumulation_steps=2)
            opt.load_state_dict(sd)
        grads = [p.grad is None for p in model.parameters()]
        model.zero_grad(set_to_none=False)
        mse(model(x2), y2).backward()
        opt.step()
        assert opt.stepped
        return grads, [p.detach().clone() for p in model.parameters()]

    (grads, want), (got_grads, got) = run(False), run(True)
    assert got_grads == grads == [zero_grad is not None] * len(grads)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    ("no tracker", "loss_scale without"),
    ("inf", r"loss scale is tensor\(inf\): not a positive finite"),
    ("nan", "loss scale is nan: not a positive finite"),
    ("zero", r"loss scale is tensor\(0\.\): not a positive finite"),
    ("negative", "loss scale is -8.0: not a positive finite"),
    ("two values", "loss scale is tensor.*: not a positive finite"),
    ("tracker -1", "growth_tracker=-1: not a count"),
    ("tracker 1.5", "growth_tracker=1.5: not a count"),
    ("tracker True", "growth_tracker=True: not a count"),
])
def test_a_malformed_loss_scale_entry_is_refused_and_changes_nothing(device, bad, match):
    """Also a scale no window could be applied with: inf (a dynamic scale that grew past
    the largest float before 2026-11-27 was saved so), 0 or NaN would skip every window
    after the load, and halving never brings them back."""
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=1, loss_scale="dynamic")
    run_managed(model, opt, make_windows(1, 1, device=device))
    sd = opt.state_dict()
    other = copy.deepcopy(sd)
    entry = other["fusedaccum"]["loss_scale"]
    if bad == "no tracker":
        del entry["growth_tracker"]
    elif bad.startswith("tracker"):
        entry["growth_tracker"] = {"-1": -1, "1.5": 1.5, "True": True}[bad.split()[1]]
    else:
        entry["scale"] = {"inf": torch.tensor(math.inf), "nan": math.nan,
                          "zero": torch.tensor(0.0), "negative": -8.0,
                          "two values": torch.ones(2)}[bad]
    other["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(other)
    assert opt.param_groups[0]["lr"] == sd["param_groups"][0]["lr"]
    assert as_float(opt.loss_scale) == 2.0**16
    # a 0-dim integer tensor as the count (a checkpoint tool may make one) loads
    entry.update(scale=torch.tensor(1024.0), growth_tracker=torch.tensor(7))
    opt.load_state_dict(other)
    assert as_float(opt.loss_scale) == 1024.0 and opt.param_groups[0]["lr"] == 0.5
    assert opt.state_dict()["fusedaccum"]["loss_scale"]["growth_tracker"] == 7


def test_the_loss_scale_is_copied_into_and_out_of_a_state_dict(device):
    """state_dict()'s loss scale is a copy of the live one, and load_state_dict copies the
    saved one in: writing either tensor in place afterwards (a checkpoint tool editing the
    dict, a later load into it) leaves the wrapper's scale as it was."""
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=1, loss_scale="dynamic")
    sd = opt.state_dict()
    sd["fusedaccum"]["loss_scale"]["scale"].fill_(3.0)
    assert as_float(opt.loss_scale) == 2.0**16
    saved = torch.tensor(1024.0, device=device)
    sd["fusedaccum"]["loss_scale"]["scale"] = saved
    opt.load_state_dict(sd)
    saved.fill_(5.0)
    assert as_float(opt.loss_scale) == 1024.0
    assert as_float(opt.state_dict()["fusedaccum"]["loss_scale"]["scale"]) == 1024.0


def _renamed(sd, ids):
    """``sd`` with its params' ids replaced by ``ids`` (in group order), as state dicts
    other than Optimizer.state_dict()'s key them."""
    out = copy.deepcopy(sd)
    flat = [pid for g in out["param_groups"] for pid in g["params"]]
    new = dict(zip(flat, ids))
    for g in out["param_groups"]:
        g["params"] = [new[pid] for pid in g["params"]]
    out["state"] = {new[pid]: st for pid, st in out["state"].items()}
    return out


@pytest.mark.parametrize("ids", ["offset", "reversed", "names"])
@pytest.mark.parametrize("opt_name,dtype", [("adamw", torch.float32), ("rmsprop", torch.bfloat16)],
                         ids=["fused", "generic_half_no_masters"])
def test_saved_param_ids_are_paired_with_the_params_as_torch_pairs_them(device, ids, opt_name,
                                                                        dtype):
    """torch.optim finds each param's state under the id its saved group lists in that
    param's place: positions in Optimizer.state_dict(), names in
    torch.distributed.checkpoint, other numbers in a group taken out of a larger state
    dict. The wrapper loads such a state dict as a plain optimizer does (here the state of
    the same params under those ids, loaded into both)."""
    make = OPTIMIZERS[opt_name]
    windows = make_windows(3, 2, device=device)
    ref = make_model(device=device)
    ref_opt, _ = reference_big_batch(ref, make, windows[:2])
    n = len(list(ref.parameters()))
    new_ids = {"offset": [i + 10 for i in range(n)], "reversed": list(range(n))[::-1],
               "names": [name for name, _ in ref.named_parameters()]}[ids]
    sd = _renamed(ref_opt.state_dict(), new_ids)

    plain = make_model(seed=3, device=device)
    plain.load_state_dict(ref.state_dict())
    plain_opt = make(plain.parameters())
    plain_opt.load_state_dict(copy.deepcopy(sd))
    model = make_model(seed=3, device=device, dtype=dtype)
    model.load_state_dict(ref.state_dict())
    opt = wrap(make(model.parameters()), accumulation_steps=2, master_weights=False)
    opt.load_state_dict(sd)
    assert_states_close(opt, plain_opt, check_dtype=False, rtol=0, atol=0)
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items()
               if k != "step" and isinstance(v, torch.Tensor))


@pytest.mark.parametrize("dtype,master_weights", [
    (torch.float32, None), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16_no_masters", "bf16_masters"])
def test_distributed_checkpoint_state_dict_functions_work_where_documented(
        device, dtype, master_weights):
    """docs/usage.md: torch.distributed.checkpoint's get_optimizer_state_dict and
    set_optimizer_state_dict (which key the state by the model's param names) work for
    fp32 params and with master_weights=False: the state comes back into another wrapper
    and training goes on alike. With fp32 masters of half params in the groups they fail
    inside torch with a KeyError (the masters are not the model's params). On a wrapper
    with no optimizer state yet, get_optimizer_state_dict calls step(): one micro-batch."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    k = 2
    windows = make_windows(3, k, dtype=dtype, device=device)
    model = make_model(dtype=dtype, device=device)
    opt = wrap(adamw(model.parameters()), accumulation_steps=k, master_weights=master_weights)
    if not master_weights:  # (a fresh wrapper: no state, a step() is called)
        sd = get_optimizer_state_dict(model, opt)
        assert opt.micro_step == 1 and opt.update_count == 0 and sd["state"] == {}
        opt.reset_accumulation()
    run_managed(model, opt, windows[:1])
    other = make_model(seed=3, dtype=dtype, device=device)
    other_opt = wrap(adamw(other.parameters()), accumulation_steps=k,
                     master_weights=master_weights)
    run_managed(other, other_opt, windows[1:2] * 2)  # (state of its own, to be replaced)
    if master_weights:
        with pytest.raises(KeyError):
            get_optimizer_state_dict(model, opt)
        twin = make_model(dtype=dtype, device=device)  # (a state dict keyed by names)
        twin_opt = wrap(adamw(twin.parameters()), accumulation_steps=k, master_weights=False)
        run_managed(twin, twin_opt, windows[:1])
        with pytest.raises(KeyError):
            set_optimizer_state_dict(other, other_opt, get_optimizer_state_dict(twin, twin_opt))
        return
    sd = get_optimizer_state_dict(model, opt)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(sd["state"]) == sorted(names)
    assert "fusedaccum" not in sd  # (the state and the groups only)
    other.load_state_dict(model.state_dict())
    set_optimizer_state_dict(other, other_opt, sd)
    # (loaded as a plain state dict: the loader keeps its own counters)
    assert (other_opt.update_count, opt.update_count) == (2, 1)
    assert_states_close(other_opt, opt, rtol=0, atol=0)
    run_managed(model, opt, windows[2:])
    run_managed(other, other_opt, windows[2:])
    assert_params_close(other, model, rtol=0, atol=0)
    assert_states_close(other_opt, opt, rtol=0, atol=0)


def test_the_fusedaccum_entry_is_paired_by_the_same_ids(device):
    """A load pre-hook relabels the saved ids for params listed in another order (what
    plain torch needs): each param gets its own optimizer state, fp32 master, model
    weight and partial window; the masters and window were paired by position before."""
    torch.manual_seed(0)
    mods = [torch.nn.Linear(3, 3, bias=False).to(device, torch.bfloat16) for _ in range(3)]
    opt = wrap(adamw([m.weight for m in mods]), accumulation_steps=2)
    for _ in range(3):  # a window and a half: masters, state and a partial window
        x = torch.randn(4, 3, device=device, dtype=torch.bfloat16)
        (mods[2](mods[1](mods[0](x))).float() ** 2).sum().backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    order = [2, 0, 1]  # the new optimizer lists the params as c, a, b
    new = [copy.deepcopy(mods[j]) for j in order]
    with torch.no_grad():
        for m in new:
            m.weight.normal_()
    opt2 = wrap(adamw([m.weight for m in new]), accumulation_steps=2)
    opt2.register_load_state_dict_pre_hook(
        lambda o, s: s["param_groups"][0].__setitem__("params", order))
    opt2.load_state_dict(copy.deepcopy(sd))
    for j, saved in enumerate(order):
        t = opt2.param_groups[0]["params"][j]
        assert torch.equal(t, sd["fusedaccum"]["masters"][saved])
        assert torch.equal(new[j].weight, sd["fusedaccum"]["masters"][saved].bfloat16())
        assert torch.equal(opt2.state[t]["exp_avg"], sd["state"][saved]["exp_avg"])
        assert torch.equal(new[j].weight.main_grad, sd["fusedaccum"]["accumulators"][saved])


def test_state_keys_made_strings_by_a_json_round_trip_find_their_params(device):
    """A checkpoint format that keys its dicts by strings (a JSON round trip) gives the
    state and the "fusedaccum" entry's masters and partial window under "0", "1", ...:
    each is found under the integer id its group lists, as before the round trip."""
    k, dtype = 2, torch.bfloat16
    model, opt = _wrapped(dtype, device, accumulation_steps=k)
    for batch in make_batches(3, dtype=dtype, device=device):
        _micro(model, opt, batch)
    sd = copy.deepcopy(opt.state_dict())
    strs = copy.deepcopy(sd)
    strs["state"] = {str(i): st for i, st in strs["state"].items()}
    for part in ("masters", "accumulators"):
        strs["fusedaccum"][part] = {str(i): v for i, v in strs["fusedaccum"][part].items()}
    want, got = _loaded(dtype, device, sd, k), _loaded(dtype, device, strs, k)
    assert_states_close(got, want, rtol=0, atol=0)
    assert_params_close(group_tensors(got), group_tensors(want), rtol=0, atol=0)
    windows = [o.state_dict()["fusedaccum"]["accumulators"] for o in (got, want)]
    assert windows[0].keys() == windows[1].keys() == set(range(4))
    assert all(torch.equal(windows[0][i], windows[1][i]) for i in range(4))


def test_an_id_listed_twice_pairs_as_in_torch(device):
    """Saved ids [5, 5, 7]: torch gives id 5's state to the last param listed with it."""
    model = make_model(device=device)
    ref_opt, _ = reference_big_batch(make_model(device=device), adamw,
                                     make_windows(1, 1, device=device))
    sd = _renamed(ref_opt.state_dict(), [5, 5, 7, 8])
    plain = adamw(make_model(device=device).parameters())
    plain.load_state_dict(copy.deepcopy(sd))
    opt = wrap(adamw(model.parameters()))
    opt.load_state_dict(sd)
    assert [len(st) for st in opt.state_dict()["state"].values()] == \
        [len(st) for st in plain.state_dict()["state"].values()]
    assert_states_close(opt, plain, rtol=0, atol=0)


def _loaded(dtype, device, sd, k):
    _, opt = _wrapped(dtype, device, seed=5, accumulation_steps=k)
    opt.load_state_dict(sd)
    return opt


def test_state_dict_hooks_on_the_wrapper_run_as_in_torch(device):
    """register_state_dict_pre/post_hook and register_load_state_dict_pre/post_hook on the
    wrapper: they fire, a post hook's returned dict is the state dict, a load pre hook's
    returned dict is what is loaded."""
    model, opt = _wrapped(torch.float32, device, accumulation_steps=1)
    run_managed(model, opt, make_windows(1, 1, device=device))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))

    def sd_post(o, sd):
        calls.append(("sd_post", o))
        return dict(sd, extra="mine")

    def load_pre(o, sd):
        calls.append(("load_pre", o, sd.get("extra")))
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.125
        return sd

    opt.register_state_dict_post_hook(sd_post)
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    sd = opt.state_dict()
    assert sd["extra"] == "mine"
    opt.load_state_dict(sd)
    assert calls == [("sd_pre", opt), ("sd_post", opt), ("load_pre", opt, "mine"),
                     ("load_post", opt)]
    assert opt.param_groups[0]["lr"] == 0.125


# ------------------------------------------------------- edits of opt.state between steps


def _replace(key, value_of):
    def edit(state, t):
        state[t][key] = value_of(t)
    return edit


def _delete_then_read(state, t):
    del state[t]
    state[t]  # noqa: B018  (a defaultdict read makes an empty entry)


_STATE_EDITS = {
    "entry replaced by {}": ("any", lambda state, t: state.__setitem__(t, {})),
    "entry cleared": ("any", lambda state, t: state[t].clear()),
    "entry deleted, then read": ("any", _delete_then_read),
    "every entry cleared": ("any", lambda state, t: state.clear()),
    "exp_avg replaced": ("adam", _replace("exp_avg", lambda t: torch.full_like(t, 0.03))),
    "exp_avg_sq replaced": ("adam", _replace("exp_avg_sq", lambda t: torch.full_like(t, 1e-4))),
    "step replaced": ("adam", _replace("step", lambda t: torch.tensor(1.0))),
    "step written in place": ("adam", lambda state, t: state[t]["step"].fill_(1)),
    "momentum_buffer replaced": ("sgd", _replace("momentum_buffer",
                                                 lambda t: torch.full_like(t, -0.2))),
    "momentum_buffer set to None": ("sgd", _replace("momentum_buffer", lambda t: None)),
}


@pytest.mark.parametrize("opt_name,edit", [
    (o, e) for o in ("adamw_amsgrad", "sgd_momentum") for e, (kind, _) in _STATE_EDITS.items()
    if kind == "any" or o.startswith(kind)])
def test_edits_of_opt_state_are_read_as_torch_reads_them(device, opt_name, edit):
    """What a user writes into opt.state between steps (a param's state reset, a value
    put in place of another, a step count changed) is what the next update reads, as in
    torch.optim; an in-place write to the entries' tensors needs nothing (they view the
    flat buffers). Here the edit comes in the middle of a window."""
    do_edit = _STATE_EDITS[edit][1]
    k = 2
    windows = make_windows(4, k, device=device)
    make_opt = OPTIMIZERS[opt_name]
    model = make_model(device=device)
    opt = wrap(make_opt(model.parameters()), accumulation_steps=k)
    ref = make_model(device=device)
    ref_opt = make_opt(ref.parameters())
    for w, window in enumerate(windows):
        for i, (x, y) in enumerate(window):
            mse(model(x), y).backward()
            if w == 2 and i == 1:
                do_edit(opt.state, group_tensors(opt)[0])
            opt.step()
            opt.zero_grad()
        if w == 2:
            do_edit(ref_opt.state, group_tensors(ref_opt)[0])
        big_batch_update(ref, ref_opt, window)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)
    # and a checkpoint of it resumes on the same trajectory
    model2 = make_model(device=device)
    model2.load_state_dict(model.state_dict())
    opt2 = wrap(make_opt(model2.parameters()), accumulation_steps=k)
    opt2.load_state_dict(opt.state_dict())
    more = make_windows(2, k, seed=7, device=device)
    run_managed(model, opt, more)
    run_managed(model2, opt2, more)
    assert_params_close(model2, model, rtol=0, atol=0)


@pytest.mark.parametrize("opt_name,key", [("adamw_amsgrad", "exp_avg"),
                                          ("sgd_momentum", "momentum_buffer")])
def test_a_state_value_put_in_place_is_copied_in_and_not_updated_after(device, opt_name, key):
    """docs/usage.md: a value put in place of a state entry (opt.state[p]["exp_avg"] = x) is
    what the next update reads, as in torch; it is copied into the flat buffers at that
    boundary and the entry then views them again, so x itself is not updated after, where
    torch's step updates x in place (x is its state)."""
    k = 2
    windows = make_windows(3, k, device=device)
    make_opt = OPTIMIZERS[opt_name]
    model, ref = make_model(device=device), make_model(device=device)
    opt = wrap(make_opt(model.parameters()), accumulation_steps=k)
    ref_opt = make_opt(ref.parameters())
    run_managed(model, opt, windows[:1])
    big_batch_update(ref, ref_opt, windows[0])
    t, ref_t = group_tensors(opt)[0], group_tensors(ref_opt)[0]
    x = torch.full_like(opt.state[t][key], 0.03)
    ref_x = x.clone()
    opt.state[t][key] = x
    ref_opt.state[ref_t][key] = ref_x
    for window in windows[1:]:
        run_managed(model, opt, [window])
        big_batch_update(ref, ref_opt, window)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)
    assert torch.equal(x, torch.full_like(x, 0.03))  # not updated after
    entry = opt.state[t][key]
    assert entry is not x
    # the entry views the buffers again: in one storage with the other params' entries
    other = opt.state[group_tensors(opt)[1]][key]
    assert entry.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    assert ref_opt.state[ref_t][key] is ref_x  # (torch: x is the state, updated in place)
    assert not torch.equal(ref_x, torch.full_like(x, 0.03))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_pickled_param_takes_its_main_grad_with_its_whole_bucket(device, dtype):
    """docs/usage.md: save model.state_dict(), not the params: pickling a param (torch.save
    of the param, the module, a list of params) also takes its p.main_grad, a view of the
    fp32 accumulator of its whole bucket; a state dict of the model holds the params'
    values alone."""
    model, opt = _wrapped(dtype, device)
    _micro(model, opt, make_batches(1, dtype=dtype, device=device)[0])
    p = model.fc2.bias
    bucket_bytes = p.main_grad.untyped_storage().nbytes()
    assert bucket_bytes >= 4 * sum(q.numel() for q in model.parameters())
    buf = io.BytesIO()
    torch.save(p, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.main_grad.untyped_storage().nbytes() == bucket_bytes
    torch.testing.assert_close(loaded.main_grad, p.main_grad, rtol=0, atol=0)
    unpickled = pickle.loads(pickle.dumps(p))
    assert unpickled.main_grad.untyped_storage().nbytes() == bucket_bytes
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert not hasattr(saved["fc2.bias"], "main_grad")
    assert saved["fc2.bias"].untyped_storage().nbytes() == p.numel() * p.element_size()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_inner_load_state_dict_after_wrapping_is_read(device, opt_name):
    """``inner.load_state_dict(sd)`` on the optimizer that was wrapped (code that keeps
    its own reference to it) is read by the next update, as the wrapper's own
    load_state_dict is: the loaded moments and step counts, not the ones before."""
    k = 2
    make_opt = OPTIMIZERS[opt_name]
    donor = make_model(seed=3, device=device)
    donor_opt, _ = reference_big_batch(donor, make_opt, make_windows(3, 1, seed=5,
                                                                     device=device))
    sd = donor_opt.state_dict()
    windows = make_windows(3, k, device=device)
    model = make_model(device=device)
    inner = make_opt(model.parameters())
    opt = wrap(inner, accumulation_steps=k)
    ref = make_model(device=device)
    ref_opt = make_opt(ref.parameters())
    for w, window in enumerate(windows):
        if w == 1:
            inner.load_state_dict(copy.deepcopy(sd))
            ref_opt.load_state_dict(copy.deepcopy(sd))
        run_managed(model, opt, [window])
        big_batch_update(ref, ref_opt, window)
    assert_params_close(model, ref)
    assert_states_close(opt, ref_opt)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state


def test_a_state_value_of_the_wrong_shape_is_refused_naming_the_param(device):
    """A tensor put into opt.state that the step cannot use (another shape) is refused at
    the boundary, naming the param and the key, before anything changes; with a value
    that fits, the retried step() goes on."""
    k = 2
    model = make_model(device=device)
    opt = wrap(adamw(model.named_parameters()), accumulation_steps=k)
    windows = make_windows(2, k, device=device)
    run_managed(model, opt, windows[:1])
    t = group_tensors(opt)[0]
    opt.state[t]["exp_avg"] = torch.zeros(3, device=device)
    x, y = windows[1][0]
    mse(model(x), y).backward()
    opt.step()
    mse(model(*windows[1][1][:1]), windows[1][1][1]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    sq = opt.state[t]["exp_avg_sq"].clone()
    with pytest.raises(ValueError, match=r"'fc1.weight'.*'exp_avg' = a tensor of shape \(3,\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert torch.equal(opt.state[t]["exp_avg_sq"], sq) and opt.update_count == 1
    opt.state[t]["exp_avg"] = torch.zeros_like(t)
    opt.step()
    assert opt.stepped and opt.update_count == 2


@pytest.mark.parametrize("opt_name,key", [("adamw_amsgrad", "max_exp_avg_sq"),
                                          ("sgd_momentum", "momentum_buffer"), ("adamw", "step")])
def test_every_state_key_put_into_opt_state_is_checked_naming_it(device, opt_name, key):
    """As exp_avg: amsgrad's max_exp_avg_sq and SGD's momentum_buffer of another shape, or
    a step of 3 elements, put into opt.state mid-window are refused at the boundary,
    naming the param and the key, before anything changes; with a value that fits, the
    retried step() goes on."""
    k = 2
    model = make_model(device=device)
    opt = wrap(OPTIMIZERS[opt_name](model.named_parameters()), accumulation_steps=k)
    windows = make_windows(2, k, device=device)
    run_managed(model, opt, windows[:1])
    t = group_tensors(opt)[0]
    opt.state[t][key] = torch.zeros(3, device=device)
    (x, y), (x2, y2) = windows[1]
    mse(model(x), y).backward()
    opt.step()
    mse(model(x2), y2).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"'fc1.weight'.*'{key}' = a tensor of shape \(3,\)"):
        opt.step()
    assert_unchanged(snap, model, opt)
    assert opt.update_count == 1
    opt.state[t][key] = torch.tensor(1.0) if key == "step" else torch.zeros_like(t)
    opt.step()
    assert opt.stepped and opt.update_count == 2


def test_a_refused_state_edit_leaves_another_edited_entry_as_it_was(device):
    """DESIGN.md section 2: bad input gets a clear error, and nothing is lost. Of two edits
    of opt.state made before one update (a param's entry cleared, another's exp_avg put
    with a wrong shape), the bad one refuses the step before any is taken in: the cleared
    param's state tensors, still held by the user, keep their values ("no state was
    changed")."""
    model = make_model(device=device)
    opt = wrap(adamw(model.parameters()))
    (x, y), = make_batches(1, device=device)
    for _ in range(2):
        mse(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    t0, t1 = group_tensors(opt)[:2]
    held = dict(opt.state[t0])
    before = {key: v.clone() for key, v in held.items()}
    opt.state[t0].clear()  # (taken in at the next update: t0 starts afresh)
    opt.state[t1]["exp_avg"] = torch.zeros(7, device=device)  # refused: not t1's shape
    mse(model(x), y).backward()
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert opt.update_count == 2
    for key, v in held.items():
        torch.testing.assert_close(v, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("opt_name,key", [("adamw", "exp_avg"),
                                          ("sgd_momentum", "momentum_buffer")])
def test_a_number_put_in_place_of_a_state_tensor_is_refused_naming_the_param(
        device, opt_name, key):
    """As a tensor of another shape: a plain number put into opt.state in place of a state
    tensor (only ``step`` may be a number) is refused at the boundary with ValueError,
    naming the param and the key, before anything changes; with a tensor that fits, the
    retried step() goes on."""
    model = make_model(device=device)
    opt = wrap(OPTIMIZERS[opt_name](model.named_parameters()))
    (x, y), = make_batches(1, device=device)
    mse(model(x), y).backward()
    opt.step()
    t = group_tensors(opt)[0]
    opt.state[t][key] = 0.5
    mse(model(x), y).backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"'fc1.weight'.*'{key}' = float"):
        opt.step()
    assert_unchanged(snap, model, opt)
    assert opt.update_count == 1
    opt.state[t][key] = torch.zeros_like(t)
    opt.step()
    assert opt.stepped and opt.update_count == 2


@pytest.mark.parametrize("bad", ["string", "meta", "shape", "complex"])
def test_wrapping_refuses_existing_state_it_cannot_use(device, bad):
    """State the inner optimizer holds when wrapped is copied into the flat buffers: a
    value torch's step could not use either (another shape, complex, no data, not a
    tensor) is refused naming the param and the key, and wrapping changes nothing, where
    it was cut or cast silently."""
    model = make_model(dtype=torch.bfloat16, device=device)
    inner = adamw(model.named_parameters())
    w = model.fc1.weight
    value = {"string": "x", "meta": torch.zeros(w.shape, device="meta"),
             "shape": torch.ones(w.numel() + 1, device=device),
             "complex": torch.ones(w.shape, dtype=torch.complex64, device=device)}[bad]
    inner.state[w] = {"step": torch.tensor(1.0), "exp_avg": value,
                      "exp_avg_sq": torch.zeros(w.shape, device=device)}
    with pytest.raises(ValueError, match=r"'fc1.weight'.*'exp_avg'"):
        wrap(inner)
    assert inner.param_groups[0]["params"][0] is w and inner.state[w]["exp_avg"] is value
    inner.state[w]["exp_avg"] = torch.zeros(w.shape, device=device)
    opt = wrap(inner)
    assert opt.param_groups is inner.param_groups


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_resume_mid_window_keeps_which_masters_grads_were_cleared(device, dtype):
    """Half params: the fp32 masters in the groups have a .grad viewing the window; the
    inner optimizer's own zero_grad() clears it (the window stays); a resume from a state
    dict taken there leaves it cleared too, as the run without stopping has it."""
    def run(resume):
        model = make_model(dtype=dtype, device=device)
        inner = adamw(model.parameters())
        opt = wrap(inner, accumulation_steps=2)
        (x, y), (x2, y2) = make_windows(1, 2, dtype=dtype, device=device)[0]
        mse(model(x), y).backward()
        opt.step()
        inner.zero_grad()
        if resume:
            sd = copy.deepcopy(opt.state_dict())
            msd = copy.deepcopy(model.state_dict())
            model = make_model(seed=4, dtype=dtype, device=device)
            model.load_state_dict(msd)
            opt = wrap(adamw(model.parameters()), accumulation_steps=2)
            opt.load_state_dict(sd)
        grads = [t.grad is None for t in group_tensors(opt)]
        mse(model(x2), y2).backward()
        opt.step()
        assert opt.stepped
        return grads, [p.detach().clone() for p in model.parameters()]

    (grads, want), (got_grads, got) = run(False), run(True)
    assert got_grads == grads == [True] * len(grads)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
