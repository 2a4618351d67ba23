"""Every backend's ops against the reference backend.

Fresh random inputs, odd sizes, fp16/bf16/fp32 gradients, outputs poisoned first so
an element a backend forgot to write shows up, and found-inf both set and unset.
"""

import math
import re

import pytest
import torch

from fusedaccum import ops
from fusedaccum.ops import reference
from fusedaccum.ops import triton as triton_ops

SIZES = [0, 1, 1023, 4097, 278011]
GRAD_DTYPES = [
    # (dtype, rtol, atol) for results that went through that dtype
    (torch.float32, 1e-6, 1e-6),
    (torch.float16, 1e-6, 1e-6),
    (torch.bfloat16, 1e-6, 1e-6),
]
HALF = [(torch.float16, 1e-3, 1e-3), (torch.bfloat16, 8e-3, 8e-3)]
NON_REFERENCE = [b for b in ops.BACKENDS if b != "reference"]


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def _backend_cases():
    cases = []
    for backend in NON_REFERENCE:
        for dev in _devices():
            cases.append(pytest.param((backend, dev), id=f"{backend}-{dev}"))
    return cases


@pytest.fixture(params=_backend_cases())
def backend_device(request):
    backend, dev = request.param
    why = ops.unavailable_reason(backend, dev)
    if why is not None:
        pytest.skip(f"backend {backend} not available on {dev}: {why}")
    return backend, torch.device(dev)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(n, dtype, device, seed, scale=1.0):
    return (torch.randn(n, generator=_gen(seed)) * scale).to(dtype).to(device)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype,rtol,atol", GRAD_DTYPES)
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("norm_type", [None, 2.0, math.inf])
def test_accumulate(backend_device, n, dtype, rtol, atol, overwrite, norm_type):
    backend, dev = backend_device
    acc0 = _rand(n, torch.float32, dev, 1)
    grad = _rand(n, dtype, dev, 2)
    want_acc = acc0.clone()
    want = reference.accumulate_(want_acc, grad, 0.37, overwrite=overwrite, norm_type=norm_type)
    got_acc = acc0.clone()
    got = ops.accumulate_(got_acc, grad, 0.37, overwrite=overwrite, norm_type=norm_type,
                          backend=backend)
    torch.testing.assert_close(got_acc, want_acc, rtol=rtol, atol=atol)
    if norm_type is None:
        assert got is None
    else:
        assert got.dtype == torch.float32 and got.dim() == 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_accumulate_norm_sees_nonfinite(backend_device, norm_type, bad):
    backend, dev = backend_device
    acc = torch.zeros(4097, device=dev)
    grad = _rand(4097, torch.float16, dev, 3)
    grad[1234] = bad
    stat = ops.accumulate_(acc, grad, 1.0, norm_type=norm_type, backend=backend)
    assert not torch.isfinite(stat)
    if math.isnan(bad):
        assert torch.isnan(stat)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("n", [1, 1023, 4097])
def test_accumulate_norm_of_an_infinite_scale_is_inf(backend_device, n, overwrite, norm_type):
    """scale=inf makes every element +-inf (no grad is 0 here), so the statistic is inf,
    as the reference's: not NaN from lanes past the tensor's end, where scale * 0 is NaN
    (the Triton kernel's last block took them in)."""
    backend, dev = backend_device
    grad = _rand(n, torch.float16, dev, 4)
    grad[grad == 0] = 1.0
    want_acc = _rand(n, torch.float32, dev, 5)
    got_acc = want_acc.clone()
    want = reference.accumulate_(want_acc, grad, math.inf, overwrite=overwrite,
                                 norm_type=norm_type)
    got = ops.accumulate_(got_acc, grad, math.inf, overwrite=overwrite, norm_type=norm_type,
                          backend=backend)
    assert torch.isinf(want) and want > 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_acc, want_acc, equal_nan=True)


# ---------------------------------------------------------------------------------------
# accumulate_many_: bitwise the per-pair accumulate_ of the same backend
# ---------------------------------------------------------------------------------------

MANY_SIZES = [4097, 0, 278011, 1, 1023, 0, 1]
POISON = float("nan")


