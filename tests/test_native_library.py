"""The C++/CUDA extension (cpu and cuda backends) beyond tests/test_ops.py.

torch.library.opcheck of every registered op (schema and mutation annotations, fake
kernels, AOT dispatch), and properties specific to the native kernels: misaligned views
(the CUDA vector path), exact fp16/bf16 rounding over whole bit-pattern ranges, bitwise
determinism across thread counts and instruction sets, skipped steps, input checks.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedaccum.ops import native, reference

ops = torch.ops.fusedaccum_native


def _devices():
    devs = []
    if native.unavailable_reason("cpu", torch.device("cpu")) is None:
        devs.append("cpu")
    if native.unavailable_reason("cuda", torch.device("cuda")) is None:
        devs.append("cuda")
    return devs


DEVICES = _devices()
pytestmark = pytest.mark.skipif(
    not DEVICES, reason=f"C++ extension unavailable: {native.unavailable_reason('cpu', None)}")


def _rand(n, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype).to(device)


def _scalar(x, device):
    return torch.tensor(float(x), device=device)


def _adam_args(n, device, param_dtype=torch.float32, out_dtype=torch.float16, amsgrad=True,
               seed=0):
    param = _rand(n, param_dtype, device, seed)
    acc = _rand(n, device=device, seed=seed + 1, scale=3.0)
    m, v, vmax = (_rand(n, device=device, seed=seed + 2 + i).abs() * 0.1 for i in range(3))
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype, device=device)
    return (param, acc, m, v, vmax if amsgrad else None, out,
            _scalar(0.25, device), _scalar(0.0, device),
            1e-2, 0.9, 0.99, 1e-8, 0.1, 3, True, amsgrad, False, True)


def _sgd_args(n, device, param_dtype=torch.float32, out_dtype=torch.bfloat16, momentum=0.9,
              seed=0):
    param = _rand(n, param_dtype, device, seed)
    acc = _rand(n, device=device, seed=seed + 1, scale=3.0)
    buf = _rand(n, device=device, seed=seed + 2) if momentum else None
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype, device=device)
    return (param, acc, buf, out, _scalar(0.5, device), _scalar(0.0, device),
            0.1, momentum, 0.1, 0.01, True, False, False, True)


# ---- opcheck ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_accumulate(device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for overwrite in (False, True):
            args = (_rand(1000, device=device), _rand(1000, dtype, device, 1), 0.37, overwrite)
            torch.library.opcheck(ops.accumulate_.default, args)
            for norm_type in (2.0, math.inf):
                torch.library.opcheck(ops.accumulate_norm_.default, (*args, norm_type))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_grad_norm(device):
    ts = [_rand(n, device=device, seed=n) for n in (1000, 17, 0)]
    for norm_type in (2.0, math.inf):
        torch.library.opcheck(ops.grad_norm.default, (ts, norm_type))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype,out_dtype,amsgrad", [
    (torch.float32, torch.float16, True),
    (torch.float32, None, False),
    (torch.bfloat16, None, False),
])
def test_opcheck_adamw(device, param_dtype, out_dtype, amsgrad):
    args = _adam_args(1000, device, param_dtype, out_dtype, amsgrad)
    torch.library.opcheck(ops.adamw_step_.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype,out_dtype,momentum", [
    (torch.float32, torch.bfloat16, 0.9),
    (torch.float16, None, 0.0),
])
def test_opcheck_sgd(device, param_dtype, out_dtype, momentum):
    args = _sgd_args(1000, device, param_dtype, out_dtype, momentum)
    torch.library.opcheck(ops.sgd_step_.default, args)


def test_build_info_and_reasons():
    info = ops.build_info()
    assert info.startswith("cpu,cpu-isa=")
    assert native.unavailable_reason("cpu", torch.device("cpu")) is None
    why = native.unavailable_reason("cpu", torch.device("meta"))
    assert why and "CPU tensors only" in why
    why = native.unavailable_reason("cuda", None)
    if "cuda" not in info.split(",") or not torch.cuda.is_available():
        assert isinstance(why, str) and why
    assert isinstance(native.build_info(), str)


def test_build_info_says_which_kernels_and_loops_were_loaded():
    """`python -m fusedaccum info`'s line on the extension: how it was loaded, whether it
    has the CUDA kernels, and the instruction set of its CPU loops, as the library says."""
    fields = ops.build_info().split(",")
    isa = next(f.split("=", 1)[1] for f in fields if f.startswith("cpu-isa="))
    info = native.build_info()
    assert info.startswith(("ahead-of-time build ", "JIT build ")), info
    kernels = "CPU and CUDA" if "cuda" in fields else "CPU only"
    assert info.endswith(f"({kernels} kernels; CPU loops: {isa})"), info


def test_cuda_backend_refused_where_the_extension_has_no_cuda_kernels(monkeypatch):
    """On a CUDA machine with an extension built without CUDA (no nvcc at build time), the
    cuda backend does not run, and says why; the machine stubbed (torch a CUDA build, a
    device visible) so that the check runs everywhere."""
    if "cuda" in ops.build_info().split(","):
        pytest.skip("the extension here has CUDA kernels")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in (None, torch.device("cuda")):
        why = native.unavailable_reason("cuda", device)
        assert why is not None and "without CUDA" in why, why


# ---- misaligned views: every offset mod 16 bytes, sizes around the 8-element unit -------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 4103])
def test_misaligned_views(device, offset, n):
    def view(t):  # same values, storage offset `offset` elements into a larger buffer
        base = torch.full((n + 8,), float("nan"), dtype=t.dtype, device=device)
        base[offset:offset + n] = t
        return base[offset:offset + n]

    grad = _rand(n, torch.float16, device, 1)
    for norm_type in (None, 2.0, math.inf):
        acc0 = _rand(n, device=device, seed=2)
        want_acc = acc0.clone()
        want = reference.accumulate_(want_acc, grad, 0.5, norm_type=norm_type)
        got_acc = view(acc0)
        got = native.accumulate_(got_acc, view(grad), 0.5, norm_type=norm_type)
        torch.testing.assert_close(got_acc, want_acc, rtol=1e-6, atol=1e-6)
        if norm_type is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    ts = [view(_rand(n, device=device, seed=3)), _rand(n + 3, device=device, seed=4)[3:]]
    torch.testing.assert_close(native.grad_norm(ts), reference.grad_norm(ts), rtol=1e-5, atol=1e-6)

    args = list(_adam_args(n, device, torch.float32, torch.bfloat16, True, seed=5))
    want = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    got = [view(a) if isinstance(a, torch.Tensor) and a.dim() == 1 else a for a in args]
    names = ["param", "acc", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "model_out"]
    kw = dict(zip(["grad_mult", "found_inf", "lr", "beta1", "beta2", "eps", "weight_decay",
                   "step", "decoupled_weight_decay", "amsgrad", "maximize", "zero_acc"],
                  args[6:]))
    reference.adamw_step_(*want[:6], **kw)
    native.adamw_step_(*got[:6], **kw)
    for name, g, w in zip(names, got[:6], want[:6]):
        tol = dict(rtol=1e-2, atol=1e-3) if g.dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                               atol=1e-6)
        torch.testing.assert_close(g, w, msg=lambda s, name=name: f"{name}: {s}", **tol)


# ---- exact conversions ------------------------------------------------------------------

def _same_bits_or_both_nan(got, want):
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_widening_is_exact(device, dtype):
    """Every fp16/bf16 bit pattern widens exactly (accumulate_ with overwrite, scale 1)."""
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    grad = grad.to(device)
    acc = torch.empty(grad.numel(), device=device)
    native.accumulate_(acc, grad, 1.0, overwrite=True)
    _same_bits_or_both_nan(acc, grad.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_rounding_matches_torch_bitwise(device, dtype):
    """model_out (and half params) round like torch's .to(): nearest even, over random fp32
    bit patterns concentrated on the half's subnormal, normal and overflow ranges."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=g, dtype=torch.int64)
    # exponents 100..150 cover fp16 subnormals (below 113), normals and overflow (143+)
    exp = torch.randint(100, 151, bits.shape, generator=g, dtype=torch.int64)
    bits = (bits & ~(0xFF << 23)) | (exp << 23)
    x = bits.to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0,
                            65519.99, 65520.0, -65520.0, 2**-24, 2**-25, 1.5 * 2**-25, 2**-26,
                            3.3895313892515355e38, 1e-45])
    x = torch.cat([x, special, torch.randn(4096, generator=g)]).to(device)
    out = torch.empty(x.numel(), dtype=dtype, device=device)
    param = x.clone()
    native.sgd_step_(param, torch.zeros_like(x), None, out, grad_mult=1.0, found_inf=0.0,
                     lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, first_step=False)
    _same_bits_or_both_nan(out, x.to(dtype))
    half_param = x.to(dtype)
    native.sgd_step_(half_param, torch.zeros_like(x), None, None, grad_mult=1.0,
                     found_inf=0.0, lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, first_step=False)
    _same_bits_or_both_nan(half_param, x.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nan_of_any_payload_rounds_to_nan(device, dtype):
    """Every fp32 NaN stays NaN in fp16/bf16 (model_out, half params), whatever its payload
    and sign: rounding a NaN's bits as a number's carries a small payload down to inf
    (0x7f800001) and a full one past the sign bit (0x7fffffff to -0 in bf16)."""
    pats = [0x7F800001, 0x7F807FFF, 0x7F808000, 0x7F80FFFF, 0x7FBFFFFF, 0x7FC00000, 0x7FC00001,
            0x7FFF8000, 0x7FFFFFFF]
    pats += [p | 0x80000000 for p in pats]
    g = torch.Generator().manual_seed(1)
    rnd = torch.randint(1, 1 << 23, (4093,), generator=g, dtype=torch.int64) | 0x7F800000
    bits = torch.cat([torch.tensor(pats, dtype=torch.int64), rnd, rnd | 0x80000000])
    x = bits.to(torch.uint32).view(torch.int32).view(torch.float32).to(device)
    assert torch.isnan(x).all()
    out = torch.empty(x.numel(), dtype=dtype, device=device)
    param = x.clone()
    native.sgd_step_(param, torch.zeros_like(x), None, out, grad_mult=1.0, found_inf=0.0,
                     lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, first_step=False)
    assert torch.isnan(out.float()).all()
    half_param = torch.zeros(x.numel(), dtype=dtype, device=device)
    native.sgd_step_(half_param, x.clone(), None, None, grad_mult=1.0, found_inf=0.0,
                     lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, first_step=False)
    assert torch.isnan(half_param.float()).all()


# ---- determinism ------------------------------------------------------------------------

def _norm_results(device):
    ts = [_rand(n, device=device, seed=n, scale=3.0) for n in (300_001, 8191, 1, 70_000)]
    acc = _rand(300_001, device=device, seed=9)
    grad = _rand(300_001, torch.bfloat16, device, 10)
    out = [native.grad_norm(ts, nt) for nt in (2.0, math.inf)]
    out.append(native.accumulate_(acc.clone(), grad, 0.3, norm_type=2.0))
    out.append(native.accumulate_(acc.clone(), grad, 0.3, norm_type=math.inf))
    for nt in (2.0, math.inf):
        out.append(native.accumulate_many_([t.clone() for t in ts], [grad[:t.numel()] for t in ts],
                                           0.7, norm_type=nt))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_norms_bitwise_deterministic(device):
    first = _norm_results(device)
    for _ in range(3):
        for a, b in zip(first, _norm_results(device)):
            assert torch.equal(a, b)
    if device == "cpu":  # and independent of the thread count
        threads = torch.get_num_threads()
        try:
            for k in (1, 3):
                torch.set_num_threads(k)
                for a, b in zip(first, _norm_results(device)):
                    assert torch.equal(a, b), f"differs with {k} threads"
        finally:
            torch.set_num_threads(threads)


_ISA_SCRIPT = textwrap.dedent("""
    import math, sys, torch
    from fusedaccum.ops import native
    assert native.unavailable_reason("cpu", None) is None
    g = torch.Generator().manual_seed(0)
    n = 100_003
    res = {}
    acc = torch.randn(n, generator=g); grad = torch.randn(n, generator=g).half()
    res["norm2"] = native.accumulate_(acc, grad, 0.3, norm_type=2.0)
    res["acc"] = acc
    res["norminf"] = native.grad_norm([acc, torch.randn(77, generator=g)], math.inf)
    res["gradnorm2"] = native.grad_norm([acc, torch.randn(77, generator=g)], 2.0)
    res["accinf"] = native.accumulate_(acc.clone(), grad.bfloat16(), -1.5, norm_type=math.inf)
    many = [acc.clone()[:n] for n in (9000, 0, 16, 80_001)]
    res["many2"] = native.accumulate_many_(many, [grad[:t.numel()] for t in many], 0.3,
                                           norm_type=2.0)
    res["manyinf"] = native.accumulate_many_(many, [grad[:t.numel()] for t in many], 0.3,
                                             norm_type=math.inf)
    res["many"] = torch.cat(many)
    p = torch.randn(n, generator=g); a = torch.randn(n, generator=g)
    m, v, vm = torch.rand(n, generator=g), torch.rand(n, generator=g), torch.rand(n, generator=g)
    out = torch.empty(n, dtype=torch.float16)
    native.adamw_step_(p, a, m, v, vm, out, grad_mult=0.3, found_inf=0.0, lr=1e-2, beta1=0.9,
                       beta2=0.99, eps=1e-8, weight_decay=0.1, step=5, amsgrad=True)
    res.update(p=p, m=m, v=v, vm=vm, out=out)
    buf = torch.randn(n, generator=g); ob = torch.empty(n, dtype=torch.bfloat16)
    native.sgd_step_(p, torch.randn(n, generator=g), buf, ob, grad_mult=0.5, found_inf=0.0,
                     lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=True,
                     maximize=True, first_step=False, trusted=True)  # (torch refuses nesterov
    # with dampening, and so do the checks: the kernels' every term, all the same)
    res.update(p2=p, buf=buf, ob=ob)
    # every other loop variant too: accumulate without a statistic (each grad dtype, adding
    # and overwriting, one pair and many), the plain and general AdamW loops without
    # amsgrad, half params and model copies, SGD without momentum
    a2 = torch.randn(n, generator=g)
    for name, gd in (("f16", grad), ("bf16", grad.bfloat16()), ("f32", grad.float())):
        for ow in (False, True):
            t = a2.clone()
            native.accumulate_(t, gd, -0.7, overwrite=ow)
            res[f"add_{name}_{ow}"] = t
        many = [a2.clone()[:k] for k in (9000, 0, 16, 80_001, 5)]
        native.accumulate_many_(many, [gd[:t.numel()] for t in many], 0.3)
        res[f"many_{name}"] = torch.cat(many)
    for k, (pd, od, ams, maxi, dec, b1) in enumerate((
            (torch.float32, None, False, False, True, 0.9),
            (torch.bfloat16, torch.bfloat16, False, False, True, 0.9),
            (torch.float16, torch.float16, False, True, False, 0.3),
            (torch.bfloat16, None, True, True, True, 0.9))):
        p = torch.randn(n, generator=g).to(pd); a = torch.randn(n, generator=g)
        m, v, vm = (torch.rand(n, generator=g) for _ in range(3))
        out = None if od is None else torch.empty(n, dtype=od)
        native.adamw_step_(p, a, m, v, vm if ams else None, out, grad_mult=0.3, found_inf=0.0,
                           lr=1e-2, beta1=b1, beta2=0.99, eps=1e-8, weight_decay=0.1, step=5,
                           decoupled_weight_decay=dec, amsgrad=ams, maximize=maxi)
        res.update({f"adam{k}_{i}": t for i, t in enumerate((p, a, m, v, vm, out))
                    if t is not None})
    p = torch.randn(n, generator=g).half(); ob = torch.empty(n, dtype=torch.float16)
    native.sgd_step_(p, torch.randn(n, generator=g), None, ob, grad_mult=0.5, found_inf=0.0,
                     lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False,
                     maximize=True, first_step=False)
    res.update(p3=p, ob3=ob)
    res["isa"] = torch.ops.fusedaccum_native.build_info().split("cpu-isa=")[1].split(",")[0]
    torch.save(res, sys.argv[1])
""")


def test_cpu_instruction_sets_agree_bitwise(tmp_path):
    """The AVX-512, AVX2 and baseline CPU loops give bitwise identical results."""
    if "cpu" not in DEVICES or "cpu-isa=baseline" in ops.build_info():
        pytest.skip("hardware: this CPU has no AVX2, so only the baseline loops exist")
    results = {}
    for isa in ("avx512", "avx2", "baseline"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, FUSEDACCUM_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env,
                       timeout=600)
        res = torch.load(path)
        results[res.pop("isa")] = res  # a cap the CPU lacks runs the next narrower set
    assert {"avx2", "baseline"} <= set(results)
    base = results["baseline"]
    for isa, res in results.items():
        for key, a in res.items():
            assert torch.equal(a, base[key]), (isa, key)


# ---- semantics the wrapper relies on ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found_inf", [1.0, float("nan"), float("inf")])
def test_skipped_step_writes_only_acc(device, found_inf):
    n = 4099
    adam = list(_adam_args(n, device, torch.float32, torch.float16, True))
    adam[5].fill_(float("nan"))
    adam[7] = _scalar(found_inf, device)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in adam]
    ops.adamw_step_(*adam)
    for i in (0, 2, 3, 4):
        assert torch.equal(adam[i], before[i])
    assert torch.isnan(adam[5].float()).all()
    assert torch.count_nonzero(adam[1]) == 0
    sgd = list(_sgd_args(n, device))
    sgd[3].fill_(1.0)
    sgd[5] = _scalar(found_inf, device)
    sgd[-1] = False  # zero_acc=False: acc untouched too
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in sgd]
    ops.sgd_step_(*sgd)
    for i in (0, 1, 2, 3):
        assert torch.equal(sgd[i], before[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found_inf", [1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("op", ["adamw_step_", "sgd_step_"])
def test_skipped_step_with_zero_acc_false_writes_nothing(device, found_inf, op):
    """A skipped step with zero_acc=False leaves acc too, as every other buffer."""
    n = 4099
    args = list(_adam_args(n, device) if op == "adamw_step_" else _sgd_args(n, device))
    found = 7 if op == "adamw_step_" else 5
    args[found] = _scalar(found_inf, device)
    args[-1] = False
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    getattr(ops, op)(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point and a.numel() > 1:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype,out_dtype", [(torch.float32, None),
                                                   (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, None)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_plain_adamw_loop_is_bitwise_the_general_one(device, param_dtype, out_dtype, amsgrad):
    """AdamW without maximize runs the CPU loop without selects; maximize=True on the
    negated gradient takes the general loop through the same values: bitwise equal."""
    n = 70_001
    results = []
    for maximize in (False, True):
        param, acc, m, v, vmax, out = _adam_args(n, device, param_dtype, out_dtype, amsgrad)[:6]
        if maximize:
            acc.neg_()
        native.adamw_step_(param, acc, m, v, vmax, out, grad_mult=0.37, found_inf=0.0, lr=3e-3,
                           beta1=0.9, beta2=0.98, eps=1e-7, weight_decay=0.05, step=4,
                           amsgrad=amsgrad, maximize=maximize)
        results.append([t for t in (param, m, v, vmax, out) if t is not None])
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int8), b.view(torch.int8))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_acc_false_keeps_acc(device):
    args = list(_adam_args(1000, device))
    args[-1] = False
    acc = args[1].clone()
    ops.adamw_step_(*args)
    assert torch.equal(args[1], acc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("flag", [False, True], ids=["plain", "amsgrad-or-momentum"])
def test_zero_acc_false_keeps_acc_in_every_loop(device, param_dtype, out_dtype, flag):
    """zero_acc=False leaves acc bitwise as it was, and changes nothing else, in every loop
    the step ops dispatch to (param dtype x model_out dtype x amsgrad / momentum)."""
    n = 4099
    for op, make in ((ops.adamw_step_, lambda: _adam_args(n, device, param_dtype, out_dtype,
                                                           amsgrad=flag)),
                     (ops.sgd_step_, lambda: _sgd_args(n, device, param_dtype, out_dtype,
                                                        momentum=0.9 if flag else 0.0))):
        results = []
        for zero_acc in (True, False):
            args = list(make())
            acc = args[1].clone()
            args[-1] = zero_acc
            op(*args)
            if zero_acc:
                assert torch.count_nonzero(args[1]) == 0
            else:
                assert torch.equal(args[1], acc), op
            results.append([a for i, a in enumerate(args)
                            if i != 1 and isinstance(a, torch.Tensor) and a.numel() == n])
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype,out_dtype", [(torch.float16, torch.bfloat16),
                                                   (torch.bfloat16, torch.float16),
                                                   (torch.float16, torch.float16)])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_model_out_rounds_the_fp32_result_once(device, param_dtype, out_dtype, amsgrad):
    """model_out is the step's fp32 result rounded once to its dtype, whatever the param's
    dtype: a half param gives the model_out of an fp32 param of the same values (the math
    is fp32 either way), not the half param's value rounded a second time."""
    outs = []
    for pd in (param_dtype, torch.float32):
        args = list(_adam_args(70_001, device, param_dtype, out_dtype, amsgrad=amsgrad))
        args[0] = args[0].to(pd)
        ops.adamw_step_(*args)
        outs.append(args[5])
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_buffers(device):
    e = torch.empty(0, device=device)
    assert native.accumulate_(e, e.half(), 2.0) is None
    for nt in (2.0, math.inf):
        assert native.accumulate_(e, e, 1.0, norm_type=nt).item() == 0.0
        assert native.grad_norm([e, e], nt).item() == 0.0
    native.adamw_step_(e, e.clone(), e.clone(), e.clone(), e.clone(), e.half(), grad_mult=1.0,
                       found_inf=0.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                       weight_decay=0.0, step=1, amsgrad=True)
    native.sgd_step_(e, e.clone(), e.clone(), None, grad_mult=1.0, found_inf=0.0, lr=0.1,
                     momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, first_step=True)


