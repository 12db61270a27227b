"""Builds the C++ CPU kernels (``r2unet_fast._C``) from ``csrc/`` when torch is importable here.

- ``pip install .`` (build isolation on) builds in a fresh environment without
  torch: no module is compiled now. The sources are copied into the package as
  ``r2unet_fast/_csrc/``, and ``r2unet_fast.ops.extension`` compiles them on first
  use against the torch the package then runs with.
- ``pip install --no-build-isolation .`` compiles the module here, against the
  torch already installed, so first use has nothing to build.

Both builds take their flags from ``r2unet_fast/ops/cpp_build.py``. Set
``R2UNET_FAST_NO_EXT=1`` to skip the install-time build.
"""
import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# By path: the package itself (and torch) cannot be imported while it is being built.
CPP_BUILD = runpy.run_path(os.path.join(HERE, "r2unet_fast", "ops", "cpp_build.py"))


class BuildPyWithSources(build_py):
    """Also copies ``csrc/`` into the package (``r2unet_fast/_csrc``), so an installed copy
    can compile its kernels on first use. An editable install reads ``csrc/`` itself."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "r2unet_fast", "_csrc")
        self.mkpath(target)
        for path in CPP_BUILD["shipped_files"](CSRC):
            self.copy_file(str(path), os.path.join(target, path.name))


def _extension_kwargs() -> dict:
    sources = [os.path.relpath(p, HERE) for p in CPP_BUILD["sources"](CSRC)]
    if not sources or os.environ.get("R2UNET_FAST_NO_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build: no torch here, the first use compiles instead
        return {}
    ext = CppExtension(
        "r2unet_fast._C",
        sources,
        extra_compile_args=list(CPP_BUILD["EXTRA_COMPILE_ARGS"]),
        extra_link_args=list(CPP_BUILD["EXTRA_LINK_ARGS"]),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


_kwargs = _extension_kwargs()
_kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithSources
setup(**_kwargs)
