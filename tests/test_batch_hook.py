"""The C++ batching hook (csrc/hooks.cpp) against the Python hook it stands in for.

FusedAccumulator puts a C++ post-accumulate-grad hook in front of the Python hook of each
small half param when the C++ extension is there (backends other than reference), and a
C++ tensor pre-hook that hands it the gradient before AccumulateGrad. It must
leave every observable thing as the Python hook does (FUSEDACCUM_FAST_HOOKS=0 turns it
off), take the common case for real, and keep torch's hook semantics: every other hook
on the param runs, in registration order, and a removed hook stops. Its batch flush
(flush_batch, also what FusedAccumulator._flush calls) uses the extension's op, or on the
triton backend the kernel with a table the C++ code builds (table flush).
"""

import gc
import inspect
import operator
import warnings
import weakref

import pytest
import torch
from _models import make_model, make_windows, mse

from fusedaccum import FusedAccumulator, accumulator
from fusedaccum.ops import native
from fusedaccum.ops import triton as triton_ops

MODULE = (native.hooks_module()
          if native.unavailable_reason("cpu", torch.device("cpu")) is None else None)
pytestmark = pytest.mark.skipif(
    MODULE is None, reason="the C++ extension (with its batching hook) is unavailable here")

HALF = [torch.bfloat16, torch.float16]
# (device, backend): the hook also runs on the autograd engine's CUDA device thread
PLACES = [("cpu", "cpu")] + (
    [("cuda", "cuda")] if native.unavailable_reason("cuda", torch.device("cuda")) is None
    else [])
# ... and flushes full batches for the triton backend with a table it builds (on CPU
# tensors under TRITON_INTERPRET=1, the interpreter runs the kernel on that table)
TRITON_PLACES = [(dev, "triton") for dev in ("cpu", "cuda")
                 if (dev == "cpu" or torch.cuda.is_available())
                 and triton_ops.unavailable_reason("triton", torch.device(dev)) is None
                 and triton_ops.table_flush(torch.device(dev), torch.bfloat16) is not None]
TABLE_CPU = [p for p in TRITON_PLACES if p[0] == "cpu"]
TABLE_CUDA = [p for p in TRITON_PLACES if p[0] == "cuda"]
needs_table_cpu = pytest.mark.skipif(not TABLE_CPU, reason="Triton does not run on CPU here")
# (the "cxx" launches: Triton's compiled kernels and the extension's CUDA build)
needs_table_cuda = pytest.mark.skipif(
    not TABLE_CUDA or PLACES[-1][0] != "cuda",
    reason="Triton's compiled kernels and the extension's CUDA build")


def place_id(place) -> str:
    """(the triton backend's as "table-flush": bench/gpu_session.sh runs these files with
    -k "not triton" once the extension is built)"""
    device, backend = place
    return f"{device}-{'table-flush' if backend == 'triton' else backend}"


def hits() -> int:
    return MODULE.batch_hook_hits()


def one_window(model, opt, k=2):
    for x, y in make_windows(1, k, dtype=torch.bfloat16, device="cpu")[0]:
        mse(model(x), y).backward()
        opt.step()


def train(dtype, fast: bool, monkeypatch, *, k=3, windows=3, extra_hook=None,
          place=("cpu", "cpu"), between=None, create_graph=False, **kw):
    """Windows of k micro-batches; the params, masters, their .grad and optimizer state.
    ``between(model)`` runs after each window's boundary."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    device, backend = place
    model = make_model(dtype=dtype, device=device)
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           accumulation_steps=k, backend=backend, **kw)
    if extra_hook is not None:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(extra_hook)
    seen = []
    for window in make_windows(windows, k, dtype=dtype, device=device):
        for j, (x, y) in enumerate(window):
            mse(model(x), y).backward(create_graph=create_graph)
            if j == k - 2:  # mid-window: what the masters expose as .grad
                seen.append([None if m.grad is None else m.grad.clone()
                             for m in opt.param_groups[0]["params"]])
            opt.step()
        if between is not None:
            between(model)
    state = [{k2: v.clone() for k2, v in s.items() if torch.is_tensor(v)}
             for s in opt.inner.state.values()]
    return [p.detach().clone() for p in model.parameters()], seen, state, opt


def assert_same_runs(got, want) -> None:
    """Two train() results bitwise equal: params, mid-window .grad of the masters, state,
    and the last window's norm."""
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    for a_list, b_list in zip(got[1], want[1]):
        for a, b in zip(a_list, b_list):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for a, b in zip(got[2], want[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(got[3].grad_norm, want[3].grad_norm)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
@pytest.mark.parametrize("dtype", HALF)
def test_same_result_as_the_python_hook_bitwise(dtype, place, monkeypatch):
    before, calls = hits(), MODULE.batch_flush_calls()
    got = train(dtype, True, monkeypatch, place=place)
    taken = hits() - before
    called = MODULE.batch_flush_calls()
    want = train(dtype, False, monkeypatch, place=place)
    assert hits() - before == taken  # the Python run never took the C++ path
    assert MODULE.batch_flush_calls() == called
    # all but the first hook of each backward: 3 windows x 3 backwards x (4 params - 1)
    assert taken == 27
    # the end-of-backward flush of the 4 batched grads: _flush calls C++ (flush_batch),
    # except on CPU in a window's last micro-batch (the norm's statistic rides on it)
    flushes = 3 * (2 if place[0] == "cpu" else 3)
    assert (called[0] - calls[0], called[1] - calls[1]) == (flushes, 4 * flushes)
    assert_same_runs(got, want)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
def test_norm_riding_and_clipping_as_the_python_hook(place, monkeypatch):
    """(On CPU the last micro-batch's accumulations produce the clipping norm's
    statistics: the batches' in Python's flush, the other params' in the Python hook.)"""
    got = train(torch.bfloat16, True, monkeypatch, max_grad_norm=0.01, place=place)
    want = train(torch.bfloat16, False, monkeypatch, max_grad_norm=0.01, place=place)
    assert_same_runs(got, want)


def test_other_hooks_run_in_order_and_results_stay(monkeypatch):
    """A hook the user adds after the wrapper's runs after it (it sees .grad released, as
    with the Python hook), every time; the C++ path steps aside for such params."""
    calls = []

    def user_hook(p):
        calls.append(p.grad is None)

    before = hits()
    got = train(torch.bfloat16, True, monkeypatch, extra_hook=user_hook)
    assert hits() == before  # the dict holds another hook: the Python hooks run
    assert len(calls) == 3 * 3 * 4 and all(calls)
    want = train(torch.bfloat16, False, monkeypatch)
    assert_same_runs(got, want)


def test_hook_registered_before_the_wrapper_runs_first(monkeypatch):
    model = make_model(dtype=torch.bfloat16, device="cpu")
    seen = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is not None))
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                           backend="cpu")
    one_window(model, opt)
    assert seen == [True] * 8  # it saw the gradient before the wrapper took it


def test_a_new_wrapper_takes_the_params_over(monkeypatch):
    """A second wrapper over the same params removes the first one's hooks: the C++ hook
    of the first steps aside (its key is gone), the second's takes the gradients."""
    model = make_model(dtype=torch.bfloat16, device="cpu")
    first = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                             backend="cpu")
    second = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                              backend="cpu")
    before = hits()
    one_window(model, second)
    assert hits() - before == 2 * 3
    assert not any(b.touched[i] for bs in first._buckets for b in bs for i in range(len(b)))
    assert all(p.grad is None for p in model.parameters())


