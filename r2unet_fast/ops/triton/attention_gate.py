"""Launchers of the fused attention gate (kernels and their scheme: :mod:`.attention_gate_kernels`).

``attention_gate_fwd`` (one launch) and ``attention_gate_bwd`` (four launches and three fixed-order
sums) take and return what ``r2unet_fast.ops.cpu``'s twins do; the tile tables below say which
tiles are committed per architecture and which are autotuned.
"""
from __future__ import annotations

import torch
import triton

from ..reference import compute_dtype
from . import tuning
from .attention_gate_kernels import _bwd_da_kernel, _bwd_dw_kernel, _bwd_dx_kernel, _fwd_kernel
from .hybrid_loss import MAX_GRID_1, PROGRAMS_PER_SM, _configs, _device_guard, _sm_count

# Channel blocks: BLOCK_K for the K loops over Cx and Cg (and the C blocks of the weight
# gradients), BLOCK_F for the F blocks. Each is clipped to the next power of two >= 16 of the
# channel count. They fix the order of every per-pixel sum, so they are never autotuned.
CHANNEL_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_K": 32, "BLOCK_F": 64}}
# The backward's first kernel writes per-tile partial sums: its pixel tile and warps fix their order.
REDUCTION_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_M": 64, "num_warps": 4}}
# The weight-gradient GEMM: BLOCK_P pixels per K step, fixed for the same reason.
WGRAD_TILES: dict[str, tuning.Tile] = {"default": {"BLOCK_P": 64, "num_warps": 4}}
# Per-pixel kernels (forward, dx/dg) tune their pixel tile freely. First entry: the default.
PIXEL_TILES: list[tuning.Tile] = [{"BLOCK_M": m, "num_warps": w} for m, w in
                                  ((64, 4), (128, 4), (128, 8), (32, 4), (256, 8))]
# Committed winners {(arch, kernel, bucket of Cx*H*W, dtype): tile}, kernel one of "fwd",
# "bwd_da", "bwd_dx", "bwd_dw"; none measured yet.
TUNED_TILES: dict[tuning.CommittedKey, tuning.Tile] = {}
MIN_DOT: int = 16  # tl.dot's smallest block dimension


def _stage_choices() -> tuple[int | None, ...]:
    return (2,) if tuning.interpreting() else (1, 2, 3)


# Backward kernels with partial sums: their tile is fixed per architecture, only num_stages tuned.
_fwd_tuners = tuning.PerArch("fwd", lambda arch: triton.autotune(
    configs=_configs(PIXEL_TILES, _stage_choices()), key=["numel_bucket"])(_fwd_kernel))
_bwd_da_tuners = tuning.PerArch("bwd_da", lambda arch: triton.autotune(
    configs=_configs([tuning.per_arch(REDUCTION_TILES, arch)], _stage_choices()), key=["numel_bucket"])(_bwd_da_kernel))
_bwd_dx_tuners = tuning.PerArch("bwd_dx", lambda arch: triton.autotune(
    configs=_configs(PIXEL_TILES, _stage_choices()), key=["numel_bucket"])(_bwd_dx_kernel))
_bwd_dw_tuners = tuning.PerArch("bwd_dw", lambda arch: triton.autotune(
    configs=_configs([tuning.per_arch(WGRAD_TILES, arch)], _stage_choices()), key=["numel_bucket"])(_bwd_dw_kernel))


def _block(channels: int, limit: int) -> int:
    """A channel block: the next power of two >= 16 of ``channels``, at most ``limit``."""
    return max(MIN_DOT, min(limit, triton.next_power_of_2(int(channels))))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, pixel) strides of a dense NCHW or channels_last (N, C, H, W) tensor; pixel
    p = h*W + w is at p * pixel stride. Strides of size-1 dims are free in torch, so those give 0."""
    n, c, h, w = t.shape
    s = t.stride()
    pixel = s[3] if w > 1 else (s[2] if h > 1 else 0)
    return (s[0] if n > 1 else 0), (s[1] if c > 1 else 0), pixel


def _dot_flags(x: torch.Tensor) -> dict[str, object]:
    """PRECISION and WIDEN for tl.dot on operands of x's dtype (see :mod:`.attention_gate_kernels`)."""
    full = x.dtype in (torch.float32, torch.float64)
    return {"PRECISION": "ieee" if full else "tf32",
            "WIDEN": x.dtype == torch.bfloat16 and tuning.interpreting()}


