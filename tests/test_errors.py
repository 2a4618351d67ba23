"""Every bad input of DESIGN.md section 2 gets its documented error, early, and a failed
or bad call leaves everything unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _models import (
    ALL_DTYPES,
    BACKEND,
    DEFAULT_DEVICE,
    DEVICES,
    INF,
    adamw,
    assert_params_close,
    assert_unchanged,
    make_batches,
    make_model,
    make_windows,
    mse,
    reference_big_batch,
    run_managed,
    snapshot,
    sum_loss,
    wrap,
)

import fusedaccum


def _model_opt():
    model = make_model()
    return model, adamw(model.parameters())


# ----------------------------------------------------------------- constructor values


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4"], ids=repr)
def test_bad_accumulation_steps(bad):
    model, inner = _model_opt()
    with pytest.raises(ValueError):
        wrap(inner, accumulation_steps=bad)


@pytest.mark.parametrize("bad", [0, -1])
def test_callable_accumulation_steps_returning_bad_value_at_first_window(bad):
    model, inner = _model_opt()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError):
        opt = wrap(inner, accumulation_steps=lambda n: bad)
        opt.accumulation_boundary  # noqa: B018  (known before forward)
        mse(model(x), y).backward()
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_failed_construction_leaves_no_hooks_behind():
    """A wrapper whose construction failed never touches later backward passes."""
    model, inner = _model_opt()
    with pytest.raises(ValueError):
        wrap(inner, accumulation_steps=lambda n: 0)
    x, y = make_batches(1)[0]
    mse(model(x), y).backward()
    for p in model.parameters():
        assert p.grad is not None and not hasattr(p, "main_grad")


def _micro_batch(model, opt, batch):
    x, y = batch
    mse(model(x), y).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("failure", ["bad state", "out of memory"])
def test_failed_wrapping_loses_nothing(device, dtype, failure, monkeypatch):
    """A wrapper B whose construction fails in its second param group (a state entry of
    the wrong shape; out of memory) after building the first puts everything back: the
    params stay with wrapper A, whose partial window and training go on bitwise as if B
    had never been tried, and the inner optimizer is as it was and can be wrapped again."""
    from fusedaccum import accumulator

    k = 2
    windows = make_windows(2, k, dtype=dtype, device=device)
    model, twin = (make_model(dtype=dtype, device=device) for _ in range(2))
    a = wrap(adamw(model.parameters()), accumulation_steps=k)
    a_twin = wrap(adamw(twin.parameters()), accumulation_steps=k)
    _micro_batch(model, a, windows[0][0])  # A holds a partial window
    _micro_batch(twin, a_twin, windows[0][0])

    params = list(model.parameters())
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    if failure == "bad state":
        inner.state[params[2]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                                  "exp_avg_sq": torch.zeros(3)}
        expected = ValueError  # (naming the param and the key: _check_entry)
    else:
        built = []

        def bucket(*args, **kwargs):
            if built:
                raise torch.OutOfMemoryError("no memory for the second group")
            built.append(real_bucket(*args, **kwargs))
            return built[-1]

        real_bucket = accumulator.Bucket
        monkeypatch.setattr(accumulator, "Bucket", bucket)
        expected = torch.OutOfMemoryError
    ptrs = [p.data_ptr() for p in params]
    main_grads = [p.main_grad for p in params]
    grads = [p.grad for p in params]
    n_hooks = [len(p._post_accumulate_grad_hooks) for p in params]
    state = dict(inner.state)
    with pytest.raises(expected):
        wrap(inner, accumulation_steps=k)
    monkeypatch.undo()
    assert [p.data_ptr() for p in params] == ptrs
    assert all(p.main_grad is g for p, g in zip(params, main_grads))
    assert all(p.grad is g for p, g in zip(params, grads))
    assert [len(p._post_accumulate_grad_hooks) for p in params] == n_hooks
    assert [q for g in inner.param_groups for q in g["params"]] == params
    assert dict(inner.state) == state

    _micro_batch(model, a, windows[0][1])  # A's window goes on: nothing was lost
    _micro_batch(twin, a_twin, windows[0][1])
    assert a.stepped and a.update_count == 1
    for p, q in zip(params, twin.parameters()):
        assert torch.equal(p, q)

    inner.state.clear()
    b = wrap(inner, accumulation_steps=k)  # wrapping again works, and B takes over
    for batch in windows[1]:
        _micro_batch(model, b, batch)
        _micro_batch(twin, a_twin, batch)
    assert b.update_count == 1 and a.update_count == 1
    assert not any(bk.touched[i] for bs in a._buckets for bk in bs for i in range(len(bk)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("failure", ["bad state", "out of memory", "out of memory in state"])
def test_failed_wrapping_keeps_held_grads_and_the_inner_state(device, dtype, failure,
                                                              monkeypatch):
    """A model trained by plain AdamW (its state made) holds the gradients of a backward
    when a wrapper fails: in its second param group (a state entry of the wrong shape; out
    of memory), or taking the state over, after two of the four entries. Each param keeps
    its .grad, and the inner optimizer its state, entry for entry, with the values it
    had."""
    from fusedaccum import accumulator

    model = make_model(dtype=dtype, device=device)
    params = list(model.parameters())
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    (x, y), (x2, y2) = make_batches(2, dtype=dtype, device=device)
    mse(model(x), y).backward()
    inner.step()
    inner.zero_grad()
    mse(model(x2), y2).backward()  # (held when wrapping: it would join the window)
    if failure == "bad state":
        inner.state[params[2]]["exp_avg"] = torch.zeros(3, dtype=dtype, device=device)
        expected = ValueError
    elif failure == "out of memory in state":
        real_adopt, adopted = fusedaccum.FusedAccumulator._adopt_entry, []

        def adopt(self, *args):
            if len(adopted) == 2:
                raise torch.OutOfMemoryError("no memory for the third entry")
            adopted.append(real_adopt(self, *args))

        monkeypatch.setattr(fusedaccum.FusedAccumulator, "_adopt_entry", adopt)
        expected = torch.OutOfMemoryError
    else:
        real_bucket, built = accumulator.Bucket, []

        def bucket(*args, **kwargs):
            if built:
                raise torch.OutOfMemoryError("no memory for the second group")
            built.append(real_bucket(*args, **kwargs))
            return built[-1]

        monkeypatch.setattr(accumulator, "Bucket", bucket)
        expected = torch.OutOfMemoryError
    grads = [p.grad for p in params]
    state = {p: {k: v.clone() for k, v in st.items()} for p, st in inner.state.items()}
    entries = dict(inner.state)
    with pytest.raises(expected):
        wrap(inner, accumulation_steps=2)
    assert all(p.grad is g for p, g in zip(params, grads))
    assert dict(inner.state) == entries and list(inner.state) == list(state)
    for p, st in state.items():
        assert inner.state[p].keys() == st.keys()
        for key, value in st.items():
            torch.testing.assert_close(inner.state[p][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -1])
def test_callable_accumulation_steps_returning_bad_value_at_a_later_window(bad):
    model, inner = _model_opt()
    opt = wrap(inner, accumulation_steps=lambda n: 1 if n == 0 else bad)
    micro = make_batches(3)
    with pytest.raises(ValueError):
        for x, y in micro:
            opt.accumulation_boundary  # noqa: B018
            mse(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    # the value for the second window is asked for at its start, after the first one's
    # update (a callable may read opt.grad_norm of the window that ended): that update is
    # applied and counted, as the exception leaves it
    assert opt.update_count == 1 and opt.stepped and opt.micro_step == 0
    ref = make_model()
    reference_big_batch(ref, adamw, [micro[:1]])
    assert_params_close(model, ref)
    # the length stays unknown: the next window asks again (and raises again) rather than
    # reusing the last window's length of 1
    with pytest.raises(ValueError, match="accumulation_steps"):
        opt.accumulation_boundary  # noqa: B018
    x, y = micro[1]
    mse(model(x), y).backward()
    with pytest.raises(ValueError, match="accumulation_steps"):
        opt.step()
    assert opt.update_count == 1 and opt.micro_step == 0
    assert_params_close(model, ref)


def test_callable_accumulation_steps_asked_again_after_it_raised():
    """A callable that fails once at a window's start (it raised, or gave a bad value) is
    asked again at the next step(); the window then has the length it gives."""
    model, inner = _model_opt()
    asked, fail = [], {1}

    def k_fn(n):
        asked.append(n)
        if n in fail:
            fail.discard(n)
            raise RuntimeError("not yet")
        return 2 if n == 0 else 3

    opt = wrap(inner, accumulation_steps=k_fn)
    micro = make_batches(5)
    lengths, count = [], 0
    for i, (x, y) in enumerate(micro):
        mse(model(x), y).backward()
        try:
            opt.step()
        except RuntimeError:
            assert i == 1  # the first window's boundary: applied, then the callable raised
            assert opt.stepped and opt.update_count == 1
        count += 1
        if opt.stepped:
            lengths.append(count)
            count = 0
    assert lengths == [2, 3] and asked == [0, 1, 1, 2]
    ref = make_model()
    reference_big_batch(ref, adamw, [micro[:2], micro[2:]])
    assert_params_close(model, ref)


def test_callable_accumulation_steps_reads_the_window_that_ended():
    """The callable is asked at each window's start (after the update that ended the
    previous one): it can adapt k to that window's grad_norm or the update count."""
    model, inner = _model_opt()
    seen, made = [], {}

    def k_fn(n):
        opt = made.get("opt")  # (the first call comes from the constructor)
        seen.append((n, None if opt is None else opt.update_count,
                     None if opt is None else float(opt.grad_norm)))
        return 1

    opt = made["opt"] = wrap(inner, accumulation_steps=k_fn)
    for x, y in make_batches(2):
        mse(model(x), y).backward()
        opt.step()
        assert seen[-1][2] == float(opt.grad_norm) > 0
    assert [(n, u) for n, u, _ in seen] == [(0, None), (1, 1), (2, 2)]


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, -INF, float("nan"), True, "1.0", 1e-300])
def test_bad_max_grad_norm(bad):
    """(1e-300 is 0 in float32, where the clip coefficient is computed.)"""
    _, inner = _model_opt()
    with pytest.raises(ValueError, match="max_grad_norm"):
        wrap(inner, max_grad_norm=bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, INF, float("nan"), "static", True, 1e39, 1e-46])