def test_a_failed_wrapping_gives_the_cpp_hooks_back(monkeypatch):
    """A wrapper whose construction fails after it hooked some params (its second param
    group's state entry has the wrong shape) gives them back to the wrapper that holds
    them, C++ hooks included: that one's backwards go through the C++ hook as before."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    model = make_model(dtype=torch.bfloat16, device="cpu")
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                           backend="cpu")
    params = list(model.parameters())
    inner = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}])
    inner.state[params[2]] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                              "exp_avg_sq": torch.zeros(3)}
    with pytest.raises(ValueError):
        FusedAccumulator(inner, accumulation_steps=2, backend="cpu")
    gc.collect()
    before = hits()
    one_window(model, opt)
    assert hits() - before == 2 * 3  # (all but the first hook of each backward)
    assert opt.update_count == 1


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("path", ["batched", "direct"])
def test_create_graph_gradients_are_left_to_the_python_hook(path, monkeypatch):
    """backward(create_graph=True) gives the half params gradients that require grad (they
    hold the graph): the C++ hooks leave them to the Python hook, which detaches them
    before they join a batch or the accumulator; the windows are the Python hook's."""
    if path == "direct":
        monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 16)  # fc1.weight, fc2.weight
    before = hits()
    got = train(torch.bfloat16, True, monkeypatch, create_graph=True)
    assert hits() == before  # (every gradient required grad: none taken in C++)
    assert_same_runs(got, train(torch.bfloat16, False, monkeypatch, create_graph=True))


def test_dropped_wrapper_is_freed_and_grads_stay_with_the_param(monkeypatch):
    model = make_model(dtype=torch.bfloat16, device="cpu")
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                           backend="cpu")
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    x, y = make_windows(1, 1, dtype=torch.bfloat16, device="cpu")[0][0]
    mse(model(x), y).backward()  # both hooks see a dead wrapper: plain autograd
    assert all(p.grad is not None for p in model.parameters())


def test_reference_backend_stays_pure_python(monkeypatch):
    monkeypatch.delenv("FUSEDACCUM_FAST_HOOKS", raising=False)
    model = make_model(dtype=torch.bfloat16, device="cpu")
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                           backend="reference")
    before = hits()
    one_window(model, opt)
    assert hits() == before


def test_install_checks_its_arguments():
    module = MODULE
    p = torch.zeros(3, requires_grad=True)
    h = p.register_post_accumulate_grad_hook(lambda p: None)
    o = weakref.ref(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(ValueError, match="key is not in"):
        module.install_batch_hook(p, p._post_accumulate_grad_hooks, h.id + 1, o, o, 0, 4, 8)
    with pytest.raises(ValueError, match="bad index"):
        module.install_batch_hook(p, p._post_accumulate_grad_hooks, h.id, o, o, -1, 4, 8)
    for nbytes, flush_bytes in ((-1, 8), (4, 0), (4, -8)):  # (a batch never full, or always)
        with pytest.raises(ValueError, match="bad index, nbytes or flush_bytes"):
            module.install_batch_hook(p, p._post_accumulate_grad_hooks, h.id, o, o, 0, nbytes,
                                      flush_bytes)
    with pytest.raises(ValueError, match="key is not in"):  # not the param's dict
        module.install_batch_hook(p, {h.id: None}, h.id, o, o, 0, 4, 8)
    with pytest.raises(TypeError):
        module.install_batch_hook(torch.zeros(1), p._post_accumulate_grad_hooks, h.id, None,
                                  o, 0, 4, 8)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
@pytest.mark.parametrize("clip", [None, 0.01])
def test_direct_accumulation_as_the_python_hook(place, clip, monkeypatch):
    """Params above the batching limit: the C++ hook accumulates them at once with the
    extension's op (triton: its kernel over a one-pair table) (no statistic: on CPU
    buckets not in a window's last micro-batch, where the norm rides on the Python hook's
    accumulations)."""
    monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 16)  # fc1.weight, fc2.weight direct
    before, times = hits(), MODULE.batch_hook_times()
    got = train(torch.bfloat16, True, monkeypatch, place=place, max_grad_norm=clip)
    taken, timed = hits() - before, MODULE.batch_hook_times()
    want = train(torch.bfloat16, False, monkeypatch, place=place, max_grad_norm=clip)
    assert MODULE.batch_hook_times() == timed  # (none in the Python run)
    # per backward: 2 direct params (not in the last micro-batch of a CPU window) and
    # 2 batched ones, the first of which queues the flush in Python
    direct = 2 * 3 * (2 if place[0] == "cpu" else 3)
    assert taken == direct + 3 * 3 * 1
    # (bench/window_phases.py's C++ rows: the direct adds counted, and their host time)
    assert timed[3] - times[3] == direct and timed[2] > times[2]
    assert timed[0] == times[0]  # no full batch
    assert_same_runs(got, want)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
def test_direct_first_gradient_overwrites_a_dirty_accumulator_written_since(place,
                                                                            monkeypatch):
    """The boundary leaves the stepped accumulators dirty (the window just applied); a
    write to the buffer before the next backward (``p.main_grad.add_``: not kept,
    docs/internals.md) moves its version off clean_version. A dirty param's first
    gradient of the window is still written over its accumulator, by the C++ direct add
    as by the Python hook (not added to the old window and the write)."""
    monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 16)  # fc1.weight, fc2.weight direct

    def write(model):
        with torch.no_grad():
            for p in (model.fc1.weight, model.fc2.weight):
                p.main_grad.add_(1.0)

    before, adds = hits(), MODULE.batch_hook_times()[3]
    got = train(torch.bfloat16, True, monkeypatch, place=place, between=write)
    # both direct params of the windows' first backwards after a boundary (not the last
    # micro-batch: no statistic) went through the C++ add
    assert hits() > before and MODULE.batch_hook_times()[3] - adds >= 2 * 2
    want = train(torch.bfloat16, False, monkeypatch, place=place, between=write)
    assert_same_runs(got, want)
    assert_same_runs(got, train(torch.bfloat16, True, monkeypatch, place=place))


@pytest.mark.parametrize("why", ["dirty", "fp32"])
def test_direct_gradient_queues_the_callback_the_wrapper_wants(why, monkeypatch):
    """Direct mode (gradients above the batching limit) skips the end-of-backward callback
    only where the wrapper needs none: with dirty accumulators (after a boundary) the
    backward's first gradient goes to Python, which queues it, so a param this backward
    gave no gradient reads zeros after it; with fp32 params the .grad a zero_grad()
    cleared comes back (the window's view) although this backward gave it nothing."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 4)  # every half param direct
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, generator=g).bfloat16())
    b = torch.nn.Parameter(torch.randn(8, generator=g).to(
        torch.bfloat16 if why == "dirty" else torch.float32))
    opt = FusedAccumulator(torch.optim.SGD([a, b], lr=0.1), accumulation_steps=3,
                           backend="cpu")
    for _ in range(3 if why == "dirty" else 1):  # (dirty: a whole window, its boundary)
        x = [torch.randn(8, generator=g).to(p.dtype) for p in (a, b)]
        ((a * x[0]).float().sum() + (b * x[1]).float().sum()).backward()
        opt.step()
    if why == "fp32":
        opt.zero_grad()
        assert b.grad is None
    window = a.main_grad.clone() if why == "fp32" else torch.zeros(8)
    x = torch.randn(8, generator=g).bfloat16()
    (a * x).float().sum().backward()  # (not the window's last micro-batch: no statistic)
    assert torch.equal(a.main_grad, window + x.float())
    if why == "dirty":
        assert torch.count_nonzero(b.main_grad) == 0
    else:
        assert b.grad is b.main_grad


def _write_then_train(fast, monkeypatch):
    """k=3, every half param direct: b's accumulator written by hand before the window's
    first gradient; a gets a gradient in every micro-batch, b only in the second. b's
    accumulator after that backward, and the params after the boundary."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 4)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(8, generator=g).bfloat16()) for _ in range(2))
    opt = FusedAccumulator(torch.optim.SGD([a, b], lr=0.1), accumulation_steps=3,
                           backend="cpu")
    with torch.no_grad():
        b.main_grad.add_(1.0)  # (its version counter tells the wrapper)
    for j in range(3):
        loss = (a * torch.randn(8, generator=g).bfloat16()).float().sum()
        if j == 1:
            loss = loss + (b * torch.randn(8, generator=g).bfloat16()).float().sum()
        loss.backward()
        if j == 1:
            seen = b.main_grad.clone()
        opt.step()
    return [seen, a.detach().clone(), b.detach().clone()]