def _views_of_flat(sizes, dtype, device, seed, align, poison=POISON):
    """Views of one flat buffer, each starting at a multiple of ``align`` elements plus
    (for an odd ``align``) an odd shift, separated by poisoned gaps. Returns the flat
    buffer, the views and a mask of the gap elements."""
    offsets, pos = [], 3 if align % 2 else 0
    for n in sizes:
        pos = -(-pos // align) * align + (align % 2)  # 16-aligned, or shifted off alignment
        offsets.append(pos)
        pos += n + 5
    flat = torch.full((pos + 7,), poison, dtype=dtype)
    gap = torch.ones(flat.numel(), dtype=torch.bool)
    for i, (o, n) in enumerate(zip(offsets, sizes)):
        flat[o:o + n] = (torch.randn(n, generator=_gen(seed + i)) * 2.0).to(dtype)
        gap[o:o + n] = False
    flat = flat.to(device)
    return flat, [flat[o:o + n] for o, n in zip(offsets, sizes)], gap.to(device)


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _many_pair(sizes, dtype, dev, align, seed=0):
    acc_flat, accs, gap = _views_of_flat(sizes, torch.float32, dev, seed, align)
    _, grads, _ = _views_of_flat(sizes, dtype, dev, seed + 100, align)
    return acc_flat, accs, gap, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align", [16, 1], ids=["aligned16", "odd"])
@pytest.mark.parametrize("scale", [0.25, -0.37])
@pytest.mark.parametrize("trusted", [False, True], ids=["checked", "trusted"])
@pytest.mark.parametrize("overwrite", [None, "mixed"])
def test_accumulate_many_is_bitwise_per_pair(backend_device, dtype, align, scale, trusted,
                                             overwrite):
    """``overwrite="mixed"``: every other pair overwrites an acc poisoned with NaN (so a
    read of it would show), zero-element pairs among them."""
    backend, dev = backend_device
    flat, accs, gap, grads = _many_pair(MANY_SIZES, dtype, dev, align)
    flags = None if overwrite is None else [i % 2 == 0 for i in range(len(accs))]
    for acc, ow in zip(accs, flags or ()):
        if ow:
            acc.fill_(float("nan"))
    grads_before = [g.clone() for g in grads]
    want_flat = flat.clone()
    want_accs = [want_flat[a.storage_offset():a.storage_offset() + a.numel()] for a in accs]
    for i, (acc, grad) in enumerate(zip(want_accs, grads)):
        ops.accumulate_(acc, grad, scale, overwrite=bool(flags and flags[i]), backend=backend)
    if trusted:  # as the wrapper calls it: the backend's own function, no argument checks,
        # the flags as 0/1 ints
        ints = None if flags is None else [int(f) for f in flags]
        assert ops.get(backend, dev).accumulate_many_(accs, grads, scale, overwrite=ints,
                                                      trusted=True) is None
    else:
        assert ops.accumulate_many_(accs, grads, scale, overwrite=flags,
                                    backend=backend) is None
    assert torch.equal(_bits(flat), _bits(want_flat))  # every element, the gaps included
    assert torch.isnan(flat[gap]).all(), "a poisoned gap between the accs was written"
    assert not any(torch.isnan(a).any() for a in accs), "an overwritten acc was read"
    for g, g0 in zip(grads, grads_before):
        assert torch.equal(_bits(g), _bits(g0))
    # and the reference, within the usual tolerance
    ref_flat, ref_accs, _, ref_grads = _many_pair(MANY_SIZES, dtype, dev, align)
    reference.accumulate_many_(ref_accs, ref_grads, scale, overwrite=flags)
    torch.testing.assert_close(flat, ref_flat, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_accumulate_many_with_norm(backend_device, dtype, norm_type):
    """The accs bitwise as without a norm; the statistic of all updated accs together as
    the reference computes it (fused into the loop on cpu, a separate pass elsewhere)."""
    backend, dev = backend_device
    flat, accs, gap, grads = _many_pair(MANY_SIZES, dtype, dev, 16)
    want_flat, want_accs, _, _ = _many_pair(MANY_SIZES, dtype, dev, 16)
    flags = [i in (0, 2) for i in range(len(accs))]  # (2: the largest pair)
    ops.accumulate_many_(want_accs, grads, -0.37, overwrite=flags, backend=backend)
    stat = ops.accumulate_many_(accs, grads, -0.37, overwrite=flags, norm_type=norm_type,
                                backend=backend)
    assert torch.equal(_bits(flat), _bits(want_flat))
    assert torch.isnan(flat[gap]).all(), "a poisoned gap between the accs was written"
    assert stat.shape == () and stat.dtype == torch.float32 and stat.device == flat.device
    torch.testing.assert_close(stat, reference.many_stat(want_accs, norm_type), rtol=1e-5,
                               atol=0)
    again_flat, again_accs, _, _ = _many_pair(MANY_SIZES, dtype, dev, 16)
    again = ops.accumulate_many_(again_accs, grads, -0.37, overwrite=flags, norm_type=norm_type,
                                 backend=backend)
    assert torch.equal(_bits(stat.reshape(1)), _bits(again.reshape(1)))  # a fixed order
    # a NaN or inf in any acc shows in the statistic
    accs[2][5] = float("nan") if norm_type == 2.0 else float("inf")
    bad = ops.accumulate_many_(accs, grads, 1.0, norm_type=norm_type, backend=backend)
    assert not torch.isfinite(bad)
    empty = ops.accumulate_many_([], [], 1.0, norm_type=norm_type, backend=backend)
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="norm_type must be 2.0 or inf"):
        ops.accumulate_many_(accs, grads, 1.0, norm_type=1.0, backend=backend)


@pytest.mark.parametrize("upload", ["pinned", "pageable", "cached"])
def test_accumulate_many_150_tensors(backend_device, upload, monkeypatch):
    """(``upload``: how the Triton launcher's table reaches a GPU; the default's run only,
    elsewhere.)"""
    backend, dev = backend_device
    if upload != triton_ops._TABLE_UPLOAD:
        if backend != "triton" or dev.type != "cuda":
            pytest.skip("the table upload mode is the Triton launcher's, on a GPU")
        monkeypatch.setattr(triton_ops, "_TABLE_UPLOAD", upload)
        monkeypatch.setattr(triton_ops, "_TABLE_CACHE", type(triton_ops._TABLE_CACHE)())
    sizes = torch.randint(0, 3000, (150,), generator=_gen(7)).tolist()
    sizes[::17] = [0] * len(sizes[::17])
    sizes[5] = 70001
    flat, accs, _, grads = _many_pair(sizes, torch.bfloat16, dev, 16, seed=11)
    flags = (torch.rand(150, generator=_gen(8)) < 0.4).tolist()  # (CUDA: > 64 pairs a launch)
    want = [a.clone() for a in accs]
    for acc, grad, ow in zip(want, grads, flags):
        ops.accumulate_(acc, grad, 0.25, overwrite=ow, backend=backend)
    ops.accumulate_many_(accs, grads, 0.25, overwrite=flags, backend=backend)
    for i, (got, w) in enumerate(zip(accs, want)):
        assert torch.equal(_bits(got), _bits(w)), f"accs[{i}] ({got.numel()} elements)"


def test_accumulate_many_separate_tensors_and_default_scale(backend_device):
    backend, dev = backend_device
    accs = [_rand(n, torch.float32, dev, 40 + n) for n in (5, 0, 4097)]
    grads = tuple(_rand(n, torch.float16, dev, 50 + n) for n in (5, 0, 4097))
    want = [a.clone() for a in accs]
    for acc, grad in zip(want, grads):
        ops.accumulate_(acc, grad, backend=backend)
    ops.accumulate_many_(accs, grads, backend=backend)
    for got, w in zip(accs, want):
        assert torch.equal(got, w)


def test_accumulate_many_takes_any_contiguous_shape(backend_device):
    """Only element counts must agree: a 1-D acc slice and a param-shaped 2-D grad."""
    backend, dev = backend_device
    flat = _rand(40, torch.float32, dev, 60)
    grads = [_rand(12, torch.float16, dev, 61).view(3, 4), _rand(5, torch.float16, dev, 62)]
    want = flat.clone()
    ops.accumulate_(want[1:13], grads[0].view(-1), 0.25, backend=backend)
    ops.accumulate_(want[20:25], grads[1], 0.25, backend=backend)
    ops.accumulate_many_([flat[1:13], flat[20:25].view(1, 5)], grads, 0.25, backend=backend)
    assert torch.equal(flat, want)


def test_ops_taking_lists_take_any_iterable(backend_device):
    """accumulate_many_'s accs and grads, and grad_norm's tensors, may be any iterable (a
    generator, a map): the same bits as the lists."""
    backend, dev = backend_device
    accs = [_rand(n, torch.float32, dev, 63 + n) for n in (7, 0, 33)]
    grads = [_rand(a.numel(), torch.bfloat16, dev, 66 + i) for i, a in enumerate(accs)]
    want = [a.clone() for a in accs]
    ops.accumulate_many_(want, grads, 0.5, backend=backend)
    got = [a.clone() for a in accs]
    ops.accumulate_many_(iter(got), (g for g in grads), 0.5, backend=backend)
    assert all(_same_bits(g, w) for g, w in zip(got, want))
    assert torch.equal(ops.grad_norm((a for a in want), backend=backend),
                       ops.grad_norm(want, backend=backend))
    with pytest.raises(ValueError, match=r"^grad_norm needs at least one tensor$"):
        ops.grad_norm(iter([]), backend=backend)


def test_accumulate_many_empty_and_zero_element(backend_device):
    backend, dev = backend_device
    assert ops.accumulate_many_([], [], 2.0, backend=backend) is None
    assert ops.accumulate_many_(iter([]), (), backend=backend) is None
    e = torch.empty(0, device=dev)
    ops.accumulate_many_([e, e.clone()], [torch.empty(0, dtype=torch.bfloat16, device=dev)] * 2,
                         backend=backend)


def _many_error_cases(dev):
    def f32(n):
        return torch.zeros(n, device=dev)

    def f16(n):
        return torch.zeros(n, dtype=torch.float16, device=dev)

    def bf16(n):
        return torch.zeros(n, dtype=torch.bfloat16, device=dev)

    accs = [f32(n) for n in (4, 5, 6, 10)]
    return [
        # (accs, grads, exception, message regex)
        (accs, [bf16(4), bf16(5), bf16(6), bf16(9)], ValueError,
         r"grads\[3\] has 9 elements, expected 10 \(accs\[3\]\)"),
        (accs, [bf16(4), bf16(5), f16(6), bf16(10)], TypeError,
         r"grads\[2\] has dtype float16, but grads\[0\] has bfloat16"),
        (accs, [bf16(4), bf16(5), bf16(6)], ValueError, r"same length.*4.*3"),
        ([], [bf16(4)], ValueError, r"same length.*0.*1"),
        ([accs[0], bf16(5)], [bf16(4), bf16(5)], TypeError, r"accs\[1\] must have dtype"),
        ([accs[0], f32(10)[::2]], [bf16(4), bf16(5)], ValueError,
         r"accs\[1\] must be contiguous"),
        ([accs[0], accs[1]], [bf16(4), bf16(10)[::2]], ValueError,
         r"grads\[1\] must be contiguous"),
        ([accs[0], accs[1]], [bf16(4), torch.zeros(5, dtype=torch.int32, device=dev)],
         TypeError, r"grads\[1\] has dtype int32, but grads\[0\] has bfloat16"),
        ([accs[0], accs[1]], [torch.zeros(4, dtype=torch.int32, device=dev), bf16(5)],
         TypeError, r"grads\[0\] must have dtype"),
        # not a tensor: the native backends' schema check raises RuntimeError
        ([accs[0], accs[1]], [bf16(4), "x"], (TypeError, RuntimeError), r"grads"),
        (accs[0], [bf16(4)], TypeError, r"accs must be a list or tuple"),
    ]


def test_accumulate_many_errors_change_nothing(backend_device):
    backend, dev = backend_device
    for accs, grads, exc, match in _many_error_cases(dev):
        listed = accs if isinstance(accs, list) else []
        for t in [*listed, *grads]:
            if isinstance(t, torch.Tensor):
                t.fill_(1)  # so that any accumulation would show
        before = [a.clone() for a in listed]
        with pytest.raises(exc, match=match):
            ops.accumulate_many_(accs, grads, 0.5, backend=backend)
        with pytest.raises(exc, match=match):
            reference.accumulate_many_(accs, grads, 0.5)
        for a, b in zip(listed, before):
            assert torch.equal(a, b), "an acc changed although the call failed"


@pytest.mark.parametrize("overwrite, exc, match", [
    ([True], ValueError, r"overwrite has 1 flags for 2 pairs"),
    ([True, False, True], ValueError, r"overwrite has 3 flags for 2 pairs"),
    ([True, 2], TypeError, r"overwrite\[1\] must be a bool, got 2"),
    ([True, "yes"], TypeError, r"overwrite\[1\] must be a bool"),
    ([True, 1.0], TypeError, r"overwrite\[1\] must be a bool, got 1\.0"),
    (True, TypeError, r"overwrite must be None or a list of bools"),
])
def test_accumulate_many_bad_overwrite_changes_nothing(backend_device, overwrite, exc, match):
    backend, dev = backend_device
    accs = [torch.ones(4, device=dev), torch.ones(5, device=dev)]
    grads = [torch.ones(4, dtype=torch.bfloat16, device=dev),
             torch.ones(5, dtype=torch.bfloat16, device=dev)]
    with pytest.raises(exc, match=match):
        ops.accumulate_many_(accs, grads, 0.5, overwrite=overwrite, backend=backend)
    with pytest.raises(exc, match=match):
        reference.accumulate_many_(accs, grads, 0.5, overwrite=overwrite)
    assert all(torch.equal(a, torch.ones_like(a)) for a in accs)


def test_accumulate_many_on_another_device_is_an_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu"):
        reference.check_many_inputs([torch.zeros(2, device="cuda")] * 2,
                                    [torch.zeros(2, device="cuda"), torch.zeros(2)])


@pytest.mark.parametrize("sizes", [[0], [1], [1023, 4097], [278011, 1, 0, 5]])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm(backend_device, sizes, norm_type):
    backend, dev = backend_device
    ts = [_rand(n, torch.float32, dev, 10 + i, scale=3.0) for i, n in enumerate(sizes)]
    want = reference.grad_norm(ts, norm_type)
    got = ops.grad_norm(ts, norm_type, backend=backend)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    again = ops.grad_norm(ts, norm_type, backend=backend)
    assert torch.equal(got, again), "grad_norm must be deterministic"


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_grad_norm_nonfinite(backend_device, norm_type, bad):
    backend, dev = backend_device
    ts = [_rand(n, torch.float32, dev, i) for i, n in enumerate([1023, 4097])]
    ts[1][4000] = bad
    got = ops.grad_norm(ts, norm_type, backend=backend)
    if math.isnan(bad):
        assert torch.isnan(got)
    else:
        assert torch.isinf(got)


def _step_inputs(n, param_dtype, dev, with_model_out):
    param = _rand(n, param_dtype, dev, 20)
    acc = _rand(n, torch.float32, dev, 21, scale=4.0)
    state = [_rand(n, torch.float32, dev, 22 + i).abs() * 0.1 for i in range(3)]
    out = None
    if with_model_out:
        out = torch.full((n,), float("nan"), dtype=with_model_out, device=dev)  # poisoned
    return param, acc, state, out


def _clone(xs):
    return [None if x is None else x.clone() for x in xs]


def _sqrt_not_correctly_rounded(x):
    """Where torch's sqrt of the fp32 tensor ``x`` (on its device) is not the correctly
    rounded square root (fp32's sqrt taken in float64 and rounded once: 53 >= 2 * 24 + 2
    bits). On CPU torch's sqrt differs in some elements, how many depends on the CPU: 17%
    of them on an AMD EPYC (Zen 4, 2026-11-29)."""
    return torch.sqrt(x) != torch.sqrt(x.double()).float()


def _assert_adam_param(got, want, prev, sqrt_of):
    """An Adam/AdamW param of ours against torch's (or the reference's: torch's ops) from
    the same ``prev``, torch's denominator being the sqrt of ``sqrt_of`` (exp_avg_sq, or
    max_exp_avg_sq with amsgrad), which is bitwise ours. Where torch's sqrt of it is
    correctly rounded, as ours always is: within 1e-6 (bitwise on CPU); elsewhere within
    two ulps of the operands of the last operation, p and the update (the sqrt's one ulp
    moves p by up to two of its own ulps: a large relative difference where p and the
    update nearly cancel)."""
    inexact = _sqrt_not_correctly_rounded(sqrt_of)
    torch.testing.assert_close(got[~inexact], want[~inexact], rtol=1e-6, atol=0)
    ulp = torch.finfo(torch.float32).eps * (prev.float().abs() + (prev.float() - want).abs())
    diff = (got - want).abs()
    assert bool((diff[inexact] <= 2 * ulp[inexact]).all()), float((diff / ulp)[inexact].max())


ADAM_CASES = [
    # (param dtype, model_out dtype, amsgrad, maximize, decoupled, weight_decay)
    (torch.float32, None, False, False, True, 0.1),
    (torch.float32, torch.float16, False, False, True, 0.1),
    (torch.float32, torch.bfloat16, True, False, True, 0.0),
    (torch.float32, None, False, True, False, 0.05),
    (torch.float16, None, False, False, True, 0.1),
    (torch.bfloat16, None, True, True, False, 0.01),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", ADAM_CASES)
@pytest.mark.parametrize("skip", [False, True])
def test_adamw_step(backend_device, n, case, skip):
    backend, dev = backend_device
    param_dtype, out_dtype, amsgrad, maximize, decoupled, wd = case
    param, acc, (m, v, vmax), out = _step_inputs(n, param_dtype, dev, out_dtype)
    if not amsgrad:
        vmax = None
    kw = dict(grad_mult=torch.tensor(0.25, device=dev),
              found_inf=torch.tensor(1.0 if skip else 0.0, device=dev),
              lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, step=3,
              decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
    want = _clone([param, acc, m, v, vmax, out])
    reference.adamw_step_(*want, **kw)
    got = _clone([param, acc, m, v, vmax, out])
    ops.adamw_step_(*got, backend=backend, **kw)
    names = ["param", "acc", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "model_out"]
    for name, g, w in zip(names, got, want):
        if g is None:
            continue
        tol = dict(rtol=1e-5, atol=1e-6)
        if g.dtype in (torch.float16, torch.bfloat16):
            tol = dict(rtol=0, atol=0) if skip else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(g, w, equal_nan=True, msg=lambda s, name=name: f"{name}: {s}",
                                   **tol)
    assert torch.count_nonzero(got[1]) == 0, "acc must be zeroed"
    if skip:
        torch.testing.assert_close(got[0], param, rtol=0, atol=0)
        if out is not None:
            assert torch.isnan(got[5].float()).all() or n == 0, "skipped step wrote model_out"


SGD_CASES = [
    # (param dtype, model_out dtype, momentum, dampening, nesterov, weight_decay, maximize, first)
    (torch.float32, None, 0.0, 0.0, False, 0.0, False, False),
    (torch.float32, torch.float16, 0.9, 0.0, True, 0.01, False, True),
    (torch.float32, torch.bfloat16, 0.9, 0.1, False, 0.01, True, False),
    (torch.float16, None, 0.8, 0.0, True, 0.0, False, False),
    (torch.bfloat16, None, 0.0, 0.0, False, 0.1, True, False),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("skip", [False, True])
def test_sgd_step(backend_device, n, case, skip):
    backend, dev = backend_device
    param_dtype, out_dtype, momentum, dampening, nesterov, wd, maximize, first = case
    param, acc, (buf, _, _), out = _step_inputs(n, param_dtype, dev, out_dtype)
    if momentum == 0:
        buf = None
    kw = dict(grad_mult=torch.tensor(0.5, device=dev),
              found_inf=torch.tensor(1.0 if skip else 0.0, device=dev),
              lr=0.1, momentum=momentum, dampening=dampening, weight_decay=wd,
              nesterov=nesterov, maximize=maximize, first_step=first)
    want = _clone([param, acc, buf, out])
    reference.sgd_step_(*want, **kw)
    got = _clone([param, acc, buf, out])
    ops.sgd_step_(*got, backend=backend, **kw)
    for g, w in zip(got, want):
        if g is None:
            continue
        tol = dict(rtol=1e-5, atol=1e-6)
        if g.dtype in (torch.float16, torch.bfloat16):
            tol = dict(rtol=0, atol=0) if skip else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(g, w, equal_nan=True, **tol)
    assert torch.count_nonzero(got[1]) == 0


ADAM_MOMENT_CASES = [
    # (beta1, decoupled, weight_decay, maximize, amsgrad): the lerp weight 1 - beta1 above,
    # at and below 0.5 (torch's two lerp forms), the plain AdamW loop and the general one
    (0.9, True, 0.1, False, False),
    (0.5, True, 0.1, False, True),
    (0.3, True, 0.1, False, False),
    (0.3, False, 0.01, True, True),
    (0.0, True, 0.0, False, False),
]


@pytest.mark.parametrize("n", [1023, 4097])
@pytest.mark.parametrize("case", ADAM_MOMENT_CASES)
def test_adam_moments_are_the_references_bitwise(backend_device, n, case):
    """exp_avg, exp_avg_sq and max_exp_avg_sq hold bitwise the reference's (torch's own
    ops: lerp, mul + addcmul, maximum): no sqrt enters them, so no ulp of excuse. A beta1 of
    0.5 or less (the lerp weight 1 - beta1 at or above 0.5) takes torch's second lerp
    form, end - (end - start) * (1 - w), rounded once."""
    backend, dev = backend_device
    if dev.type == "cpu":  # (without fused multiply-adds torch's lerp rounds twice)
        _skip_without_torch_cpu_fma()
    beta1, decoupled, wd, maximize, amsgrad = case
    param, acc, (m, v, vmax), _ = _step_inputs(n, torch.float32, dev, None)
    if not amsgrad:
        vmax = None
    kw = dict(grad_mult=torch.tensor(0.25, device=dev), found_inf=torch.tensor(0.0, device=dev),
              lr=1e-2, beta1=beta1, beta2=0.99, eps=1e-8, weight_decay=wd, step=3,
              decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
    want = _clone([param, acc, m, v, vmax])
    reference.adamw_step_(*want, **kw)
    got = _clone([param, acc, m, v, vmax])
    ops.adamw_step_(*got, backend=backend, **kw)
    for name, i in (("exp_avg", 2), ("exp_avg_sq", 3), ("max_exp_avg_sq", 4)):
        if got[i] is not None:
            assert torch.equal(got[i], want[i]), name
    _assert_adam_param(got[0], want[0], param, want[4] if amsgrad else want[3])


@pytest.mark.parametrize("where", ["max_exp_avg_sq", "exp_avg_sq"])
def test_amsgrad_keeps_a_nan_maximum(backend_device, where):
    """torch.maximum propagates NaN from either side: a NaN in max_exp_avg_sq (or in the
    new exp_avg_sq) stays in max_exp_avg_sq and reaches the param, as in torch."""
    backend, dev = backend_device
    n = 4097
    param, acc, (m, v, vmax), _ = _step_inputs(n, torch.float32, dev, None)
    state = {"max_exp_avg_sq": vmax, "exp_avg_sq": v}[where]
    idx = [0, 17, 1000, n - 1]
    state[idx] = float("nan")
    kw = dict(grad_mult=torch.tensor(0.25, device=dev), found_inf=torch.tensor(0.0, device=dev),
              lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3, amsgrad=True)
    want = _clone([param, acc, m, v, vmax])
    reference.adamw_step_(*want, **kw)
    got = _clone([param, acc, m, v, vmax])
    ops.adamw_step_(*got, backend=backend, **kw)
    assert torch.isnan(want[4][idx]).all() and torch.isnan(want[0][idx]).all()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_steps_take_python_numbers_for_grad_mult_and_found_inf(backend_device, skip):
    """The same result as with one-element tensors (the reference once failed on them)."""
    backend, dev = backend_device
    param, acc, (m, v, _), _ = _step_inputs(1023, torch.float32, dev, None)
    adam = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=2)
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
               maximize=False, first_step=False)
    for op, state, hp in ((ops.adamw_step_, [m, v], adam), (ops.sgd_step_, [m], sgd)):
        want = _clone([param, acc, *state])
        op(*want, grad_mult=torch.tensor(0.5, device=dev),
           found_inf=torch.tensor(float(skip), device=dev), backend=backend, **hp)
        for b in (backend, "reference"):
            got = _clone([param, acc, *state])
            op(*got, grad_mult=0.5, found_inf=float(skip), backend=b, **hp)
            want_b = want
            if b == "reference":
                want_b = _clone([param, acc, *state])
                reference_op = getattr(reference, op.__name__)
                reference_op(*want_b, grad_mult=torch.tensor(0.5, device=dev),
                             found_inf=torch.tensor(float(skip), device=dev), **hp)
            for g, w in zip(got, want_b):
                assert torch.equal(g, w), b


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
def test_any_nonzero_found_inf_skips_the_step(backend_device, op_name):
    """found_inf != 0 writes nothing but acc (GradScaler's found_inf is 0 or 1, but the ops
    say "!= 0"): negative, fractional and NaN values skip as 1.0 does, as a tensor or a
    Python number, on every backend."""
    backend, dev = backend_device
    hp = dict(_STEP_HP[op_name], grad_mult=0.5)
    for name, call in ((backend, getattr(ops, op_name)),
                       ("reference", getattr(reference, op_name))):
        extra = dict(backend=backend) if name == backend else {}
        want = _step_tensors(op_name, dev)
        call(*want, found_inf=1.0, **hp, **extra)
        for value in (-1.0, 0.5, 1e-30, float("nan")):
            for found_inf in (value, torch.tensor(value, device=dev)):
                got = _step_tensors(op_name, dev)
                call(*got, found_inf=found_inf, **hp, **extra)
                for arg, g, w in zip(_STEP_ARGS[op_name], got, want):
                    assert _same_bits(g, w), (name, arg, found_inf)
    fresh = _step_tensors(op_name, dev)
    assert _same_bits(want[0], fresh[0]), "a skipped step changed param"


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_a_skipped_step_leaves_half_tensors_bitwise_as_they_were(backend_device, op_name,
                                                                 dtype):
    """found_inf set: a half param, and a model_out, keep every bit, those of NaNs with a
    payload too (a round trip through fp32 makes them the default NaN)."""
    backend, dev = backend_device
    nan_bits = {torch.float16: [0x7E01, 0x7C01, 0xFE01 - 2**16],
                torch.bfloat16: [0x7FC1, 0x7F81, 0xFFC1 - 2**16]}[dtype]
    idx = [0, 5, 32]
    hp = dict(_STEP_HP[op_name], grad_mult=0.5, found_inf=1.0)
    for name, call in ((backend, getattr(ops, op_name)),
                       ("reference", getattr(reference, op_name))):
        extra = dict(backend=backend) if name == backend else {}
        for half in (0, -1):  # the param, model_out (of an fp32 param)
            args = _step_tensors(op_name, dev)
            args[half] = args[half].to(dtype)
            args[half].view(torch.int16)[idx] = torch.tensor(nan_bits, dtype=torch.int16,
                                                             device=dev)
            if half == 0:
                args[-1] = None
            before = args[half].clone()
            call(*args, **hp, **extra)
            assert _same_bits(args[half], before), (name, _STEP_ARGS[op_name][half])


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("skip", [False, True])
def test_zero_acc_false_leaves_acc_as_it_was(backend_device, op_name, skip):
    """zero_acc=False: acc is only read (its bits stay), and every other tensor gets what
    zero_acc=True gives it."""
    backend, dev = backend_device
    hp = dict(_STEP_HP[op_name], grad_mult=0.5, found_inf=float(skip))
    for name, call in ((backend, getattr(ops, op_name)),
                       ("reference", getattr(reference, op_name))):
        extra = dict(backend=backend) if name == backend else {}
        want = _step_tensors(op_name, dev)
        call(*want, **hp, **extra)
        got = _step_tensors(op_name, dev)
        acc = got[1].clone()
        call(*got, zero_acc=False, **hp, **extra)
        assert _same_bits(got[1], acc), (name, "acc")
        for arg, g, w in zip(_STEP_ARGS[op_name], got, want):
            if arg != "acc":
                assert _same_bits(g, w), (name, arg)


def test_negative_inf_is_not_a_norm_type(backend_device):
    backend, dev = backend_device
    acc, grad = _rand(10, torch.float32, dev, 1), _rand(10, torch.float32, dev, 2)
    for call in (lambda: ops.accumulate_(acc, grad, norm_type=-math.inf, backend=backend),
                 lambda: ops.grad_norm([acc], -math.inf, backend=backend),
                 lambda: ops.accumulate_many_([acc], [grad], norm_type=-math.inf,
                                              backend=backend)):
        with pytest.raises(ValueError, match="norm_type must be 2.0 or inf"):
            call()


# ---- argument checks: every backend refuses the same bad input, as the reference does,
# with the same error naming the argument, before writing anything

_STEP_HP = {
    "adamw_step_": dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=2,
                        amsgrad=True),
    "sgd_step_": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
                      maximize=False, first_step=False),
}
_STEP_ARGS = {
    "adamw_step_": ["param", "acc", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "model_out"],
    "sgd_step_": ["param", "acc", "momentum_buffer", "model_out"],
}


def _step_tensors(op_name, dev, n=33):
    """Fresh positional tensors of adamw_step_ / sgd_step_ (every one given, model_out too)."""
    param, acc = _rand(n, torch.float32, dev, 40), _rand(n, torch.float32, dev, 41, scale=3.0)
    state = [_rand(n, torch.float32, dev, 42 + i).abs() for i in range(3)]
    out = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    return [param, acc, *state[:len(_STEP_ARGS[op_name]) - 3], out]


def _refused_everywhere(backend, op_name, args, kwargs, exc, match):
    """``op_name`` raises ``exc`` matching ``match`` on ``backend`` and on the reference,
    and changes none of the tensors in ``args`` (nested lists included; meta tensors have
    no data)."""
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])
            if isinstance(t, torch.Tensor) and not t.is_meta]
    for name, call in ((backend, getattr(ops, op_name)),
                       ("reference", getattr(reference, op_name))):
        before = [t.detach().clone() for t in flat]
        extra = dict(backend=backend) if name == backend else {}
        with pytest.raises(exc, match=match):
            call(*args, **kwargs, **extra)
        for t, b in zip(flat, before):
            assert _same_bits(t.detach(), b), f"{name}: a tensor changed although the call failed"