@pytest.mark.skipif("cpu" not in DEVICES, reason="the C++ CPU backend is not built here")
def test_cpu_norm_reads_past_2_31_elements():
    """int64 indexing in the CPU norm's chunk table (csrc/cpu/kernels.cpp reduce_chunks):
    a buffer of 2^31 + 70000 fp32 elements after a small one, its only large value 7
    elements from its end. The big buffer costs no memory: torch.empty of 8 GiB is fresh
    pages from the kernel, which read as zeros from its one zero page until written; only
    the two written pages become memory of their own (about 2 s, nearly all page faults)."""
    n = (1 << 31) + 70_000
    big = torch.empty(n)
    big[5] = 3.0
    big[n - 7] = 1000.0
    small = _rand(1023, scale=0.1)
    # torch's own norms over the same memory (whatever the untouched pages hold)
    big2, bigmax = torch.linalg.vector_norm(big), torch.linalg.vector_norm(big, math.inf)
    assert bigmax.item() == 1000.0  # (the pages read as zeros: the test's premise)
    want2 = (big2.double().square() + small.double().square().sum()).sqrt().float()
    torch.testing.assert_close(native.grad_norm([small, big], 2.0), want2, rtol=1e-6, atol=0)
    assert native.grad_norm([small, big], math.inf).item() == 1000.0