def test_a_write_by_hand_is_not_forgotten_by_a_later_direct_add(monkeypatch):
    """After something else wrote the buffer (p.main_grad.add_ on a param without a
    gradient yet), the wrapper no longer knows that the untouched accumulators hold zeros,
    and the C++ hook's own direct adds to other params must not make it believe so again:
    b's first gradient is added to what was written, not written over it, as with the
    Python hook."""
    got = _write_then_train(True, monkeypatch)
    want = _write_then_train(False, monkeypatch)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def _train_two_backwards_in_last(fast, monkeypatch, place, windows=2):
    """Windows of 2 micro-batches; the last one is two backward passes: the first reaches
    s1 only (its statistic rides on the end-of-backward flush), the second s0 (a param
    without a statistic: its hook, the backward's first, queues the flush in Python) then
    s1 again. The params and their masters, each window's norm, and the norm of the
    window's sum (clipped: the norm scales the update)."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    device, backend = place
    g = torch.Generator().manual_seed(0)
    s0, s1 = (torch.nn.Parameter(torch.randn(8, generator=g).bfloat16().to(device))
              for _ in range(2))
    opt = FusedAccumulator(torch.optim.SGD([s0, s1], lr=0.1), accumulation_steps=2,
                           backend=backend, max_grad_norm=0.01)
    norms, sums = [], []
    for _ in range(windows):
        xs = [torch.randn(8, generator=g).bfloat16().to(device) for _ in range(4)]
        ((s0 * xs[0]).float().square().sum() + (s1 * xs[1]).float().square().sum()).backward()
        opt.step()
        (s1 * xs[2]).float().square().sum().backward()
        # (s1's part built first: autograd reaches s0's AccumulateGrad first)
        ((s1 * xs[3]).float().square().sum() + (s0 * xs[0]).float().square().sum()).backward()
        sums.append(torch.cat([s0.main_grad, s1.main_grad]).norm() / 2)
        opt.step()
        norms.append(opt.grad_norm)
    masters = [m.detach().clone() for m in opt.param_groups[0]["params"]]
    return [s0.detach().clone(), s1.detach().clone(), *masters], norms, sums


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
def test_second_gradient_after_its_statistic_rode_stales_it(place, monkeypatch):
    """On CPU the norm's statistics ride on the last micro-batch's flushes; a param whose
    batch statistic was made gets a second gradient in the same micro-batch (a second
    backward): that statistic is stale, so the C++ hook leaves the gradient to Python
    (which marks it so) and the clipping norm is the window's, as the Python hook's."""
    got, got_norms, sums = _train_two_backwards_in_last(True, monkeypatch, place)
    want, want_norms, _ = _train_two_backwards_in_last(False, monkeypatch, place)
    for a, b in zip(got, want):  # the params and their masters
        assert torch.equal(a, b)
    for a, b in zip(got_norms, want_norms):
        assert torch.equal(a, b)
    for n, s in zip(got_norms, sums):
        torch.testing.assert_close(n, s, rtol=1e-5, atol=0)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
@pytest.mark.parametrize("clip", [None, 0.01])
def test_full_batches_flushed_in_cpp_as_in_python(place, clip, monkeypatch):
    """A gradient that fills its batch: the C++ hook flushes the batch with it (the
    extension's accumulate_many_; on the triton backend the kernel, with the table the hook
    built), except where the norm's statistic rides on the flush (CPU buckets, a window's
    last micro-batch), which Python's flush makes."""
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 1)  # every grad fills a batch
    before, (flushes, grads) = hits(), MODULE.batch_hook_flushes()
    times = MODULE.batch_hook_times()
    got = train(torch.bfloat16, True, monkeypatch, place=place, max_grad_norm=clip)
    taken = hits() - before
    flushed, timed = MODULE.batch_hook_flushes(), MODULE.batch_hook_times()
    want = train(torch.bfloat16, False, monkeypatch, place=place, max_grad_norm=clip)
    assert MODULE.batch_hook_flushes() == flushed  # none in the Python run
    assert MODULE.batch_hook_times() == timed
    # (bench/window_phases.py's C++ rows: the full batches' host time, no direct add)
    assert timed[0] > times[0] and timed[3] == times[3]
    # per backward the 3 params after the first (which queues the end-of-backward flush),
    # but on CPU not in the last of the 3 micro-batches of each of the 3 windows; one
    # gradient in each batch
    assert taken == flushed[0] - flushes == flushed[1] - grads == \
        3 * (2 if place[0] == "cpu" else 3) * 3
    assert_same_runs(got, want)
    for b in got[3]._all_buckets():  # the batch is empty after the window
        assert b.pending == [] and b.pending_bytes == 0 and not any(b.is_pending)


@pytest.mark.parametrize("place", [("cpu", "cpu")] + TABLE_CPU, ids=place_id)
@pytest.mark.parametrize("flush_bytes", [3 * 2 * 16, 2 * (3 + 18 + 6 + 24)],
                         ids=["past-the-limit", "exactly-the-limit"])
@pytest.mark.parametrize("setting", ["_BATCH_FLUSH_BYTES", "_BATCH_FLUSH_BYTES_CPU"])
def test_batch_full_with_waiting_grads_flushes_them_all(place, flush_bytes, setting,
                                                        monkeypatch):
    """Grads waiting in a batch go with the one that fills it (one op call, every element
    written once): the same as the Python hook with the batch filling on the 3rd grad.
    A batch whose bytes reach the limit exactly is full too, as in Python's hook
    (``pending_bytes >= flush_bytes``; the 4 bf16 params hold 3 + 18 + 6 + 24 elements).
    A CPU bucket's limit is the smaller of the GPUs' and the CPUs' settings, for the C++
    hook as for Python's (accumulator._flush_bytes)."""
    monkeypatch.setattr(accumulator, setting, flush_bytes)  # bf16 bytes
    (flushes, grads) = MODULE.batch_hook_flushes()
    got = train(torch.bfloat16, True, monkeypatch, k=2, windows=2, place=place)
    now = MODULE.batch_hook_flushes()
    # fc2.bias waits (Python), fc2.weight and fc1.bias join it, fc1.weight fills the batch:
    # one flush of all 4 per backward but the last (a CPU window's last micro-batch)
    assert now[0] - flushes == 2 and now[1] - grads == 2 * 4
    want = train(torch.bfloat16, False, monkeypatch, k=2, windows=2, place=place)
    assert_same_runs(got, want)