def test_bad_loss_scale(bad):
    """(1e39 is inf in float32, where the scale is kept, and 1e-46 is 0: every window
    was skipped.)"""
    _, inner = _model_opt()
    with pytest.raises(ValueError, match="loss_scale"):
        wrap(inner, loss_scale=bad)


@pytest.mark.parametrize("bad", [0, 1, "no", 0.0])
def test_bad_master_weights(bad):
    """(0 == False: it passed the check and kept the masters.)"""
    _, inner = _model_opt()
    with pytest.raises(ValueError, match="master_weights must be None, True or False"):
        wrap(inner, master_weights=bad)


def test_max_grad_norm_and_accumulation_steps_set_later_are_checked_and_used():
    """Set on the wrapper after construction (a clipping schedule, a longer window): a bad
    value is refused as the constructor refuses it, keeping the old one (-1 was taken, a
    negative multiplier: gradient ascent); a good one applies from the next boundary, and
    to the next window (the one under way keeps its length)."""
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2,
               max_grad_norm=1.0)
    for bad in (-1, 0, float("nan"), "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            opt.max_grad_norm = bad
        assert opt.max_grad_norm == 1.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="accumulation_steps"):
            opt.accumulation_steps = bad
        assert opt.accumulation_steps == 2
    batches = make_batches(7)
    x, y = batches[0]
    mse(model(x), y).backward()
    opt.step()
    opt.accumulation_steps = 3  # (mid-window: this window stays 2 long)
    opt.max_grad_norm = 1e-3
    x, y = batches[1]
    mse(model(x), y).backward()
    opt.step()
    assert opt.stepped and opt.update_count == 1
    assert float(opt.grad_norm) > 1e-2  # (so that 1e-3 clips)
    before = [p.detach().clone() for p in model.parameters()]
    ends = []
    for x, y in batches[2:5]:
        mse(model(x), y).backward()
        ends.append(opt.accumulation_boundary)
        opt.step()
    assert ends == [False, False, True] and opt.stepped
    # plain SGD moves by lr times the clipped gradient, whose norm is the threshold
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    torch.testing.assert_close(moved.norm(), torch.tensor(0.1 * 1e-3), rtol=1e-4, atol=0)
    opt.accumulation_steps = lambda n: 1  # (between windows: the next one takes it)
    x, y = batches[5]
    mse(model(x), y).backward()
    assert opt.accumulation_boundary
    opt.step()
    assert opt.stepped and opt.update_count == 3