def _same_bits(a, b):
    """Bitwise equal (NaN payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("arg", ["grad_mult", "found_inf"])
@pytest.mark.parametrize("shape", [(33,), (2,), (1, 2), (0,)],
                         ids=["param-shape", "2", "1x2", "empty"])
def test_scalar_args_of_several_elements_are_refused(backend_device, op_name, arg, shape):
    """grad_mult / found_inf hold one value: a tensor of the param's shape once made the
    reference apply it element-wise, silently, where cpu and triton raised."""
    backend, dev = backend_device
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
    kw[arg] = torch.full(shape, 0.5 if arg == "grad_mult" else 0.0, device=dev)
    _refused_everywhere(backend, op_name, _step_tensors(op_name, dev), kw, ValueError,
                        rf"^{arg} must hold exactly one value .*got a tensor of shape "
                        rf"{re.escape(str(shape))}")


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("arg", ["grad_mult", "found_inf"])
@pytest.mark.parametrize("value", ["complex tensor", "real complex tensor", "python complex",
                                   None, "0.5x", b"0.5"])
def test_scalar_args_that_are_not_real_numbers_are_refused(backend_device, op_name, arg, value):
    """A complex grad_mult: cpu dropped the imaginary part, the reference failed unclearly."""
    backend, dev = backend_device
    value = {"complex tensor": torch.tensor(0.5 + 1j, device=dev),
             "real complex tensor": torch.tensor(0.5 + 0j, device=dev).reshape(1),
             "python complex": 0.5 + 0j}.get(value, value)
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
    kw[arg] = value
    _refused_everywhere(backend, op_name, _step_tensors(op_name, dev), kw, TypeError,
                        rf"^{arg} must be a real number or a one-element real tensor, got ")


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("skip", [False, True])
def test_scalar_args_in_every_accepted_form_agree(backend_device, op_name, skip):
    """What every backend takes for grad_mult / found_inf: a one-element real tensor of any
    shape, dtype (bool and int included) or device, or a Python number; all give what
    0-dim fp32 tensors give (the reference once broadcast a (1, 1) tensor and failed)."""
    backend, dev = backend_device
    hp = _STEP_HP[op_name]
    f = float(skip)
    forms = [
        (torch.full((1,), 0.5, device=dev), torch.full((1,), f, device=dev)),
        (torch.full((1, 1), 0.5, device=dev), torch.full((1, 1, 1), f, device=dev)),
        (torch.tensor(0.5, dtype=torch.float64, device=dev), torch.tensor(skip, device=dev)),
        (torch.tensor(2, device=dev), torch.tensor(int(skip), device=dev)),
        (torch.tensor(0.5), torch.tensor(f, dtype=torch.float16)),  # (host tensors)
        (0.5, skip),
        (2, f),
    ]
    for name, call in ((backend, getattr(ops, op_name)),
                       ("reference", getattr(reference, op_name))):
        extra = dict(backend=backend) if name == backend else {}
        for grad_mult, found_inf in forms:
            mult = float(grad_mult)
            want = _step_tensors(op_name, dev)
            call(*want, grad_mult=torch.tensor(mult, device=dev),
                 found_inf=torch.tensor(f, device=dev), **hp, **extra)
            got = _step_tensors(op_name, dev)
            call(*got, grad_mult=grad_mult, found_inf=found_inf, **hp, **extra)
            for arg, g, w in zip(_STEP_ARGS[op_name], got, want):
                assert torch.equal(g, w), (name, arg, grad_mult, found_inf)


def test_non_tensor_arguments_are_type_errors_naming_them(backend_device):
    """A list where a tensor belongs once gave "'list' object has no attribute 'device'"."""
    backend, dev = backend_device

    def t(n=4):
        return torch.ones(n, device=dev)

    cases = [
        ("accumulate_", [[0.0] * 4, t()], {}, r"^acc must be a tensor, got list"),
        ("accumulate_", [t(), [0.0] * 4], {}, r"^grad must be a tensor, got list"),
        ("accumulate_", [None, t()], {"norm_type": 2.0}, r"^acc must be a tensor, got NoneType"),
        ("grad_norm", [[[1.0, 2.0]]], {}, r"^tensors\[0\] must be a tensor, got list"),
        ("grad_norm", [[t(), [1.0]]], {}, r"^tensors\[1\] must be a tensor, got list"),
        ("accumulate_many_", [[[0.0] * 4, t()], [t(), t()]], {},
         r"^accs\[0\] must be a tensor, got list"),
    ]
    for op_name in ("adamw_step_", "sgd_step_"):
        for i, arg in enumerate(_STEP_ARGS[op_name]):
            args = _step_tensors(op_name, dev, 4)
            args[i] = [0.0] * 4
            cases.append((op_name, args, dict(grad_mult=1.0, found_inf=0.0, **_STEP_HP[op_name]),
                          rf"^{arg} must be a tensor, got list"))
    for op_name, args, kw, match in cases:
        _refused_everywhere(backend, op_name, args, kw, TypeError, match)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _bad_layout_cases(dev, n=33):
    """(op name, args, exception, message) with a tensor argument of a wrong dtype, strided,
    of the wrong size or on another device (the meta device: no second device needed)."""
    acc, grad = _rand(n, torch.float32, dev, 95), _rand(n, torch.bfloat16, dev, 96)
    strided = _rand(2 * n, torch.float32, dev, 97)[::2]
    meta = torch.empty(n, dtype=torch.bfloat16, device="meta")
    cases = [
        ("accumulate_", [strided, grad], ValueError,
         rf"^acc must be a contiguous 1-D tensor, got shape \({n},\)$"),
        ("accumulate_", [acc, grad[:n - 1]], ValueError,
         rf"^grad has {n - 1} elements, expected {n}$"),
        ("accumulate_", [acc, grad[:1]], ValueError,  # (would broadcast)
         rf"^grad has 1 elements, expected {n}$"),
        ("accumulate_", [acc, meta], ValueError, rf"^grad is on meta, expected {dev}$"),
        ("grad_norm", [[acc, strided]], ValueError,
         r"^tensors\[1\] must be a contiguous 1-D tensor"),
    ]
    for op_name in ("adamw_step_", "sgd_step_"):
        names = _STEP_ARGS[op_name]
        for i in range(1, len(names)):  # (the sizes and device are param's)
            args = _step_tensors(op_name, dev, n)
            args[i] = args[i][:1]
            cases.append((op_name, args, ValueError,
                          rf"^{names[i]} has 1 elements, expected {n}$"))
            args = _step_tensors(op_name, dev, n)
            args[i] = torch.empty(n, dtype=args[i].dtype, device="meta")
            cases.append((op_name, args, ValueError, rf"^{names[i]} is on meta, expected {dev}$"))
        args = _step_tensors(op_name, dev, n)
        args[1] = strided
        cases.append((op_name, args, ValueError, r"^acc must be a contiguous 1-D tensor"))
        for i, dtype, allowed in ((1, torch.float16, "float32"), (2, torch.bfloat16, "float32"),
                                  (-1, torch.float32, "float16 or bfloat16")):
            args = _step_tensors(op_name, dev, n)
            args[i] = args[i].to(dtype)
            cases.append((op_name, args, TypeError,
                          rf"^{names[i]} must have dtype {allowed}, got {_dtype_name(dtype)}$"))
    return cases


def test_tensors_of_a_wrong_dtype_layout_size_or_device_are_refused(backend_device):
    """The flat tensors of one call are contiguous, of one size, on one device, the
    accumulator and state fp32, model_out half: a tensor of another dtype (an fp32
    model_out too), a strided view, a shorter tensor (one element of it would broadcast on
    the reference) or one on another device is refused, naming it, before anything is
    written."""
    backend, dev = backend_device
    for op_name, args, exc, match in _bad_layout_cases(dev):
        kw = {} if op_name not in _STEP_HP else dict(grad_mult=0.5, found_inf=0.0,
                                                      **_STEP_HP[op_name])
        _refused_everywhere(backend, op_name, args, kw, exc, match)


@pytest.mark.parametrize("norm_type", ["fro", "nuc", 1, 0.0, -math.inf, [2.0]])
def test_bad_norm_type_is_an_error_naming_norm_type(backend_device, norm_type):
    """norm_type='fro' once gave "could not convert string to float", a list a float()
    TypeError."""
    backend, dev = backend_device
    acc, grad = _rand(10, torch.float32, dev, 1), _rand(10, torch.float32, dev, 2)
    match = rf"^norm_type must be 2\.0 or inf, got {re.escape(repr(norm_type))}$"
    for op_name, args in (("accumulate_", [acc, grad]), ("accumulate_many_", [[acc], [grad]]),
                          ("accumulate_many_", [[], []]), ("grad_norm", [[acc]])):
        _refused_everywhere(backend, op_name, args, dict(norm_type=norm_type), ValueError, match)


def test_grad_norm_needs_a_norm_type(backend_device):
    """None means "no statistic" to accumulate_; grad_norm has no such choice."""
    backend, dev = backend_device
    acc = _rand(10, torch.float32, dev, 1)
    _refused_everywhere(backend, "grad_norm", [[acc], None], {}, ValueError,
                        r"^norm_type must be 2\.0 or inf, got None$")
    for norm_type in (2, "inf", float("inf")):  # what float() makes 2.0 or inf is fine
        assert torch.equal(ops.grad_norm([acc], norm_type, backend=backend),
                           reference.grad_norm([acc], norm_type))


@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
def test_step_tensors_that_require_grad_are_refused_in_grad_mode(backend_device, op_name):
    """The reference failed with autograd's in-place error, cpu and triton wrote silently;
    under torch.no_grad() (how optimizers step) every backend writes them."""
    backend, dev = backend_device
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
    for i, arg in enumerate(_STEP_ARGS[op_name]):
        args = _step_tensors(op_name, dev)
        args[i].requires_grad_(True)
        _refused_everywhere(backend, op_name, args, kw, RuntimeError,
                            rf"^{arg} is a leaf tensor that requires grad, and the op writes it")
    args = _step_tensors(op_name, dev)
    base = args[0].clone().requires_grad_(True)
    args[0] = base[:]  # a view: not a leaf, still requires grad
    _refused_everywhere(backend, op_name, args, kw, RuntimeError,
                        r"^param is a tensor that requires grad")
    for i in range(len(_STEP_ARGS[op_name])):
        want = _step_tensors(op_name, dev)
        reference_op = getattr(reference, op_name)
        reference_op(*want, **kw)
        got = _step_tensors(op_name, dev)
        got[i].requires_grad_(True)
        with torch.no_grad():
            getattr(ops, op_name)(*got, backend=backend, **kw)
        for g, w in zip(got, want):
            tol = dict(rtol=1e-5, atol=1e-6)
            if g.dtype in (torch.float16, torch.bfloat16):
                tol = dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(g.detach(), w, **tol)


def test_accs_that_require_grad_are_refused_in_grad_mode(backend_device):
    backend, dev = backend_device
    grad = _rand(10, torch.bfloat16, dev, 2)
    leaf = _rand(10, torch.float32, dev, 1).requires_grad_(True)
    for norm_type in (None, 2.0):
        _refused_everywhere(backend, "accumulate_", [leaf, grad], dict(norm_type=norm_type),
                            RuntimeError, r"^acc is a leaf tensor that requires grad")
    _refused_everywhere(backend, "accumulate_", [leaf * 1, grad], {}, RuntimeError,
                        r"^acc is a tensor that requires grad")
    plain = _rand(10, torch.float32, dev, 3)
    for norm_type in (None, math.inf):
        _refused_everywhere(backend, "accumulate_many_", [[plain, leaf], [grad, grad]],
                            dict(norm_type=norm_type), RuntimeError,
                            r"^accs\[1\] is a leaf tensor that requires grad")
    with torch.no_grad():
        want = leaf.detach().clone()
        reference.accumulate_(want, grad, 0.5)
        got = leaf.clone().requires_grad_(True)
        ops.accumulate_(got, grad, 0.5, backend=backend)
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
        got_many = [plain.clone(), leaf.clone().requires_grad_(True)]
        ops.accumulate_many_(got_many, [grad, grad], 0.5, backend=backend)
        torch.testing.assert_close(got_many[1].detach(), want, rtol=1e-6, atol=1e-6)


def _overlap_cases(dev, n=33):
    """(op name, args, kwargs, the two arguments the error names) of calls in which a tensor
    the op writes shares memory with another argument."""
    def buf(k=3):
        return _rand(k * n, torch.float32, dev, 50)

    def grad(dtype=torch.bfloat16):
        return _rand(n, dtype, dev, 51)

    cases = []
    b = buf()
    cases.append(("accumulate_", [b[:n], b[2:n + 2]], {}, ("acc", "grad")))  # grad after acc
    b = buf()
    cases.append(("accumulate_", [b[2:n + 2], b[:n]], {}, ("acc", "grad")))  # grad before acc
    a = buf(1)
    cases.append(("accumulate_", [a, a], dict(norm_type=2.0), ("acc", "grad")))
    b = buf()
    cases.append(("accumulate_", [b[:n], b.view(torch.bfloat16)[n - 1:2 * n - 1]], {},
                  ("acc", "grad")))  # another dtype over the same bytes
    a = buf(1)
    cases.append(("accumulate_many_", [[a, a], [grad(), grad()]], {}, ("accs[0]", "accs[1]")))
    b = buf()
    cases.append(("accumulate_many_", [[b[:n], b[n - 1:2 * n - 1]], [grad(), grad()]], {},
                  ("accs[0]", "accs[1]")))
    b = buf()
    cases.append(("accumulate_many_", [[_rand(n, torch.float32, dev, 52), b[:n]],
                                       [b[n // 2:n // 2 + n], grad(torch.float32)]], {},
                  ("accs[1]", "grads[0]")))
    b = buf()  # a bf16 grad over the second half of acc's bytes (past the grad's own size)
    cases.append(("accumulate_", [b[:n], b.view(torch.bfloat16)[n + 1:2 * n + 1]], {},
                  ("acc", "grad")))
    b, m = buf(), n // 2  # grads[1] inside grads[0] (both only read), then accs[1] inside
    cases.append(("accumulate_many_",  # grads[0] past grads[1]'s end: the furthest reach
                  [[_rand(2 * n, torch.float32, dev, 53), b[n + 1:n + 1 + m]],
                   [b[:2 * n], b[1:1 + m]]], {}, ("accs[1]", "grads[0]")))
    for op_name in ("adamw_step_", "sgd_step_"):
        names = _STEP_ARGS[op_name][:-1]  # (model_out is half: checked on its own below)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                args = _step_tensors(op_name, dev, n)
                args[j] = args[i]  # the same tensor twice
                cases.append((op_name, args, {}, (names[i], names[j])))
        args = _step_tensors(op_name, dev, n)
        b = buf()
        args[0], args[1] = b[:n], b[n // 2:n // 2 + n]  # param and acc overlap
        cases.append((op_name, args, {}, ("param", "acc")))
        args = _step_tensors(op_name, dev, n)
        args[-1] = args[0].view(torch.bfloat16)[:n]  # model_out over param's bytes
        cases.append((op_name, args, {}, ("param", "model_out")))
        args = _step_tensors(op_name, dev, n)  # acc only read: still refused (param written)
        args[0] = args[1]
        cases.append((op_name, args, dict(zero_acc=False), ("param", "acc")))
        args = _step_tensors(op_name, dev, n)
        cases.append((op_name, args, dict(grad_mult=args[1][5:6]), ("acc", "grad_mult")))
        args = _step_tensors(op_name, dev, n)
        cases.append((op_name, args, dict(found_inf=args[0][:1].view(1, 1)),
                      ("param", "found_inf")))
    return cases


def test_overlapping_arguments_are_refused(backend_device):
    """Aliased or overlapping tensors where the op writes one of them: the cpu and triton
    kernels wrote silently (each in its own order), the reference sometimes too and
    sometimes failed with autograd's in-place error. Every backend refuses them, naming
    both arguments, before writing anything."""
    backend, dev = backend_device
    for op_name, args, extra, (a, b) in _overlap_cases(dev):
        kw = dict(extra)
        if op_name in _STEP_HP:
            kw = {"grad_mult": 0.5, "found_inf": 0.0, **_STEP_HP[op_name], **extra}
        _refused_everywhere(backend, op_name, args, kw, ValueError,
                            rf"^{re.escape(a)} and {re.escape(b)} share memory, and the op "
                            "writes ")


def test_arguments_that_are_only_read_may_share_memory(backend_device):
    """What no write reaches may alias: the same grad for two accs, zero-element views at
    one address, an unused state buffer (amsgrad=False, momentum=0), accs side by side."""
    backend, dev = backend_device
    n = 33
    g = _rand(n, torch.bfloat16, dev, 60)
    flat = _rand(3 * n, torch.float32, dev, 61)
    e = flat[n:n]
    for call in (
        lambda mod, **kw: mod.accumulate_many_([flat[:n], flat[n:2 * n], e, flat[n:n]],
                                               [g, g, g[:0], g[:0]], 0.5, **kw),
        lambda mod, **kw: mod.accumulate_(e, flat[n:n], **kw),
    ):
        before = flat.clone()
        call(ops, backend=backend)
        got = flat.clone()
        flat.copy_(before)
        call(reference)
        assert _same_bits(got, flat)
    hp = dict(grad_mult=0.5, found_inf=0.0)
    cases = [("adamw_step_", dict(_STEP_HP["adamw_step_"], amsgrad=False), 4, 2),
             ("sgd_step_", dict(_STEP_HP["sgd_step_"], momentum=0.0), 2, 1)]
    for op_name, op_hp, unused, alias in cases:
        outs = {}
        for name, call in ((backend, getattr(ops, op_name)),
                           ("reference", getattr(reference, op_name))):
            args = _step_tensors(op_name, dev, n)
            args[unused] = args[alias]  # never read or written
            extra = dict(backend=backend) if name == backend else {}
            call(*args, **hp, **op_hp, **extra)
            outs[name] = args
        for got, want in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    for op_name in ("adamw_step_", "sgd_step_"):  # zero_acc=False: acc is only read
        outs = {}
        for name, call in ((backend, getattr(ops, op_name)),
                           ("reference", getattr(reference, op_name))):
            args = _step_tensors(op_name, dev, n)
            extra = dict(backend=backend) if name == backend else {}
            call(*args, grad_mult=args[1][5:6], found_inf=0.0, zero_acc=False,
                 **_STEP_HP[op_name], **extra)
            outs[name] = args
        for got, want in zip(outs[backend], outs["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_a_missing_state_buffer_is_refused(backend_device):
    """amsgrad=True without max_exp_avg_sq, momentum without momentum_buffer: a ValueError
    saying so on every backend (not an error from deep inside one), nothing written."""
    backend, dev = backend_device
    for op_name, i, match in (("adamw_step_", 4, r"^amsgrad=True needs max_exp_avg_sq$"),
                              ("sgd_step_", 2, r"^momentum != 0 needs momentum_buffer$")):
        args = _step_tensors(op_name, dev)
        args[i] = None
        kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])  # (amsgrad, momentum)
        _refused_everywhere(backend, op_name, args, kw, ValueError, match)


@pytest.mark.parametrize("arg, value", [
    ("lr", -1e-3), ("lr", float("nan")), ("eps", -1e-8), ("beta1", 1.0), ("beta1", -0.1),
    ("beta1", 1.5), ("beta2", 1.0), ("beta2", -1e-3), ("beta2", float("nan")),
    ("weight_decay", -0.01),
])
def test_adamw_hyperparameters_torch_refuses_are_refused(backend_device, arg, value):
    """beta1=1.0 divided by zero in the reference and triton and gave non-finite params on
    cpu; negative lr/eps/weight_decay were taken. torch.optim.AdamW refuses all of these
    at construction: every backend refuses them, naming the argument."""
    backend, dev = backend_device
    betas = {"beta1": (value, 0.999), "beta2": (0.9, value)}.get(arg, (0.9, 0.999))
    with pytest.raises(ValueError):
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], betas=betas,
                          **{k: value for k in (arg,) if not k.startswith("beta")})
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP["adamw_step_"])
    kw[arg] = value
    what = "in \\[0, 1\\)" if arg.startswith("beta") else ">= 0"
    _refused_everywhere(backend, "adamw_step_", _step_tensors("adamw_step_", dev), kw,
                        ValueError, rf"^{arg} must be {what}, got {re.escape(str(value))} "
                        r"\(torch\.optim\.AdamW refuses it too")


@pytest.mark.parametrize("hp, match", [
    (dict(lr=-0.1), r"^lr must be >= 0, got -0\.1"),
    (dict(momentum=-0.5), r"^momentum must be >= 0, got -0\.5"),
    (dict(weight_decay=-1e-4), r"^weight_decay must be >= 0, got -0\.0001"),
    (dict(nesterov=True, momentum=0.0), r"^nesterov=True needs momentum > 0 and dampening "
                                        r"== 0, got momentum=0\.0 and dampening=0\.0"),
    (dict(nesterov=True, dampening=0.5), r"^nesterov=True needs momentum > 0 and dampening "
                                         r"== 0, got momentum=0\.9 and dampening=0\.5"),
    (dict(nesterov=True, momentum=-0.9), r"^momentum must be >= 0, got -0\.9"),
    (dict(nesterov=True, dampening=-0.5), r"^nesterov=True needs momentum > 0 and dampening "
                                          r"== 0, got momentum=0\.9 and dampening=-0\.5"),
])
def test_sgd_hyperparameters_torch_refuses_are_refused(backend_device, hp, match):
    """Taken silently by every backend; torch.optim.SGD refuses them at construction."""
    backend, dev = backend_device
    with pytest.raises(ValueError):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **hp)
    kw = dict(grad_mult=0.5, found_inf=0.0, **{**_STEP_HP["sgd_step_"], **hp})
    _refused_everywhere(backend, "sgd_step_", _step_tensors("sgd_step_", dev), kw, ValueError,
                        match)


def test_hyperparameters_at_the_edge_of_torch_ranges_are_taken(backend_device):
    """What torch.optim takes (zeros, SGD's negative dampening) still runs, and agrees
    with the reference."""
    backend, dev = backend_device
    cases = [("adamw_step_", dict(lr=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0)),
             ("adamw_step_", dict(beta1=0.0, beta2=0.0)),
             ("sgd_step_", dict(lr=0.0, momentum=0.0, weight_decay=0.0)),
             ("sgd_step_", dict(momentum=0.5, dampening=-1.0))]
    for op_name, hp in cases:
        kw = dict(grad_mult=0.5, found_inf=0.0, **{**_STEP_HP[op_name], **hp})
        want = _step_tensors(op_name, dev)
        getattr(reference, op_name)(*want, **kw)
        got = _step_tensors(op_name, dev)
        getattr(ops, op_name)(*got, backend=backend, **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("step, exc, match", [
    (2.5, ValueError, r"^step must be an integer \(the step number after this update\), "
                      r"got 2\.5$"),
    (float("inf"), ValueError, r"^step must be an integer"),
    (float("nan"), ValueError, r"^step must be an integer"),
    (0, ValueError, r"^step must be >= 1 \(the step number after this update\), got 0$"),
    (0.0, ValueError, r"^step must be >= 1 .*got 0$"),
    (-3, ValueError, r"^step must be >= 1 .*got -3$"),
    (2**63, ValueError, r"^step must be < 2\*\*63 .*got 9223372036854775808$"),
    (1e300, ValueError, r"^step must be < 2\*\*63 .*got 1000000"),
    ("3", TypeError, r"^step must be an integer \(int, or an integral float\), got str '3'$"),
    (None, TypeError, r"^step must be an integer .*got NoneType None$"),
    (True, TypeError, r"^step must be an integer .*got bool True$"),
    (3 + 0j, TypeError, r"^step must be a real number"),
])
def test_step_must_be_an_integer_of_at_least_one(backend_device, step, exc, match):
    """step=2.5 was taken everywhere, cpu truncating it to 2 where the reference used 2.5;
    "3" failed with a raw comparison TypeError."""
    backend, dev = backend_device
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP["adamw_step_"])
    kw["step"] = step
    _refused_everywhere(backend, "adamw_step_", _step_tensors("adamw_step_", dev), kw, exc,
                        match)


def test_step_in_every_accepted_form_agrees(backend_device):
    """An int, an integral float (what torch's float step tensors hold) or a one-element
    tensor holding one: the bits of step=3."""
    backend, dev = backend_device
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP["adamw_step_"])
    for name, call in ((backend, ops.adamw_step_), ("reference", reference.adamw_step_)):
        extra = dict(backend=backend) if name == backend else {}
        want = _step_tensors("adamw_step_", dev)
        call(*want, **{**kw, "step": 3}, **extra)
        for step in (3.0, torch.tensor(3.0), torch.tensor([3], device=dev)):
            got = _step_tensors("adamw_step_", dev)
            call(*got, **{**kw, "step": step}, **extra)
            for arg, g, w in zip(_STEP_ARGS["adamw_step_"], got, want):
                assert _same_bits(g, w), (name, arg, step)


def test_the_largest_step_is_taken(backend_device):
    """step must be < 2**63 (an int64): 2**63 - 1 itself is taken, and gives the bits of
    any step past which beta**step is 0 for both betas (bias corrections of 1)."""
    backend, dev = backend_device
    kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP["adamw_step_"])
    for name, call in ((backend, ops.adamw_step_), ("reference", reference.adamw_step_)):
        extra = dict(backend=backend) if name == backend else {}
        want = _step_tensors("adamw_step_", dev)
        call(*want, **{**kw, "step": 10**6}, **extra)
        got = _step_tensors("adamw_step_", dev)
        call(*got, **{**kw, "step": 2**63 - 1}, **extra)
        for arg, g, w in zip(_STEP_ARGS["adamw_step_"], got, want):
            assert _same_bits(g, w), (name, arg)


def _wrong_type_cases(dev, n=33):
    """(op name, args, kwargs, exception, message) with a number argument of the wrong
    type or holding several values."""
    acc, grad = _rand(n, torch.float32, dev, 70), _rand(n, torch.bfloat16, dev, 71)
    many = [[acc, _rand(5, torch.float32, dev, 72)], [grad, _rand(5, torch.bfloat16, dev, 73)]]
    cases = []
    for op_name, args in (("accumulate_", [acc, grad]), ("accumulate_many_", many)):
        for norm_type in (None, 2.0):
            for value in ("2", None, [2.0], 2 + 0j, torch.tensor(2 + 1j, device=dev)):
                cases.append((op_name, args + [value], dict(norm_type=norm_type), TypeError,
                              r"^scale must be a real number or a one-element real tensor, "
                              "got "))
            cases.append((op_name, args + [torch.tensor([2.0, 3.0], device=dev)],
                          dict(norm_type=norm_type), ValueError,
                          r"^scale must hold exactly one value .*got a tensor of shape \(2,\)"))
    cases.append(("accumulate_many_", [[], [], "2"], {}, TypeError, r"^scale must be a real"))
    for op_name, names in (("adamw_step_", ["lr", "beta1", "beta2", "eps", "weight_decay"]),
                           ("sgd_step_", ["lr", "momentum", "dampening", "weight_decay"])):
        for name in [*names, "grad_mult", "found_inf"]:
            for value in (None, "0.1", [0.1]):
                kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
                kw[name] = value
                cases.append((op_name, _step_tensors(op_name, dev, n), kw, TypeError,
                              rf"^{name} must be a real number or a one-element real tensor, "
                              rf"got {type(value).__name__}"))
            kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
            kw[name] = torch.zeros(2, device=dev)
            cases.append((op_name, _step_tensors(op_name, dev, n), kw, ValueError,
                          rf"^{name} must hold exactly one value"))
    return cases


def test_number_arguments_of_the_wrong_type_are_refused(backend_device):
    """scale="2" was taken by cpu and triton (float("2")) and a raw add_ error on the
    reference; lr=None or "0.1" failed with raw errors, differently per backend."""
    backend, dev = backend_device
    for op_name, args, kw, exc, match in _wrong_type_cases(dev):
        _refused_everywhere(backend, op_name, args, kw, exc, match)


def test_scale_in_every_accepted_form_agrees(backend_device):
    """A real number or a one-element real tensor of any shape: the bits of the float
    (a (1,)-shaped tensor failed on the reference)."""
    backend, dev = backend_device
    n = 33
    acc0, grad = _rand(n, torch.float32, dev, 80), _rand(n, torch.bfloat16, dev, 81)
    for name in (backend, "reference"):
        mod, extra = (ops, dict(backend=backend)) if name == backend else (reference, {})
        for overwrite in (False, True, 0, 1):
            want = acc0.clone()
            mod.accumulate_(want, grad, 2.0, overwrite=bool(overwrite), **extra)
            for scale in (2, torch.tensor(2.0), torch.tensor([2.0], device=dev),
                          torch.tensor([[2]], device=dev)):
                got = acc0.clone()
                mod.accumulate_(got, grad, scale, overwrite=overwrite, **extra)
                assert _same_bits(got, want), (name, scale, overwrite)
                got_many = [acc0.clone()]
                mod.accumulate_many_(got_many, [grad], scale,
                                     overwrite=[overwrite] if overwrite else None, **extra)
                assert _same_bits(got_many[0], want), (name, scale, overwrite)


def test_flags_must_be_bools(backend_device):
    """overwrite="no" (truthy) overwrote the accumulator on every backend; the step ops'
    flags took any value alike."""
    backend, dev = backend_device
    acc, grad = _rand(33, torch.float32, dev, 90), _rand(33, torch.bfloat16, dev, 91)
    cases = []
    for value in ("no", None, 2, 1.0, [True]):
        for norm_type in (None, 2.0):
            cases.append(("accumulate_", [acc, grad], dict(overwrite=value,
                                                           norm_type=norm_type), "overwrite",
                          value))
    flags = {"adamw_step_": ["decoupled_weight_decay", "amsgrad", "maximize", "zero_acc"],
             "sgd_step_": ["nesterov", "maximize", "first_step", "zero_acc"]}
    for op_name, names in flags.items():
        for name in names:
            for value in ("no", None):
                kw = dict(grad_mult=0.5, found_inf=0.0, **_STEP_HP[op_name])
                kw[name] = value
                cases.append((op_name, _step_tensors(op_name, dev), kw, name, value))
    for op_name, args, kw, name, value in cases:
        _refused_everywhere(backend, op_name, args, kw, TypeError,
                            rf"^{name} must be a bool, got {type(value).__name__} "
                            rf"{re.escape(repr(value))}$")


# ---- every op writes only its own elements: its tensors are views into larger buffers
# (as the wrapper's flat buffers are) with poisoned neighbours on both sides

_PAD = 5


def _padded(t, fill):
    """A copy of ``t`` inside a buffer with ``_PAD`` elements of ``fill`` on each side:
    (the buffer, the view of ``t``)."""
    buf = torch.full((t.numel() + 2 * _PAD,), fill, dtype=t.dtype, device=t.device)
    view = buf[_PAD:_PAD + t.numel()]
    view.copy_(t)
    return buf, view


@pytest.mark.parametrize("n", [1, 1023, 4097, 278011])
@pytest.mark.parametrize("op_name", ["adamw_step_", "sgd_step_"])
@pytest.mark.parametrize("skip", [False, True])
def test_steps_write_nothing_outside_their_tensors(backend_device, n, op_name, skip):
    """A step (zeroing acc included) leaves the elements next to each of its tensors
    bitwise as they were: a tail mask one element too long would step (or zero) the
    first element of the next tensor in a flat buffer, which no test of standalone
    tensors sees. The neighbours are finite, so a step would change them."""
    backend, dev = backend_device
    tensors = _step_tensors(op_name, dev, n)
    fills = [3.0, 7.0, 0.5, 0.25, 0.125][:len(tensors) - 1] + [11.0]
    bufs, views = zip(*(_padded(t, f) for t, f in zip(tensors, fills)))
    before = [b.clone() for b in bufs]
    hp = dict(_STEP_HP[op_name], grad_mult=torch.tensor(0.5, device=dev),
              found_inf=torch.tensor(float(skip), device=dev))
    getattr(ops, op_name)(*views, backend=backend, **hp)
    for name, buf, b0 in zip(_STEP_ARGS[op_name], bufs, before):
        for side in (slice(0, _PAD), slice(_PAD + n, None)):
            assert _same_bits(buf[side], b0[side]), f"{name}: a neighbour was written"
    assert torch.count_nonzero(views[1]) == 0, "acc must be zeroed"


def _written_by(op_name, dev, n):
    """(the positional tensors of a call of ``op_name``, the names of those it writes)."""
    if op_name in _STEP_ARGS:
        return _step_tensors(op_name, dev, n), _STEP_ARGS[op_name]
    grad = _rand(n, torch.bfloat16, dev, 43)
    if op_name == "accumulate_":
        return [_rand(n, torch.float32, dev, 44), grad], ["acc"]
    return [[_rand(n, torch.float32, dev, 44), _rand(5, torch.float32, dev, 45)],
            [grad, _rand(5, torch.bfloat16, dev, 46)]], ["accs"]


@pytest.mark.parametrize("op_name", ["accumulate_", "accumulate_many_", "adamw_step_",
                                     "sgd_step_"])
@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("dev", _devices())
def test_every_written_tensor_gets_a_version_bump(backend, dev, op_name):
    """As torch's in-place ops: every tensor an op writes gets its version counter bumped,
    so a backward through a tensor saved before the write is refused, not computed with
    the new values. (The C++ backends bumped none.)"""
    why = ops.unavailable_reason(backend, dev)
    if why is not None:
        pytest.skip(f"backend {backend} not available on {dev}: {why}")
    args, names = _written_by(op_name, dev, 33)
    hp = {}
    if op_name in _STEP_HP:
        hp = dict(_STEP_HP[op_name], grad_mult=0.5, found_inf=0.0)
    written = [t for a, _ in zip(args, names) for t in (a if isinstance(a, list) else [a])]
    before = [t._version for t in written]
    x = torch.ones(33, device=dev, requires_grad=True)
    saved = (x * written[0]).sum()  # (mul saves written[0] for the backward)
    getattr(ops, op_name)(*args, backend=backend, **hp)
    for t, v in zip(written, before):
        assert t._version > v, "written in place without a version bump"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_rounding_is_nearest_even(backend_device, dtype):
    """model_out must be the fp32 result rounded to nearest even, as torch's .to() does."""
    backend, dev = backend_device
    n = 4097
    param = _rand(n, torch.float32, dev, 30)
    acc = torch.zeros(n, device=dev)
    out = torch.empty(n, dtype=dtype, device=dev)
    ops.sgd_step_(param, acc, None, out, grad_mult=torch.tensor(1.0, device=dev),
                  found_inf=torch.tensor(0.0, device=dev), lr=0.0, momentum=0.0,
                  dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                  first_step=False, backend=backend)
    assert torch.equal(out, param.to(dtype))


def test_reference_adamw_matches_torch():
    """The reference itself equals torch.optim.AdamW on one tensor."""
    torch.manual_seed(0)
    p0 = torch.randn(1023)
    grads = [torch.randn(1023) for _ in range(3)]
    p_t = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p_t], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True)
    p, acc = p0.clone(), torch.zeros(1023)
    m, v, vmax = torch.zeros(1023), torch.zeros(1023), torch.zeros(1023)
    for step, g in enumerate(grads, 1):
        p_t.grad = g.clone()
        opt.step()
        acc.copy_(g)
        reference.adamw_step_(p, acc, m, v, vmax, grad_mult=torch.tensor(1.0),
                              found_inf=torch.tensor(0.0), lr=1e-2, beta1=0.9, beta2=0.99,
                              eps=1e-8, weight_decay=0.1, step=step, amsgrad=True)
    torch.testing.assert_close(p, p_t.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[p_t]["exp_avg"], rtol=1e-6, atol=1e-7)