def _channel_blocks(arch: str, cx: int, cg: int, f: int) -> dict[str, int]:
    tiles = tuning.per_arch(CHANNEL_TILES, arch)
    return {"BLOCK_KX": _block(cx, tiles["BLOCK_K"]), "BLOCK_KG": _block(cg, tiles["BLOCK_K"]),
            "BLOCK_F": _block(f, tiles["BLOCK_F"])}


def _pixel_grid(n: int, hw: int):
    def grid(meta: dict) -> tuple[int, int]:
        return (n, min(triton.cdiv(hw, meta["BLOCK_M"]), MAX_GRID_1))
    return grid


def _kernel_and_tile(tuners: tuning.PerArch, kernel, key: tuning.CommittedKey, fixed: tuning.Tile | None = None):
    """The autotuner (when tuning.AUTOTUNE, for an uncommitted key) or the plain kernel and its tile;
    a kernel with a ``fixed`` reduction tile has no other default."""
    tile = tuning.launch_config(TUNED_TILES, key, {} if fixed else PIXEL_TILES[0], fixed=fixed)
    return (tuners(key[0]) if tile is None else kernel), (tile or {})


def attention_gate_fwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                       w_psi: torch.Tensor, b_psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated skip feature and the gate, in one launch.

    Args:
        x: (N, Cx, H, W) fp32/bf16/fp16 on CUDA (fp64/fp32 under the interpreter); g: (N, Cg, H, W)
            of x's dtype; both NCHW-contiguous or both channels_last.
        w_x (F, Cx), w_g (F, Cg), bias (F,), w_psi (F,), b_psi (1,): contiguous, float32
            (float64 for float64 x).
    Returns:
        out like x (dtype and strides) and psi (N, 1, H, W) contiguous in x's dtype.
    """
    n, cx, h, w = x.shape
    cg, f, hw = g.shape[1], w_x.shape[0], h * w
    out = torch.empty_like(x)
    psi = torch.empty((n, 1, h, w), dtype=x.dtype, device=x.device)
    arch = tuning.arch(x.device)
    key = (arch, "fwd", tuning.bucket(cx * hw), tuning.dtype_name(x.dtype))
    kernel, tile = _kernel_and_tile(_fwd_tuners, _fwd_kernel, key)
    with _device_guard(x.device):
        tuning.wrap(kernel)[_pixel_grid(n, hw)](
            x, g, w_x, w_g, bias, w_psi, b_psi, out, psi, hw, cx, cg, f, *_strides(x), *_strides(g), *_strides(out),
            key[2], **_channel_blocks(arch, cx, cg, f), **_dot_flags(x), **tile)
    return out, psi


def _splits(pixels: int, blocks: int, device: torch.device, block_p: int) -> tuple[int, int]:
    """(chunk, splits) of the pixel axis for the weight-gradient GEMM, from the shape and device only."""
    target = PROGRAMS_PER_SM * _sm_count(device) if device.type == "cuda" else 4
    wanted = min(max(1, triton.cdiv(target, blocks)), MAX_GRID_1)
    splits = min(triton.cdiv(pixels, block_p), wanted)
    chunk = triton.cdiv(triton.cdiv(pixels, splits), block_p) * block_p
    return chunk, triton.cdiv(pixels, chunk)


def _weight_grad(da: torch.Tensor, v: torch.Tensor, arch: str, blocks: dict[str, int], flags: dict[str, object],
                 bucket: int) -> torch.Tensor:
    """sum over pixels of da^T v, (F, C), from per-split partials summed in a fixed order."""
    n, c, h, w = v.shape
    f = da.shape[1]
    tiles = tuning.per_arch(WGRAD_TILES, arch)
    block_f, block_c = blocks["BLOCK_F"], _block(c, tuning.per_arch(CHANNEL_TILES, arch)["BLOCK_K"])
    grid_fc = (triton.cdiv(f, block_f), triton.cdiv(c, block_c))
    chunk, splits = _splits(n * h * w, grid_fc[0] * grid_fc[1], v.device, tiles["BLOCK_P"])
    partials = torch.empty((splits, f, c), dtype=da.dtype if da.dtype == torch.float64 else torch.float32,
                           device=v.device)
    key = (arch, "bwd_dw", bucket, tuning.dtype_name(v.dtype))
    kernel, tile = _kernel_and_tile(_bwd_dw_tuners, _bwd_dw_kernel, key, fixed=tiles)
    tuning.wrap(kernel)[(*grid_fc, splits)](
        da, v, partials, h * w, n * h * w, c, f, *_strides(v), chunk, bucket,
        BLOCK_F=block_f, BLOCK_C=block_c, **flags, **tile)
    return partials.sum(dim=0)


def attention_gate_bwd(x: torch.Tensor, g: torch.Tensor, w_x: torch.Tensor, w_g: torch.Tensor, bias: torch.Tensor,
                       w_psi: torch.Tensor, b_psi: torch.Tensor, grad_out: torch.Tensor, grad_psi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """Gradients of the gate, recomputed from its inputs: four launches and three fixed-order sums.

    Args:
        x, g, w_x, w_g, bias, w_psi, b_psi: as for :func:`attention_gate_fwd`.
        grad_out: like x (shape, dtype, memory format); grad_psi: (N, 1, H, W) contiguous in x's
            dtype, or any tensor with no elements when psi got no gradient.
    Returns:
        (dx, dg, dw_x, dw_g, dbias, dw_psi, db_psi): dx like x, dg like g (dtype and strides), the
        weight gradients in the weights' dtype and shapes.
    """
    n, cx, h, w = x.shape
    cg, f, hw = g.shape[1], w_x.shape[0], h * w
    acc = compute_dtype(x)
    arch = tuning.arch(x.device)
    bucket = tuning.bucket(cx * hw)
    blocks = _channel_blocks(arch, cx, cg, f)
    flags = _dot_flags(x)
    has_grad_psi = grad_psi.numel() > 0
    # the transient da: in x's dtype for bf16/fp16 (like autocast's backward), else the compute dtype
    da = torch.empty((n * hw, f), dtype=acc if x.dtype in (torch.float32, torch.float64) else x.dtype,
                     device=x.device)
    psi = torch.empty((n * hw,), dtype=acc, device=x.device)
    reduction = tuning.per_arch(REDUCTION_TILES, arch)
    tiles_per_image = triton.cdiv(hw, reduction["BLOCK_M"])
    partials = torch.empty((n * tiles_per_image, 2 * f + 1), dtype=acc, device=x.device)
    dx = torch.empty_like(x)
    dg = torch.empty_like(g)
    with _device_guard(x.device):
        key = (arch, "bwd_da", bucket, tuning.dtype_name(x.dtype))
        kernel, tile = _kernel_and_tile(_bwd_da_tuners, _bwd_da_kernel, key, fixed=reduction)
        # without grad_psi its pointer is never read: grad_out stands in
        tuning.wrap(kernel)[(n, min(tiles_per_image, MAX_GRID_1))](
            x, g, w_x, w_g, bias, w_psi, b_psi, grad_out, grad_psi if has_grad_psi else grad_out, da, psi, partials,
            hw, cx, cg, f, *_strides(x), *_strides(g), *_strides(grad_out), bucket,
            HAS_GRAD_PSI=has_grad_psi, **blocks, **flags, **tile)
        key = (arch, "bwd_dx", bucket, tuning.dtype_name(x.dtype))
        kernel, tile = _kernel_and_tile(_bwd_dx_tuners, _bwd_dx_kernel, key)
        tuning.wrap(kernel)[_pixel_grid(n, hw)](
            grad_out, w_x, w_g, da, psi, dx, dg, hw, cx, cg, f, *_strides(grad_out), *_strides(dx), *_strides(dg),
            bucket, **blocks, **flags, **tile)
        dw_x = _weight_grad(da, x, arch, blocks, flags, bucket)
        dw_g = _weight_grad(da, g, arch, blocks, flags, bucket)
    # one sum per gradient, so that no two outputs are views of one tensor (op outputs must not alias)
    dbias = partials[:, :f].sum(dim=0)
    dw_psi = partials[:, f:2 * f].sum(dim=0)
    db_psi = partials[:, 2 * f:].sum(dim=0)
    return dx, dg, dw_x, dw_g, dbias, dw_psi, db_psi


def tuned_configs() -> dict[str, list[dict[str, object]]]:
    """What autotuning chose so far per kernel (``numel_per_image`` is the bucket of Cx*H*W), in
    the form :data:`TUNED_TILES` takes; see :func:`.hybrid_loss.tuned_configs`."""
    return {t.name: t.winners() for t in (_fwd_tuners, _bwd_da_tuners, _bwd_dx_tuners, _bwd_dw_tuners)}