def test_infinite_max_grad_norm_clips_nothing():
    """As torch.nn.utils.clip_grad_norm_(params, inf): the norm is computed (opt.grad_norm),
    the gradient is not scaled."""
    windows = make_windows(2, 2)
    runs = []
    for clip in (INF, None):
        model, inner = _model_opt()
        opt = wrap(inner, accumulation_steps=2, max_grad_norm=clip)
        assert opt.max_grad_norm == clip
        runs.append((model, run_managed(model, opt, windows)))
    (a, norms_a), (b, norms_b) = runs
    assert len(norms_a) == 2 and all(n > 0 for n in norms_a)
    assert all(torch.equal(n, m) for n, m in zip(norms_a, norms_b))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("bad", [1, 1.0, 3, 0.5, -INF, "-inf", True])
def test_bad_norm_type(bad):
    """Only the 2-norm and the inf-norm are taken (torch's -inf, the smallest |value|, too
    is refused)."""
    _, inner = _model_opt()
    with pytest.raises(ValueError, match="norm_type must be 2.0 or inf"):
        wrap(inner, norm_type=bad)


@pytest.mark.parametrize("norm_type", [2, 2.0, INF])
def test_good_norm_types_are_accepted(norm_type):
    model, inner = _model_opt()
    opt = wrap(inner, norm_type=norm_type, max_grad_norm=1.0)
    x, y = make_batches(1)[0]
    mse(model(x), y).backward()
    opt.step()
    assert opt.stepped