def test_reference_sgd_matches_torch():
    torch.manual_seed(0)
    p0 = torch.randn(4097)
    grads = [torch.randn(4097) for _ in range(3)]
    p_t = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p_t], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                          nesterov=False)
    p, acc, buf = p0.clone(), torch.zeros(4097), torch.zeros(4097)
    for i, g in enumerate(grads):
        p_t.grad = g.clone()
        opt.step()
        acc.copy_(g)
        reference.sgd_step_(p, acc, buf, grad_mult=torch.tensor(1.0), found_inf=torch.tensor(0.0),
                            lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                            nesterov=False, maximize=False, first_step=i == 0)
    torch.testing.assert_close(p, p_t.detach(), rtol=1e-6, atol=1e-7)


# torch.optim's CPU step (foreach=False, its default there) rounds add(x, y, alpha=a), lerp
# and addcmul once each, as one multiply-add, where the CPU has FMA (torch's AVX2 and AVX-512
# kernels); every backend does the same (csrc/math.h fmaf, triton _fma). Its CPU sqrt (SLEEF)
# is not always correctly rounded while ours is, so Adam is exact for the reference only.
_TORCH_CPU_FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
SGD_TORCH_CASES = [
    dict(),
    dict(weight_decay=0.01),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
]


def _skip_without_torch_cpu_fma():
    """Tests that compare with torch's CPU ops bitwise: those ops round like ours only where
    torch's kernels fuse multiply-adds (AVX2, AVX-512)."""
    if not _TORCH_CPU_FMA:
        pytest.skip("hardware: torch's CPU kernels fuse no multiply-add on this CPU "
                    f"({torch.backends.cpu.get_cpu_capability()})")


