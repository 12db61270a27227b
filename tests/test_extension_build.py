"""The C++ kernels without an install-time build (r2unet_fast/ops/extension.py).

A plain ``pip install .`` compiles nothing at install time; the kernels are compiled
on first use from the sources the package carries. The slow test runs that path for
real, in two processes at once against an empty cache; the others check the reasons
given when it cannot run, and that setup.py ships the sources.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r2unet_fast.ops import extension

REPO = Path(__file__).resolve().parents[1]

# Builds (or reuses) the kernels, checks they came from the first-use build, and runs the
# hybrid loss's cpu kernel, forward and backward, against the reference.
FIRST_USE = r"""
import os, time
import torch
import r2unet_fast
from r2unet_fast.ops import extension, hybrid_loss

start = time.monotonic()
report = r2unet_fast.available_backends(device="cpu")
assert report["cpu"] is None, report["cpu"]
module = extension.load_extension()
assert module.__file__.startswith(os.environ["R2UNET_FAST_CACHE"]), module.__file__
print(f"ready in {time.monotonic() - start:.1f} s from {module.__file__}")

x = torch.randn(3, 1, 17, 19, dtype=torch.float64)
t = (torch.rand_like(x) > 0.5).double()
grads = []
for backend in ("cpu", "reference"):
    xb = x.clone().requires_grad_()
    loss = hybrid_loss(xb, t, backend=backend)
    loss.backward()
    grads.append((loss.detach(), xb.grad))
torch.testing.assert_close(grads[0], grads[1])
print("cpu matches reference")
"""

NOTICE = "compiling the C++ kernels on first use"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, R2UNET_FAST_CACHE=str(cache), R2UNET_FAST_JIT="1", **extra)
    env.pop("R2UNET_FAST_NO_EXT", None)
    # This checkout's package, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_first_use_build_compiles_once_for_two_processes_then_is_reused(tmp_path):
    # Two processes that start together must not corrupt each other's build: one compiles,
    # the other waits for it, and both load the result.
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=_env(cache), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
        assert "cpu matches reference" in out
    notices = [line for _, err in outputs for line in err.splitlines() if NOTICE in line]
    assert len(notices) == 1, [err for _, err in outputs]

    (folder,) = (cache / "ext").iterdir()
    assert not (folder / "lock").exists(), "torch's baton file was left behind"

    # A later process loads the build without compiling or printing anything about it.
    again = subprocess.run([sys.executable, "-c", FIRST_USE], env=_env(cache), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "r2unet_fast:" not in again.stderr, again.stderr


def test_no_ext_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(extension.NO_EXT_ENV, "1")
    module, reason = extension.find()
    assert module is None and "R2UNET_FAST_NO_EXT=1" in reason


def test_missing_compiler_and_ninja_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv(extension.JIT_ENV, "1")
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja on PATH
    monkeypatch.setitem(sys.modules, "ninja", None)  # nor the ninja package
    module, reason = extension.find()
    assert module is None
    assert "no-such-compiler" in reason and "install g++" in reason, reason
    assert "ninja (`pip install ninja`)" in reason, reason
    assert not (tmp_path / "cache").exists(), "nothing may be written when nothing can be built"


def test_a_failed_build_is_reported_not_retried(monkeypatch, tmp_path):
    # Compiling takes minutes: a failure is remembered in the build folder, and its reason
    # names the error and the folder to delete for another try.
    monkeypatch.setenv(extension.JIT_ENV, "1")
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path))
    folder = extension.build_folder(extension.source_dir())
    folder.mkdir(parents=True)
    (folder / "failed.txt").write_text("[1/5] c++ ...\nbindings.cpp:3:10: fatal error: boom.h: No such file\n")
    module, reason = extension.find()
    assert module is None
    assert "fatal error: boom.h" in reason and f"delete {folder}" in reason, reason


def test_a_compile_error_is_named_and_remembered(monkeypatch, tmp_path):
    # A compiler that rejects every translation unit (and answers torch's version probes).
    calls = tmp_path / "calls"
    compiler = tmp_path / "refusing-c++"
    compiler.write_text("#!/bin/sh\n"
                        'case " $* " in *" -c "*) echo x >> "%s"; '
                        'echo "bindings.cpp:1:1: error: refused (test)" >&2; exit 1;; esac\n'
                        'exec c++ "$@"\n' % calls)
    compiler.chmod(0o755)
    monkeypatch.setenv(extension.JIT_ENV, "1")
    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MAX_JOBS", "1")
    module, reason = extension.find()
    assert module is None
    assert "error: refused (test)" in reason and "failed.txt" in reason, reason
    compiles = calls.read_text().count("x")
    assert compiles >= 1
    # The next process is told the same without compiling again.
    assert extension.find() == (None, reason)
    assert calls.read_text().count("x") == compiles


def test_cache_root_is_the_decode_cache_root(monkeypatch, tmp_path):
    from r2unet_fast.data.cache import default_cache_dir

    monkeypatch.setenv(extension.CACHE_ENV, str(tmp_path))
    assert extension.cache_root() == default_cache_dir() == tmp_path
    monkeypatch.delenv(extension.CACHE_ENV)
    assert extension.cache_root() == default_cache_dir()


def test_setup_ships_the_sources_in_the_package(tmp_path):
    # What a wheel gets: csrc/'s sources and headers as r2unet_fast/_csrc. Run on a copy of
    # the checkout, since setuptools writes an egg-info folder beside setup.py.
    tree = tmp_path / "tree"
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    for name in ("csrc", "r2unet_fast"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=tree,
                   env=dict(os.environ, R2UNET_FAST_NO_EXT="1"), check=True, capture_output=True)
    shipped = sorted(p.name for p in (tmp_path / "lib" / "r2unet_fast" / "_csrc").iterdir())
    expected = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h"))
    assert shipped == expected