def test_the_build_reads_the_fields_buffers_keeps():
    """hooks.cpp reads Bucket.hook_fields by position: its order must be buffers.py's (a
    stale build with another order is refused by native.hooks_module)."""
    from fusedaccum.buffers import HOOK_FIELDS

    assert MODULE.HOOK_FIELDS == HOOK_FIELDS


def test_a_build_reading_other_fields_is_not_used(monkeypatch):
    """native.hooks_module refuses a build of hooks.cpp that reads Bucket.hook_fields in
    another order than buffers.py keeps them (a stale build): the wrappers then run the
    Python hooks only, instead of the C++ hook misreading the fields."""
    from fusedaccum import buffers

    state = native._load()
    monkeypatch.setattr(state, "hooks", None)  # (put back after: the module found before)
    monkeypatch.setattr(buffers, "HOOK_FIELDS", tuple(reversed(buffers.HOOK_FIELDS)))
    assert native.hooks_module() is None
    assert state.hooks is False


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


@pytest.mark.parametrize("fast", [True, False], ids=["cpp-hook", "python-hook"])
def test_a_backward_that_raised_does_not_stop_later_flushes(fast, monkeypatch):
    """A backward that raises never runs its end-of-backward callback; the next backward
    must queue its own, so p.main_grad holds its gradients once it returned (before, the
    batches waited for the next step())."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8).bfloat16())
    b = torch.nn.Parameter(torch.randn(8).bfloat16())
    opt = FusedAccumulator(torch.optim.SGD([a, b], lr=0.1), accumulation_steps=4,
                           backend="cpu")
    x = torch.randn(8).bfloat16()
    with pytest.raises(RuntimeError, match="boom"):  # b's gradient arrives, then it raises
        (_RaiseInBackward.apply(a * x).sum() + (b * x).sum()).backward()
    opt.zero_grad()
    for n in (1, 2):  # clean backwards, each read right after it returned
        before = hits()
        ((a * x).sum() + (b * x).sum()).backward()
        assert torch.equal(a.main_grad, n * x.float()), n
        # b's gradient from the backward that raised is kept, as autograd keeps a .grad
        assert torch.equal(b.main_grad, (n + 1) * x.float()), n
        # the first hook of each backward queues the flush (Python), the second is C++'s
        assert hits() - before == (1 if fast else 0)


def _train_after_a_raised_backward(fast, monkeypatch):
    """A window of 2 micro-batches whose last one has a backward that raises after b's
    gradient joined b's batch, then a clean one giving b and c gradients (a none): b's
    C++ hook finds it still pending. Clipped; the norm and the params."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(8, generator=g).bfloat16()) for _ in range(2))
    c = torch.nn.Parameter(torch.randn(8, generator=g).half())  # (another bucket)
    opt = FusedAccumulator(torch.optim.SGD([a, b, c], lr=0.1), accumulation_steps=2,
                           backend="cpu", max_grad_norm=0.01)
    xs = [torch.randn(8, generator=g) for _ in range(4)]

    def sq(p, x):
        return (p.float() * x).square().sum()

    (sq(a, xs[0]) + sq(b, xs[1]) + sq(c, xs[2])).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="boom"):
        (_RaiseInBackward.apply(sq(c, xs[3])) + sq(b, xs[0])).backward()
    (sq(b, xs[2]) + sq(c, xs[1])).backward()
    opt.step()
    assert opt.stepped
    return opt.grad_norm, [p.detach().clone() for p in (a, b, c)]


def test_a_gradient_still_pending_after_a_raised_backward_is_flushed_first(monkeypatch):
    """A param whose gradient of a backward that raised still waits in its batch (the
    end-of-backward flush never ran) gets its next gradient: the C++ hook leaves it to
    Python, which flushes the batch first (a param is pending once at most), so the
    clipping norm's statistics of the window's last micro-batch are the Python hook's."""
    got_norm, got = _train_after_a_raised_backward(True, monkeypatch)
    want_norm, want = _train_after_a_raised_backward(False, monkeypatch)
    assert torch.equal(got_norm, want_norm)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fast", [True, False], ids=["cpp-hook", "python-hook"])
def test_compiled_autograd_accumulates_within_the_backward(fast, monkeypatch):
    """Under compiled autograd the hooks are traced: a batched gradient is accumulated at
    once, so p.main_grad holds every micro-batch when backward returns (batched, it
    lagged one micro-batch: the end-of-backward callback ran before the traced appends)."""
    # (a private torch API, present in the torch versions this project runs on: 2.11 on
    # the GPU image, 2.13 here; a torch without it fails this test loudly, to be updated)
    from torch._dynamo import compiled_autograd
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).bfloat16()
    ref = torch.nn.Linear(4, 3).bfloat16()
    ref.load_state_dict(lin.state_dict())
    opt = FusedAccumulator(torch.optim.SGD(lin.parameters(), lr=1.0), accumulation_steps=2,
                           backend="cpu")
    x = torch.randn(5, 4).bfloat16()
    ref(x).float().pow(2).sum().backward()
    torch._dynamo.reset()
    try:
        for j in (1, 2):
            loss = lin(x).float().pow(2).sum()
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
            for p, q in zip(lin.parameters(), ref.parameters()):
                assert torch.equal(p.main_grad, j * q.grad.float()), j
            opt.step()
    finally:
        torch._dynamo.reset()
    assert opt.stepped



@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
@pytest.mark.parametrize("dtype", HALF)
def test_pre_hook_takes_the_gradients_before_accumulate_grad_bitwise(dtype, place,
                                                                     monkeypatch):
    """The tensor pre-hook (BatchPreHook) takes the gradients the C++ hook took after
    AccumulateGrad, all but the first hook of each backward (it queues the flush, in
    Python); .grad is never made. The same bits as without it and as the Python hook."""
    before, pre_before = hits(), MODULE.batch_prehook_hits()
    got = train(dtype, True, monkeypatch, place=place)
    assert (hits() - before, MODULE.batch_prehook_hits() - pre_before) == (27, 27)
    monkeypatch.setattr(accumulator, "_PRE_HOOK", False)
    before, pre_before = hits(), MODULE.batch_prehook_hits()
    after_accumulate_grad = train(dtype, True, monkeypatch, place=place)
    assert (hits() - before, MODULE.batch_prehook_hits() - pre_before) == (27, 0)
    assert_same_runs(got, after_accumulate_grad)
    assert_same_runs(got, train(dtype, False, monkeypatch, place=place))


