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
    assert not lock.exists() and "waiting for another process's build" in \
        capsys.readouterr().err
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
