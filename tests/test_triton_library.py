"""The Triton backend beyond tests/test_ops.py: torch.library registration (opcheck,
torch.compile), determinism, int64 offsets, fp16/bf16 rounding edge cases, empty and
non-finite inputs, and the reasons it gives when it cannot run.

On a machine without CUDA, tests/conftest.py sets TRITON_INTERPRET=1, so the kernels
run for real on CPU tensors through Triton's interpreter.
"""

import ast
import inspect
import math
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from fusedaccum import ops
from fusedaccum.ops import reference

T = pytest.importorskip("fusedaccum.ops.triton")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DEV = _device()
pytestmark = [
    pytest.mark.skipif(
        T.unavailable_reason("triton", torch.device(DEV)) is not None,
        reason=f"triton cannot run here: {T.unavailable_reason('triton', torch.device(DEV))}",
    ),
    # numpy's overflow/invalid warnings for inf and NaN inputs under the interpreter
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


def _rand(n, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * scale).to(dtype).to(DEV)


def _scalar(x):
    return torch.tensor(x, dtype=torch.float32, device=DEV)


# ---------------------------------------------------------------------------------------
# torch.library: schemas, fakes, opcheck, torch.compile
# ---------------------------------------------------------------------------------------


def test_ops_are_registered_with_mutations_declared():
    schemas = {
        name: str(getattr(torch.ops.fusedaccum, name).default._schema)
        for name in ("triton_accumulate_", "triton_accumulate_norm_", "triton_grad_norm",
                     "triton_adamw_step_", "triton_sgd_step_", "triton_accumulate_many_")
    }
    assert "Tensor(a0!)[] accs, Tensor[] grads" in schemas["triton_accumulate_many_"]
    assert "Tensor(a0!) acc" in schemas["triton_accumulate_"]
    assert "Tensor(a0!) acc" in schemas["triton_accumulate_norm_"]
    assert "!" not in schemas["triton_grad_norm"]
    for arg in ("param", "acc", "exp_avg", "exp_avg_sq"):
        assert f"!) {arg}," in schemas["triton_adamw_step_"], schemas["triton_adamw_step_"]
    for arg in ("max_exp_avg_sq", "model_out"):
        assert f"!)? {arg}," in schemas["triton_adamw_step_"], schemas["triton_adamw_step_"]
    assert "!)? momentum_buffer," in schemas["triton_sgd_step_"]
    # grad_mult / found_inf are read-only device tensors
    assert "Tensor grad_mult" in schemas["triton_sgd_step_"]
    assert "Tensor found_inf" in schemas["triton_adamw_step_"]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_opcheck_accumulate(grad_dtype, overwrite):
    acc, grad = _rand(3001, seed=1), _rand(3001, grad_dtype, seed=2)
    torch.library.opcheck(torch.ops.fusedaccum.triton_accumulate_.default,
                          (acc, grad, 0.5, overwrite))
    for norm_type in (2.0, math.inf):
        torch.library.opcheck(torch.ops.fusedaccum.triton_accumulate_norm_.default,
                              (acc, grad, 0.5, overwrite, norm_type))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_accumulate_many(grad_dtype):
    sizes = (3001, 0, 1, 70001)
    accs = [_rand(n, seed=10 + i) for i, n in enumerate(sizes)]
    grads = [_rand(n, grad_dtype, seed=20 + i) for i, n in enumerate(sizes)]
    for overwrite in ([], [1, 0, 1, 0]):
        torch.library.opcheck(torch.ops.fusedaccum.triton_accumulate_many_.default,
                              (accs, grads, 0.25, overwrite))


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_opcheck_grad_norm(norm_type):
    ts = [_rand(n, seed=n) for n in (5, 3001, 0, 1)]
    torch.library.opcheck(torch.ops.fusedaccum.triton_grad_norm.default, (ts, norm_type))


@pytest.mark.parametrize("amsgrad,out_dtype,param_dtype", [
    (False, None, torch.float32),
    (True, torch.bfloat16, torch.float32),
    (False, torch.float16, torch.float32),
    (False, None, torch.bfloat16),
])
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck_adamw(amsgrad, out_dtype, param_dtype, found_inf):
    n = 2049
    param = _rand(n, param_dtype, seed=3)
    acc = _rand(n, seed=4)
    m, v, vmax = (_rand(n, seed=5 + i).abs() for i in range(3))
    out = None if out_dtype is None else torch.zeros(n, dtype=out_dtype, device=DEV)
    args = (param, acc, m, v, vmax if amsgrad else None, out, _scalar(0.5), _scalar(found_inf),
            1e-3, 0.9, 0.999, 1e-8, 0.1, 2, True, amsgrad, False, True)
    torch.library.opcheck(torch.ops.fusedaccum.triton_adamw_step_.default, args)


@pytest.mark.parametrize("momentum,out_dtype", [(0.0, None), (0.9, torch.float16)])
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_opcheck_sgd(momentum, out_dtype, found_inf):
    n = 2049
    param, acc, buf = _rand(n, seed=6), _rand(n, seed=7), _rand(n, seed=8)
    out = None if out_dtype is None else torch.zeros(n, dtype=out_dtype, device=DEV)
    args = (param, acc, buf if momentum else None, out, _scalar(0.5), _scalar(found_inf),
            0.1, momentum, 0.0, 0.01, True, False, False, True)
    torch.library.opcheck(torch.ops.fusedaccum.triton_sgd_step_.default, args)


def test_torch_compile_sees_the_ops():
    """fullgraph=True: the ops must be graph nodes, not graph breaks."""
    torch._dynamo.reset()

    def window(acc, g1, g2, param, m, v, grad_mult, found_inf):
        ops.accumulate_(acc, g1, 1.0, overwrite=True, backend="triton")
        sq = ops.accumulate_(acc, g2, 1.0, norm_type=2.0, backend="triton")
        norm = ops.grad_norm([acc], 2.0, backend="triton")
        ops.adamw_step_(param, acc, m, v, grad_mult=grad_mult, found_inf=found_inf, lr=1e-2,
                        beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=1,
                        backend="triton")
        return sq, norm

    def inputs():
        return [_rand(1000, seed=10), _rand(1000, torch.bfloat16, seed=11),
                _rand(1000, torch.float16, seed=12), _rand(1000, seed=13),
                torch.zeros(1000, device=DEV), torch.zeros(1000, device=DEV),
                _scalar(0.5), _scalar(0.0)]

    eager_in, compiled_in = inputs(), inputs()
    want = window(*eager_in)
    got = torch.compile(window, backend="aot_eager", fullgraph=True)(*compiled_in)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for g, w in zip(compiled_in, eager_in):
        torch.testing.assert_close(g, w)


def test_torch_compile_sees_accumulate_many():
    torch._dynamo.reset()

    def window(flat, g1, g2):
        ops.accumulate_many_([flat[:100], flat[100:107], flat[107:]], [g1, g1[:7], g2], 0.25,
                             backend="triton")
        return flat.sum()

    def inputs():
        return [_rand(1107, seed=14), _rand(100, torch.bfloat16, seed=15),
                _rand(1000, torch.bfloat16, seed=16)]

    eager_in, compiled_in = inputs(), inputs()
    want = window(*eager_in)
    got = torch.compile(window, backend="aot_eager", fullgraph=True)(*compiled_in)
    torch.testing.assert_close(got, want)
    assert torch.equal(compiled_in[0], eager_in[0])


# ---------------------------------------------------------------------------------------
# accumulate_many_: one launch, the binary search over the block starts
# ---------------------------------------------------------------------------------------


class _CountLaunches:
    """Stands in for a kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def _per_pair(accs, grads, scale):
    want = [a.clone() for a in accs]
    for acc, grad in zip(want, grads):
        T.accumulate_(acc, grad, scale)
    return want


def test_accumulate_many_is_one_launch(monkeypatch):
    many = _CountLaunches(T._accumulate_many_kernel)
    single = _CountLaunches(T._accumulate_kernel)
    monkeypatch.setattr(T, "_accumulate_many_kernel", many)
    monkeypatch.setattr(T, "_accumulate_kernel", single)
    block, _ = T._config("accumulate")
    sizes = [block + 1, 0, 1, 3 * block, 0, 5] * 10
    accs = [_rand(n, seed=i) for i, n in enumerate(sizes)]
    grads = [_rand(n, torch.float16, seed=100 + i) for i, n in enumerate(sizes)]
    want = _per_pair(accs, grads, 0.25)
    single.grids.clear()
    T.accumulate_many_(accs, grads, 0.25)
    assert single.grids == []
    assert many.grids == [(sum(-(-n // block) for n in sizes),)]
    for got, w in zip(accs, want):
        assert torch.equal(got, w)
    # nothing to do: no launch at all
    T.accumulate_many_([], [])
    T.accumulate_many_([accs[1], accs[4]], [grads[1], grads[4]])
    assert len(many.grids) == 1


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_accumulate_many_binary_search_every_tensor_count(tiny_blocks, grad_dtype):
    """T = 1 .. 20 tensors (LOG_T = 0 .. 5, T a power of two and not), sizes that end
    exactly on a block boundary and not, empty ones in between (skipped in the table)."""
    block, _ = T._config("accumulate")
    choices = [1, block - 1, block, block + 1, 3 * block, 0, 2 * block + 7]
    for count in range(1, 21):
        sizes = [choices[(count * 3 + i) % len(choices)] for i in range(count)]
        if count == 20:
            sizes = [0] * 19 + [block + 3]
        accs = [_rand(n, seed=count * 100 + i) for i, n in enumerate(sizes)]
        grads = [_rand(n, grad_dtype, seed=count * 200 + i) for i, n in enumerate(sizes)]
        want = _per_pair(accs, grads, -0.37)
        T.accumulate_many_(accs, grads, -0.37)
        for i, (got, w) in enumerate(zip(accs, want)):
            assert torch.equal(got, w), f"{count} tensors: accs[{i}] of {sizes}"


class _RecordingKernel:
    """Stands in for a kernel (_accumulate_many_kernel unless ``like`` another): records
    each launch Triton's launcher would make (kernel[grid](...)) and each direct one (the
    compiled kernel it returned)."""

    def __init__(self, direct_raises=None, like=None):
        self.calls = []
        self.arg_names = list((like or T._accumulate_many_kernel).arg_names)
        outer = self

        class Compiled:
            def __getitem__(self, grid):
                if direct_raises is not None:
                    raise direct_raises

                def runner(*args):
                    grid[0], grid[1], grid[2]  # Triton's runner reads all three (3.6, 3.9)
                    outer.calls.append(("direct", grid, args, {}))
                return runner

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled
        return run


def _fresh_launch_state(monkeypatch, kernel=None):
    """No compiled kernel kept and direct launches allowed; with ``kernel``, it stands in
    for _accumulate_many_kernel as on a GPU (not interpreted)."""
    monkeypatch.setattr(T, "_COMPILED", {})
    monkeypatch.setattr(T, "_DIRECT_FAILED", [])
    if kernel is not None:
        monkeypatch.setattr(T, "_accumulate_many_kernel", kernel)
        monkeypatch.setattr(T, "_INTERPRETED", False)
    return kernel


def test_direct_launch_reuses_the_compiled_kernel_only_for_its_key(monkeypatch):
    """launch "direct": the first launch of a (device, LOG_T, GRAD_KIND, BLOCK, warps) goes
    through Triton's launcher, the next ones straight to the compiled kernel it returned,
    with every argument in the kernel's order; another LOG_T or grad dtype goes through
    the launcher again; "jit" never launches directly. (The real launch is tested on a
    GPU: test_direct_launch_on_gpu_matches_the_reference.)"""
    kernel = _fresh_launch_state(monkeypatch, _RecordingKernel())
    block, warps = T._config("accumulate")

    def flush(n, dtype=torch.bfloat16, launch="direct"):
        accs = [torch.zeros(5) for _ in range(n)]
        grads = [torch.ones(5, dtype=dtype) for _ in range(n)]
        T._launch_accumulate_many(accs, grads, 0.5, launch=launch)

    flush(3)
    flush(3)
    flush(4)  # LOG_T 2 again: the same compiled kernel
    flush(5)  # LOG_T 3
    flush(3, torch.float16)
    flush(3, launch="jit")
    kinds = [c[0] for c in kernel.calls]
    assert kinds == ["jit", "direct", "direct", "jit", "jit", "jit"]
    _, grid, args, kwargs = kernel.calls[0]
    assert grid == (3,) and args[1:] == (3, 0.5)
    assert kwargs == dict(LOG_T=2, GRAD_KIND=T._KIND[torch.bfloat16], INTERPRETED=False,
                          BLOCK=block, num_warps=warps)
    _, grid, args, _ = kernel.calls[2]
    assert grid == (4, 1, 1) and args[1:] == (4, 0.5, 2, T._KIND[torch.bfloat16], False, block)
    assert args[0].dtype == torch.int64 and args[0].numel() == 4 * 4 + 1  # the table
    assert len(T._COMPILED) == 3
    with pytest.raises(ValueError, match="launch mode"):
        flush(3, launch="nope")


def test_auto_launch_is_direct_from_python(monkeypatch):
    """launch "auto" (the default) launches from Python as "direct": the compiled kernel
    Triton's launcher returned, from the second flush of a key on; off a GPU nothing is
    handed to C++ (registration is for CUDA tables only)."""
    kernel = _fresh_launch_state(monkeypatch, _RecordingKernel())
    registered = []
    monkeypatch.setattr(T, "_register_cxx", lambda *a, **k: registered.append((a, k)))
    accs, grads = [torch.zeros(5), torch.zeros(7)], [torch.ones(5), torch.ones(7)]
    for _ in range(3):
        T._launch_accumulate_many(accs, grads, 0.5, launch="auto")
    assert [c[0] for c in kernel.calls] == ["jit", "direct", "direct"]
    assert registered == [] and len(T._COMPILED) == 1


@pytest.mark.parametrize("error", [TypeError("no such launcher"),
                                   IndexError("tuple index out of range")])
def test_direct_launch_a_triton_cannot_do_falls_back_to_its_launcher(monkeypatch, error):
    """A compiled kernel whose direct launch raises before launching (another Triton's
    API): that flush and every later one go through Triton's launcher, one warning."""
    kernel = _fresh_launch_state(monkeypatch,
                                 _RecordingKernel(direct_raises=error))
    accs, grads = [torch.zeros(3)], [torch.ones(3, dtype=torch.bfloat16)]
    T._launch_accumulate_many(accs, grads, 1.0, launch="direct")
    with pytest.warns(RuntimeWarning, match=str(error)):
        T._launch_accumulate_many(accs, grads, 1.0, launch="direct")
    T._launch_accumulate_many(accs, grads, 1.0, launch="direct")
    assert [c[0] for c in kernel.calls] == ["jit", "jit", "jit"]
    assert T._COMPILED == {} and len(T._DIRECT_FAILED) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels of a GPU")
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_direct_launch_on_gpu_matches_the_reference(monkeypatch, grad_dtype):
    """Triton's own compiled kernel launched directly, twice per key (the second call is
    the direct one), with overwrite flags and sizes that end on a block and not."""
    _fresh_launch_state(monkeypatch)
    block, _ = T._config("accumulate")
    sizes = [1, block, block + 1, 3 * block - 5, 17]
    for call in range(2):
        accs = [_rand(n, seed=call * 10 + i) for i, n in enumerate(sizes)]
        grads = [_rand(n, grad_dtype, seed=call * 20 + i) for i, n in enumerate(sizes)]
        flags = [call, 1 - call, 0, 1, 0]
        want = [a.clone() for a in accs]
        for acc, grad, ow in zip(want, grads, flags):
            reference.accumulate_(acc, grad, -0.37, overwrite=bool(ow))
        T._launch_accumulate_many(accs, grads, -0.37, flags, launch="direct")
        for i, (got, w) in enumerate(zip(accs, want)):
            assert torch.equal(got, w), f"call {call}, accs[{i}] of {sizes}"
        assert len(T._COMPILED) == 1 and not T._DIRECT_FAILED