class _MyLBFGS(torch.optim.LBFGS):
    pass


@pytest.mark.parametrize("cls", [torch.optim.LBFGS, _MyLBFGS], ids=["LBFGS", "subclass"])
def test_lbfgs_is_rejected(cls):
    """LBFGS re-evaluates the loss inside step(): refused, a subclass of it too."""
    model = make_model()
    with pytest.raises(ValueError, match="LBFGS re-evaluates the loss"):
        wrap(cls(model.parameters()))


def test_wrapping_an_already_wrapped_optimizer_of_half_params_is_refused():
    """Its groups hold the fp32 masters, which no backward reaches: a second wrapper
    trained nothing, silently (update_count grew, the model never changed)."""
    model = make_model(dtype=torch.bfloat16)
    inner = torch.optim.AdamW(model.parameters())
    wrap(inner)
    with pytest.raises(ValueError, match="master weight"):
        wrap(inner)
    with pytest.raises(ValueError, match="master weight"):  # rebuilt from its groups
        wrap(torch.optim.SGD(inner.param_groups, lr=0.1))
    wrap(torch.optim.AdamW(model.parameters()))  # the model's params: ownership moves
    bias = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))  # (a 1-D master too)
    inner = torch.optim.SGD([bias], lr=0.1)
    wrap(inner)
    with pytest.raises(ValueError, match="master weight"):
        wrap(inner)


@pytest.mark.parametrize("case", ["expand", "as_strided", "as_strided beside another"])
def test_params_with_elements_sharing_memory_are_refused(case):
    if case == "expand":
        params = [torch.nn.Parameter(torch.randn(3, 1).expand(3, 4))]
    else:  # elements 0, 4, 2, 6, 4, 8: the 4 twice (room enough for the pigeonhole check)
        base = torch.randn(10)
        params = [torch.nn.Parameter(base.as_strided((3, 2), (2, 4)))]
        if case.endswith("another"):
            params.append(torch.nn.Parameter(base[1:2]))  # in its gaps
    with pytest.raises(ValueError, match=r"index 0, .* has elements sharing memory"):
        wrap(torch.optim.SGD(params, lr=0.1))


def _tied_by_assign():
    """A tied LM restored the meta-device way: load_state_dict(assign=True) makes the
    embedding and the head two Parameters over one storage."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

    sd = LM().state_dict()
    with torch.device("meta"):
        model = LM()
    model.load_state_dict(sd, assign=True)
    assert model.emb.weight is not model.head.weight
    return model, [("emb.weight", model.emb.weight), ("head.weight", model.head.weight)]


@pytest.mark.parametrize("case", ["tied by assign", "overlapping slices", "later group"])
def test_params_sharing_memory_with_each_other_are_refused_naming_both(case):
    """torch.optim updates memory two params share through both of them; the wrapper,
    which gives every param a buffer of its own, would untie them silently: refused,
    naming both, before anything is touched."""
    if case == "tied by assign":
        model, named = _tied_by_assign()
        inner, first, second = torch.optim.AdamW(named), "emb.weight", "head.weight"
    else:
        base = torch.zeros(8, device=DEFAULT_DEVICE)
        a, b = nn.Parameter(base[0:4]), nn.Parameter(base[2:6])
        first, second = "a", "b"
        inner = torch.optim.AdamW(
            [("a", a), ("b", b)] if case == "overlapping slices"
            else [("c", nn.Parameter(torch.zeros(3, device=DEFAULT_DEVICE)))])
    if case == "later group":
        opt = wrap(inner)
        with pytest.raises(ValueError, match="'a'.*and.*'b'.* share memory"):
            opt.add_param_group({"params": [("a", a), ("b", b)]})
        assert len(opt.param_groups) == 1 and not hasattr(a, "main_grad")
        return
    with pytest.raises(ValueError, match=f"'{first}'.*and.*'{second}'.* share memory"):
        wrap(inner)


@pytest.mark.parametrize("case", ["past a shorter range", "part of an element"])
def test_strided_params_sharing_an_element_are_refused(case):
    """a: every other element of a buffer; b lies in a's gaps; c shares memory with a:
    its last element (after b, whose byte range ends before it), or, as bf16, half of
    a's third element (an element address a does not have)."""
    base = torch.zeros(8, device=DEFAULT_DEVICE)
    a, b = nn.Parameter(base[0::2]), nn.Parameter(base[1:2])
    c = nn.Parameter(base[6:7] if case == "past a shorter range"
                     else base.view(torch.bfloat16)[9:10])
    with pytest.raises(ValueError, match="'a'.*and.*'c'.* share memory"):
        wrap(torch.optim.SGD([("a", a), ("b", b), ("c", c)], lr=0.1))