def _cpu_backend(backend):
    why = ops.unavailable_reason(backend, "cpu")
    if why is not None:
        pytest.skip(f"backend {backend} not available on cpu: {why}")
    _skip_without_torch_cpu_fma()


@pytest.mark.parametrize("hp", SGD_TORCH_CASES, ids=lambda hp: ",".join(hp) or "plain")
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_sgd_step_is_torch_bitwise_on_cpu(backend, hp):
    """Three SGD steps give bitwise torch.optim.SGD's param and momentum buffer on CPU (the
    rounding of ``p - lr * g`` alone differed in a fifth of the elements)."""
    _cpu_backend(backend)
    n = 4097
    p0 = torch.randn(n, generator=_gen(50))
    grads = [torch.randn(n, generator=_gen(51 + k)) for k in range(3)]
    p_t = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p_t], lr=0.1, foreach=False, **hp)
    p, acc, buf = p0.clone(), torch.zeros(n), torch.zeros(n)
    momentum = hp.get("momentum", 0.0)
    for k, g in enumerate(grads):
        p_t.grad = g.clone()
        opt.step()
        acc.copy_(g)
        ops.sgd_step_(p, acc, buf if momentum else None, grad_mult=torch.tensor(1.0),
                      found_inf=torch.tensor(0.0), lr=0.1, momentum=momentum,
                      dampening=hp.get("dampening", 0.0),
                      weight_decay=hp.get("weight_decay", 0.0),
                      nesterov=hp.get("nesterov", False), maximize=hp.get("maximize", False),
                      first_step=k == 0, backend=backend)
    assert torch.equal(p, p_t.detach())
    if momentum:
        assert torch.equal(buf, opt.state[p_t]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_accumulate_is_torch_bitwise_on_cpu(backend, dtype):
    """accumulate_ is ``acc.add_(grad, alpha=scale)`` with its one rounding (torch's CPU
    kernel fuses the multiply-add, as its CUDA kernel does; two roundings differed in a
    fifth of the elements), alone and batched."""
    _cpu_backend(backend)
    n = 4097
    acc0 = torch.randn(n, generator=_gen(70))
    grad = torch.randn(n, generator=_gen(71)).to(dtype)
    want = acc0.clone().add_(grad.float(), alpha=0.37)
    got = acc0.clone()
    ops.accumulate_(got, grad, 0.37, backend=backend)
    assert torch.equal(got, want)
    got = acc0.clone()
    ops.accumulate_many_([got], [grad], 0.37, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_adam_weight_decay_cancelling_gradient_is_torch(backend):
    """Adam's coupled weight decay where ``g + wd * p`` cancels: torch forms it with one
    rounding (``g.add(p, alpha=wd)``), leaving a tiny remainder that Adam's first step
    normalizes to about ``lr / 100`` (with eps 1e-8); two roundings give exactly 0 and no
    step. Every backend follows torch (it differed by ~1e-5 in every element before)."""
    _cpu_backend(backend)
    n, wd, lr = 4097, 0.01, 1e-3
    p0 = torch.randn(n, generator=_gen(60))
    g = -(p0 * wd)  # exactly the negated two-rounding product
    p_t = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p_t], lr=lr, weight_decay=wd, foreach=False)
    p_t.grad = g.clone()
    opt.step()
    assert (p_t.detach() - p0).abs().max() > lr / 1000  # (the case this test is about)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    ops.adamw_step_(p, g.clone(), m, v, grad_mult=torch.tensor(1.0),
                    found_inf=torch.tensor(0.0), lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=wd, step=1, decoupled_weight_decay=False, backend=backend)
    # (one ulp where torch's sqrt rounds otherwise; the reference calls torch's own)
    tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=3e-7, atol=0)
    torch.testing.assert_close(p, p_t.detach(), **tol)
    torch.testing.assert_close(m, opt.state[p_t]["exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize("beta1", [0.5, 0.3, 0.7])
@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_adam_exp_avg_is_torch_lerp_bitwise_on_cpu(backend, beta1):
    """exp_avg is bitwise ``exp_avg.lerp(g, 1 - beta1)``: torch's lerp has two formulas,
    from exp_avg for a weight below 0.5 and from g for 0.5 and above, which round
    differently; a weight of exactly 0.5 (beta1 = 0.5) must take the second, as torch's.
    (The tolerance of test_adamw_both_lerp_formulas_match_reference hides the choice.)"""
    _cpu_backend(backend)
    n = 4097
    m0 = torch.randn(n, generator=_gen(90))
    g = torch.randn(n, generator=_gen(91)) * 3.0
    want = m0.lerp(g, 1 - beta1)
    p, m = torch.randn(n, generator=_gen(92)), m0.clone()
    v = torch.rand(n, generator=_gen(93))
    ops.adamw_step_(p, g.clone(), m, v, grad_mult=torch.tensor(1.0),
                    found_inf=torch.tensor(0.0), lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, step=2, backend=backend)
    assert torch.equal(m, want)


@pytest.mark.parametrize("backend, device", [("cuda", "cuda"), ("triton", "cuda"),
                                             ("triton", "cpu")])
def test_kernels_give_the_cpu_backends_bits(backend, device):
    """A backend's accumulate and AdamW/SGD steps give bitwise what the C++ CPU backend
    gives on the same inputs: one element math (csrc/math.h, the Triton kernels), the same
    multiply-adds fused and no others (nvcc --fmad=false; Triton's contraction of
    ``acc * grad_mult - exp_avg`` and ``p * decay + update`` once made AdamW differ on a
    GPU, while the interpreter, on CPU, fuses nothing)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("compares a GPU's kernels with the CPU backend: no GPU here")
    for b, dev in ((backend, device), ("cpu", "cpu")):
        why = ops.unavailable_reason(b, dev)
        if why is not None:
            pytest.skip(f"backend {b} not available on {dev}: {why}")
    n = 278011

    def both(op, make, **kw):
        outs = []
        for b, dev in ((backend, device), ("cpu", "cpu")):
            args = [None if t is None else t.to(dev) for t in make()]
            extra = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            op(*args, backend=b, **extra)
            outs.append([None if t is None else t.cpu() for t in args])
        for i, (g, c) in enumerate(zip(*outs)):
            if g is not None:
                assert torch.equal(g, c), f"{op.__name__} {kw}: argument {i}"

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        both(ops.accumulate_, lambda dtype=dtype: [_rand(n, torch.float32, "cpu", 80),
                                                   _rand(n, dtype, "cpu", 81)], scale=0.37)
    adam = dict(grad_mult=torch.tensor(0.3), found_inf=torch.tensor(0.0), lr=1e-2,
                beta1=0.9, beta2=0.99, eps=1e-8, step=3)
    for param_dtype, out_dtype, amsgrad, maximize, decoupled, wd in ADAM_CASES:
        def make(param_dtype=param_dtype, out_dtype=out_dtype, amsgrad=amsgrad):
            param, acc, (m, v, vmax), out = _step_inputs(n, param_dtype, "cpu", out_dtype)
            return [param, acc, m, v, vmax if amsgrad else None, out]
        both(ops.adamw_step_, make, weight_decay=wd, decoupled_weight_decay=decoupled,
             amsgrad=amsgrad, maximize=maximize, **adam)
    sgd = dict(grad_mult=torch.tensor(0.3), found_inf=torch.tensor(0.0), lr=0.1)
    for param_dtype, out_dtype, momentum, damp, nesterov, wd, maximize, first in SGD_CASES:
        def make(param_dtype=param_dtype, out_dtype=out_dtype, momentum=momentum):
            param, acc, (buf, _, _), out = _step_inputs(n, param_dtype, "cpu", out_dtype)
            return [param, acc, buf if momentum else None, out]
        both(ops.sgd_step_, make, momentum=momentum, dampening=damp, weight_decay=wd,
             nesterov=nesterov, maximize=maximize, first_step=first, **sgd)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam], ids=["AdamW", "Adam"])
@pytest.mark.parametrize("backend", [b for b in ops.BACKENDS if b != "reference"])
def test_adam_differs_from_torch_only_where_its_cpu_sqrt_is_not_correctly_rounded(backend, cls):
    """docs/usage.md: the cpu and triton backends' Adam/AdamW step on CPU is bitwise torch's
    (foreach=False) but in elements where torch's sqrt of exp_avg_sq is not correctly
    rounded (ours is), and there within two ulps of the operands of the last operation;
    exp_avg and exp_avg_sq are bitwise torch's. Each of three steps starts from torch's own
    state, so that differences do not compound. How many elements differ depends on the
    CPU torch runs on: 0.01% to 0.03% (once 0.15%) on the CPUs of earlier sessions, 0.3% to
    0.6% on an AMD EPYC (Zen 4, 2026-11-29), whose torch sqrt was off in 17% of them."""
    _cpu_backend(backend)
    n, wd = 1 << 16, 0.1 if cls is torch.optim.AdamW else 0.01
    p_t = torch.nn.Parameter(torch.randn(n, generator=_gen(80)))
    opt = cls([p_t], lr=1e-2, betas=(0.9, 0.999), weight_decay=wd, foreach=False)
    for step in range(1, 4):
        g = torch.randn(n, generator=_gen(80 + step))
        prev = p_t.detach().clone()
        st = opt.state.get(p_t)
        m = st["exp_avg"].clone() if st else torch.zeros(n)
        v = st["exp_avg_sq"].clone() if st else torch.zeros(n)
        p_t.grad = g.clone()
        opt.step()
        p = prev.clone()
        ops.adamw_step_(p, g.clone(), m, v, grad_mult=torch.tensor(1.0),
                        found_inf=torch.tensor(0.0), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=wd, step=step,
                        decoupled_weight_decay=cls is torch.optim.AdamW, backend=backend)
        want = p_t.detach()
        assert torch.equal(m, opt.state[p_t]["exp_avg"]), step
        assert torch.equal(v, opt.state[p_t]["exp_avg_sq"]), step
        inexact = _sqrt_not_correctly_rounded(v)
        assert torch.equal(p[~inexact], want[~inexact]), step
        _assert_adam_param(p, want, prev, v)


def test_reference_adam_is_torch_bitwise_on_cpu():
    """The reference is torch.optim.Adam/AdamW's own CPU ops: bitwise the same, amsgrad,
    coupled weight decay and a lerp weight above 0.5 included."""
    _cpu_backend("reference")
    n = 4097
    for cls, wd, betas, amsgrad in ((torch.optim.AdamW, 0.1, (0.9, 0.99), True),
                                    (torch.optim.Adam, 0.01, (0.3, 0.999), False)):
        p0 = torch.randn(n, generator=_gen(70))
        p_t = torch.nn.Parameter(p0.clone())
        opt = cls([p_t], lr=1e-2, betas=betas, weight_decay=wd, amsgrad=amsgrad, foreach=False)
        p, m, v, vmax = p0.clone(), torch.zeros(n), torch.zeros(n), torch.zeros(n)
        for step in range(1, 4):
            g = torch.randn(n, generator=_gen(70 + step))
            p_t.grad = g.clone()
            opt.step()
            reference.adamw_step_(p, g.clone(), m, v, vmax if amsgrad else None,
                                  grad_mult=torch.tensor(1.0), found_inf=torch.tensor(0.0),
                                  lr=1e-2, beta1=betas[0], beta2=betas[1], eps=1e-8,
                                  weight_decay=wd, step=step,
                                  decoupled_weight_decay=cls is torch.optim.AdamW,
                                  amsgrad=amsgrad)
        assert torch.equal(p, p_t.detach()), cls.__name__
        assert torch.equal(m, opt.state[p_t]["exp_avg"]), cls.__name__
        assert torch.equal(v, opt.state[p_t]["exp_avg_sq"]), cls.__name__


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="unknown backend"):
        ops.accumulate_(torch.zeros(3), torch.zeros(3), backend="nope")


def test_available_backends_lists_every_backend():
    avail = ops.available_backends()
    assert set(avail) == set(ops.BACKENDS)
    assert avail["reference"] is None
    for why in avail.values():
        assert why is None or (isinstance(why, str) and why)


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "reference")
    assert ops.resolve("auto", "cpu") == "reference"
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "nope")
    with pytest.raises(RuntimeError, match="FUSEDACCUM_BACKEND"):
        ops.resolve("auto", "cpu")
    if not torch.cuda.is_available():  # says why and what to change: the variable
        monkeypatch.setenv("FUSEDACCUM_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="no CUDA device here.*Unset FUSEDACCUM_BACKEND"):
            ops.resolve("auto", "cpu")
        monkeypatch.delenv("FUSEDACCUM_BACKEND")
        with pytest.raises(RuntimeError, match="no CUDA device here.*Use backend='auto'"):
            ops.resolve("cuda", "cpu")


def test_env_var_empty_means_auto_and_never_overrides_an_explicit_backend(monkeypatch):
    """FUSEDACCUM_BACKEND overrides "auto" only: an empty value is unset, and an explicit
    backend= is used as named whatever the variable says."""
    monkeypatch.delenv("FUSEDACCUM_BACKEND", raising=False)
    unset = ops.resolve("auto", "cpu")
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "")
    assert ops.resolve("auto", "cpu") == ops.resolve(None, "cpu") == unset
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "nope")
    assert ops.resolve("reference", "cpu") == "reference"
    assert ops.get("reference", "cpu") is ops._module("reference")


def _runs_only(monkeypatch, runs):
    """ops' registry sees exactly the backends in ``runs`` as runnable, on any device."""
    monkeypatch.delenv("FUSEDACCUM_BACKEND", raising=False)
    monkeypatch.setattr(ops, "unavailable_reason", lambda name, device=None: (
        None if name in runs else f"{name} made unavailable by the test"))


@pytest.mark.parametrize("runs,cpu,cuda", [
    ({"reference", "triton", "cuda", "cpu"}, "cpu", "cuda"),
    ({"reference", "triton", "cpu"}, "cpu", "triton"),
    ({"reference", "cuda"}, "reference", "cuda"),
    ({"reference"}, "reference", "reference"),
])
def test_auto_picks_the_first_backend_that_runs(monkeypatch, runs, cpu, cuda):
    """DESIGN.md section 3: "auto" is cuda, else triton, else reference for CUDA tensors,
    and cpu, else reference for CPU tensors. The registry's choice alone (the backends'
    availability stubbed), so that it runs without a GPU."""
    _runs_only(monkeypatch, runs)
    assert ops.resolve("auto", "cpu") == cpu
    assert ops.resolve("auto", "cuda") == cuda


def test_only_auto_on_cuda_with_both_gpu_backends_gets_the_router(monkeypatch):
    """The measured cuda/triton split (ops/auto.py) is what "auto" means; an explicit
    backend="cuda", FUSEDACCUM_BACKEND=cuda, or a machine where Triton cannot run gets the
    cuda backend itself. Module loading and availability stubbed: no GPU needed."""
    from fusedaccum.ops import auto

    mods = {name: object() for name in ops.BACKENDS}
    monkeypatch.setattr(ops, "_module", mods.__getitem__)
    monkeypatch.setattr(ops, "_router", None)
    _runs_only(monkeypatch, set(ops.BACKENDS))
    router = ops.get("auto", "cuda")
    assert isinstance(router, auto.Router)
    assert (router.cuda, router.triton) == (mods["cuda"], mods["triton"])
    assert ops.get(None, "cuda") is router
    assert ops.get("cuda", "cuda") is mods["cuda"]
    assert ops.get("auto", "cpu") is mods["cpu"]
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "")  # (empty: unset, "auto")
    assert ops.get("auto", "cuda") is router
    monkeypatch.setenv("FUSEDACCUM_BACKEND", "cuda")
    assert ops.get("auto", "cuda") is mods["cuda"]
    _runs_only(monkeypatch, set(ops.BACKENDS) - {"triton"})
    assert ops.get("auto", "cuda") is mods["cuda"]


def test_auto_router_sends_each_op_to_the_measured_faster_backend():
    """backend="auto" on CUDA with cuda and triton both available (fusedaccum.ops.auto):
    small calls and norms to cuda, big AdamW/SGD steps and fp32-grad accumulation to
    Triton. Checked with recording stand-ins, so it runs without a GPU."""
    from fusedaccum.ops import auto

    class Recorder:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def __getattr__(self, op):
            return lambda *a, **kw: self.log.append((op, self.name))

    log = []
    r = auto.Router(Recorder("cuda", log), Recorder("triton", log))
    big, small = auto.TRITON_FROM, auto.TRITON_FROM - 1
    for dtype in (torch.bfloat16, torch.float32):
        for n in (small, big):
            acc = torch.empty(()).expand(n)  # numel n without the memory
            r.accumulate_(acc, torch.empty((), dtype=dtype).expand(n))
            r.accumulate_(acc, torch.empty((), dtype=dtype).expand(n), norm_type=2.0)
            r.adamw_step_(acc, acc)
            r.sgd_step_(acc, acc)
    r.accumulate_many_([], [])
    r.grad_norm([])
    assert log == [
        ("accumulate_", "cuda"), ("accumulate_", "cuda"), ("adamw_step_", "cuda"),
        ("sgd_step_", "cuda"),
        ("accumulate_", "cuda"), ("accumulate_", "cuda"), ("adamw_step_", "triton"),
        ("sgd_step_", "triton"),
        ("accumulate_", "cuda"), ("accumulate_", "cuda"), ("adamw_step_", "cuda"),
        ("sgd_step_", "cuda"),
        ("accumulate_", "triton"), ("accumulate_", "cuda"), ("adamw_step_", "triton"),
        ("sgd_step_", "triton"),
        ("accumulate_many_", "cuda"), ("grad_norm", "cuda"),
    ]


def test_auto_router_passes_every_argument_through():
    """Each op the router forwards gets the caller's arguments unchanged, whichever backend
    it picks (the wrapper's batches give overwrite flags and trusted=True)."""
    from fusedaccum.ops import auto

    class Recorder:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def __getattr__(self, op):
            return lambda *a, **kw: self.log.append((op, self.name, a, kw))

    log = []
    r = auto.Router(Recorder("cuda", log), Recorder("triton", log))
    acc, grad, t = torch.zeros(3), torch.ones(3), [torch.ones(2)]
    r.accumulate_(acc, grad, 0.5, overwrite=True, norm_type=None)
    r.accumulate_(acc, grad, 0.5, overwrite=True, norm_type=math.inf)
    r.accumulate_many_([acc], [grad], 0.25, overwrite=[1], norm_type=2.0, trusted=True)
    r.grad_norm(t, math.inf)
    r.adamw_step_(acc, grad, 1, 2, lr=0.1, step=3)
    r.sgd_step_(acc, grad, 4, lr=0.2, first_step=True)
    assert [(op, a[2:], kw) for op, _, a, kw in log] == [
        ("accumulate_", (0.5,), dict(overwrite=True, norm_type=None)),
        ("accumulate_", (0.5,), dict(overwrite=True, norm_type=math.inf)),
        ("accumulate_many_", (0.25,), dict(overwrite=[1], norm_type=2.0, trusted=True)),
        ("grad_norm", (), {}),
        ("adamw_step_", (1, 2), dict(lr=0.1, step=3)),
        ("sgd_step_", (4,), dict(lr=0.2, first_step=True)),
    ]
    assert all(a[0] is acc for op, _, a, _ in log if op not in ("accumulate_many_", "grad_norm"))
    assert log[2][2][:2] == ([acc], [grad]) and log[3][2] == (t, math.inf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_the_router_when_both_gpu_backends_run():
    from fusedaccum.ops import auto

    both = all(ops.unavailable_reason(b, "cuda") is None for b in ("cuda", "triton"))
    got = ops.get("auto", "cuda")
    assert isinstance(got, auto.Router) == both
