"""Builds the optional C++ CPU kernels (``r2unet_fast._C``) from ``csrc/``.

Install with ``pip install --no-build-isolation .`` so the extension compiles
against the torch already installed instead of a second torch pulled into an
isolated build environment. Set ``R2UNET_FAST_NO_EXT=1`` to skip it; the
package then runs on its reference and Triton backends.
"""
import os
from glob import glob

from setuptools import setup


def _extension_kwargs() -> dict:
    sources = sorted(glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("R2UNET_FAST_NO_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    ext = CppExtension(
        "r2unet_fast._C",
        sources,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