def test_a_new_group_sharing_memory_with_a_wrapped_param_is_refused():
    """A param added later that views a wrapped param's memory (now the wrapper's flat
    buffer) would be untied from it: refused, before anything is touched."""
    model, inner = _model_opt()
    opt = wrap(inner)
    view = nn.Parameter(model.fc1.weight.detach()[0])
    with pytest.raises(ValueError, match="a param the wrapper holds.* share memory"):
        opt.add_param_group({"params": [view]})
    assert len(opt.param_groups) == 1 and not hasattr(view, "main_grad")


def test_interleaved_views_sharing_no_element_are_accepted():
    """Views with gaps whose byte ranges meet but whose elements differ are independent
    params, as for torch."""
    base = torch.zeros(4, 6, device=DEFAULT_DEVICE)
    a, b = nn.Parameter(base[:, 0::2]), nn.Parameter(base[:, 1::2])
    opt = wrap(torch.optim.SGD([a, b], lr=0.1))
    (a.sum() + 2 * b.sum()).backward()
    opt.step()
    full = torch.full((4, 3), -0.1, device=DEFAULT_DEVICE)
    assert torch.equal(a, full) and torch.equal(b, 2 * full)


def test_lazy_module_params_are_refused_naming_them():
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2)).to(DEFAULT_DEVICE)
    with pytest.raises(ValueError, match=r"'1.weight'.*uninitialized.*forward"):
        wrap(torch.optim.AdamW(model.named_parameters()))
    model(torch.zeros(1, 3, device=DEFAULT_DEVICE))  # materialized: accepted
    wrap(torch.optim.AdamW(model.parameters()))


@pytest.mark.skipif("cpu" not in DEVICES, reason=f"backend {BACKEND!r} runs on no CPU "
                    "tensors (shared memory is a CPU tensor's: share_memory_() leaves "
                    "CUDA tensors as they are)")
def test_params_in_shared_memory_are_named_in_a_warning():
    """Hogwild: other processes would never see the updates of the wrapper's buffers. (Not
    an error: mp.spawn shares the model it hands each rank, which then trains its own.)"""
    model = make_model(device="cpu").share_memory()
    with pytest.warns(RuntimeWarning, match="shared memory") as caught:
        fusedaccum.FusedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1),
                                    backend=BACKEND)
    assert len(caught) == 1 and caught[0].filename == __file__


def test_sparse_adam_is_rejected_when_wrapping():
    """SparseAdam needs sparse gradients, which the wrapper never accumulates: refused at
    once, not with torch's error at the first boundary k micro-batches later."""
    model = make_model()
    with pytest.raises(ValueError, match="SparseAdam"):
        wrap(torch.optim.SparseAdam(list(model.parameters())))


def test_duplicate_param_is_rejected():
    model = make_model()
    p = model.fc1.weight
    with pytest.warns(UserWarning):  # torch itself only warns
        inner = torch.optim.AdamW([p, model.fc1.bias, p])
    with pytest.raises(ValueError, match=r"index 2, .* appears more than once"):
        wrap(inner)


def test_a_group_appended_by_hand_with_a_param_already_wrapped_is_rejected():
    """A group appended to the groups by hand (torch's add_param_group checks skipped)
    holding a param the wrapper holds: refused, naming it, when the wrapper adopts the
    group (the next step()), before anything changes."""
    model, inner = _model_opt()
    opt = wrap(inner, accumulation_steps=1)
    x, y = make_batches(1)[0]
    mse(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups.append(dict(opt.param_groups[0], params=[model.fc2.bias]))
    with pytest.raises(ValueError, match=r"group 1, index 0, .* appears more than once"):
        opt.step()
    assert opt.update_count == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_add_param_group_with_a_param_already_present_is_rejected():
    model, inner = _model_opt()
    opt = wrap(inner)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [model.fc1.weight]})
    assert len(opt.param_groups) == 1


