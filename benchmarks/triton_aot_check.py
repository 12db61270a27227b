"""Compile the recurrent conv step's Triton kernels for a GPU target, without a GPU.

The interpreter runs the kernels' arithmetic on a CPU but not Triton's GPU compiler, so a kernel
can pass every interpreted test and still fail to compile on a GPU (an unsupported operation, a
type the MMA does not take, a shape rule of ``tl.dot``, too much shared memory). Triton compiles
ahead of time for a named target with the ptxas it ships, so this script builds every variant the
launchers can ask for (each activation dtype, every constexpr switch, the committed GPU tiles) for
Hopper and Ampere and reports each one's shared memory. Usage::

    python benchmarks/triton_aot_check.py [--arch 90,80] [--quick]

``--quick`` (what the test suite runs, under a minute on one core) keeps four convolution
variants that between them take every switch, K loop and dot dtype.

Exit status 1 if any variant fails to compile. It must run without ``TRITON_INTERPRET=1``
(the interpreter replaces the kernels with plain Python functions).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# per-channel vectors and partial sums: the compute dtype (fp32 for every GPU activation dtype)
VECTOR_POINTERS = {"part_ptr", "mean_ptr", "var_ptr", "scale_ptr", "shift_ptr", "rstd_ptr", "gamma_ptr",
                   "sum_dy_ptr", "sum_dy_xhat_ptr"}
# --quick: each convolution kernel (the newest code) with the switches that add code, each K loop
# and each dot dtype once (fp16 takes bf16's path through tl.dot); the passes in the full run only
QUICK = ("conv3x3_fwd bf16 taps_in_k prologue=True", "conv3x3_fwd fp32 per_tap prologue=True",
         "conv3x3_wgrad bf16 per_tap prologue=True", "conv3x3_wgrad fp32 taps_in_k prologue=True")
ACTIVATIONS = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # dtype -> tl.dot input_precision


Variant = tuple[str, object, dict[str, object], dict[str, int]]


def _variants() -> Iterator[tuple[Variant, str]]:
    """((name, kernel, constexprs, launch options), activation dtype) for every variant the
    launchers launch on a GPU."""
    from r2unet_fast.ops.triton import conv3x3 as cv
    from r2unet_fast.ops.triton import recurrent_conv as rc
    from r2unet_fast.ops.triton import recurrent_conv_kernels as k
    from r2unet_fast.ops.triton.conv3x3_kernels import _conv3x3_fwd_kernel, _conv3x3_wgrad_kernel

    conv = cv.CONV_TILES["default"]
    wgrad = cv.WGRAD_TILES["default"]
    reduction = rc.REDUCTION_TILES["default"]
    pixel = rc.PIXEL_TILES[0]
    block_c = rc.CHANNEL_TILES["default"]["BLOCK_C"]
    for dtype, precision in ACTIVATIONS.items():
        dot = {"PRECISION": precision, "WIDEN": False}
        options = {"num_warps": conv["num_warps"], "num_stages": conv["num_stages"]}
        for flat, (prologue, feed, stats, bias) in itertools.product(
                (False, True), ((True, True, True, False), (False, False, True, True), (False, False, False, False))):
            yield (f"conv3x3_fwd {dtype} {'taps_in_k' if flat else 'per_tap'} prologue={prologue} stats={stats}",
                   _conv3x3_fwd_kernel, {"HAS_BIAS": bias, "PROLOGUE": prologue, "HAS_FEED": feed, "STATS": stats,
                                         "FLAT_K": flat, "BLOCK_M": conv["BLOCK_M"], "BLOCK_N": conv["BLOCK_N"],
                                         "BLOCK_K": conv["BLOCK_K"], **dot}, options), dtype
        for flat, prologue in itertools.product((False, True), (False, True)):
            yield (f"conv3x3_wgrad {dtype} {'taps_in_k' if flat else 'per_tap'} prologue={prologue}",
                   _conv3x3_wgrad_kernel, {"PROLOGUE": prologue, "FLAT_K": flat, "BLOCK_P": wgrad["BLOCK_P"],
                                           "BLOCK_N": wgrad["BLOCK_N"], "BLOCK_K": wgrad["BLOCK_K"], **dot},
                   {"num_warps": wgrad["num_warps"], "num_stages": wgrad["num_stages"]}), dtype
        fixed = {"num_warps": reduction["num_warps"], "num_stages": 2}
        free = {"num_warps": pixel["num_warps"], "num_stages": 2}
        for feed in (False, True):
            yield (f"add_stats {dtype} feed={feed}", k._add_stats_kernel,
                   {"HAS_FEED": feed, "BLOCK_M": reduction["BLOCK_M"], "BLOCK_C": block_c}, fixed), dtype
            for residual in (False, True):
                yield (f"bn_relu {dtype} feed={feed} residual={residual}", k._bn_relu_kernel,
                       {"HAS_FEED": feed, "HAS_RESIDUAL": residual, "BLOCK_M": pixel["BLOCK_M"], "BLOCK_C": block_c},
                       free), dtype
        yield (f"bwd_reduce {dtype}", k._bwd_reduce_kernel, {"BLOCK_M": reduction["BLOCK_M"], "BLOCK_C": block_c},
               fixed), dtype
        for write_ds, dfeed in ((True, False), (True, True), (False, True)):
            yield (f"bwd_apply {dtype} write_ds={write_ds} dfeed={dfeed}", k._bwd_apply_kernel,
                   {"WRITE_DS": write_ds, "HAS_DFEED": dfeed, "BLOCK_M": pixel["BLOCK_M"], "BLOCK_C": block_c},
                   free), dtype
    yield ("stats_merge", k._stats_merge_kernel, {"BLOCK_C": rc.MERGE_BLOCK_C}, {"num_warps": 4}), "fp32"
    yield ("sums_merge", k._sums_merge_kernel, {"BLOCK_C": rc.MERGE_BLOCK_C}, {"num_warps": 4}), "fp32"


def _signature(kernel, constexprs: dict[str, object], dtype: str) -> dict[str, str]:
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            if name not in constexprs:
                raise KeyError(f"{kernel.__name__}: no value for constexpr {name}")
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in VECTOR_POINTERS else f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    parser.add_argument("--quick", action="store_true", help="a variant of each kind only (see QUICK)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python functions", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for cc in (int(a) for a in args.arch.split(",")):
        for (name, kernel, constexprs, options), dtype in _variants():
            if args.quick and not name.startswith(QUICK):
                continue
            src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype), constexprs=constexprs)
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
            except Exception as e:  # report every variant, not just the first failure
                failures += 1
                print(f"sm_{cc} {name}: FAILED {type(e).__name__}: {str(e)[:2000]}")
                continue
            print(f"sm_{cc} {name}: ok, {compiled.metadata.shared} B shared memory")
    print(f"{failures} variant(s) failed" if failures else "every variant compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