def _run_beside_autograd(scenario, fast, monkeypatch):
    """3 windows of 3 micro-batches where something needs AccumulateGrad to see each
    gradient; the params after, what the user's hooks saw, and the gradients the pre-hook
    took."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    model = make_model(dtype=torch.bfloat16, device="cpu")
    params = list(model.parameters())
    seen, nodes = [], []
    if scenario == "tensor-hook-first":  # registered before the wrapper's: runs before it
        for p in params:
            p.register_hook(lambda g: seen.append(g.clone()))
    opt = FusedAccumulator(torch.optim.AdamW(params, lr=1e-2), accumulation_steps=3,
                           backend="cpu")
    for p in params:
        if scenario.startswith("node-"):  # as DistributedDataParallel's, which keeps the nodes
            node = p.view_as(p).grad_fn.next_functions[0][0]
            node.register_prehook(lambda go: seen.append(go[0] is not None))
            if scenario == "node-hooks":  # ("node-prehook": a pre-hook alone)
                node.register_hook(lambda gi, go: seen.append(go[0] is not None))
            nodes.append(node)
        elif scenario == "tensor-hook":  # registered after the wrapper's
            p.register_hook(lambda g: seen.append(g.clone()))
    before = MODULE.batch_prehook_hits()
    for window in make_windows(3, 3, dtype=torch.bfloat16, device="cpu"):
        for x, y in window:
            if scenario == "grad-by-hand":  # AccumulateGrad adds the gradient to it
                params[0].grad = torch.full_like(params[0], 0.5)
            loss = mse(model(x), y)
            if scenario == "inputs":
                loss.backward(inputs=params)
            else:
                loss.backward()
            opt.step()
    return [p.detach().clone() for p in params], seen, MODULE.batch_prehook_hits() - before


@pytest.mark.parametrize("scenario", ["inputs", "node-hooks", "node-prehook", "tensor-hook",
                                      "grad-by-hand", "tensor-hook-first"])
def test_pre_hook_steps_aside_where_accumulate_grad_must_see_the_gradient(scenario,
                                                                        monkeypatch):
    """backward(inputs=...) (the engine runs only some AccumulateGrad nodes), hooks on the
    AccumulateGrad node (a pre-hook alone too), a tensor hook registered later (it
    replaces the param's C++ tensor hooks: the pre-hook is gone), a .grad assigned by
    hand: the gradient goes through AccumulateGrad, every user hook sees it, and the
    result is the Python hook's. A tensor hook registered before the wrapper runs before
    the pre-hook, which then takes the gradient as usual."""
    got, seen, taken = _run_beside_autograd(scenario, True, monkeypatch)
    want, want_seen, _ = _run_beside_autograd(scenario, False, monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if scenario == "grad-by-hand":  # only that param's gradient goes through AccumulateGrad
        assert 2 * 9 <= taken <= 3 * 9
    elif scenario == "tensor-hook-first":
        assert taken == 3 * 9
    else:
        assert taken == 0
    if scenario.startswith("node-"):
        assert seen == want_seen == [True] * ((2 if scenario == "node-hooks" else 1) * 4 * 9)
    elif scenario.startswith("tensor-hook"):
        assert len(seen) == len(want_seen) == 4 * 9
        assert all(torch.equal(a, b) for a, b in zip(seen, want_seen))


def test_pre_hook_leaves_the_gradient_it_takes_as_it_was(monkeypatch):
    """A gradient someone else holds (AccumulateGrad would copy it) is read where it is,
    never written, and the window holds it once."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    ps = [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16)) for _ in range(3)]
    opt = FusedAccumulator(torch.optim.SGD(ps, lr=1.0), accumulation_steps=4, backend="cpu")
    held = [torch.randn(8).bfloat16() for _ in ps]
    copies = [g.clone() for g in held]
    before = MODULE.batch_prehook_hits()
    for _ in range(2):
        torch.autograd.backward(ps, held)
        opt.step()
    assert MODULE.batch_prehook_hits() - before == 2 * 2
    assert all(torch.equal(g, c) for g, c in zip(held, copies))
    for p, g in zip(ps, held):
        assert p.grad is None
        assert torch.equal(p.main_grad, 2 * g.float())


@pytest.mark.parametrize("direct", [False, True], ids=["batched", "direct"])
def test_a_non_contiguous_gradient_waits_for_accumulate_grad(direct, monkeypatch):
    """A gradient handed over non-contiguous (here a transposed one given to
    torch.autograd.backward): the pre-hook steps aside, AccumulateGrad makes a .grad of the
    param's layout and the C++ hook takes that (batched or direct), as the Python hook
    makes the gradient contiguous; the window holds it bitwise."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    if direct:
        monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 4)
    ps = [torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.bfloat16)) for _ in range(3)]
    opt = FusedAccumulator(torch.optim.SGD(ps, lr=1.0), accumulation_steps=4, backend="cpu")
    g = torch.Generator().manual_seed(0)
    held = [torch.randn(4, 3, generator=g).bfloat16().t() for _ in ps]
    assert not any(h.is_contiguous() for h in held)
    before, pre_before = hits(), MODULE.batch_prehook_hits()
    for _ in range(2):
        torch.autograd.backward(ps, held)
        opt.step()
    # (direct: every gradient, none queues the end-of-backward callback; batched: all but
    # the first of each backward)
    assert (hits() - before, MODULE.batch_prehook_hits() - pre_before) == (6 if direct else 4, 0)
    for p, h in zip(ps, held):
        assert p.grad is None
        assert torch.equal(p.main_grad, 2 * h.float())


def test_params_that_are_not_row_major_keep_the_python_hook(monkeypatch):
    """A param that is not row-major (transposed, channels_last) is accumulated in its own
    memory order (Bucket.flat_of): it gets no C++ hook, so a row-major gradient handed to
    it (torch.autograd.backward) goes through the Python hook, which lays it out as the
    accumulator, and the window holds it bitwise."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g).bfloat16().t()) for _ in range(3)]
    ps.append(torch.nn.Parameter(torch.randn(2, 3, 4, 4, generator=g).bfloat16().to(
        memory_format=torch.channels_last)))
    opt = FusedAccumulator(torch.optim.SGD(ps, lr=1.0), accumulation_steps=4, backend="cpu")
    held = [torch.randn(p.shape, generator=g).bfloat16() for p in ps]
    assert all(h.is_contiguous() and not p.is_contiguous() for p, h in zip(ps, held))
    before, pre_before = hits(), MODULE.batch_prehook_hits()
    for _ in range(2):
        torch.autograd.backward(ps, held)
        opt.step()
    assert (hits(), MODULE.batch_prehook_hits()) == (before, pre_before)
    for p, h in zip(ps, held):
        assert p.grad is None
        assert torch.equal(p.main_grad, 2 * h.float())


def test_a_resumed_window_exposes_the_masters_grads_again(monkeypatch):
    """A window saved part-way after its masters' .grad views were cleared (here by hand)
    resumes with them cleared; the next backward gives every master its .grad view of the
    window again (DESIGN.md section 2), the C++ hook's params as the Python hook's."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    model = make_model(dtype=torch.bfloat16, device="cpu")
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=3,
                           backend="cpu")
    (x, y), (x2, y2), _ = make_windows(1, 3, dtype=torch.bfloat16, device="cpu")[0]
    mse(model(x), y).backward()
    opt.step()
    for m in opt.param_groups[0]["params"]:
        m.grad = None
    sd = opt.state_dict()
    twin = make_model(dtype=torch.bfloat16, device="cpu")
    twin.load_state_dict(model.state_dict())
    resumed = FusedAccumulator(torch.optim.AdamW(twin.parameters()), accumulation_steps=3,
                               backend="cpu")
    resumed.load_state_dict(sd)
    before = hits()
    mse(twin(x2), y2).backward()
    assert hits() - before == 3  # (all but the first hook of the backward)
    for m, p in zip(resumed.param_groups[0]["params"], twin.parameters()):
        assert m.grad is p.main_grad


def _params_with_empty(dtype):
    """Four half params, the second and last of them empty (0 elements)."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (16, 0, 8, 0)]


def _train_with_empty(dtype, fast, monkeypatch, k=2, windows=2):
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    ps = _params_with_empty(dtype)
    opt = FusedAccumulator(torch.optim.AdamW(ps, lr=1e-2), accumulation_steps=k,
                           backend="triton")
    g = torch.Generator().manual_seed(1)
    for _ in range(windows * k):
        x = [torch.randn(p.shape, generator=g).to(dtype) for p in ps]
        sum(((p * xi).float() ** 2).sum() for p, xi in zip(ps, x)).backward()
        opt.step()
    return [p.detach().clone() for p in ps], opt


@needs_table_cpu
@pytest.mark.parametrize("flush_bytes", [1, 2 * 20], ids=["every-grad", "two-grads"])
def test_table_flush_skips_empty_params(flush_bytes, monkeypatch):
    """Empty gradients get no row in the table the C++ hook builds (the kernel's pairs are
    the non-empty ones; a batch of only empty ones launches nothing), as in _many_table."""
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", flush_bytes)
    tables = []
    real = triton_ops._launch_many_kernel

    def recording(blocks, table, n_tensors, *args):
        tables.append((n_tensors, blocks, table.tolist()))
        real(blocks, table, n_tensors, *args)

    monkeypatch.setattr(triton_ops, "_launch_many_kernel", recording)
    before = MODULE.batch_hook_flushes()[0]
    got, opt = _train_with_empty(torch.bfloat16, True, monkeypatch)
    assert MODULE.batch_hook_flushes()[0] > before  # the C++ hook flushed some batches
    assert tables and all(n >= 1 and len(t) == 4 * n + 1 and t[3 * n] == 0
                          and 0 not in t[2 * n:3 * n] for n, _, t in tables)
    monkeypatch.setattr(triton_ops, "_launch_many_kernel", real)
    want, _ = _train_with_empty(torch.bfloat16, False, monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert opt.stepped


@pytest.mark.parametrize("place", TRITON_PLACES, ids=place_id)
def test_table_flush_error_reaches_backward(place, monkeypatch):
    """A launch that raises in the C++ hook's flush makes backward() raise it, as itself
    (on a GPU the hook runs on the engine's device thread: the error is carried over).
    Launched from Python ("direct": in the default "auto" mode a GPU flush launches from
    C++ once its kernel is registered)."""
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 1)  # every grad fills a batch
    monkeypatch.setattr(triton_ops, "_LAUNCH", "direct")
    real = triton_ops._launch_many_kernel
    failed = []

    def failing(*args):
        # (the first gradient of a backward goes to the Python hook, whose flush launches
        # through _flush: that one runs)
        if any(f.function == "_flush" for f in inspect.stack()):
            return real(*args)
        failed.append(True)
        raise RuntimeError("launch failed: boom")

    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    model = make_model(dtype=torch.bfloat16, device=place[0])
    opt = FusedAccumulator(torch.optim.AdamW(model.parameters()), accumulation_steps=2,
                           backend="triton")
    monkeypatch.setattr(triton_ops, "_launch_many_kernel", failing)
    x, y = make_windows(1, 1, dtype=torch.bfloat16, device=place[0])[0][0]
    with pytest.raises(RuntimeError, match="launch failed: boom"):
        mse(model(x), y).backward()
    assert failed == [True] and opt.update_count == 0  # (opt: the hooks hold it weakly)


@pytest.fixture
def failing_full_flush(monkeypatch):
    """``fail(place)``: from then until ``fail(None)``, a flush of 4 gradients (a full
    batch of make_model's params) raises "flush failed: boom", in C++ or in Python: the
    triton backend's launch, or the extension's accumulate_many_ kernel (a CPU kernel
    registered over it)."""
    real = triton_ops._launch_many_kernel
    libs = []

    def launch(blocks, table, n_tensors, *args):
        if n_tensors == 4:
            raise RuntimeError("flush failed: boom")
        return real(blocks, table, n_tensors, *args)

    def kernel(*args):
        raise RuntimeError("flush failed: boom")

    def fail(place):
        if place is None:
            monkeypatch.setattr(triton_ops, "_launch_many_kernel", real)
            while libs:
                libs.pop()._destroy()  # (the extension's kernel again)
        elif place[1] == "triton":
            monkeypatch.setattr(triton_ops, "_LAUNCH", "direct")
            monkeypatch.setattr(triton_ops, "_launch_many_kernel", launch)
        else:
            libs.append(torch.library.Library("fusedaccum_native", "IMPL"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (overriding a kernel: warned)
                libs[-1].impl("accumulate_many_", kernel, "CPU")

    yield fail
    fail(None)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
def test_a_failed_flush_leaves_no_batch_behind(place, failing_full_flush, monkeypatch):
    """An accumulation that fails while the C++ hook flushes a full batch (3 gradients
    waiting, the 4th fills it) raises out of backward with the batch gone, as Python's
    flush leaves it (the batch is emptied before the op): nothing stays pending, and the
    next backward's window holds only its own gradients."""
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 3 * 2 * 16)  # bf16 bytes
    results = []
    for fast in (True, False):
        monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
        model = make_model(dtype=torch.bfloat16, device=place[0])
        opt = FusedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1),
                               accumulation_steps=4, backend=place[1])
        (b,) = [b for bs in opt._buckets for b in bs]
        (x, y), (x2, y2) = make_windows(1, 2, dtype=torch.bfloat16, device=place[0])[0]
        before = MODULE.batch_hook_flushes()
        failing_full_flush(place)
        with pytest.raises(RuntimeError, match="flush failed: boom"):
            mse(model(x), y).backward()
        failing_full_flush(None)
        assert b.pending == [] and b.pending_bytes == 0 and not any(b.is_pending)
        opt.reset_accumulation()
        for p in model.parameters():
            p.grad = None
        mse(model(x2), y2).backward()
        # (the fast run's second backward flushes its full batch in C++)
        assert MODULE.batch_hook_flushes()[0] - before[0] == (1 if fast else 0)
        results.append([p.main_grad.clone() for p in model.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
@pytest.mark.parametrize("fast", [True, False], ids=["cpp-hook", "python-hook"])
def test_a_failed_flush_after_a_boundary_leaves_no_stale_window(place, fast,
                                                                 failing_full_flush,
                                                                 monkeypatch):
    """After a boundary the accumulators hold the window just applied (dirty): each
    param's first gradient of the next window is written over its accumulator. A flush of
    such first gradients that fails (the batch is gone) must leave them to be overwritten
    (or zeroed) still: a backward after the error makes p.main_grad that backward's
    gradient, not the last window's sum plus it."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1" if fast else "0")
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 3 * 2 * 16)  # bf16 bytes
    model, twin = (make_model(dtype=torch.bfloat16, device=place[0]) for _ in range(2))
    opt = FusedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=2,
                           backend=place[1])
    windows = make_windows(2, 2, dtype=torch.bfloat16, device=place[0])
    for x, y in windows[0]:
        mse(model(x), y).backward()
        opt.step()
    twin.load_state_dict(model.state_dict())
    x, y = windows[1][0]
    failing_full_flush(place)
    with pytest.raises(RuntimeError, match="flush failed: boom"):
        mse(model(x), y).backward()
    failing_full_flush(None)
    for p in model.parameters():
        p.grad = None  # (a .grad the failed backward left behind)
    mse(model(x), y).backward()
    mse(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.main_grad, q.grad.float())


def test_install_checks_the_launcher():
    module = MODULE
    p = torch.zeros(3, requires_grad=True)
    h = p.register_post_accumulate_grad_hook(lambda p: None)
    o = weakref.ref(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    args = (p, p._post_accumulate_grad_hooks, h.id, o, o, 0, 4, 8)
    for bad in [(False, False, "not callable", 1024, 2), (False, True, print, 1024, 2),
                (False, False, print, 0, 2), (False, False, print, 1024, 3)]:
        with pytest.raises(ValueError, match="a launcher needs"):
            module.install_batch_hook(*args, *bad)


@pytest.mark.parametrize("place", PLACES + TRITON_PLACES, ids=place_id)
def test_flush_batch_leaves_what_it_cannot_take_to_python(place, monkeypatch):
    """flush_batch with a table for another gradient dtype (or a bad launcher) changes
    nothing and says so: _flush then accumulates the batch in Python."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    device, backend = place
    model = make_model(dtype=torch.bfloat16, device=device)
    opt = FusedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=4,
                           backend=backend)
    (b,) = [b for bs in opt._buckets for b in bs]
    assert b.cxx_flush and b.cxx_flush[0] is MODULE.flush_batch
    monkeypatch.setattr(b, "cxx_flush", False)  # the batch waits for the test's calls
    x, y = make_windows(1, 1, dtype=torch.bfloat16, device=device)[0][0]
    with monkeypatch.context() as m:  # (no end-of-backward flush: the batch stays)
        m.setattr(opt, "_flush_all", lambda: None)
        mse(model(x), y).backward()
    waiting = list(b.pending)
    assert len(waiting) == 4
    with pytest.raises(ValueError, match="a launcher needs"):
        MODULE.flush_batch(b, "not callable", 1024, 2)
    for block, kind in ((0, 2), (-1024, 2), (1024, 3), (1024, -1)):
        with pytest.raises(ValueError, match="a launcher needs"):
            MODULE.flush_batch(b, print, block, kind)
    with pytest.raises(AttributeError):
        MODULE.flush_batch(object())
    launcher, block, _ = triton_ops.table_flush(torch.device(device), torch.bfloat16) or (
        lambda *args: None, 1024, 2)
    assert MODULE.flush_batch(b, launcher, block, 1) is False  # fp16: not the grads' dtype
    assert b.pending == waiting and b.pending_bytes > 0 and all(b.is_pending)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in b.main_grads)
    opt._flush(b)  # cxx_flush False: Python's
    assert b.pending == [] and not any(b.is_pending)
    twin = make_model(dtype=torch.bfloat16, device=device)  # (equal params: no step yet)
    mse(twin(x), y).backward()
    for g, p in zip(b.main_grads, twin.parameters()):
        assert torch.equal(g, p.grad.float())