def test_add_param_group_takes_what_torch_takes_and_refuses_what_it_refuses():
    """add_param_group goes through torch's own normalization: named params (torch 2.6+)
    keep their names, and a set of params (no fixed order) is refused as in torch,
    leaving the groups as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)).to(DEFAULT_DEVICE)
    opt = wrap(torch.optim.AdamW(model[0].named_parameters()))
    opt.add_param_group({"params": list(model[1].named_parameters()), "lr": 0.5})
    assert [g["param_names"] for g in opt.param_groups] == [["weight", "bias"]] * 2
    assert opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": set(model[2].parameters())})
    assert len(opt.param_groups) == 2
    model(torch.randn(2, 4, device=DEFAULT_DEVICE)).sum().backward()
    opt.step()
    assert opt.stepped and model[2].weight.grad is not None  # (not wrapped)
    assert model[1].weight.main_grad is not None


@pytest.mark.parametrize("edit", ["pop", "swap", "replace", "append"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_edits_of_a_groups_params_list_are_refused(dtype, edit):
    """The wrapper steps its own buffers and numbers the state by the params it built: a
    group['params'] list edited after wrapping would give updates and state to the wrong
    params, silently. The next boundary and state_dict() refuse it, naming the group,
    and change nothing."""
    model = make_model(dtype=dtype)
    opt = wrap(adamw(model.parameters()))
    x, y = make_batches(1, dtype=dtype)[0]
    mse(model(x), y).backward()
    opt.step()
    params = opt.param_groups[0]["params"]
    kept = list(params)
    if edit == "pop":
        params.pop()
    elif edit == "swap":
        params[0], params[2] = params[2], params[0]
    elif edit == "replace":
        params[1] = params[1].detach().clone().requires_grad_()
    else:
        params.append(torch.zeros(3, requires_grad=True))
    mse(model(x), y).backward()
    snap = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="param group 0's 'params' list changed"):
        opt.step()
    with pytest.raises(RuntimeError, match="param group 0's 'params' list changed"):
        opt.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snap))
    params[:] = kept  # put back, it trains on
    opt.step()
    assert opt.stepped


@pytest.mark.parametrize("backend", ["cuda", "nope"])
def test_backend_that_cannot_run_here(backend):
    model = make_model(device="cpu")  # CPU params: the cuda backend can never step them
    inner = adamw(model.parameters())
    import fusedaccum

    with pytest.raises(RuntimeError, match=backend):
        fusedaccum.FusedAccumulator(inner, backend=backend)


def test_backend_that_runs_nowhere_here_is_refused_also_without_params():
    """A wrapper of empty param groups (params come later, by add_param_group) has no
    device to check its backend against: a backend that runs on no device of this machine
    is refused when it is built, as with params; one that runs somewhere is taken."""
    import fusedaccum

    for name, why in fusedaccum.available_backends().items():
        inner = torch.optim.SGD([{"params": []}], lr=0.1)
        if why is None:
            fusedaccum.FusedAccumulator(inner, backend=name)
        else:
            with pytest.raises(RuntimeError, match=f"backend '{name}' cannot run here"):
                fusedaccum.FusedAccumulator(inner, backend=name)


def test_backend_env_var_that_cannot_run_here(monkeypatch):
    import fusedaccum

    monkeypatch.setenv("FUSEDACCUM_BACKEND", "nope")
    model, inner = _model_opt()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1)[0]
    with pytest.raises(RuntimeError, match="nope"):
        opt = fusedaccum.FusedAccumulator(inner, backend="auto")
        mse(model(x), y).backward()
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_shard_optimizer_state_without_process_group_is_rejected():
    # ZeRO-1 splits the state across the ranks of process_group: without one there is
    # nothing to split across
    _, inner = _model_opt()
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        wrap(inner, shard_optimizer_state=True)


# -------------------------------------------------------------------------- params


class _Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3, sparse=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, idx):
        return self.fc(self.emb(idx))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_sparse_gradient_is_rejected_naming_the_param(named, dtype):
    """fp32 params (their .grad views the window) and fp16/bf16 params (their gradients
    are added to it, batched or not) alike."""
    model = make_model(cls=_Emb, dtype=dtype)
    params = model.named_parameters() if named else model.parameters()
    opt = wrap(torch.optim.SGD(params, lr=0.1))
    idx = torch.tensor([[1, 2], [3, 1]], device=model.fc.weight.device)
    with pytest.raises(RuntimeError, match="emb.weight" if named else "(?i)sparse") as info:
        model(idx).sum().backward()
        opt.step()
    assert opt.update_count == 0
    # autograd gave fc its gradient first: the message says how to drop it
    assert "reset_accumulation" in str(info.value)
    window = opt.state_dict()["fusedaccum"]["accumulators"]  # (a half batch: flushed here)
    assert sorted(window) == [1, 2] and all(a.abs().sum() > 0 for a in window.values())
    opt.reset_accumulation()
    assert model.fc.weight.main_grad.abs().sum() == 0


@pytest.mark.parametrize("kind", ["complex", "integer"])
def test_complex_or_integer_param_is_rejected_naming_it(kind):
    model = make_model()
    if kind == "complex":
        odd = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    else:
        odd = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    name = f"my_{kind}_param"
    inner = torch.optim.AdamW([("fc1.weight", model.fc1.weight), (name, odd)])
    with pytest.raises((TypeError, RuntimeError), match=name):
        wrap(inner)
    # unnamed: still rejected
    with pytest.raises((TypeError, RuntimeError)):
        wrap(torch.optim.AdamW([model.fc2.weight, odd]))


def test_tensor_subclass_param_is_rejected_naming_it():
    """A param of a tensor subclass that dispatches its own operations (FSDP2's DTensor,
    a quantized weight; here torch's test subclass TwoTensor) is refused by name before
    anything is touched: the wrapper built over one and moved its "data" into a flat
    buffer, and FSDP2's DTensors were refused as tied weights. So is FSDP1's
    FlatParameter, whose gradient FSDP reduces from the .grad the wrapper releases."""
    from torch.testing._internal.two_tensor import TwoTensor

    model = make_model()
    odd = nn.Parameter(TwoTensor(torch.randn(3), torch.randn(3)))
    inner = torch.optim.AdamW([("fc1.weight", model.fc1.weight), ("two", odd)])
    with pytest.raises(TypeError, match=r"'two'.*TwoTensor.*subclass.*process_group="):
        wrap(inner)
    assert not hasattr(model.fc1.weight, "main_grad") and not hasattr(odd, "main_grad")
    # FSDP1's FlatParameter (a Parameter marked as one; FSDP itself needs a GPU)
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.randn(5), requires_grad=True)
    with pytest.raises(TypeError, match=r"'flat'.*FlatParameter.*process_group="):
        wrap(torch.optim.AdamW([("fc1.weight", model.fc1.weight), ("flat", flat)]))
    assert not hasattr(model.fc1.weight, "main_grad")
    # a subclass of Parameter that leaves dispatch to torch is a plain param
    plain = type("MyParam", (nn.Parameter,), {})(torch.randn(3, device=DEFAULT_DEVICE))
    opt = wrap(torch.optim.AdamW([plain]))
    (plain * 2).sum().backward()
    opt.step()
    assert opt.update_count == 1


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_meta_device_param_is_rejected_naming_it(backend):
    """A param still on the meta device (deferred init) is refused by name, with what to
    do, before anything is touched (it failed deep inside the buffers, naming nothing)."""
    model = make_model()
    with torch.device("meta"):
        late = nn.Linear(3, 2)
    inner = torch.optim.AdamW([("fc1.weight", model.fc1.weight), ("late.weight", late.weight)])
    with pytest.raises(ValueError, match=r"'late.weight'.*meta device.*to_empty"):
        fusedaccum.FusedAccumulator(inner, backend=backend)
    assert not hasattr(model.fc1.weight, "main_grad")


# ------------------------------------------------------------------------ num_items


@pytest.mark.parametrize("bad", [0, -5, float("inf"), torch.tensor(float("inf")),
                                 torch.tensor(True), 10**40, 1e39,
                                 torch.tensor(1.0, device="meta")], ids=repr)
def test_bad_num_items_is_rejected_and_loses_nothing(bad):
    k = 2
    sizes = [3, 5]
    micro = make_batches(2, sizes=sizes)
    model = make_model()
    opt = wrap(adamw(model.parameters()), accumulation_steps=k)
    for i, (x, y) in enumerate(micro):
        sum_loss(model(x), y).backward()
        snap = snapshot(model, opt)
        held = [p.main_grad.clone() for p in model.parameters()]
        with pytest.raises(ValueError):  # at a plain micro-batch, then at the boundary
            opt.step(num_items=bad)
        assert opt.micro_step == i and not opt.stepped and opt.update_count == 0
        assert_unchanged(snap, model, opt)
        for p, h in zip(model.parameters(), held):
            assert torch.equal(p.main_grad, h)
        opt.step(num_items=sum(sizes))
        opt.zero_grad()
    assert opt.stepped
    ref = make_model()
    reference_big_batch(ref, adamw, [micro], loss_fn=sum_loss, num_items=[sum(sizes)])
    assert_params_close(model, ref)


# ----------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capturable_is_refused_where_torch_refuses_it(device, cls, dtype):
    """``capturable=True`` where torch's own step refuses it (CPU params): the boundary
    raises naming the group, before anything changes, and the window is kept for a retry
    with it off; where torch accepts it, it trains as without it."""
    k = 2
    windows = make_windows(1, k, dtype=dtype, device=device)
    probe = nn.Parameter(torch.ones(3, device=device))
    probe.grad = torch.ones(3, device=device)
    try:
        cls([probe], capturable=True).step()
        torch_refuses = False
    except (AssertionError, RuntimeError, ValueError):
        torch_refuses = True

    def run(capturable):
        model = make_model(dtype=dtype, device=device)
        opt = wrap(cls(model.parameters(), lr=1e-2, capturable=capturable),
                   accumulation_steps=k)
        for x, y in windows[0]:
            mse(model(x), y).backward()
            if capturable and torch_refuses and opt.accumulation_boundary:
                snap = snapshot(model, opt)
                held = [p.main_grad.clone() for p in model.parameters()]
                with pytest.raises(ValueError, match="param group 0: capturable=True"):
                    opt.step()
                assert_unchanged(snap, model, opt)
                assert all(torch.equal(p.main_grad, h) for p, h in zip(model.parameters(), held))
                assert opt.update_count == 0 and not opt.stepped
                opt.param_groups[0]["capturable"] = False
            opt.step()
            opt.zero_grad()
        assert opt.update_count == 1
        return [p.detach().clone() for p in model.parameters()]

    want, got = run(False), run(True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_state_after_errors_still_trains_like_torch():
    """A wrapper that refused bad calls keeps training exactly like plain torch."""
    model = make_model()
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    windows = [make_batches(2, seed=s) for s in (1, 2)]
    with pytest.raises(ValueError):
        opt.step(num_items=0)
    run_managed(model, opt, windows)
    ref = make_model()
    reference_big_batch(ref, adamw, windows)
    assert_params_close(model, ref)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch_save"])
def test_a_wrapper_cannot_be_pickled_or_deep_copied(how):
    """docs/usage.md: a wrapper is tied to its model by hooks, so a copy of it would train
    nothing (or the model behind the original's back): pickling, deep-copying and
    torch.save of the wrapper itself are refused with a pointer to state dicts, and the
    wrapper trains on as before."""
    import copy
    import io
    import pickle

    model = make_model()
    opt = wrap(adamw(model.parameters()), accumulation_steps=2)
    windows = make_windows(2, 2)
    run_managed(model, opt, windows[:1])
    copier = {"pickle": pickle.dumps, "deepcopy": copy.deepcopy,
              "torch_save": lambda o: torch.save(o, io.BytesIO())}[how]
    with pytest.raises(TypeError, match=r"cannot be pickled or deep-copied.*state_dict"):
        copier(opt)
    run_managed(model, opt, windows[1:])
    ref = make_model()
    reference_big_batch(ref, adamw, windows)
    assert_params_close(model, ref)


@pytest.mark.parametrize("conversion", ["to(float64)", "load_state_dict(assign=True)"])
def test_swapping_wrapped_params_on_conversion_fails_inside_torch(conversion):
    """docs/usage.md: with torch.__future__.set_swap_module_params_on_conversion(True) a
    module conversion (or a load with assign=True) swaps each param's tensor in place,
    which torch refuses for a tensor something holds a weak reference to, as the wrapper
    does for its params: the error comes from torch's swap_tensors."""
    model = make_model()
    opt = wrap(adamw(model.parameters()))  # (alive: a collected wrapper leaves the params)
    saved = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with pytest.raises(RuntimeError) as caught:
            if conversion == "to(float64)":
                model.to(torch.float64)
            else:
                model.load_state_dict(make_model(seed=3).state_dict(), assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(saved)
    messages = f"{caught.value} {caught.value.__cause__}"
    assert "has weakref associated with it" in messages
    assert opt.param_groups[0]["params"][0] is model.fc1.weight


def test_max_grad_norm_set_mid_window_clips_that_windows_update():
    """docs/usage.md: a max_grad_norm set after construction applies from the next
    boundary: set in the middle of a window, it clips the update that ends that window
    (plain SGD moves by lr times the clipped gradient, whose norm is the threshold)."""
    model = make_model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2)
    (x, y), (x2, y2) = make_batches(2)
    mse(model(x), y).backward()
    opt.step()
    opt.max_grad_norm = 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    mse(model(x2), y2).backward()
    opt.step()
    assert opt.stepped and float(opt.grad_norm) > 1e-2  # (so that 1e-3 clips)
    moved = torch.cat([(p - b).flatten() for p, b in zip(model.parameters(), before)])
    torch.testing.assert_close(moved.norm(), torch.tensor(0.1 * 1e-3), rtol=1e-4, atol=0)
