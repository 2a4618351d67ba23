"""A wheel carries the C++/CUDA sources, so a machine without a prebuilt extension can
compile it on first use; the loader finds them there."""

import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from fusedaccum.ops import native

ROOT = Path(__file__).resolve().parents[1]


def _csrc_files():
    return sorted(str(p.relative_to(ROOT / "csrc")) for p in (ROOT / "csrc").rglob("*")
                  if p.is_file() and p.suffix in (".cpp", ".cu", ".h", ".cuh"))


def test_wheel_carries_the_sources(tmp_path):
    # a copy without build products (a stale build/ would hide a missing copy step)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".*_cache", "bench"))
    # FUSEDACCUM_NATIVE=jit: no ahead-of-time extension (what pip's isolated build makes)
    env = dict(os.environ, FUSEDACCUM_NATIVE="jit")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("fusedaccum-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"fusedaccum/_csrc/{f}" for f in _csrc_files()}
    assert want and want <= names, sorted(want - names)
    assert not any(n.endswith(".so") for n in names)


def test_loader_prefers_the_wheels_copy(tmp_path):
    pkg = tmp_path / "site" / "fusedaccum"
    (pkg / "_csrc").mkdir(parents=True)
    assert native._find_csrc(pkg) == tmp_path / "site" / "csrc"  # neither has the sources
    (pkg / "_csrc" / "bindings.cpp").write_text("")
    assert native._find_csrc(pkg) == pkg / "_csrc"
    assert native._find_csrc(ROOT / "fusedaccum") == ROOT / "csrc"  # this checkout


_FALLBACK_SCRIPT = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fusedaccum import ops
    assert ops.resolve("auto", "cpu") == "reference"
    assert ops.available_backends()["cpu"] is not None
    ops.resolve("auto", "cpu")
said = [w for w in caught if "C++ extension is unavailable" in str(w.message)]
assert len(said) == 1, [str(w.message) for w in said]
assert said[0].filename == "<string>", said[0].filename  # this script's line, not ours
print(said[0].message)
"""


def test_a_failed_build_falls_back_and_says_so_once(tmp_path):
    """No ahead-of-time build and a compiler that does not work: 'auto' uses the reference
    backend and one RuntimeWarning says why and what would build the extension."""
    env = dict(os.environ, FUSEDACCUM_NATIVE="jit", CXX=str(tmp_path / "no-such-c++"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install --no-build-isolation -e ." in proc.stdout
    # the reason itself, not the compile commands that failed
    assert "no C++ compiler found" in proc.stdout and "no-such-c++" in proc.stdout


def test_a_build_lock_is_waited_for_and_removed_when_stale(tmp_path, monkeypatch, capsys):
    """torch's first-use build waits, forever and silently, for the lock file of a build
    running elsewhere, and an interrupted build (Ctrl-C) leaves its lock. The wait is
    ours instead: a line on stderr names the lock; a lock that goes (the other build
    finished) ends it; one older than any build is removed with a warning."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = native._build_folder("fusedaccum_native_cpu_locktest")
    assert folder.parent == tmp_path / "ext"  # (torch's folder, under TORCH_EXTENSIONS_DIR)
    native._check_build_lock(folder)  # no lock: nothing to say
    assert capsys.readouterr().err == ""
    lock = folder / "lock"
    lock.touch()  # another build, which finishes in 0.3 s
    threading.Timer(0.3, lock.unlink).start()
    native._check_build_lock(folder, poll_s=0.05)
    err = capsys.readouterr().err
    assert not lock.exists() and err.count("waiting for another process's build") == 1, err
    lock.touch()  # left by an interrupted build: removed once older than any build
    monkeypatch.setattr(native, "_STALE_LOCK_S", 0.3)
    with pytest.warns(RuntimeWarning, match="interrupted first-use build"):
        native._check_build_lock(folder, poll_s=0.05)
    assert not lock.exists()
    old = time.time() - 3600  # (an hour old: removed at once, with nothing on stderr)
    lock.touch()
    os.utime(lock, (old, old))
    capsys.readouterr()
    with pytest.warns(RuntimeWarning, match="60 minutes ago"):
        native._check_build_lock(folder, poll_s=0.05)
    assert not lock.exists() and capsys.readouterr().err == ""


def test_the_wait_for_a_build_lock_names_the_file_and_ends_at_15_minutes(tmp_path,
                                                                        monkeypatch, capsys):
    """README "Backends": the next build waits for the lock file an interrupted build
    left, says so on stderr naming the file to delete, and removes it itself once it is
    15 minutes old (the real limit: a 14-minute-old lock is waited for, with no warning;
    a 16-minute-old one is removed at once, with nothing on stderr)."""
    import warnings

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    folder = native._build_folder("fusedaccum_native_cpu_locktest15")
    lock = folder / "lock"
    lock.touch()
    young = time.time() - 14 * 60
    os.utime(lock, (young, young))
    threading.Timer(0.3, lock.unlink).start()  # (the other build finishes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a removal would warn)
        native._check_build_lock(folder, poll_s=0.05)
    err = capsys.readouterr().err
    assert f"its lock {lock} is" in err and "delete it" in err, err
    assert "removed at 15 minutes" in err, err
    lock.touch()
    old = time.time() - 16 * 60
    os.utime(lock, (old, old))
    # (a limit above 16 minutes would wait: the lock goes after 5 s, and no warning says so)
    threading.Timer(5.0, lambda: lock.unlink(missing_ok=True)).start()
    with pytest.warns(RuntimeWarning, match="16 minutes ago by an interrupted first-use build"):
        native._check_build_lock(folder, poll_s=0.05)
    assert not lock.exists() and capsys.readouterr().err == ""


def test_a_build_after_an_interrupted_one_compiles(tmp_path):
    """End to end: with the lock of an interrupted build in the cache (where torch's own
    build looks for it), the first-use build removes it and compiles, where it waited
    forever before."""
    # (no GPU visible: the CPU build only, whose name the script knows)
    env = dict(os.environ, FUSEDACCUM_NATIVE="jit", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               CUDA_VISIBLE_DEVICES="")
    script = """
import os, sys, time
from fusedaccum.ops import native
lock = native._build_folder(native._build_name(False)) / "lock"
lock.touch()
old = time.time() - native._STALE_LOCK_S - 60
os.utime(lock, (old, old))
import fusedaccum
print(fusedaccum.available_backends()["cpu"])
"""
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # (it waited forever)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "None", proc.stdout  # the cpu backend runs
    assert "interrupted first-use build" in proc.stderr
    # the build says it runs (a silent minute looks like a hang, and invites a Ctrl-C)
    assert "compiling the C++ extension on first use" in proc.stderr
    # ... once: the next process loads the cached build (README "Backends")
    def builds():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "ext").rglob("*.so")}

    built = builds()
    assert len(built) == 1, built
    again = subprocess.run([sys.executable, "-c", "import fusedaccum; "
                            "print(fusedaccum.available_backends()['cpu'])"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip() == "None", again.stderr[-3000:]
    assert "compiling" not in again.stderr, again.stderr[-3000:]
    assert builds() == built, "built again"


def test_first_use_build_finds_the_ninja_of_this_environment(tmp_path, monkeypatch):
    """A virtual environment's python run by its path (not activated) has the ninja that
    pip installed beside it, off PATH: the first-use build puts that folder on PATH."""
    from fusedaccum.ops import native

    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "ninja").write_text("")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin")
    native._tool_path()
    path = os.environ["PATH"].split(os.pathsep)
    assert path[0] == "/usr/bin" and str(bindir) in path
    monkeypatch.delenv("PATH")  # unset: the default search path stays searched
    native._tool_path()
    assert os.environ["PATH"].startswith(os.defpath + os.pathsep)
    assert str(bindir) in os.environ["PATH"].split(os.pathsep)


@pytest.mark.parametrize("var,value,says", [
    ("FUSEDACCUM_NATIVE", "disable", "FUSEDACCUM_NATIVE='disable' is not one of"),
    ("FUSEDACCUM_CPU_ISA", "AVX512", "fall back to baseline"),
])
def test_unknown_environment_values_are_named_in_a_warning(monkeypatch, var, value, says):
    from fusedaccum.ops import native

    monkeypatch.setenv(var, value)
    with pytest.warns(RuntimeWarning, match=says):
        native._load_uncached()


def _no_first_use_build(monkeypatch, tmp_path):
    """native._load_uncached() in this process without compiling anything: no compiler, no
    GPU (the CUDA build would start before the compiler is checked), a cache of its own;
    PATH, which it may extend, put back after."""
    import torch

    monkeypatch.setenv("PATH", os.environ.get("PATH", os.defpath))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("mode", ["", "1", "on", "true", "yes", "jit", "0", "off", "false", "no",
                                  " JIT ", "Off"])
def test_every_documented_native_mode_is_taken_without_a_warning(tmp_path, monkeypatch, mode):
    """FUSEDACCUM_NATIVE's documented values (any case, spaces around) warn of nothing; a
    missing compiler keeps the first-use build of "jit" from starting."""
    import warnings

    _no_first_use_build(monkeypatch, tmp_path)
    monkeypatch.setenv("FUSEDACCUM_NATIVE", mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native._load_uncached()
    assert [str(w.message) for w in caught if "FUSEDACCUM_NATIVE" in str(w.message)] == []


@pytest.mark.parametrize("mode", ["0", "off", "False", " no "])
def test_native_off_disables_the_extension_quietly(monkeypatch, mode):
    """FUSEDACCUM_NATIVE=0 (off, false, no): the cpu and cuda backends say that it turned them
    off, "auto" takes the reference backend on CPU tensors, and no warning says the
    extension is unavailable (the user asked for that)."""
    import warnings

    from fusedaccum import ops

    monkeypatch.setattr(native, "_state", None)  # (the loaded state comes back after)
    monkeypatch.setenv("FUSEDACCUM_NATIVE", mode)
    monkeypatch.delenv("FUSEDACCUM_BACKEND", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = native.unavailable_reason("cpu", None)
        assert ops.resolve("auto", "cpu") == "reference"
    assert why is not None and "disabled by FUSEDACCUM_NATIVE" in why, why
    assert [str(w.message) for w in caught] == []


def test_a_build_that_fails_to_load_is_named_in_the_reason(tmp_path, monkeypatch):
    """An ahead-of-time build that does not load (built against another torch) and no
    compiler for the first-use build: the reason names both, the broken file first."""
    import importlib.machinery

    pkg = tmp_path / "fusedaccum"
    pkg.mkdir()
    bad = pkg / f"_native{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    bad.write_bytes(b"not a shared library")
    monkeypatch.setattr(native, "_PKG_DIR", pkg)
    _no_first_use_build(monkeypatch, tmp_path)
    monkeypatch.delenv("FUSEDACCUM_NATIVE", raising=False)
    why = native._load_uncached().error
    assert why is not None and str(bad) in why and "failed to load" in why, why
    assert "no C++ compiler found" in why and why.index(str(bad)) < why.index("compiler"), why


def test_a_compiler_given_with_flags_or_a_launcher_is_found(monkeypatch):
    """CXX may hold a command line ("ccache g++", "c++ -fuse-ld=gold"), as torch's build
    takes it: the check for a compiler looks for its first word."""
    cxx = shutil.which("c++")
    if cxx is None or shutil.which("ninja") is None:
        pytest.skip("needs c++ and ninja on PATH")
    for value in (f"{cxx} -fdiagnostics-color=never", "c++", "  "):
        monkeypatch.setenv("CXX", value)
        assert native._missing_compiler() is None, value
    monkeypatch.setenv("CXX", "/nonexistent/c++ -O2")
    assert "/nonexistent/c++" in native._missing_compiler()


def test_a_failed_build_is_told_by_its_error_lines():
    """The reason for a first-use build that failed quotes the compiler's errors, not the
    compile commands and ninja's lines around them."""
    exc = RuntimeError("Error building extension 'fusedaccum_native_cpu_0'\n"
                       "[1/2] c++ -MMD -MF bindings.o.d -O3 -c bindings.cpp -o bindings.o\n"
                       "FAILED: bindings.o\n"
                       "c++ -MMD -MF bindings.o.d -O3 -c bindings.cpp -o bindings.o\n"
                       "bindings.cpp:12:3: error: 'foo' was not declared in this scope\n"
                       "ninja: build stopped: subcommand failed.\n")
    assert native._first_lines(exc) == \
        "bindings.cpp:12:3: error: 'foo' was not declared in this scope"


def test_hook_module_never_builds_the_extension_when_not_asked_to(monkeypatch):
    """hooks_module(load=False) (python -m fusedaccum info, the wrapper's hook choice) gives
    None where the extension is neither loaded nor built ahead of time: it does not
    compile it just for the hook."""
    def no_load():
        raise AssertionError("hooks_module(load=False) loaded (or compiled) the extension")

    monkeypatch.delenv("FUSEDACCUM_FAST_HOOKS", raising=False)
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_aot_library", lambda: None)
    monkeypatch.setattr(native, "_load", no_load)
    assert native.hooks_module(load=False) is None


def test_hook_module_does_not_build_for_the_hook_under_native_jit(monkeypatch):
    """FUSEDACCUM_NATIVE=jit skips the ahead-of-time build, so with it set an extension not
    loaded yet would be compiled: hooks_module(load=False) (wrapping with backend="triton",
    `info`) gives None then, as where no ahead-of-time build exists, instead of starting
    the first-use build just for the hook."""
    def no_load():
        raise AssertionError("hooks_module(load=False) loaded (or compiled) the extension")

    monkeypatch.delenv("FUSEDACCUM_FAST_HOOKS", raising=False)
    monkeypatch.setenv("FUSEDACCUM_NATIVE", "jit")
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_aot_library", lambda: native._PKG_DIR / "_native.so")
    monkeypatch.setattr(native, "_load", no_load)
    assert native.hooks_module(load=False) is None