@needs_table_cpu
def test_table_flush_launches_with_the_block_its_table_was_built_for(monkeypatch):
    """The C++ hook builds its tables with the block it was given when the wrapper was
    made; a block size changed later (bench/tune_triton.py sweeps them in-process) must
    not make the kernel cover less of each gradient than the table says."""
    monkeypatch.setenv("FUSEDACCUM_FAST_HOOKS", "1")
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 1)  # every grad fills a batch
    model = make_model(dtype=torch.bfloat16, device="cpu")
    opt = FusedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), accumulation_steps=4,
                           backend="triton")
    monkeypatch.setattr(triton_ops, "_INTERPRET_BLOCK", 2)  # smaller than every param
    x, y = make_windows(1, 1, dtype=torch.bfloat16, device="cpu")[0][0]
    before = MODULE.batch_hook_flushes()[0]
    mse(model(x), y).backward()
    assert MODULE.batch_hook_flushes()[0] - before == 3  # all but the first: C++
    twin = make_model(dtype=torch.bfloat16, device="cpu")
    mse(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert q.numel() > 2
        assert torch.equal(p.main_grad, q.grad.float())
    assert opt.micro_step == 0


def test_register_triton_kernel_checks_its_arguments():
    """The C++ registry of Triton kernels for "cxx" launches (ops/triton.py _LAUNCH):
    bad values are refused; a build without CUDA registers nothing (False)."""
    bad = [(-1, 2, 0, 1024, 1, 4, 0), (0, 3, 0, 1024, 1, 4, 0), (0, 2, -1, 1024, 1, 4, 0),
           (0, 2, 0, 0, 1, 4, 0), (0, 2, 0, 1024, 0, 4, 0), (0, 2, 0, 1024, 1, 0, 0),
           (0, 2, 0, 1024, 1, 4, -1)]
    for args in bad:
        with pytest.raises(ValueError, match="register_triton_kernel"):
            MODULE.register_triton_kernel(triton_ops, *args)
    has_cuda = "cuda" in torch.ops.fusedaccum_native.build_info().split(",")
    try:  # (device 99: a key no flush looks up)
        assert MODULE.register_triton_kernel(triton_ops, 99, 2, 0, 1024, 1, 4, 0) is has_cuda
    finally:
        triton_ops._forget_cxx()
    assert isinstance(MODULE.triton_cxx_launches(), int)


@needs_table_cuda
@pytest.mark.parametrize("mode", ["cxx", "auto"])
@pytest.mark.parametrize("how", ["full-batches", "direct"])
def test_cxx_launch_on_gpu_as_the_python_hook(how, mode, monkeypatch):
    """ops/triton.py _LAUNCH = "cxx" or "auto" on a GPU: the C++ flushes (full batches,
    gradients above the batching limit over a one-pair table, the end-of-backward flush_batch)
    launch Triton's compiled kernel from C++ once its variant is registered: every
    variant goes through Triton's launcher once, and the launches add up to those of the
    same run with _LAUNCH = "jit". Every result is bitwise the Python hook's."""
    if how == "direct":
        monkeypatch.setattr(accumulator, "_BATCH_MAX_NUMEL", 16)
    else:
        monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 1)
    python_launches = []
    real = triton_ops._launch_many_kernel

    def counted(*args):
        python_launches.append(args)
        return real(*args)

    monkeypatch.setattr(triton_ops, "_launch_many_kernel", counted)
    place = TABLE_CUDA[0]
    triton_ops._forget_cxx()
    try:
        monkeypatch.setattr(triton_ops, "_LAUNCH", mode)
        before = MODULE.triton_cxx_launches()
        got = train(torch.bfloat16, True, monkeypatch, place=place, max_grad_norm=0.01)
        in_cxx, in_python = MODULE.triton_cxx_launches() - before, len(python_launches)
        assert triton_ops._CXX_REFUSED == []
        assert in_python == len(triton_ops._CXX_KERNELS) and in_cxx >= 9
        monkeypatch.setattr(triton_ops, "_LAUNCH", "jit")
        python_launches.clear()
        jit = train(torch.bfloat16, True, monkeypatch, place=place, max_grad_norm=0.01)
        assert MODULE.triton_cxx_launches() - before == in_cxx  # "jit": none from C++
        assert len(python_launches) == in_cxx + in_python
    finally:
        triton_ops._forget_cxx()
    want = train(torch.bfloat16, False, monkeypatch, place=place, max_grad_norm=0.01)
    assert_same_runs(got, want)
    assert_same_runs(jit, want)