@pytest.mark.parametrize("device", DEVICES)
def test_inf_norm_nan_wins_over_inf(device):
    t = _rand(10_000, device=device)
    t[17] = float("inf")
    t[9000] = float("nan")
    assert torch.isnan(native.grad_norm([t], math.inf))
    acc = torch.zeros(10_000, device=device)
    assert torch.isnan(native.accumulate_(acc, t, 1.0, norm_type=math.inf))
    t[9000] = -float("inf")
    assert native.grad_norm([t], math.inf).item() == math.inf


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_norm_is_of_updated_acc(device):
    acc = _rand(5000, device=device, seed=1)
    grad = _rand(5000, torch.float16, device, 2)
    stat = native.accumulate_(acc, grad, 0.5, norm_type=2.0)
    torch.testing.assert_close(stat, acc.square().sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_input_checks_name_the_argument(device):
    acc = torch.zeros(10, device=device)
    with pytest.raises(TypeError, match="grad must have dtype"):
        native.accumulate_(acc, torch.zeros(10, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="acc must have dtype"):
        native.accumulate_(acc.half(), acc)
    with pytest.raises(ValueError, match="grad has 9 elements, expected 10"):
        native.accumulate_(acc, torch.zeros(9, device=device))
    with pytest.raises(ValueError, match="acc must be a contiguous 1-D tensor"):
        native.accumulate_(torch.zeros(20, device=device)[::2], acc)
    with pytest.raises(ValueError, match="norm_type"):
        native.accumulate_(acc, acc, norm_type=1.0)
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        native.grad_norm([acc, acc.view(2, 5)])
    args = list(_adam_args(10, device))
    args[4] = None
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sq"):
        ops.adamw_step_(*args)
    args = list(_adam_args(10, device))
    args[3] = torch.zeros(11, device=device)
    with pytest.raises(ValueError, match="exp_avg_sq has 11 elements"):
        ops.adamw_step_(*args)
    args = list(_adam_args(10, device))
    args[6] = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="grad_mult must hold exactly one value"):
        ops.adamw_step_(*args)
    args = list(_sgd_args(10, device))
    args[2] = None
    with pytest.raises(ValueError, match="momentum != 0 needs momentum_buffer"):
        ops.sgd_step_(*args)
    args = list(_sgd_args(10, device))
    args[3] = torch.zeros(10, device=device)
    with pytest.raises(TypeError, match="model_out must have dtype float16 or bfloat16"):
        ops.sgd_step_(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_binding_checks_too(device):
    """native.py checks in Python first; the C++ binding checks again on its own."""
    acc = torch.zeros(10, device=device)
    with pytest.raises(TypeError, match="grad must have dtype"):
        ops.accumulate_(acc, torch.zeros(10, dtype=torch.int32, device=device), 1.0, False)
    with pytest.raises(ValueError, match=r"grads\[1\] has 9 elements, expected 10"):
        ops.accumulate_many_([acc, acc], [acc, torch.zeros(9, device=device)], 1.0)
    with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sq"):
        args = list(_adam_args(10, device))
        args[4] = None
        ops.adamw_step_(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_binding_checks_every_size_and_norm_type(device):
    """The C++ binding checks every buffer's size against the param (acc) and refuses a
    norm_type of -inf on its own, called without native.py's checks (a grad or state
    buffer one element short would be read or written past its end)."""
    acc = torch.zeros(10, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        short = torch.zeros(12, dtype=dtype, device=device)[:9]
        with pytest.raises(ValueError, match="grad has 9 elements, expected 10"):
            ops.accumulate_(acc, short, 1.0, False)
        with pytest.raises(ValueError, match="grad has 9 elements, expected 10"):
            ops.accumulate_norm_(acc, short, 1.0, False, 2.0)
    assert torch.count_nonzero(acc) == 0
    for op, make, names in (
            (ops.adamw_step_, _adam_args,
             {1: "acc", 2: "exp_avg", 3: "exp_avg_sq", 4: "max_exp_avg_sq", 5: "model_out"}),
            (ops.sgd_step_, _sgd_args, {1: "acc", 2: "momentum_buffer", 3: "model_out"})):
        for i, name in names.items():
            args = list(make(10, device))
            args[i] = torch.zeros(12, dtype=args[i].dtype, device=device)[:9]
            before = args[0].clone()
            with pytest.raises(ValueError, match=f"^{name} has 9 elements, expected 10"):
                op(*args)
            assert torch.equal(args[0], before)
    grad = _rand(10, torch.float32, device, 1)
    for call in (lambda: ops.accumulate_norm_(acc, grad, 1.0, False, -math.inf),
                 lambda: ops.grad_norm([acc], -math.inf),
                 lambda: ops.accumulate_many_norm_([acc], [grad], 1.0, -math.inf, [])):
        with pytest.raises(ValueError, match="norm_type must be 2.0 or inf, got -inf"):
            call()
    assert torch.count_nonzero(acc) == 0


def _binding_refusal(case, device):
    """(op, args, error type, message) of one direct op call the C++ binding must refuse."""
    acc = _rand(10, device=device, seed=1)
    grad = _rand(10, torch.bfloat16, device, 2)
    strided = _rand(20, device=device, seed=3)[::2]
    pairs = ([acc, _rand(10, device=device, seed=4)], [grad, _rand(10, torch.bfloat16, device, 5)])
    if case == "strided-acc":
        return ops.accumulate_, (strided, grad, 1.0, False), ValueError, \
            r"^acc must be a contiguous 1-D tensor"
    if case == "strided-grad":
        return ops.accumulate_norm_, (acc, strided, 1.0, False, 2.0), ValueError, \
            r"^grad must be a contiguous 1-D tensor"
    if case == "strided-param":
        args = list(_adam_args(10, device))
        args[0] = strided
        return ops.adamw_step_, tuple(args), ValueError, r"^param must be a contiguous 1-D tensor"
    if case == "strided-norm-input":
        return ops.grad_norm, ([acc, strided], 2.0), ValueError, \
            r"^tensors\[1\] must be a contiguous 1-D tensor"
    if case == "half-norm-input":
        return ops.grad_norm, ([acc, grad], 2.0), TypeError, \
            r"^tensors\[1\] must have dtype float32, got BFloat16"
    if case == "fp64-grad-mult":
        args = list(_adam_args(10, device))
        args[6] = args[6].double()
        return ops.adamw_step_, tuple(args), TypeError, \
            r"^grad_mult must be a float32 tensor, got Double"
    if case == "fp16-found-inf":
        args = list(_sgd_args(10, device))
        args[5] = args[5].half()
        return ops.sgd_step_, tuple(args), TypeError, \
            r"^found_inf must be a float32 tensor, got Half"
    if case == "overwrite-flag-2":
        return ops.accumulate_many_, (*pairs, 1.0, [0, 2]), ValueError, \
            r"^overwrite\[1\] must be 0 or 1, got 2"
    if case == "overwrite-too-short":
        return ops.accumulate_many_, (*pairs, 1.0, [1]), ValueError, \
            r"^overwrite must be empty or have one flag per pair, got 1 flags for 2 pairs"
    if case == "mixed-grad-dtypes":
        return ops.accumulate_many_, (pairs[0], [grad, pairs[1][1].half()], 1.0, []), TypeError, \
            r"^grads\[1\] has dtype float16, but grads\[0\] has bfloat16"
    assert case == "strided-accs", case
    return ops.accumulate_many_, ([acc, strided], pairs[1], 1.0, []), ValueError, \
        r"^accs\[1\] must be contiguous, got shape \[10\] and strides \[2\]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["strided-acc", "strided-grad", "strided-param",
                                  "strided-norm-input", "half-norm-input", "fp64-grad-mult",
                                  "fp16-found-inf", "overwrite-flag-2", "overwrite-too-short",
                                  "mixed-grad-dtypes", "strided-accs"])
def test_binding_refuses_what_its_kernels_would_misread(device, case):
    """Called directly (no native.py checks in front: torch.compile graphs, users of
    torch.ops), the C++ binding refuses each input its kernels would misread -- a strided
    buffer read as contiguous, a grad_mult/found_inf or norm input of another dtype read as
    fp32, overwrite flags other than one 0/1 per pair, grads read as grads[0]'s dtype --
    with an error naming it, and leaves every tensor's values and version as they were
    (checks before any write or version bump)."""
    op, args, exc, match = _binding_refusal(case, device)
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a])
               if isinstance(t, torch.Tensor)]
    before = [(t.clone(), t._version) for t in tensors]
    with pytest.raises(exc, match=match):
        op(*args)
    for i, (t, (value, version)) in enumerate(zip(tensors, before)):
        torch.testing.assert_close(t, value, rtol=0, atol=0, equal_nan=True,
                                   msg=f"tensor {i} of the refused call was written")
        assert t._version == version, f"tensor {i} of the refused call had its version bumped"