def _spec_corpus():
    """Runtime arguments of every kind a launch passes, and their neighbours: tensors of
    each dtype at every address modulo 16, empty ones, ints around each bound Triton
    specializes on (1, multiples of 16, the i32/i64/u64 ranges), floats, bools."""
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        base = torch.zeros(64, dtype=dtype)
        out += [base[i:] for i in range(16 // base.element_size() + 1)]
        out.append(torch.zeros(0, dtype=dtype))
    for edge in (0, 16, 1 << 31, 1 << 32, 1 << 63, -(1 << 31), -(1 << 63) + 16):
        out += [edge + d for d in (-17, -16, -15, -1, 0, 1, 2, 15, 16, 17)]
    out += [2**64 - 1, 2**64 - 16, 7, 48, 278011, 4097]
    out = [v for v in out if not isinstance(v, int) or -(1 << 63) <= v < 1 << 64]
    out += [0.0, -0.0, 1.0, 0.5, -0.37, 1e300, -1e-300, float("inf"), float("nan"), True, False]
    return out


def test_grid_sizes_are_tritons_cdiv():
    """The launchers' _cdiv (plain ints, no decorator) gives triton.cdiv's grid sizes."""
    for n in (0, 1, 1023, 1024, 1025, 4097, 278011, (1 << 31) + 5, 1 << 40):
        for block in (1, 128, 1024, 4096):
            assert T._cdiv(n, block) == triton.cdiv(n, block), (n, block)


def test_launch_key_is_at_least_as_fine_as_tritons_specialization():
    """Two runtime arguments with the same _spec (the launch key of a direct launch, _run)
    get the same specialization from Triton's launcher, so that a key never stands for
    two compiled kernels: checked with the function Triton's launcher calls (Triton 3.6
    and 3.9: native_specialize_impl) for the CUDA backend, specializing on value and
    alignment (the kernels that ask for less get a coarser one)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget

    specialize = getattr(libtriton, "native_specialize_impl", None)
    assert specialize is not None, "Triton's launcher specializes some other way: see _spec"
    backend = nvidia.CUDABackend(GPUTarget("cuda", 90, 32))
    seen = {}
    for arg in _spec_corpus():
        triton_spec = tuple(specialize(backend, arg, False, True, True))
        key = T._spec(arg)
        assert seen.setdefault(key, (triton_spec, arg))[0] == triton_spec, (
            f"_spec {key!r}: {seen[key][1]!r} gets {seen[key][0]}, {arg!r} gets {triton_spec}")
    # (and the key tells apart what Triton does: 1, multiples of 16, i32/i64/u64, alignment)
    assert len({T._spec(v) for v in (1, 16, 17, 1 << 31, 1 << 63)}) == 5
    assert T._spec(torch.zeros(8)[1:]) != T._spec(torch.zeros(8))


def _launches(monkeypatch, name):
    """A recording stand-in for kernel ``name`` as on a GPU (see _RecordingKernel)."""
    kernel = _RecordingKernel(like=getattr(T, name))
    monkeypatch.setattr(T, name, kernel)
    monkeypatch.setattr(T, "_INTERPRETED", False)
    monkeypatch.setattr(T, "_COMPILED", {})
    monkeypatch.setattr(T, "_DIRECT_FAILED", [])
    return kernel


def _step_tensors(n, device):
    """The tensors _step_launches' launches read: made once, so that every launch of a
    test passes the same ones."""
    g = torch.Generator().manual_seed(n)
    half = torch.randn(n + 8, generator=g).to(torch.bfloat16).to(device)
    f32 = [torch.rand(n + 8, generator=g).to(device) for _ in range(4)]
    norm_blocks = 16 * T._config("norm")[0]  # a norm with 16 partials
    return dict(p=half[:n], p_off=half[1:n + 1], f32=[t[:n] for t in f32],
                f32_off=[t[1:n + 1] for t in f32],
                out=torch.full((n,), float("nan"), dtype=torch.bfloat16, device=device),
                out16=torch.full((n,), float("nan"), dtype=torch.float16, device=device),
                small=half[:16], small_acc=f32[0][:16], wide=torch.rand(norm_blocks).to(device),
                one=torch.ones((), device=device), zero=torch.zeros((), device=device))


def _step_launches():
    """(kernel name, launch(tensors, variant)) for every launcher but the table flush's;
    ``variant``: the same launch with one argument that Triton specializes differently
    (an address off 16 bytes, another dtype, a count that is a multiple of 16)."""

    def adamw(t, variant):
        T._launch_adamw(t["p_off"] if variant else t["p"], *t["f32"], t["out"], t["one"],
                        t["zero"], 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, True, True, False, True)

    def sgd(t, variant):
        T._launch_sgd(t["p"], t["f32"][0], t["f32"][1], t["out16"] if variant else t["out"],
                      t["one"], t["zero"], 0.1, 0.9, 0.0, 0.0, True, False, False, True)

    def accumulate(t, variant):
        if variant:
            T._launch_accumulate(t["small_acc"], t["small"], 0.5, False, T._NORM_2)
        else:
            T._launch_accumulate(t["f32"][0], t["p"], 0.5, False, T._NORM_2)

    def norm_partials(t, variant):
        T._launch_grad_norm([t["f32_off" if variant else "f32"][0]], T._NORM_2)

    def finish(t, variant):
        T._launch_grad_norm([t["wide"] if variant else t["f32"][0]], T._NORM_2)

    return [("_adamw_kernel", adamw), ("_sgd_kernel", sgd), ("_accumulate_kernel", accumulate),
            ("_norm_partials_kernel", norm_partials), ("_finish_kernel", finish)]


_STEP_IDS = [c[0] for c in _step_launches()]


@pytest.mark.parametrize("name, launch", _step_launches(), ids=_STEP_IDS)
def test_every_kernel_launches_directly_with_the_launchers_arguments(monkeypatch, name,
                                                                      launch):
    """Each launcher's second launch of a key is direct, with every argument Triton's
    launcher got, in the kernel's parameter order; an argument Triton specializes
    differently makes a new key (Triton's launcher first); "jit" never launches
    directly."""
    kernel = _launches(monkeypatch, name)
    t = _step_tensors(3000, "cpu")
    for variant in (False, False, True, True, False):
        launch(t, variant)
    monkeypatch.setattr(T, "_LAUNCH", "jit")
    launch(t, False)
    assert [c[0] for c in kernel.calls] == ["jit", "direct", "jit", "direct", "direct", "jit"]
    for first, again in ((0, 1), (2, 3), (0, 4)):
        _, grid, args, kwargs = kernel.calls[first]
        _, dgrid, dargs, _ = kernel.calls[again]
        kwargs = dict(kwargs)
        assert isinstance(kwargs.pop("num_warps"), int)
        bound = dict(zip(kernel.arg_names, args), **kwargs)
        assert list(bound) == kernel.arg_names, (list(bound), kernel.arg_names)
        assert dgrid == (grid[0], 1, 1) and len(dargs) == len(kernel.arg_names)
        for arg_name, want, got in zip(kernel.arg_names, bound.values(), dargs):
            if isinstance(want, torch.Tensor):  # (partials and norms: new buffers each time)
                assert want is got or arg_name in ("partial_ptr", "out_ptr"), arg_name
                assert (want.dtype, want.shape) == (got.dtype, got.shape), arg_name
            else:
                assert want == got and type(want) is type(got), (arg_name, want, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels of a GPU")
@pytest.mark.parametrize("name, launch", _step_launches(), ids=_STEP_IDS)
def test_direct_launches_of_every_kernel_on_gpu_give_the_launchers_bits(monkeypatch, name,
                                                                        launch):
    """On a GPU: a launcher's first launch of a key (Triton's launcher) and its second
    (the compiled kernel launched directly) write the same bits from the same inputs,
    each variant."""
    monkeypatch.setattr(T, "_COMPILED", {})
    monkeypatch.setattr(T, "_DIRECT_FAILED", [])
    monkeypatch.setattr(T, "_LAUNCH", "direct")
    for variant in (False, True):
        results = []
        for _ in range(2):
            t = _step_tensors(278011, DEV)
            launch(t, variant)
            results.append([t["p"], t["out"], t["out16"], *t["f32"], t["small_acc"]])
        assert T._COMPILED and not T._DIRECT_FAILED
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)


def test_direct_launch_key_holds_num_warps(monkeypatch):
    """A launch with the same constexprs and arguments but another num_warps (what
    bench/tune_triton.py sweeps in one process: one BLOCK with several warp counts) goes
    through Triton's launcher with its own num_warps, not to the compiled kernel of the
    other."""
    kernel = _launches(monkeypatch, "_accumulate_kernel")
    acc, grad = torch.zeros(3000), torch.ones(3000, dtype=torch.bfloat16)
    block, warps = T._config("accumulate")
    for w in (warps, warps, 2 * warps, 2 * warps, warps):
        monkeypatch.setitem(T._GPU_CONFIG, "accumulate", (block, w))
        T._launch_accumulate(acc, grad, 0.5, False, T._NORM_NONE)
    assert [c[0] for c in kernel.calls] == ["jit", "direct", "jit", "direct", "direct"]
    assert [c[3]["num_warps"] for c in kernel.calls if c[0] == "jit"] == [warps, 2 * warps]


def test_direct_launch_key_holds_the_device(monkeypatch):
    """A compiled kernel is loaded on one GPU: the same launch on another device goes
    through Triton's launcher, never to the kernel the first device's launch returned.
    (No second GPU needed: the key takes the device of the first argument, which here
    stands in for a tensor on cuda:0, then cuda:1.)"""
    kernel = _launches(monkeypatch, "_finish_kernel")
    monkeypatch.setattr(T, "_LAUNCH", "direct")

    class OnDevice:
        device = torch.device("cuda", 0)

    partials, out = OnDevice(), torch.zeros(())
    for index in (0, 0, 1, 1, 0):
        partials.device = torch.device("cuda", index)
        T._run(kernel, 1, (partials, out, 7), dict(NORM=1, SQRT=False, BLOCK=16), 1)
    assert [c[0] for c in kernel.calls] == ["jit", "direct", "jit", "direct", "direct"]
    assert len(T._COMPILED) == 2


def test_direct_launch_only_for_constexprs_in_the_kernels_order(monkeypatch):
    """The compiled kernel is launched with every argument by position: a launch whose
    constexprs are not the kernel's remaining parameters in its order (here NORM and SQRT
    swapped, which the launcher binds by name) keeps no compiled kernel and goes through
    Triton's launcher every time."""
    kernel = _launches(monkeypatch, "_finish_kernel")
    monkeypatch.setattr(T, "_LAUNCH", "direct")
    partials, out = torch.zeros(7), torch.zeros(())
    for _ in range(2):
        T._run(kernel, 1, (partials, out, 7), dict(SQRT=False, NORM=1, BLOCK=16), 1)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"] and T._COMPILED == {}
    for _ in range(2):  # (the kernel's order: kept, then launched directly)
        T._run(kernel, 1, (partials, out, 7), dict(NORM=1, SQRT=False, BLOCK=16), 1)
    assert [c[0] for c in kernel.calls] == ["jit", "jit", "jit", "direct"]
    assert len(T._COMPILED) == 1


# _accumulate_many_kernel compiled for a GPU by this Triton (no GPU needed: its NVIDIA
# backend and ptxas), in a process without the interpreter (_run_python)
_COMPILE_MANY = """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedaccum.ops import triton as T

    def compile_many(cc, kind, block, warps):
        sig = {"table_ptr": "*i64", "n_tensors": "i32", "scale": "fp32",
               "LOG_T": "constexpr", "GRAD_KIND": "constexpr", "INTERPRETED": "constexpr",
               "BLOCK": "constexpr"}
        src = ASTSource(fn=T._accumulate_many_kernel, signature=sig,
                        constexprs={"LOG_T": 3, "GRAD_KIND": kind, "INTERPRETED": False,
                                    "BLOCK": block})
        return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": warps})
"""


def _run_with_compile_many(code):
    """_run_python of ``code`` after _COMPILE_MANY (each dedented on its own)."""
    return _run_python(textwrap.dedent(_COMPILE_MANY) + textwrap.dedent(code))


def test_accumulate_many_kernel_compiles_to_16_byte_accesses():
    """The batch kernel reads its addresses from a table, where the compiler sees no
    alignment: its whole aligned blocks declare it, so sm_80 and sm_90 get 16-byte
    vector loads of the gradient and the accumulator and stores of the accumulator (the
    masked path alone compiles to scalar ones)."""
    pytest.importorskip("triton.backends.nvidia")
    res = _run_with_compile_many("""
        import re
        block, warps = T._GPU_CONFIG["accumulate"]
        for cc in (80, 90):
            for kind in (0, 1, 2):
                ptx = compile_many(cc, kind, block, warps).asm["ptx"]
                print(cc, kind, len(re.findall(r"ld\\.global\\.v4", ptx)),
                      len(re.findall(r"st\\.global\\.v4", ptx)))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()]
    assert len(rows) == 6, res.stdout
    for cc, kind, loads, stores in rows:
        # fp32 grads: 2 + 2 vector loads (the added and the overwriting branch may share
        # them), half grads: 1 + 2; and at least one vector store per branch
        assert int(loads) >= (3 if kind != "0" else 4) and int(stores) >= 2, (cc, kind,
                                                                             res.stdout)



# (kernel, constexprs beyond BLOCK and INTERPRETED=False, multiply-adds per element: the
# _fma calls of that configuration and nothing else)
_FMA_CASES = [
    ("_accumulate_kernel", dict(GRAD_KIND=2, OVERWRITE=False, NORM=0), 1),
    # AdamW: the lerp and the addcmul; not acc * grad_mult - exp_avg, not p * decay + update
    ("_adamw_kernel", dict(PARAM_KIND=0, OUT_KIND=2, HAS_OUT=True, WD_MODE=1, AMSGRAD=False,
                           MAXIMIZE=False, LERP_FROM_START=True, ZERO_ACC=True), 2),
    # Adam with L2 weight decay: also g.add(p, alpha=wd)
    ("_adamw_kernel", dict(PARAM_KIND=0, OUT_KIND=0, HAS_OUT=False, WD_MODE=2, AMSGRAD=True,
                           MAXIMIZE=True, LERP_FROM_START=False, ZERO_ACC=True), 3),
    ("_sgd_kernel", dict(PARAM_KIND=0, OUT_KIND=1, HAS_OUT=True, HAS_WD=True,
                         HAS_MOMENTUM=True, FIRST_STEP=False, NESTEROV=True, MAXIMIZE=False,
                         ZERO_ACC=True), 4),
]


@pytest.mark.parametrize("name, constexprs, per_element", _FMA_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in _FMA_CASES])
def test_kernels_compile_to_their_own_multiply_adds_only(name, constexprs, per_element):
    """Compiled for sm_90 with Triton's default contraction on, a kernel's PTX holds the
    multiply-adds it asks for (_fma, where torch's kernels fuse) and no other: a product
    the compiler fused into the next add (AdamW's ``acc * grad_mult - exp_avg`` and ``p *
    decay + update`` were) rounds once on a GPU where the interpreter, the C++ kernels and
    torch round twice, and made the wrapper's two boundary paths differ in an ulp on an
    H100 (test_found_inf_read_before_or_after_the_update_is_queued_alike)."""
    pytest.importorskip("triton.backends.nvidia")
    block, warps = T._GPU_CONFIG["accumulate"]
    res = _run_python(f"""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fusedaccum.ops import triton as T

        kernel = T.{name}
        consts = dict({constexprs!r}, INTERPRETED=False, BLOCK={block})
        half = {{"out_ptr": "*bf16" if consts.get("OUT_KIND") == 2 else "*fp16"}}
        sig = {{}}
        for arg in kernel.arg_names:
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = half.get(arg, "*bf16" if arg == "grad_ptr" else "*fp32")
            else:
                sig[arg] = "i32" if arg == "n" else "fp32"
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={{"num_warps": {warps}}}).asm["ptx"]
        print(len(re.findall(r"\\bfma\\.rn\\.f32\\b", ptx)))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    per_thread = block // (32 * warps)
    assert int(res.stdout.split()[-1]) == per_element * per_thread, res.stdout

def _compiled_like(**meta):
    """A stand-in for Triton's CompiledKernel of _accumulate_many_kernel on a GPU, as
    _cxx_spec reads it (Triton 3.6 and 3.9 field names)."""
    fields = dict(num_warps=4, shared=0, num_ctas=1, launch_cooperative_grid=False,
                  launch_pdl=False, global_scratch_size=0, profile_scratch_size=0,
                  warp_size=32, target=types.SimpleNamespace(backend="cuda", warp_size=32))
    fields.update(meta)
    signature = fields.pop("signature", {"table_ptr": "*i64", "n_tensors": "i32",
                                          "scale": "fp32", "LOG_T": "constexpr",
                                          "GRAD_KIND": "constexpr", "BLOCK": "constexpr"})
    return types.SimpleNamespace(function=fields.pop("function", 0x7f00ab),
                                 src=types.SimpleNamespace(signature=signature),
                                 metadata=types.SimpleNamespace(**fields))


def test_cxx_spec_takes_only_the_launch_the_cpp_side_makes():
    """_cxx_spec hands C++ a kernel only where csrc/cuda/triton_launch.cu's launch is the
    one Triton's launcher would make: arguments (*i64, i32, fp32), no clusters, no
    cooperative or PDL launch, no scratch, warps of 32; a loaded function handle."""
    assert T._cxx_spec(_compiled_like()) == (0x7f00ab, 4, 0)
    assert T._cxx_spec(_compiled_like(num_warps=8, shared=4096)) == (0x7f00ab, 8, 4096)
    refused = [
        dict(function=None), dict(function=0),
        dict(signature={"table_ptr": "*i64", "n_tensors": "i64", "scale": "fp32"}),
        dict(signature={"table_ptr": "*i64", "scale": "fp32"}),
        dict(signature={"table_ptr": "*i64", "n_tensors": "i32", "scale": "fp32", "x": "i32"}),
        dict(num_ctas=2), dict(launch_cooperative_grid=True), dict(launch_pdl=True),
        dict(global_scratch_size=64), dict(profile_scratch_size=8), dict(warp_size=64),
        dict(shared=300 * 1024), dict(target=types.SimpleNamespace(backend="hip")),
    ]
    for meta in refused:
        assert isinstance(T._cxx_spec(_compiled_like(**meta)), str), meta
    assert isinstance(T._cxx_spec(object()), str)  # (the interpreter returns no kernel)
    # the compiled PTX's entry, where Triton kept it: the arguments the C++ launch passes,
    # then up to two .u64 scratch pointers
    entry = ".visible .entry _accumulate_many_kernel(\n\t.param .u64 .ptr .global .align 1 " \
            "a_0,\n\t.param .u32 a_1,\n\t.param .f32 a_2{})\n{{\n}}"
    for tail, ok in (("", True), (",\n\t.param .u64 a_3", True),
                     (",\n\t.param .u64 a_3,\n\t.param .u64 a_4", True),
                     (",\n\t.param .u64 a_3,\n\t.param .u64 a_4,\n\t.param .u64 a_5", False),
                     (",\n\t.param .u32 a_3", False)):
        c = _compiled_like()
        c.asm = {"ptx": entry.format(tail)}
        assert isinstance(T._cxx_spec(c), tuple) is ok, tail
    c = _compiled_like()
    c.asm = {"ptx": entry.format("").replace(".u32", ".u64")}
    assert "PTX entry" in T._cxx_spec(c)


class _FakeHooks:
    def __init__(self, takes: bool):
        self.takes, self.calls = takes, []

    def register_triton_kernel(self, *args):
        self.calls.append(args)
        return self.takes


def test_cxx_registration_once_per_variant_or_one_refusal(monkeypatch):
    """_register_cxx: each (device, GRAD_KIND, LOG_T, BLOCK) variant is handed to the C++
    hook once and its compiled kernel kept alive; a refusal (a kernel it cannot take, a
    build without CUDA) is recorded once, with one warning, and nothing is registered
    after it."""
    from fusedaccum.ops import native

    monkeypatch.setattr(T, "_CXX_KERNELS", {})
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    hooks = _FakeHooks(takes=True)
    monkeypatch.setattr(native, "hooks_module", lambda load=True: hooks)
    good = _compiled_like()
    T._register_cxx(good, 0, 3, 2, 1024)
    T._register_cxx(good, 0, 3, 2, 1024)
    T._register_cxx(good, 1, 3, 2, 1024)
    assert hooks.calls == [(T, 0, 2, 3, 1024, 0x7f00ab, 4, 0), (T, 1, 2, 3, 1024, 0x7f00ab, 4, 0)]
    assert T._CXX_KERNELS == {(0, 2, 3, 1024): good, (1, 2, 3, 1024): good}
    with pytest.warns(RuntimeWarning, match="arguments are"):
        T._register_cxx(_compiled_like(signature={"a": "*fp32"}), 0, 0, 2, 1024)
    T._register_cxx(good, 0, 1, 2, 1024)  # nothing more after a refusal
    assert len(hooks.calls) == 2 and len(T._CXX_REFUSED) == 1

    monkeypatch.setattr(T, "_CXX_KERNELS", {})
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    monkeypatch.setattr(native, "hooks_module", lambda load=True: _FakeHooks(takes=False))
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        T._register_cxx(good, 0, 3, 2, 1024)
    assert T._CXX_KERNELS == {}
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    monkeypatch.setattr(native, "hooks_module", lambda load=True: None)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ hook is off"):
        T._register_cxx(good, 0, 3, 2, 1024)

    # a launch the driver refused in C++ sent its flush back here: reported, even for a
    # registered variant, and nothing is registered after it
    monkeypatch.setattr(T, "_CXX_KERNELS", {(0, 2, 3, 1024): good})
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    hooks = _FakeHooks(takes=True)
    hooks.triton_cxx_error = lambda: "invalid argument (CUDA driver error 1)"
    monkeypatch.setattr(native, "hooks_module", lambda load=True: hooks)
    with pytest.warns(RuntimeWarning, match="a launch from C\\+\\+ failed: invalid argument"):
        T._register_cxx(good, 0, 3, 2, 1024)
    T._register_cxx(good, 0, 4, 2, 1024)
    assert hooks.calls == [] and len(T._CXX_REFUSED) == 1


def test_cxx_registration_for_auto_is_quiet(monkeypatch):
    """_register_cxx(quiet=True), the default "auto" mode: a refusal is recorded without a
    warning (its flushes stay "direct"); an extension not loaded yet is forgotten once
    table_flush (asked by a C++ hook, so with the extension loaded) runs; a launch the
    driver refused in C++ still warns."""
    from fusedaccum.ops import native

    good = _compiled_like()
    for hooks, why in ((None, T._CXX_UNLOADED), (_FakeHooks(takes=False), "built without CUDA"),
                       (_FakeHooks(takes=True), None)):
        monkeypatch.setattr(T, "_CXX_KERNELS", {})
        monkeypatch.setattr(T, "_CXX_REFUSED", [])
        monkeypatch.setattr(native, "hooks_module", lambda load=True, h=hooks: h)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            T._register_cxx(good, 0, 3, 2, 1024, quiet=True)
        if why is None:
            assert T._CXX_KERNELS == {(0, 2, 3, 1024): good} and T._CXX_REFUSED == []
        else:
            assert T._CXX_KERNELS == {} and len(T._CXX_REFUSED) == 1
            assert why in T._CXX_REFUSED[0]
    monkeypatch.setattr(T, "_CXX_REFUSED", ["the extension was built without CUDA"])
    T.table_flush(torch.device("cpu"), torch.bfloat16)
    assert T._CXX_REFUSED == ["the extension was built without CUDA"]  # (for good)
    monkeypatch.setattr(T, "_CXX_REFUSED", [T._CXX_UNLOADED])
    assert T.table_flush(torch.device("cpu"), torch.bfloat16) is not None
    assert T._CXX_REFUSED == []  # (the next launch asks again)

    hooks = _FakeHooks(takes=True)
    hooks.triton_cxx_error = lambda: "invalid argument (CUDA driver error 1)"
    monkeypatch.setattr(native, "hooks_module", lambda load=True: hooks)
    monkeypatch.setattr(T, "_CXX_KERNELS", {(0, 2, 3, 1024): good})
    with pytest.warns(RuntimeWarning, match="a launch from C\\+\\+ failed"):
        T._register_cxx(good, 0, 3, 2, 1024, quiet=True)
    assert len(T._CXX_REFUSED) == 1 and hooks.calls == []


def test_cxx_launch_mode_flushes_as_the_reference_here(monkeypatch):
    """launch "cxx" through Python: Triton's launcher runs the kernel, and on a GPU its
    variant is handed to C++ or refused (extension off), once; with tables off the GPU
    (the interpreter's CPU tensors) nothing is."""
    monkeypatch.setattr(T, "_CXX_KERNELS", {})
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    sizes = [0, 1, 1023, 4097]
    accs = [_rand(n, seed=i) for i, n in enumerate(sizes)]
    grads = [_rand(n, torch.bfloat16, seed=10 + i) for i, n in enumerate(sizes)]
    want = _per_pair(accs, grads, 0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a refusal, on a GPU)
        T._launch_accumulate_many(accs, grads, 0.75, launch="cxx")
    for got, w in zip(accs, want):
        assert torch.equal(got, w)
    handed = len(T._CXX_KERNELS) + len(T._CXX_REFUSED)
    assert handed == (1 if DEV == "cuda" else 0)
    if T._CXX_KERNELS:
        T._forget_cxx()  # (nothing registered outlives the test)


def test_launches_switch_the_device_only_when_another_is_current():
    """A launch enters torch.cuda.device only for a tensor on a GPU that is not the
    current device (Triton launches on the current one)."""
    if not T._INTERPRETED:
        assert T._device_of(torch.zeros(1)) is T._NO_SWITCH
    if torch.cuda.is_available():
        assert T._device_of(torch.zeros(1, device="cuda")) is T._NO_SWITCH
        if torch.cuda.device_count() > 1:
            other = torch.zeros(1, device=f"cuda:{1 - torch.cuda.current_device() % 2}")
            assert isinstance(T._device_of(other), torch.cuda.device)


def test_cached_flush_tables_are_reused_only_for_the_same_entries(monkeypatch):
    """table upload "cached": one table per distinct (device, stream, entries), reused
    (the same tensor), bounded (least recently used dropped), and the launcher gives the
    same bits with it, cache hit or not."""
    monkeypatch.setattr(T, "_TABLE_CACHE", type(T._TABLE_CACHE)())
    monkeypatch.setattr(T, "_TABLE_CACHE_SIZE", 2)
    dev = torch.empty(0, device=DEV).device  # with its index, as a tensor's device has
    a = T._upload_table([1, 2, 3], dev, "cached")
    assert a.tolist() == [1, 2, 3] and a.device == dev and a.dtype == torch.int64
    assert T._upload_table([1, 2, 3], dev, "cached") is a
    b = T._upload_table([1, 2, 4], dev, "cached")
    assert b is not a and b.tolist() == [1, 2, 4]
    T._upload_table([1, 2, 3], dev, "cached")  # a is now the most recent
    T._upload_table([9], dev, "cached")  # drops b
    assert len(T._TABLE_CACHE) == 2
    assert T._upload_table([1, 2, 3], dev, "cached") is a
    assert T._upload_table([1, 2, 4], dev, "cached") is not b
    with pytest.raises(ValueError, match="table upload mode"):
        T._upload_table([1], dev, "nope")
    accs = [_rand(n, seed=i) for i, n in enumerate((5, 3000, 1))]
    grads = [_rand(n, torch.bfloat16, seed=10 + i) for i, n in enumerate((5, 3000, 1))]
    want = _per_pair(accs, grads, 0.5)
    want = _per_pair(want, grads, 0.5)
    for _ in range(2):  # a miss, then a hit
        T._launch_accumulate_many(accs, grads, 0.5, upload="cached")
    for got, w in zip(accs, want):
        assert torch.equal(got, w)


def test_accumulate_many_bumps_version_counters():
    accs = [_rand(10, seed=1), _rand(3, seed=2)]
    versions = [a._version for a in accs]
    T.accumulate_many_(accs, [_rand(10, seed=3), _rand(3, seed=4)])
    assert all(a._version > v for a, v in zip(accs, versions))


# ---------------------------------------------------------------------------------------
# determinism and multi-block reductions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_and_accumulate_stat_are_bitwise_deterministic(norm_type):
    ts = [_rand(n, seed=20 + n, scale=3.0) for n in (278011, 7, 70001)]
    first = T.grad_norm(ts, norm_type)
    for _ in range(3):
        assert torch.equal(T.grad_norm(ts, norm_type), first)
    grad = _rand(278011, torch.float16, seed=21)
    stats = []
    for _ in range(3):
        acc = ts[0].clone()
        stats.append(T.accumulate_(acc, grad, 0.5, norm_type=norm_type))
    assert all(torch.equal(s, stats[0]) for s in stats)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Many blocks and more partials than the finishing program's block, so the
    second stage's loop runs several times (on a GPU the real table stays)."""
    if T._INTERPRETED:
        monkeypatch.setattr(T, "_INTERPRET_BLOCK", 64)
        monkeypatch.setattr(T, "_INTERPRET_FINISH_BLOCK", 16)
    else:
        cfg = dict(T._GPU_CONFIG, accumulate=(64, 1), norm=(64, 1), finish=(16, 1))
        monkeypatch.setattr(T, "_GPU_CONFIG", cfg)


@pytest.mark.parametrize("blocks", ["tiny_blocks", "distinct_blocks"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_reductions_over_many_blocks(blocks, norm_type, request):
    request.getfixturevalue(blocks)
    ts = [_rand(n, seed=30 + i, scale=2.0) for i, n in enumerate((5000, 63, 0, 1, 129))]
    torch.testing.assert_close(T.grad_norm(ts, norm_type), reference.grad_norm(ts, norm_type),
                               rtol=1e-5, atol=1e-6)
    grad = _rand(5000, torch.bfloat16, seed=40)
    want_acc, got_acc = ts[0].clone(), ts[0].clone()
    want = reference.accumulate_(want_acc, grad, -0.3, norm_type=norm_type)
    got = T.accumulate_(got_acc, grad, -0.3, norm_type=norm_type)
    torch.testing.assert_close(got_acc, want_acc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # NaN in a late block, larger values (inf) in an earlier one: still NaN
    bad = ts[0].clone()
    bad[100] = math.inf
    bad[4900] = math.nan
    assert torch.isnan(T.grad_norm([bad], norm_type))
    assert torch.isnan(T.accumulate_(bad.clone(), torch.zeros_like(bad), norm_type=norm_type))


@pytest.fixture
def distinct_blocks(monkeypatch):
    """Another BLOCK for each kernel (under the interpreter every kernel but the finishing
    one has the same, as tiny_blocks gives them), so that a launcher that sizes its grid or
    its partials by another kernel's block, or launches with another's, shows."""
    blocks = dict(accumulate=64, norm=128, finish=16, adamw=32, sgd=256)
    if T._INTERPRETED:
        monkeypatch.setattr(T, "_config", lambda kernel: (blocks[kernel], 4))
    else:
        monkeypatch.setattr(T, "_GPU_CONFIG", {k: (b, 1) for k, b in blocks.items()})
    return blocks


def test_each_kernel_is_sized_by_its_own_block(distinct_blocks):
    """accumulate_many_ and the steps against the reference with a different BLOCK per
    kernel and sizes that end inside a block."""
    sizes = (5000, 63, 0, 1, 129)
    ts = [_rand(n, seed=110 + i, scale=2.0) for i, n in enumerate(sizes)]
    # (the norms and accumulate_'s statistic: test_reductions_over_many_blocks, with these
    # blocks too)
    grads = [_rand(n, torch.float16, seed=130 + i) for i, n in enumerate(sizes)]
    want = [t.clone() for t in ts]
    reference.accumulate_many_(want, grads, 0.25)
    got = [t.clone() for t in ts]
    T.accumulate_many_(got, grads, 0.25)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    n = 5000
    param, acc = _rand(n, seed=140), _rand(n, seed=141)
    state = [_rand(n, seed=142 + i).abs() for i in range(3)]
    kw = dict(grad_mult=_scalar(0.5), found_inf=_scalar(0.0))
    for op, hp, k in ((T.adamw_step_, dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                           weight_decay=0.1, step=2, amsgrad=True), 3),
                      (T.sgd_step_, dict(lr=0.1, momentum=0.9, dampening=0.0,
                                         weight_decay=0.01, nesterov=True, maximize=False,
                                         first_step=False), 1)):
        want = [t.clone() for t in (param, acc, *state[:k])]
        getattr(reference, op.__name__)(*want, **kw, **hp)
        got = [t.clone() for t in (param, acc, *state[:k])]
        op(*got, **kw, **hp)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# int64 offsets
# ---------------------------------------------------------------------------------------


@triton.jit
def _offsets_probe_kernel(out_ptr, first_pid, BLOCK: tl.constexpr):
    offs = T._block_offsets(tl.program_id(0) + first_pid, BLOCK)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), offs)


def test_block_offsets_do_not_overflow_int32():
    """The offsets every kernel uses, for programs whose first element is past 2**31
    (pid * BLOCK would wrap in int32), without allocating 8 GiB."""
    block = 256
    first_pid = (2**31 // block) - 1  # the second program starts exactly at 2**31
    out = torch.empty(2 * block, dtype=torch.int64, device=DEV)
    _offsets_probe_kernel[(2,)](out, first_pid, BLOCK=block)
    want = torch.arange(first_pid * block, (first_pid + 2) * block, dtype=torch.int64)
    assert torch.equal(out.cpu(), want)
    assert out.max().item() > 2**31


def test_every_kernel_indexes_through_int64_offsets():
    """No kernel forms offsets from the int32 program id by itself."""
    kernels = [v for k, v in vars(T).items() if k.startswith("_") and k.endswith("_kernel")]
    assert len(kernels) >= 5
    for kernel in kernels:
        fn = getattr(kernel, "fn", kernel)
        src = inspect.getsource(fn)
        if "program_id" in src:
            assert "_block_offsets(" in src, fn.__name__
        assert "* BLOCK" not in src, f"{fn.__name__} multiplies by BLOCK outside _block_offsets"
    assert ".to(tl.int64) * BLOCK" in inspect.getsource(getattr(T._block_offsets, "fn",
                                                                T._block_offsets))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with ~14 GB free")
def test_accumulate_past_2_pow_31_elements_on_gpu():
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < n * 6 + (1 << 30):
        pytest.skip("not enough free GPU memory")
    acc = torch.zeros(n, device="cuda")
    grad = torch.ones(n, dtype=torch.float16, device="cuda")
    grad[-5:] = 3.0
    stat = T.accumulate_(acc, grad, 2.0, norm_type=math.inf)
    assert acc[-5:].eq(6.0).all() and acc[-6].item() == 2.0 and acc[0].item() == 2.0
    assert stat.item() == 6.0
    del acc, grad


# ---------------------------------------------------------------------------------------
# fp16 / bf16 rounding: identical to torch's .to(dtype), round to nearest even
# ---------------------------------------------------------------------------------------


def _edge_fp32_values():
    bits = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
        0x00000001, 0x00008000, 0x00018000, 0x00008001, 0x00007FFF, 0x007FFFFF, 0x00800000,
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bf16 ties / near ties around 1
        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,  # bf16 overflow to inf
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF,  # fp16: 65504, near 65520 (tie)
        0x33800000, 0x33000000, 0x33400000, 0x33C00000, 0x38800000, 0x387FE000,  # fp16 subn.
        0x387FF000, 0x3F801000, 0x3F803000, 0xB3400000, 0xC77FF000,
    ]
    g = torch.Generator().manual_seed(0)
    rand_bits = torch.randint(-(2**31), 2**31, (50000,), generator=g, dtype=torch.int64)
    small = torch.randint(0, 2**31, (20000,), generator=g, dtype=torch.int64) & 0x387FFFFF
    all_bits = torch.cat([torch.tensor(bits, dtype=torch.int64), rand_bits, small])
    all_bits = torch.where(all_bits >= 2**31, all_bits - 2**32, all_bits)
    return all_bits.to(torch.int32).view(torch.float32)


def _assert_same_bits(got, want):
    gnan, wnan = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(gnan, wnan)
    keep = ~wnan
    bad = (got[keep].view(torch.int16) != want[keep].view(torch.int16)).nonzero()
    assert bad.numel() == 0, (
        f"{bad.numel()} mismatches, e.g. {want.float()[keep][bad[:5, 0]].tolist()} -> "
        f"{got[keep][bad[:5, 0]].float().tolist()} (want "
        f"{want[keep][bad[:5, 0]].float().tolist()})")


def _sgd_copy(param, out=None):
    """lr=0, zero gradient: the param is rewritten unchanged and model_out gets it."""
    n = param.numel()
    T.sgd_step_(param, torch.zeros(n, device=DEV), None, out, grad_mult=_scalar(1.0),
                found_inf=_scalar(0.0), lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0,
                nesterov=False, maximize=False, first_step=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_out_rounding_matches_torch_on_edge_values(dtype):
    x = _edge_fp32_values().to(DEV)
    out = torch.empty(x.numel(), dtype=dtype, device=DEV)
    _sgd_copy(x.clone(), out)
    _assert_same_bits(out.cpu(), x.cpu().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_params_round_trip_every_bit_pattern(dtype):
    """Loading a half param to fp32 and storing it back is exact for all 65536 patterns
    (subnormals included: the interpreter's own bf16 conversion gets those wrong)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    param = bits.view(dtype).to(DEV)
    got = param.clone()
    _sgd_copy(got)
    _assert_same_bits(got.cpu(), param.cpu())
    # and the fp32 values seen by the kernel are torch's: accumulate a bf16/fp16 grad
    acc = torch.zeros(param.numel(), device=DEV)
    T.accumulate_(acc, param, 1.0)
    want = param.float()
    assert torch.equal(torch.isnan(acc), torch.isnan(want))
    assert torch.equal(acc[~torch.isnan(want)], want[~torch.isnan(want)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adamw_half_param_update_rounds_like_torch(dtype):
    """A half param updated in place equals the fp32 update rounded by torch."""
    n = 4099
    param = _rand(n, dtype, seed=50)
    master = param.float()
    acc = _rand(n, seed=51)
    m, v = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    kw = dict(grad_mult=_scalar(1.0), found_inf=_scalar(0.0), lr=1e-2, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, step=1)
    T.adamw_step_(master, acc.clone(), m.clone(), v.clone(), **kw)
    T.adamw_step_(param, acc.clone(), m.clone(), v.clone(), **kw)
    mismatch = (param != master.to(dtype)).sum().item()
    # fp32 results may differ from the reference by an ulp, which can flip a rounding
    assert mismatch <= n // 1000, mismatch


# ---------------------------------------------------------------------------------------
# empty tensors, non-finite values, found-inf, scalar arguments
# ---------------------------------------------------------------------------------------


def test_empty_tensors():
    e = torch.empty(0, device=DEV)
    assert T.accumulate_(e, torch.empty(0, dtype=torch.float16, device=DEV), 2.0) is None
    for norm_type in (2.0, math.inf):
        stat = T.accumulate_(e, torch.empty(0, device=DEV), norm_type=norm_type)
        assert stat.shape == () and stat.item() == 0.0
        assert T.grad_norm([e, e], norm_type).item() == 0.0
    T.adamw_step_(e, e.clone(), e.clone(), e.clone(), e.clone(),
                  torch.empty(0, dtype=torch.bfloat16, device=DEV), grad_mult=_scalar(1.0),
                  found_inf=_scalar(0.0), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.1, step=1, amsgrad=True)
    T.sgd_step_(e, e.clone(), e.clone(), None, grad_mult=_scalar(1.0), found_inf=_scalar(0.0),
                lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first_step=True)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_grad_norm_nonfinite_in_any_tensor(norm_type):
    ts = [_rand(n, seed=60 + n) for n in (100, 70000, 3)]
    ts[2][1] = -math.inf
    assert T.grad_norm(ts, norm_type).item() == math.inf
    ts[1][69999] = math.nan
    assert torch.isnan(T.grad_norm(ts, norm_type))


def test_huge_finite_values_overflow_like_the_reference():
    t = torch.full((10,), 3e38, device=DEV)
    assert T.grad_norm([t], 2.0).item() == reference.grad_norm([t], 2.0).item() == math.inf
    assert T.grad_norm([t], math.inf).item() == pytest.approx(3e38)


@pytest.mark.parametrize("found_inf", [1.0, math.nan, math.inf, -2.0])
def test_found_inf_any_nonzero_value_skips(found_inf):
    n = 1000
    param, acc, buf = _rand(n, seed=70), _rand(n, seed=71), _rand(n, seed=72)
    out = torch.full((n,), math.nan, dtype=torch.bfloat16, device=DEV)
    p0, b0 = param.clone(), buf.clone()
    T.sgd_step_(param, acc, buf, out, grad_mult=_scalar(1.0), found_inf=_scalar(found_inf),
                lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first_step=False)
    assert torch.equal(param, p0) and torch.equal(buf, b0) and torch.isnan(out.float()).all()
    assert torch.count_nonzero(acc) == 0


def test_keep_acc_when_zero_acc_false():
    n = 1000
    param, acc = _rand(n, seed=73), _rand(n, seed=74)
    a0 = acc.clone()
    for skip in (0.0, 1.0):
        T.sgd_step_(param, acc, None, None, grad_mult=_scalar(1.0), found_inf=_scalar(skip),
                    lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False, first_step=False, zero_acc=False)
        assert torch.equal(acc, a0)


def test_scalar_arguments_as_numbers_or_one_element_tensors():
    """GradScaler-style found_inf of shape [1]; plain-number grad_mult."""
    n = 777
    param, acc = _rand(n, seed=80), _rand(n, seed=81)
    m, v = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=1)
    want = [param.clone(), acc.clone(), m.clone(), v.clone()]
    reference.adamw_step_(*want, grad_mult=_scalar(0.5), found_inf=_scalar(0.0), **kw)
    got = [param.clone(), acc.clone(), m.clone(), v.clone()]
    T.adamw_step_(*got, grad_mult=0.5, found_inf=torch.zeros(1, device=DEV), **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one-element"):
        T.adamw_step_(*got, grad_mult=torch.ones(2, device=DEV), found_inf=0.0, **kw)


@pytest.mark.parametrize("beta1,step", [(0.3, 1), (0.0, 5), (0.5, 2), (0.95, 100)])
def test_adamw_both_lerp_formulas_match_reference(beta1, step):
    """torch's lerp switches formula at weight 0.5 (weight = 1 - beta1)."""
    n = 3001
    param, acc = _rand(n, seed=95), _rand(n, seed=96, scale=2.0)
    m, v, vmax = (_rand(n, seed=97 + i).abs() for i in range(3))
    kw = dict(grad_mult=_scalar(0.3), found_inf=_scalar(0.0), lr=3e-3, beta1=beta1,
              beta2=0.98, eps=1e-6, weight_decay=0.02, step=step, amsgrad=True)
    want = [t.clone() for t in (param, acc, m, v, vmax)]
    reference.adamw_step_(*want, **kw)
    got = [t.clone() for t in (param, acc, m, v, vmax)]
    T.adamw_step_(*got, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_mutated_tensors_bump_their_version_counter():
    """The wrapper detects in-place changes of accumulators through ``_version``."""
    acc, grad = _rand(100, seed=98), _rand(100, torch.float16, seed=99)
    v0 = acc._version
    T.accumulate_(acc, grad)
    T.accumulate_(acc, grad, norm_type=2.0)
    assert acc._version > v0
    param = _rand(100, seed=100)
    p0 = param._version
    _sgd_copy(param)
    assert param._version > p0


def test_bad_norm_type_fails_before_acc_changes():
    acc = _rand(10, seed=90)
    a0 = acc.clone()
    with pytest.raises(ValueError, match="norm_type"):
        T.accumulate_(acc, torch.ones(10, device=DEV), norm_type=1.0)
    assert torch.equal(acc, a0)
    with pytest.raises(ValueError, match="norm_type"):
        T.grad_norm([acc], 3.0)


# ---------------------------------------------------------------------------------------
# where it runs, and why not
# ---------------------------------------------------------------------------------------


def test_unavailable_reason_here():
    assert T.unavailable_reason("triton", None) is None
    assert T.unavailable_reason("triton", torch.device(DEV)) is None
    assert ops.unavailable_reason("triton", DEV) is None
    why = T.unavailable_reason("triton", torch.device("meta"))
    assert isinstance(why, str) and "meta" in why


def _run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value, mode", [(None, "auto"), ("jit", "jit"), ("direct", "direct"),
                                         ("cxx", "cxx"), (" cxx ", "cxx"), ("auto", "auto"),
                                         ("", "auto")])
def test_launch_mode_from_the_environment(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("FUSEDACCUM_TRITON_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("FUSEDACCUM_TRITON_LAUNCH", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T._launch_from_env() == mode


@pytest.mark.parametrize("value", ["CXX", "fast", "jit,cxx"])
def test_launch_mode_the_environment_misspells_warns_and_is_the_default(monkeypatch, value):
    monkeypatch.setenv("FUSEDACCUM_TRITON_LAUNCH", value)
    with pytest.warns(RuntimeWarning, match=f"FUSEDACCUM_TRITON_LAUNCH={value!r} is not one"):
        assert T._launch_from_env() == "auto"


def test_launch_summary_says_where_flushes_launch(monkeypatch):
    """`python -m fusedaccum info`'s line: "auto" and "cxx" launch from C++ only with the
    C++ hook on, a CUDA build and no refusal; else "auto" is "direct", and "cxx" warns."""
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    for mode in ("auto", "cxx"):
        monkeypatch.setattr(T, "_LAUNCH", mode)
        assert "from the C++ hook" in T.launch_summary(True, True)
        for hooks_on, cuda_build, why in ((False, True, "hook is off"),
                                          (True, False, "without CUDA")):
            line = T.launch_summary(hooks_on, cuda_build)
            assert line.startswith(f"'{mode}'") and why in line, line
            assert ("'direct' from Python" in line) is (mode == "auto"), line
    monkeypatch.setattr(T, "_CXX_REFUSED", ["its arguments are ..."])
    assert "refused: its arguments are" in T.launch_summary(True, True)
    for mode in ("jit", "direct"):
        monkeypatch.setattr(T, "_LAUNCH", mode)
        assert T.launch_summary(True, True).startswith(f"'{mode}'")


def test_launch_mode_the_environment_sets_is_the_modules():
    """FUSEDACCUM_TRITON_LAUNCH set before the import is the mode every flush reads
    (_LAUNCH, also read by csrc/hooks.cpp)."""
    res = _run_python("""
        from fusedaccum.ops import triton as T
        print(T._LAUNCH)
    """, FUSEDACCUM_TRITON_LAUNCH="jit", TRITON_INTERPRET="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().split("\n")[-1] == "jit"


def test_flush_kernel_compiled_for_sm90_is_one_the_cpp_launch_takes():
    """The real _accumulate_many_kernel compiled by this Triton for an H100 (sm_90; Triton
    compiles without a GPU): its signature is the one Triton's JIT derives for a flush's
    arguments (checked by hand for Triton 3.6 and 3.9: n_tensors and the table's alignment
    are not specialized) and its metadata asks for nothing csrc/cuda/triton_launch.cu does
    not set up, so _cxx_spec takes it (with the function handle a GPU would load). A
    Triton that changes the launch fails here, on CPU, before a GPU session."""
    res = _run_with_compile_many("""
        for warps, kind in ((4, 2), (8, 1)):
            k = compile_many(90, kind, 2048, warps)
            assert k.function is None  # (not loaded: no GPU needed)
            # the kernel's ABI: csrc/cuda/triton_launch.cu passes exactly these
            assert T._ptx_params(k.asm["ptx"]) == [".u64", ".u32", ".f32", ".u64", ".u64"]
            k.function = 0x7f0012
            print(T._cxx_spec(k))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    specs = [ast.literal_eval(line) for line in res.stdout.strip().split("\n")]
    assert [s[:2] for s in specs] == [(0x7f0012, 4), (0x7f0012, 8)], res.stdout
    assert all(0 <= s[2] <= 228 * 1024 for s in specs)


def test_module_imports_without_triton():
    res = _run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch
        from fusedaccum.ops import triton as T
        why = T.unavailable_reason("triton", None)
        assert "triton is not installed" in why, why
        assert T.unavailable_reason("triton", torch.device("cpu")) == why
        import fusedaccum
        assert "triton is not installed" in fusedaccum.available_backends()["triton"]
        try:
            fusedaccum.ops.accumulate_(torch.zeros(3), torch.zeros(3), backend="triton")
        except RuntimeError as exc:
            assert "triton is not installed" in str(exc)
        else:
            raise AssertionError("expected RuntimeError")
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_interpreter_and_gpu_says_how_to_run():
    res = _run_python("""
        import os, torch
        from fusedaccum.ops import triton as T
        why = T.unavailable_reason("triton", None)
        assert "TRITON_INTERPRET=1" in why and "no CUDA device" in why, why
        assert "TRITON_INTERPRET=1" in T.unavailable_reason("triton", torch.device("cpu"))
        os.environ["TRITON_INTERPRET"] = "1"  # too late: triton read it at import
        assert "was not when" in T.unavailable_reason("triton", torch.device("cpu"))
        print("ok")
    """)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


_TRITON_OP_SCRIPT = textwrap.dedent("""
    import torch
    from fusedaccum.ops import reference as R, triton as T

    assert T._TRITON_OP
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)

    def rand(n, dtype=torch.float32):
        return torch.randn(n, generator=g).to(dtype).to(dev)

    F = torch.ops.fusedaccum
    for n in (1, 1023, 4097):
        acc, grad = rand(n), rand(n, torch.bfloat16)
        a1, a2 = acc.clone(), acc.clone()
        F.triton_accumulate_(a1, grad, 0.5, False)
        R.accumulate_(a2, grad, 0.5)
        assert torch.equal(a1, a2)
        stat = F.triton_accumulate_norm_(a1, grad, 0.5, False, 2.0)
        R.accumulate_(a2, grad, 0.5)
        torch.testing.assert_close(stat, a2.square().sum())
        torch.testing.assert_close(F.triton_grad_norm([a1, acc], float("inf")),
                                   torch.cat([a1, acc]).abs().max())
        p, m, v = rand(n), rand(n).abs() * 0.1, rand(n).abs() * 0.1
        out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=dev)
        gm, fi = torch.tensor(0.5, device=dev), torch.tensor(0.0, device=dev)
        want = [p.clone(), a1.clone(), m.clone(), v.clone()]
        F.triton_adamw_step_(p, a1, m, v, None, out, gm, fi, 1e-3, 0.9, 0.999, 1e-8, 0.1, 3,
                             True, False, False, True)
        R.adamw_step_(*want, None, None, grad_mult=gm, found_inf=fi, lr=1e-3, beta1=0.9,
                      beta2=0.999, eps=1e-8, weight_decay=0.1, step=3)
        for got, w in zip((p, a1, m, v), want):
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
        assert torch.equal(out, p.to(torch.bfloat16))
        acc, buf = rand(n), rand(n)
        want = [p.clone(), acc.clone(), buf.clone()]
        F.triton_sgd_step_(p, acc, buf, None, gm, fi, 0.1, 0.9, 0.1, 0.01, True, False, False,
                           True)
        R.sgd_step_(*want, None, grad_mult=gm, found_inf=fi, lr=0.1, momentum=0.9,
                    dampening=0.1, weight_decay=0.01, nesterov=True, maximize=False,
                    first_step=False, trusted=True)  # (nesterov with dampening: unchecked)
        for got, w in zip((p, acc, buf), want):
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    print("ok")
""")


@pytest.mark.parametrize("value, on_gpu, interpreted, want", [
    (None, True, False, True), (None, True, True, False), (None, False, True, False),
    ("0", True, False, False), (" 1 ", False, True, True), ("", True, False, True),
])
def test_triton_op_registration_follows_the_environment(monkeypatch, value, on_gpu,
                                                        interpreted, want):
    """README "Backends", FUSEDACCUM_TRITON_OP: ``1``/``0`` force torch.library.triton_op
    or the opaque custom_op; unset (or empty), triton_op on a GPU, custom_op under the
    interpreter (where triton_op fails opcheck)."""
    # this process's registration (made at import, with this process's environment)
    forced = os.environ.get("FUSEDACCUM_TRITON_OP", "").strip()
    here = forced == "1" if forced in ("0", "1") else (
        DEV == "cuda" and not T._INTERPRETED and hasattr(torch.library, "triton_op"))
    assert T._TRITON_OP is here
    if value is None:
        monkeypatch.delenv("FUSEDACCUM_TRITON_OP", raising=False)
    else:
        monkeypatch.setenv("FUSEDACCUM_TRITON_OP", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    monkeypatch.setattr(T, "_INTERPRETED", interpreted)
    assert T._use_triton_op() is want


def test_ops_registered_as_triton_op_compute_the_same():
    """On a GPU the ops are torch.library.triton_op (inductor sees the kernels); here,
    under the interpreter, they are custom_op + fake (triton_op fails opcheck there).
    FUSEDACCUM_TRITON_OP=1 forces the triton_op registration: called eagerly through
    torch.ops, every op must still match the reference."""
    env = dict(os.environ, FUSEDACCUM_TRITON_OP="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_OP_SCRIPT], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@triton.jit
def _fma_probe(a_ptr, b_ptr, c_ptr, out_ptr, n, EMULATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    out = T._fma(tl.load(a_ptr + offs, mask=mask, other=0.0),
                 tl.load(b_ptr + offs, mask=mask, other=0.0),
                 tl.load(c_ptr + offs, mask=mask, other=0.0), EMULATE)
    tl.store(out_ptr + offs, out, mask=mask)


@pytest.mark.parametrize("emulate", [True, False] if DEV == "cuda" else [True])
def test_fma_rounds_once(emulate):
    """T._fma is a multiply-add rounded once, also where fp64 then fp32 would round twice
    (the interpreter's path: two-sum and round-to-odd), with inf, NaN, overflow and exact
    zeros as an FMA gives them; random cases against torch's own fused addcmul on CPU."""
    u = 2.0 ** -23
    cases = [  # (a, b, c, a * b + c rounded once)
        # (1 + u)(1 - u) = 1 - 2^-46: the sum lies just below the fp32 midpoint 2^24 + 3,
        # which fp64 rounds onto; ties-to-even would then give 2^24 + 4
        (1 + u, 1 - u, 2.0 ** 24 + 2, 2.0 ** 24 + 2),
        (-(1 + u), 1 - u, -(2.0 ** 24 + 2), -(2.0 ** 24 + 2)),
        (1 + u, 1 + u, 2.0 ** 24 + 1 - 1, 2.0 ** 24 + 2),  # just above 2^24 + 1: up
        (2.0, 3.0, -6.0, 0.0),
        (float("inf"), 1.0, 1.0, float("inf")),
        (float("inf"), 0.0, 1.0, float("nan")),
        (1.0, 1.0, float("nan"), float("nan")),
        (3e38, 2.0, 0.0, float("inf")),
        (1e-30, 1e-10, 0.0, 1e-40),  # an fp32 subnormal result
    ]
    a, b, c, want = (torch.tensor([x[i] for x in cases], dtype=torch.float32)
                     for i in range(4))
    g = torch.Generator().manual_seed(80)
    r = [torch.randn(4096, generator=g) for _ in range(3)]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        a, b, c = (torch.cat([x, y]) for x, y in zip((a, b, c), r))
        want = torch.cat([want, torch.addcmul(r[2], r[0], r[1])])  # vec::fmadd there
    out = torch.full_like(a, 7.0)
    n = a.numel()
    _fma_probe[(1,)](a.to(DEV), b.to(DEV), c.to(DEV), out_dev := out.to(DEV), n,
                     EMULATE=emulate, BLOCK=triton.next_power_of_2(n))
    got = out_dev.cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# launch plumbing: blocks, flush tables, uploads, GPU-only branches through stand-ins
# ---------------------------------------------------------------------------------------
def test_each_kernel_launches_with_its_own_block(distinct_blocks, monkeypatch):
    """Every launch passes its own kernel's BLOCK (and the finishing program its own,
    which fixes the order of the partials' fold): grad_norm, accumulate_ with its
    statistic, accumulate_many_ and both steps, with a different block per kernel."""
    seen = {}
    run = T._run

    def recording(kernel, grid, args, consts, warps, *rest, **kw):
        name = getattr(kernel, "fn", kernel).__name__
        seen.setdefault(name, set()).add(consts["BLOCK"])
        return run(kernel, grid, args, consts, warps, *rest, **kw)

    monkeypatch.setattr(T, "_run", recording)
    ts = [_rand(n, seed=150 + i) for i, n in enumerate((5000, 63))]
    T.grad_norm(ts, 2.0)
    T.accumulate_(ts[0], ts[0].clone(), 0.5, norm_type=math.inf)
    T.accumulate_many_(ts, [t.clone() for t in ts], 0.5)
    p, acc, m, v = (_rand(300, seed=160 + i).abs() for i in range(4))
    T.adamw_step_(p, acc, m, v, grad_mult=_scalar(1.0), found_inf=_scalar(0.0), lr=1e-3,
                  beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1)
    T.sgd_step_(p, acc, None, None, grad_mult=_scalar(1.0), found_inf=_scalar(0.0), lr=0.1,
                momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first_step=False)
    b = distinct_blocks
    assert seen == {"_norm_partials_kernel": {b["norm"]}, "_finish_kernel": {b["finish"]},
                    "_accumulate_kernel": {b["accumulate"]},
                    "_accumulate_many_kernel": {b["accumulate"]},
                    "_adamw_kernel": {b["adamw"]}, "_sgd_kernel": {b["sgd"]}}


def test_launch_switches_to_a_gpu_that_is_not_the_current_one(monkeypatch):
    """_device_of on GPU tensors, without a GPU (a stand-in tensor on cuda:0 and cuda:1,
    cuda:0 current): no switch for the current device, torch.cuda.device of the tensor's
    own for another."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    class OnDevice:
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    assert T._device_of(OnDevice(0)) is T._NO_SWITCH
    switch = T._device_of(OnDevice(1))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1


def test_table_flush_on_a_gpu_without_the_interpreter(monkeypatch):
    """What the C++ hook gets for a GPU when the kernels are compiled (not interpreted):
    the table launcher, the accumulate kernel's GPU block and the grad dtype's kind; None
    for a dtype the kernels do not store, and under the interpreter (which cannot read a
    GPU table)."""
    monkeypatch.setattr(T, "_INTERPRETED", False)
    cuda = torch.device("cuda", 0)
    block = T._GPU_CONFIG["accumulate"][0]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert T.table_flush(cuda, dtype) == (T._launch_table, block, T._KIND[dtype])
    assert T.table_flush(cuda, torch.float64) is None
    monkeypatch.setattr(T, "_INTERPRETED", True)
    assert T.table_flush(cuda, torch.bfloat16) is None


@pytest.mark.parametrize("sizes", [[0], [0, 0], [0, 5, 9], [0, 5, 0, 9], [5, 0, 9, 0]])
def test_flush_table_has_a_row_for_each_non_empty_pair_only(sizes):
    """_many_table: empty pairs get no row wherever they are (first included), so the
    block starts strictly increase and a batch of only empty pairs is no table at all;
    the overwrite flags stay with their pairs (a negated numel)."""
    block = 4
    accs = [torch.zeros(n) for n in sizes]
    grads = [torch.ones(n, dtype=torch.bfloat16) for n in sizes]
    flags = [i % 2 for i in range(len(sizes))]
    entries, count, grid = T._many_table(accs, grads, block, flags)
    kept = [i for i, n in enumerate(sizes) if n]
    assert count == len(kept) and grid == sum(-(-sizes[i] // block) for i in kept)
    if not kept:
        assert entries == []
        return
    assert entries[:count] == [accs[i].data_ptr() for i in kept]
    assert entries[count:2 * count] == [grads[i].data_ptr() for i in kept]
    assert entries[2 * count:3 * count] == [-sizes[i] if flags[i] else sizes[i] for i in kept]
    starts = entries[3 * count:]
    assert starts[0] == 0 and starts[-1] == grid and len(starts) == count + 1
    assert all(a < b for a, b in zip(starts, starts[1:]))


def test_gpu_flushes_register_for_cpp_quietly_only_for_auto(monkeypatch):
    """A flush of a GPU table (a stand-in on cuda:0) hands its compiled kernel to
    _register_cxx in "auto" (quietly: a refusal leaves it "direct") and "cxx" (a refusal
    warns), and not at all in "direct" or "jit"."""
    _fresh_launch_state(monkeypatch, _RecordingKernel())
    registered = []
    monkeypatch.setattr(T, "_CXX_REFUSED", [])
    monkeypatch.setattr(T, "_register_cxx",
                        lambda *a, quiet=False: registered.append((a[1:], quiet)))

    class CudaTable:
        device = torch.device("cuda", 0)

    for mode in ("auto", "cxx", "direct", "jit"):
        T._launch_many_kernel(3, CudaTable(), 2, 0.5, 1, T._BF16, 1024, 4, mode)
    assert registered == [((0, 1, T._BF16, 1024), True), ((0, 1, T._BF16, 1024), False)]


def test_accumulate_many_uploads_its_table_as_asked(monkeypatch):
    """_launch_accumulate_many's ``upload`` overrides the module's mode for that flush:
    "cached" keeps the table, the default ("pageable") does not, and a mode that is not
    one fails before any launch."""
    monkeypatch.setattr(T, "_TABLE_CACHE", type(T._TABLE_CACHE)())
    monkeypatch.setattr(T, "_TABLE_UPLOAD", "pageable")
    accs = [_rand(n, seed=170 + i) for i, n in enumerate((5, 70))]
    grads = [_rand(n, torch.bfloat16, seed=180 + i) for i, n in enumerate((5, 70))]
    want = _per_pair(accs, grads, 0.5)
    T._launch_accumulate_many(accs, grads, 0.5, upload="cached")
    assert len(T._TABLE_CACHE) == 1
    T._launch_accumulate_many([a.clone() for a in accs], grads, 0.5)
    assert len(T._TABLE_CACHE) == 1
    with pytest.raises(ValueError, match="table upload mode"):
        T._launch_accumulate_many(accs, grads, 0.5, upload="nope")
    for got, w in zip(accs, want):
        assert torch.equal(got, w)


def test_steps_leave_an_unused_state_buffer_alone_version_included():
    """A state buffer the step does not use (SGD's momentum_buffer with momentum=0,
    AdamW's max_exp_avg_sq without amsgrad) is neither written nor has its version
    counter bumped (the wrapper reads in-place changes from ``_version``)."""
    n = 100
    param, acc, buf = _rand(n, seed=190), _rand(n, seed=191), _rand(n, seed=192)
    b0, v0, p0 = buf.clone(), buf._version, param._version
    T.sgd_step_(param, acc, buf, None, grad_mult=_scalar(1.0), found_inf=_scalar(0.0), lr=0.1,
                momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first_step=False)
    assert param._version > p0 and buf._version == v0 and torch.equal(buf, b0)
    m, v = _rand(n, seed=193).abs(), _rand(n, seed=194).abs()
    T.adamw_step_(param, _rand(n, seed=195), m, v, buf, grad_mult=_scalar(1.0),
                  found_inf=_scalar(0.0), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0, step=1, amsgrad=False)
    assert buf._version == v0 and torch.equal(buf, b0)


def test_interpreter_flushes_gpu_pairs_one_by_one_with_their_flags(monkeypatch):
    """Under the interpreter a table of GPU addresses cannot be read: accumulate_many_
    on tensors off the CPU (stand-ins on the meta device here) runs accumulate_ per pair,
    each with its own overwrite flag, and no table launch."""
    monkeypatch.setattr(T, "_INTERPRETED", True)
    calls = []
    monkeypatch.setattr(T, "_launch_accumulate", lambda *a: calls.append(a))
    monkeypatch.setattr(T, "_launch_table", lambda *a, **k: pytest.fail("a table launch"))
    accs = [torch.empty(n, device="meta") for n in (3, 5, 7)]
    grads = [torch.empty(n, dtype=torch.bfloat16, device="meta") for n in (3, 5, 7)]
    T._launch_accumulate_many(accs, grads, 0.5, [1, 0, 1])
    assert [(c[0], c[1], c[2], c[3], c[4]) for c in calls] == [
        (accs[0], grads[0], 0.5, True, T._NORM_NONE), (accs[1], grads[1], 0.5, False, T._NORM_NONE),
        (accs[2], grads[2], 0.5, True, T._NORM_NONE)]
    calls.clear()
    T._launch_accumulate_many(accs, grads, 0.5)
    assert [c[3] for c in calls] == [False, False, False]


def test_cached_flush_tables_are_per_device(monkeypatch):
    """upload "cached": the same entries on another device are another table (a table's
    addresses are only valid on its own device; a stand-in second device without a GPU)."""
    monkeypatch.setattr(T, "_TABLE_CACHE", type(T._TABLE_CACHE)())
    a = T._upload_table([1, 2, 3], torch.device("cpu"), "cached")
    b = T._upload_table([1, 2, 3], torch.device("meta"), "cached")
    assert b is not a and len(T._TABLE_CACHE) == 2
    assert T._upload_table([1, 2, 3], torch.device("cpu"), "cached") is a


def test_forget_cxx_undoes_registrations_and_refusals(monkeypatch):
    """_forget_cxx: the C++ side's registrations cleared first, then the kernels kept here
    and any refusal, so that the next launches register anew."""
    from fusedaccum.ops import native

    cleared = []
    hooks = types.SimpleNamespace(clear_triton_kernels=lambda: cleared.append(True))
    monkeypatch.setattr(native, "hooks_module", lambda load=True: hooks)
    monkeypatch.setattr(T, "_CXX_KERNELS", {(0, 2, 3, 1024): object()})
    monkeypatch.setattr(T, "_CXX_REFUSED", ["the extension was built without CUDA"])
    T._forget_cxx()
    assert cleared == [True] and T._CXX_KERNELS == {} and T._CXX_REFUSED == []


def test_unavailable_reason_for_cuda_without_cuda(monkeypatch):
    """A CUDA device where torch has no CUDA: a reason that says so (not None)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = T.unavailable_reason("triton", torch.device("cuda"))
    assert isinstance(why, str) and "CUDA is not available" in why


def test_accumulate_many_stays_opaque_where_the_ops_are_triton_op():
    """FUSEDACCUM_TRITON_OP=1 makes the ops triton_op, but accumulate_many_ (a host-side
    table of data pointers) stays an opaque custom_op with its fake: traced on fake
    tensors it reads no data pointer."""
    res = _run_python("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fusedaccum.ops import triton as T
        assert T._TRITON_OP
        with FakeTensorMode():
            accs, grads = [torch.zeros(5), torch.zeros(7)], [torch.ones(5), torch.ones(7)]
            torch.ops.fusedaccum.triton_accumulate_many_(accs, grads, 0.5, [1, 0])
        print("ok")
    """, FUSEDACCUM_TRITON_OP="1", TRITON_INTERPRET="1")
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_accumulate_many_op_keeps_the_overwrite_flags():
    """torch.ops.fusedaccum.triton_accumulate_many_ (what a compiled graph calls) honours
    each pair's overwrite flag as the eager op does; an empty list means none."""
    sizes = (5, 3000, 1)
    accs = [_rand(n, seed=200 + i) for i, n in enumerate(sizes)]
    grads = [_rand(n, torch.bfloat16, seed=210 + i) for i, n in enumerate(sizes)]
    for flags in ([1, 0, 1], []):
        want = [a.clone() for a in accs]
        reference.accumulate_many_(want, grads, 0.5, overwrite=flags or None)
        got = [a.clone() for a in accs]
        torch.ops.fusedaccum.triton_accumulate_many_(got, grads, 0.5, flags)
        for g, w in zip(got, want):
            assert torch.equal(g, w), flags