@needs_table_cuda
@pytest.mark.parametrize("mode", ["cxx", "auto"])
def test_cxx_launch_the_driver_refuses_falls_back_to_python(mode, monkeypatch):
    """A launch from C++ that the driver refuses (here: more shared memory than the kernel
    may have, CUDA_ERROR_INVALID_VALUE; nothing runs) drops the registered kernels: that
    flush and the later ones go through Python's launch, which warns once (also in the
    default "auto" mode), and every result is still bitwise the Python hook's."""
    monkeypatch.setattr(accumulator, "_BATCH_FLUSH_BYTES", 1)
    place = TABLE_CUDA[0]
    triton_ops._forget_cxx()
    try:
        monkeypatch.setattr(triton_ops, "_LAUNCH", mode)
        train(torch.bfloat16, True, monkeypatch, place=place, windows=1)  # registers
        assert triton_ops._CXX_KERNELS and not triton_ops._CXX_REFUSED
        for key, compiled in triton_ops._CXX_KERNELS.items():
            function, warps, _ = triton_ops._cxx_spec(compiled)
            assert MODULE.register_triton_kernel(triton_ops, *key, function, warps, 1 << 30)
        before = MODULE.triton_cxx_launches()
        with pytest.warns(RuntimeWarning, match="a launch from C\\+\\+ failed"):
            got = train(torch.bfloat16, True, monkeypatch, place=place, max_grad_norm=0.01)
        assert MODULE.triton_cxx_launches() == before
        assert MODULE.triton_cxx_error() is not None and len(triton_ops._CXX_REFUSED) == 1
    finally:
        triton_ops._forget_cxx()
    assert MODULE.triton_cxx_error() is None
    want = train(torch.bfloat16, False, monkeypatch, place=place, max_grad_norm=0.01)
    assert_same_runs(got, want)


