"""Tile choice for the Triton kernels: committed configs per GPU architecture, else a default tile,
or autotuning when asked for.

Every kernel module keeps two tables and calls :func:`launch_config`:

- a reduction tile per architecture (``{"sm_90": {...}, "default": {...}}``) for kernels that
  reduce: its ``BLOCK_SIZE`` and ``num_warps`` fix the order of the floating-point sums, so
  they never come from autotuning (only ``num_stages`` may);
- committed tiles ``{(arch, kernel, numel_bucket, dtype): {...}}`` that skip autotuning for
  their key; ``benchmarks/gpu_report.py`` prints the winners in this form.

A key without a committed tile runs the kernel's default tile, unless :data:`AUTOTUNE` is on
(``R2UNET_FAST_AUTOTUNE=1``, or ``benchmarks/gpu_report.py --autotune``). Autotuning is opt-in
because its cost lands on the first training step: every config of every kernel is compiled
and timed once per key, and the model's many shapes and dtypes make that minutes on a GPU
(measured on an H200: one attention-gate test took 70 s under autotuning). Autotune keys are
power-of-two buckets of the per-image element count (:func:`bucket`), so a new image size
within a bucket reuses the tuned config instead of retuning.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton

from ..library import interpreting

Tile = dict[str, int]
CommittedKey = tuple[str, str, int, str]  # (arch, kernel, numel_bucket, dtype name)
INTERPRETER_ARCH = "interpreter"
# Read once: the launchers consult it under torch.compile, which guards on a module global.
AUTOTUNE: bool = os.environ.get("R2UNET_FAST_AUTOTUNE", "0") == "1"
__all__ = ["AUTOTUNE", "arch", "bucket", "dtype_name", "interpreting", "launch_config", "per_arch", "wrap", "PerArch"]


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def arch(device: torch.device) -> str:
    """``"sm_90"`` for an H100/H200, :data:`INTERPRETER_ARCH` for CPU tensors under the interpreter."""
    if device.type != "cuda":
        return INTERPRETER_ARCH
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def bucket(numel: int) -> int:
    """The autotune key for ``numel`` elements: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(int(numel), 1))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def per_arch(table: dict[str, Tile], arch_name: str) -> Tile:
    """``table[arch_name]``, else ``table["default"]``."""
    return dict(table.get(arch_name, table["default"]))


def launch_config(committed: dict[CommittedKey, Tile], key: CommittedKey, default: Tile,
                  fixed: Tile | None = None) -> Tile | None:
    """The tile to launch ``key`` with: the committed one, else ``default``, or None to autotune
    (only when :data:`AUTOTUNE` is on). ``fixed`` entries (a reduction tile) go on top; a committed
    tile that contradicts them is an error, not a silent override."""
    tile = committed.get(key)
    if tile is None:
        return None if AUTOTUNE else {**default, **(fixed or {})}
    for name, value in (fixed or {}).items():
        if tile.get(name, value) != value:
            raise ValueError(f"committed tile {key} sets {name}={tile[name]}, but the reduction order "
                             f"fixes {name}={value} on {key[0]}")
    return {**tile, **(fixed or {})}


def wrap(kernel: Callable) -> Callable:
    """``torch.library.wrap_triton(kernel)`` so torch.compile sees the launch inside a triton_op;
    the interpreter's kernels are plain Python functions and launch as they are."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)


class PerArch:
    """One Autotuner per GPU architecture for a kernel (its configs may depend on the
    architecture), made on first use; remembers them to report what they chose."""

    def __init__(self, name: str, make: Callable[[str], object]) -> None:
        self.name, self._make, self.tuners = name, make, {}

    def __call__(self, arch_name: str):
        if arch_name not in self.tuners:
            self.tuners[arch_name] = self._make(arch_name)
        return self.tuners[arch_name]

    def winners(self) -> list[dict[str, object]]:
        """Each choice so far (autotune keys are ``numel_bucket`` then the tensor dtypes, logits first)
        as ``{"arch", "numel_per_image", "dtype", "tile", "key"}``, ``key`` as TUNED_TILES takes it."""
        out = []
        for arch_name, tuner in self.tuners.items():
            for key, cfg in tuner.cache.items():
                dtype = str(key[1]).replace("torch.", "")
                tile = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                out.append({"arch": arch_name, "numel_per_image": key[0], "dtype": dtype, "tile": tile,
                            "key": (arch_name, self.name, key[0], dtype)})
        return out