@pytest.mark.parametrize("device,op_name",
                         [(d, "accumulate_norm_") for d in DEVICES]
                         + [("cpu", "accumulate_many_norm_")] * ("cpu" in DEVICES))
def test_norm_variants_bump_the_versions_they_write(device, op_name):
    """The accumulate ops that also return the norm statistic bump the version of every
    acc they write, as the plain ones do (tests/test_ops.py), so that a backward through a
    tensor saved before the write is refused instead of reading the new values
    (accumulate_many_norm_ runs on CPU tensors only)."""
    accs = [_rand(33, device=device, seed=1), _rand(5, device=device, seed=2)]
    grads = [_rand(33, torch.bfloat16, device, 3), _rand(5, torch.bfloat16, device, 4)]
    if op_name == "accumulate_norm_":
        accs = accs[:1]
    before = [a._version for a in accs]
    x = torch.ones(33, device=device, requires_grad=True)
    saved = (x * accs[0]).sum()  # (mul saves accs[0] for the backward)
    if op_name == "accumulate_norm_":
        ops.accumulate_norm_(accs[0], grads[0], 0.5, False, 2.0)
    else:
        ops.accumulate_many_norm_(accs, grads, 0.5, 2.0, [])
    for a, v in zip(accs, before):
        assert a._version > v, "written in place without a version bump"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_cuda_tensors_on_cpu_only_build_fail_clearly():
    if not torch.cuda.is_available() or "cuda" in ops.build_info().split(","):
        pytest.skip("needs a GPU and a CPU-only build of the extension")
    acc = torch.zeros(10, device="cuda")
    with pytest.raises((RuntimeError, NotImplementedError)):
        ops.accumulate_(acc, acc, 1.0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_trace_under_torch_compile(device):
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(acc, grad, ts):
        s = native.accumulate_(acc, grad, 0.5, norm_type=2.0)
        return s + native.grad_norm(ts, 2.0)

    acc = _rand(1000, device=device)
    grad = _rand(1000, torch.bfloat16, device, 1)
    ts = [_rand(100, device=device, seed=2)]
    want_acc = acc.clone()
    want = reference.accumulate_(want_acc, grad, 0.5, norm_type=2.0) + reference.grad_norm(ts)
    got = f(acc, grad, ts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, want_acc, rtol=1e-6, atol=1e-6)


# ---- accumulate_many_ -------------------------------------------------------------------

_MANY_SIZES = [278011, 0, 1023, 1, 4097, 0, 1, 4097, 1023, 278011, 17]


def _many_views(sizes, dtype, device, align, seed, fill=None):
    """Views of one flat buffer, one per size, each start a multiple of `align` elements
    plus 1 when align is odd (misaligned for the 16-byte vector path); the gaps hold
    `fill` (or random values) and must never be written."""
    starts, pos = [], 0
    for n in sizes:
        pos = (pos + 15) // 16 * 16 + (1 if align % 2 else 0)
        starts.append(pos)
        pos += n + 3
    flat = _rand(pos + 16, dtype, device, seed)
    if fill is not None:
        flat.fill_(fill)
    return flat, [flat[s:s + n] for s, n in zip(starts, sizes)]


def _check_many_matches_accumulate(sizes, grad_dtype, device, acc_align, grad_align, scale,
                                   seed=0):
    acc_flat, accs = _many_views(sizes, torch.float32, device, acc_align, seed)
    grad_flat, grads = _many_views(sizes, grad_dtype, device, grad_align, seed + 1)
    want_flat = acc_flat.clone()
    want = [want_flat[a.storage_offset():a.storage_offset() + a.numel()] for a in accs]
    for a, g in zip(want, grads):
        native.accumulate_(a, g, scale)
    grad_before = grad_flat.clone()
    native.accumulate_many_(accs, grads, scale)
    assert torch.equal(acc_flat, want_flat)  # every pair bitwise, and the gaps untouched
    assert torch.equal(grad_flat, grad_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("acc_align,grad_align", [(16, 16), (1, 1), (16, 1), (1, 16)])
def test_accumulate_many_bitwise_equals_accumulate(device, grad_dtype, acc_align, grad_align):
    _check_many_matches_accumulate(_MANY_SIZES, grad_dtype, device, acc_align, grad_align, 0.37)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_many_more_pairs_than_one_launch(device):
    """150 pairs (several CUDA launches), sizes from 0 to past a block, scale 1 and not."""
    g = torch.Generator().manual_seed(3)
    sizes = [int(x) for x in torch.randint(0, 5000, (150,), generator=g)]
    sizes[7] = sizes[64] = 0
    sizes[100] = 70_001
    for grad_dtype, align, scale in ((torch.bfloat16, 16, 1.0), (torch.float16, 1, -2.5)):
        _check_many_matches_accumulate(sizes, grad_dtype, device, align, align, scale, seed=5)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_many_edge_cases(device):
    native.accumulate_many_([], [])
    e = torch.empty(0, device=device)
    native.accumulate_many_([e, e.clone()], [e.half(), e.half()], 3.0)
    # any contiguous shapes with equal numel; the default scale is 1
    acc = _rand(12, device=device)
    grad = _rand(12, torch.bfloat16, device, 1).view(3, 4)
    want = acc.clone()
    native.accumulate_(want, grad.view(-1), 1.0)
    native.accumulate_many_([acc], [grad])
    assert torch.equal(acc, want)
    ops.accumulate_many_([acc], [grad])
    native.accumulate_(want, grad.view(-1), 1.0)
    assert torch.equal(acc, want)


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_many_input_checks(device):
    accs = [torch.zeros(n, device=device) for n in (3, 5, 7, 10)]
    grads = [torch.zeros(n, dtype=torch.bfloat16, device=device) for n in (3, 5, 7, 10)]

    def with_(lst, i, t):
        return lst[:i] + [t] + lst[i + 1:]

    with pytest.raises(ValueError, match=r"accs and grads must have the same length, got 4 "
                                         r"accs and 3 grads"):
        native.accumulate_many_(accs, grads[:3])
    with pytest.raises(ValueError, match=r"same length, got 0 accs and 1 grads"):
        native.accumulate_many_([], grads[:1])
    bad = with_(grads, 3, torch.zeros(9, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match=r"grads\[3\] has 9 elements, expected 10 \(accs\[3\]\)"):
        native.accumulate_many_(accs, bad)
    bad = with_(grads, 2, torch.zeros(7, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype float16, but grads\[0\] has "
                                        r"bfloat16"):
        native.accumulate_many_(accs, bad)
    bad = [g.to(torch.int32) for g in grads]
    with pytest.raises(TypeError, match=r"grads\[0\] must have dtype float32, float16 or "
                                        r"bfloat16, got int32"):
        native.accumulate_many_(accs, bad)
    bad = with_(accs, 1, torch.zeros(5, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match=r"accs\[1\] must have dtype float32, got float16"):
        native.accumulate_many_(bad, grads)
    bad = with_(accs, 2, torch.zeros(14, device=device)[::2])
    with pytest.raises(ValueError, match=r"accs\[2\] must be contiguous"):
        native.accumulate_many_(bad, grads)
    bad = with_(grads, 1, torch.zeros(10, dtype=torch.bfloat16, device=device)[::2])
    with pytest.raises(ValueError, match=r"grads\[1\] must be contiguous"):
        native.accumulate_many_(accs, bad)
    if torch.cuda.is_available() and "cuda" in DEVICES:
        other = "cpu" if device == "cuda" else "cuda"
        bad = with_(grads, 2, grads[2].to(other))
        with pytest.raises(ValueError, match=r"grads\[2\] is on .*, expected .* \(the device "
                                             r"of accs\[0\]\)"):
            native.accumulate_many_(accs, bad)
        bad = with_(accs, 3, accs[3].to(other))
        with pytest.raises(ValueError, match=r"accs\[3\] is on .*, expected .* \(the device "
                                             r"of accs\[0\]\)"):
            native.accumulate_many_(bad, grads)
    for a in accs:  # nothing was written by a rejected call
        assert torch.count_nonzero(a) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_accumulate_many(device, grad_dtype):
    sizes = [1000, 0, 17, 4097]
    accs = [_rand(n, device=device, seed=i) for i, n in enumerate(sizes)]
    grads = [_rand(n, grad_dtype, device, 10 + i) for i, n in enumerate(sizes)]
    torch.library.opcheck(ops.accumulate_many_.default, (accs, grads, 0.37))
    _, views = _many_views(sizes, torch.float32, device, 16, 20)
    torch.library.opcheck(ops.accumulate_many_.default, (views, grads, -1.5))
    flags = [1, 0, 0, 1]  # (overwrite per pair)
    torch.library.opcheck(ops.accumulate_many_.default, (views, grads, -1.5, flags))
    if device == "cpu":
        for nt in (2.0, math.inf):
            torch.library.opcheck(ops.accumulate_many_norm_.default, (views, grads, 0.5, nt))
            torch.library.opcheck(ops.accumulate_many_norm_.default,
                                  (views, grads, 0.5, nt, flags))