# ---------------------------------------------- the boundary's walks over the params in C++


class _Sub(torch.Tensor):
    """A tensor subclass: the walks leave it to Python (its attributes may be its own)."""


@pytest.mark.parametrize("place", PLACES, ids=place_id)
def test_boundary_walks_answer_as_python_would(place):
    """params_in_place, bump_versions, clear_grads and any_grad (the wrapper's boundary and
    zero_grad use them where the C++ hooks run) against the Python reads they replace;
    anything but a plain tensor or Parameter makes them answer "look in Python"."""
    device = place[0]
    ps = [torch.nn.Parameter(torch.randn(5, device=device)) for _ in range(3)]
    ptrs = [p.data_ptr() for p in ps]
    versions = [p._version for p in ps]
    assert MODULE.params_in_place(ps, ptrs, torch.float32, versions) is True
    assert MODULE.params_in_place(ps, ptrs, torch.float32, None) is True
    assert MODULE.params_in_place(ps, ptrs, torch.float16, None) is False
    assert MODULE.params_in_place(ps, ptrs[:2], torch.float32, None) is False
    assert MODULE.params_in_place(ps, ptrs, torch.float32, versions[:2]) is False
    with torch.no_grad():
        ps[2].mul_(2.0)  # a write: the version moves, the pointer stays
    assert MODULE.params_in_place(ps, ptrs, torch.float32, None) is True
    assert MODULE.params_in_place(ps, ptrs, torch.float32, versions) is False
    ps[1].data = ps[1].data.clone()  # moved
    assert MODULE.params_in_place(ps, ptrs, torch.float32, None) is False
    sub = torch.randn(5, device=device).as_subclass(_Sub)
    assert MODULE.params_in_place([sub], [sub.data_ptr()], torch.float32, None) is False

    seen = [p._version for p in ps]
    assert MODULE.bump_versions(ps, seen) is True
    assert seen == [p._version for p in ps] == [v + 1 for v in versions[:2]] + [
        versions[2] + 2]
    before = sub._version
    assert MODULE.bump_versions([ps[0], sub], [0, 0]) is False  # nothing done
    assert ps[0]._version == seen[0] and sub._version == before

    assert MODULE.any_grad(ps) is False
    ps[2].grad = torch.ones_like(ps[2])
    assert MODULE.any_grad(ps) is True
    assert MODULE.any_grad([sub]) is None
    sub.grad = torch.ones_like(sub)
    MODULE.clear_grads([*ps, sub])
    assert all(t.grad is None for t in (*ps, sub))
    with pytest.raises(TypeError, match="list of tensors"):
        MODULE.clear_grads(tuple(ps))


def test_entries_edited_answers_as_python_would():
    """entries_edited (the boundary's look at the optimizer state, _sync_state) against
    FusedAccumulator._edited_entries's Python loop, over each kind of edit."""
    from collections import defaultdict

    ts = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    state = defaultdict(dict)
    for t in ts[:3]:
        state[t].update(step=torch.tensor(1.0), exp_avg=torch.zeros(3))
    unknown = torch.zeros(1)
    state[unknown]["x"] = 1  # (an entry of a tensor the wrapper does not step: ignored)

    def snapshot():
        return {id(t): ("b", i, state.get(t), tuple(state[t].values()) if t in state else ())
                for i, t in enumerate(ts)}

    def python(snaps):  # (the definition: accumulator.py _edited_entries)
        return sorted(id(t) for t, e in state.items() if (s := snaps.get(id(t))) is not None
                      and (s[2] is not e or len(e) != len(s[3])
                           or not all(map(operator.is_, e.values(), s[3]))))

    snaps = snapshot()
    assert MODULE.entries_edited(state, snaps) == [] == python(snaps)
    state[ts[0]]["exp_avg"] = torch.zeros(3)  # a value replaced
    state[ts[1]] = {}  # an entry replaced
    state[ts[2]]["extra"] = 0  # a key added
    state[ts[3]]  # noqa: B018  (a new entry where there was none)
    want = sorted(map(id, ts))
    assert sorted(MODULE.entries_edited(state, snaps)) == want == python(snaps)
    snaps = snapshot()
    state[ts[2]].clear()
    assert MODULE.entries_edited(state, snaps) == [id(ts[2])] == python(snaps)
    assert MODULE.entries_edited(dict(state), {}) == []
    assert MODULE.entries_edited(list(state.items()), snaps) is None  # not a dict: Python
    assert MODULE.entries_edited(state, {id(ts[0]): ("malformed",)}) is None


def test_entries_unchanged_tells_only_an_identical_state():
    """entries_unchanged (the boundary's first look, _edited_entries' _snap_order): True
    only for the same keys in the same order with the same entries and values; any edit,
    a reordering or a malformed order gives False (entries_edited then looks)."""
    from collections import defaultdict

    ts = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    state = defaultdict(dict)
    for t in ts[:2]:
        state[t].update(step=torch.tensor(1.0), exp_avg=torch.zeros(3))
    state[ts[2]]["x"] = 1  # (not the wrapper's: only its key's place is compared)

    def order():
        return tuple((k, None, None) if k is ts[2] else (k, e, tuple(e.values()))
                     for k, e in state.items())

    o = order()
    assert MODULE.entries_unchanged(state, o) is True
    state[ts[2]]["x"] = 2  # (not the wrapper's)
    assert MODULE.entries_unchanged(state, o) is True
    old = state[ts[0]]["exp_avg"]
    state[ts[0]]["exp_avg"] = torch.zeros(3)  # a value replaced
    assert MODULE.entries_unchanged(state, o) is False
    state[ts[0]]["exp_avg"] = old  # and put back: identical again
    assert MODULE.entries_unchanged(state, o) is True
    state[ts[1]]["extra"] = 0  # a key added
    assert MODULE.entries_unchanged(state, o) is False
    del state[ts[1]]["extra"]
    state[ts[1]] = dict(state[ts[1]])  # an equal entry, another dict
    assert MODULE.entries_unchanged(state, o) is False
    o = order()
    e = state.pop(ts[0])
    state[ts[0]] = e  # the same items in another order
    assert MODULE.entries_unchanged(state, o) is False
    o = order()
    assert MODULE.entries_unchanged(state, o) is True
    assert MODULE.entries_unchanged(state, o[:-1]) is False
    assert MODULE.entries_unchanged(dict(state), o) is True  # (a plain dict as well)
    assert MODULE.entries_unchanged(list(state.items()), o) is False  # not a dict
    assert MODULE.entries_unchanged(state, (("malformed",),) * len(o)) is False
    with pytest.raises(TypeError):
        MODULE.entries_unchanged(state, list(o))
