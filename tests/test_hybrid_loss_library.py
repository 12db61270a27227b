"""hybrid_loss as library ops: the epilogue alone against the reference formula, each loss
term against a hand computation, non-finite logits, registration (opcheck), torch.compile
without graph breaks, ATen-op and launch counts, tuning that keeps the sums' bits, any N.

Test ids name the backend and device (``cpu-cpu``, ``triton-cpu`` through the interpreter,
``triton-cuda`` on a GPU); tests marked ``cuda`` run on the GPU machine only.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from backend_cases import Case, cases
from loss_oracle import hand_hybrid_loss

from r2unet_fast import HybridLoss, R2AttUNet
from r2unet_fast.ops import reference
from r2unet_fast.ops.library import hybrid_loss as lib

BACKENDS = cases("hybrid_loss")
CPU_ONLY = cases("hybrid_loss", ("cpu",))
TRITON_ONLY = cases("hybrid_loss", ("triton",))
WITH_REFERENCE = [pytest.param(Case("reference", torch.device("cpu")), id="reference")] + BACKENDS
FAST = {"reference": reference.hybrid_loss, "triton": lib.hybrid_loss_triton, "cpu": lib.hybrid_loss_cpu}
OPTIONS = [
    {},
    {"dice_weight": 0.0, "bce_weight": 1.0, "pos_weight": 3.0},
    {"dice_weight": 1.0, "bce_weight": 0.0, "smooth": 0.0},
    {"dice_weight": 0.7, "bce_weight": 0.3, "pos_weight": 0.7, "smooth": 2.5, "per_image": False},
    {"per_image": False, "pos_weight": 0.0},
]
ARGS = ("pos_weight", "dice_weight", "bce_weight", "smooth", "per_image")
DEFAULTS = {"pos_weight": 1.0, "dice_weight": 0.5, "bce_weight": 0.5, "smooth": 1.0, "per_image": True}


def _op_args(options: dict) -> tuple:
    """The library ops' positional scalars (pos_weight, dice_weight, bce_weight, smooth, per_image)."""
    return tuple({**DEFAULTS, **options}[k] for k in ARGS)


def _run(fn, logits, target, grad_target=True, **options):
    x = logits.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(grad_target)
    loss = fn(x, t, **options)
    loss.backward()
    return loss.detach(), x.grad, t.grad


def _epilogue(backend: str):
    if backend == "cpu":
        from r2unet_fast.ops import cpu
        return cpu.hybrid_loss_epilogue
    from r2unet_fast.ops.triton import hybrid_loss as kernels
    return kernels.hybrid_loss_epilogue


def _reference_epilogue(partials, numel, pos_weight, dice_weight, bce_weight, smooth, per_image):
    """loss_from_sums on the chunk-summed partials and autograd's gradient with respect to the five sums."""
    sums = partials.sum(1).requires_grad_()
    combined = torch.cat((sums[:, :3], sums[:, 3:4] + pos_weight * sums[:, 4:5]), dim=1)
    loss = reference.loss_from_sums(combined, numel, dice_weight=dice_weight, bce_weight=bce_weight,
                                    smooth=smooth, per_image=per_image)
    (coef,) = torch.autograd.grad(loss, sums)
    return loss.detach(), coef


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, chunks", [(1, 1), (3, 4), (37, 2), (1500, 1)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_epilogue_alone_is_loss_from_sums_and_its_gradient(backend, n, chunks, options):
    partials = torch.rand(n, chunks, 5, dtype=torch.float64) * 7
    numel = 97 * n
    got = _epilogue(backend.name)(partials.to(backend.device), numel, *_op_args(options))
    want = _reference_epilogue(partials, numel, *_op_args(options))
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-14)


# Each case isolates one term, on images small enough that smooth is a large share of the Dice
# sums: a mutant of that term (in the kernels' epilogue or in reference.loss_from_sums) fails it.
TERMS = {
    "per_image_dice": {"dice_weight": 1.0, "bce_weight": 0.0, "per_image": True},
    "pooled_dice": {"dice_weight": 1.0, "bce_weight": 0.0, "per_image": False},
    "smooth_per_image": {"dice_weight": 1.0, "bce_weight": 0.0, "smooth": 2.5, "per_image": True},
    "smooth_pooled": {"dice_weight": 1.0, "bce_weight": 0.0, "smooth": 2.5, "per_image": False},
    "pos_weight": {"dice_weight": 0.0, "bce_weight": 1.0, "pos_weight": 3.0},
    "weights": {"dice_weight": 0.3, "bce_weight": 0.7, "pos_weight": 0.4, "smooth": 0.1},
}


@pytest.mark.parametrize("backend", WITH_REFERENCE)
@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_matches_a_hand_computation(backend, term):
    logits = (torch.randn(3, 1, 3, 4, dtype=torch.float64) * 2).to(backend.device)
    target = torch.rand(3, 1, 3, 4, dtype=torch.float64).to(backend.device)
    got = _run(FAST[backend.name], logits, target, **TERMS[term])
    want = _run(hand_hybrid_loss, logits, target, **TERMS[term])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _with_nonfinite(value: float, dtype: torch.dtype, device: torch.device):
    """Three images; ``value`` at one pixel of each, whose target is 0, 1 and 0.3 in turn."""
    logits = torch.randn(3, 1, 3, 4, dtype=torch.float64) * 2
    target = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    for img, t in enumerate((0.0, 1.0, 0.3)):
        logits[img, 0, 1, 2], target[img, 0, 1, 2] = value, t
    return logits.to(device, dtype), target.to(device, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "+inf", "-inf"])
def test_nonfinite_logits_give_the_references_loss_and_gradients(backend, dtype, value):
    # the reference is the specification: NaN loss and NaN gradients wherever it has them,
    # finite gradients where it has those (x = -inf gives a NaN loss but finite dL/dx)
    for options in OPTIONS:
        logits, target = _with_nonfinite(value, dtype, backend.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy warns on NaN
            got = _run(FAST[backend.name], logits, target, **options)
        want = _run(reference.hybrid_loss, logits, target, **options)
        for name, a, b in zip(("loss", "grad_logits", "grad_target"), got, want):
            assert torch.equal(a.isnan(), b.isnan()), f"{name} {options}: NaN where the reference has none, or not"
            assert torch.equal(a.isinf() * a.sign(), b.isinf() * b.sign()), f"{name} {options}: infinities differ"
            if dtype != torch.bfloat16:  # low precision: the pattern is the point, values have their own test
                tol = 1e-10 if dtype == torch.float64 else 1e-5
                scale = b[b.isfinite()].abs().max().item() if b.isfinite().any() else 1.0
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("backend", WITH_REFERENCE)
def test_a_nan_logit_stops_clip_grad_norm(backend):
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64).to(backend.device)
    image = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    image[1, 0, 2, 3] = float("nan")
    target = (torch.rand(2, 1, 6, 6) > 0.5).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        HybridLoss(backend=backend.name)(conv(image.to(backend.device)), target.to(backend.device)).backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(conv.parameters(), 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(backend):
    lib.register(backend.name)
    ops = torch.ops.r2unet_fast
    fwd, bwd = getattr(ops, lib.op_name(backend.name)), getattr(ops, lib.op_name(backend.name, backward=True))
    x = (torch.randn(2, 1, 5, 6, dtype=torch.float64) * 2).to(backend.device)
    t = torch.rand(2, 1, 5, 6, dtype=torch.float64).to(backend.device)
    args = _op_args({"pos_weight": 0.7, "per_image": False})
    torch.library.opcheck(fwd.default, (x.requires_grad_(), t.requires_grad_(), *args))
    x, t = x.detach(), t.detach()
    _, coef = fwd(x, t, *args)
    for grad_target in (True, False):
        torch.library.opcheck(bwd.default, (x, t, coef, torch.tensor(1.5, dtype=torch.float64,
                                                                     device=backend.device), grad_target))


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_cpp_path_runs_only_allocations_besides_its_ops(backend):
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(4, 1, 16, 16, requires_grad=True)
    target = torch.rand(4, 1, 16, 16)
    grad = torch.ones(())
    for _ in range(2):
        torch.autograd.grad(lib.hybrid_loss_cpu(logits, target), logits, grad)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # autograd.grad: no AccumulateGrad into .grad
        torch.autograd.grad(lib.hybrid_loss_cpu(logits, target), logits, grad)
    names = [e.name for e in prof.events()]
    aten = [n for n in names if n.startswith("aten::")]
    assert names.count("r2unet_fast::hybrid_loss_cpu") == 1 and names.count("r2unet_fast::hybrid_loss_cpu_bwd") == 1
    assert set(aten) <= {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty"}, aten
    assert len(aten) <= 6, aten


@pytest.mark.cuda
def test_cuda_fwd_bwd_is_at_most_four_launches_without_host_sync():
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(16, 1, 256, 256, device="cuda", requires_grad=True)
    target = (torch.rand(16, 1, 256, 256, device="cuda") > 0.5).float()
    for _ in range(3):  # autotuning happens on the first calls
        lib.hybrid_loss_triton(logits, target).backward()
    torch.cuda.synchronize()
    logits.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            lib.hybrid_loss_triton(logits, target).backward()  # ones_like for grad_output is one of the four
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 4, kernels


def _tiny_model(device):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 1, 1)).to(device)


def _compiled_matches_eager(backend: str, device: torch.device) -> None:
    model, loss_fn = _tiny_model(device), HybridLoss(pos_weight=2.0, backend=backend)
    x = torch.randn(2, 3, 12, 10, device=device)
    y = (torch.rand(2, 1, 12, 10, device=device) > 0.5).float()

    def step(inputs, labels):
        return loss_fn(model(inputs), labels)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        loss = fn(x, y)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_ONLY)
def test_torch_compile_fullgraph_traces_the_model_and_the_cpp_loss(backend):
    model = R2AttUNet(base_channels=4, depth=2, t=1)
    loss_fn = HybridLoss(backend="auto")
    x, y = torch.randn(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    explained = torch._dynamo.explain(lambda a, b: loss_fn(model(a), b))(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert "r2unet_fast.hybrid_loss_cpu" in explained.graphs[0].code
    _compiled_matches_eager("cpu", torch.device("cpu"))


@pytest.mark.cuda
def test_cuda_torch_compile_fullgraph_and_cuda_graph_capture():
    device = torch.device("cuda")
    _compiled_matches_eager("triton", device)
    model, loss_fn = _tiny_model(device), HybridLoss(pos_weight=2.0, backend="triton")
    x = torch.randn(4, 3, 32, 32, device=device)
    y = (torch.rand(4, 1, 32, 32, device=device) > 0.5).float()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and autotune) outside the capture
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            loss_fn(model(x), y).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model(x), y)
        static_loss.backward()
    model.zero_grad(set_to_none=False)
    graph.replay()
    replayed = [static_loss.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    eager = loss_fn(model(x), y)
    eager.backward()
    for a, b in zip(replayed, [eager.detach()] + [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_ONLY + [
    pytest.param(Case("triton", torch.device("cuda")), id="triton-cuda", marks=pytest.mark.cuda)])
def test_batch_beyond_the_65535_grid_limit(backend):
    n = 70000
    logits, target = torch.randn(n, 1, 1, 2) * 3, torch.rand(n, 1, 1, 2)
    for per_image in (True, False):
        got = _run(FAST[backend.name], logits.to(backend.device), target.to(backend.device), per_image=per_image)
        want = _run(reference.hybrid_loss, logits, target, per_image=per_image)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_triton_grids_put_the_batch_on_axis_0(backend, monkeypatch):
    # The interpreter runs one Python call per program (about 10 ms each here), so N = 70000
    # would take many minutes: record the grids on meta tensors instead (test above runs it on CUDA).
    from r2unet_fast.ops.triton import hybrid_loss as kernels

    grids = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: grids.append((self.kernel, grid(kw | {"BLOCK_SIZE": 1024})
                                                     if callable(grid) else grid))

    monkeypatch.setattr(kernels.tuning, "wrap", Recorder)
    for n, numel in ((70000, 2), (2, 1 << 27)):
        x = torch.empty(n, 1, numel, device="meta")
        _, coef = kernels.hybrid_loss_fwd(x, x, *_op_args({}))
        kernels.hybrid_loss_bwd(x, x, coef, torch.empty((), device="meta"), True)
        assert [g[0] for _, g in grids] == [n, 1, n], grids
        assert all(0 < d <= 65535 for _, g in grids for d in g[1:]), grids
        grids.clear()


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_tile_tables_fall_back_and_buckets_are_powers_of_two(backend):
    from r2unet_fast.ops.triton import hybrid_loss as kernels
    from r2unet_fast.ops.triton import tuning

    assert [tuning.bucket(n) for n in (1, 2, 3, 1073, 2048, 65536, 65537)] == [1, 2, 4, 2048, 2048, 65536, 131072]
    assert tuning.per_arch(kernels.REDUCTION_TILES, "sm_999") == kernels.REDUCTION_TILES["default"]
    configs = kernels.tuned_configs()
    assert set(configs) == {"fwd", "bwd"} and all(isinstance(v, list) for v in configs.values())


@pytest.mark.parametrize("backend", TRITON_ONLY)
def test_triton_committed_tile_bypasses_autotuning(backend, monkeypatch):
    from r2unet_fast.ops.triton import hybrid_loss as tl_hybrid_loss
    from r2unet_fast.ops.triton import tuning

    logits = (torch.randn(2, 1, 37, 29) * 3).to(backend.device)
    target = torch.rand(2, 1, 37, 29).to(backend.device)
    arch, bucket = tuning.arch(logits.device), tuning.bucket(37 * 29)
    monkeypatch.setitem(tl_hybrid_loss.TUNED_TILES, (arch, "fwd", bucket, "float32"), {"num_stages": 1})
    monkeypatch.setitem(tl_hybrid_loss.TUNED_TILES, (arch, "bwd", bucket, "float32"),
                        {"BLOCK_SIZE": 128, "num_warps": 2})

    def no_autotuner(arch):
        raise AssertionError("the autotuner ran although a tile was committed")

    monkeypatch.setattr(tl_hybrid_loss, "_fwd_tuners", no_autotuner)
    monkeypatch.setattr(tl_hybrid_loss, "_bwd_tuners", no_autotuner)
    got = _run(FAST["triton"], logits, target, pos_weight=1.5)
    for a, b in zip(got, _run(reference.hybrid_loss, logits, target, pos_weight=1.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # the forward's reduction tile is fixed per architecture: a committed tile may not change it
    monkeypatch.setitem(tl_hybrid_loss.TUNED_TILES, (arch, "fwd", bucket, "float32"), {"BLOCK_SIZE": 256})
    with pytest.raises(ValueError, match="reduction order"):
        FAST["triton"](logits, target)


@pytest.mark.cuda
def test_cuda_sums_do_not_depend_on_the_tuned_config(monkeypatch):
    from r2unet_fast.ops.triton import hybrid_loss as kernels
    from r2unet_fast.ops.triton import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    logits = torch.randn(3, 1, 300, 257, device="cuda") * 3
    target = torch.rand(3, 1, 300, 257, device="cuda")
    key = (tuning.arch(logits.device), "fwd", tuning.bucket(300 * 257), "float32")
    lib.register("triton")
    fwd = torch.ops.r2unet_fast.hybrid_loss_triton
    runs = []
    for stages in (1, 2, 3):
        monkeypatch.setitem(kernels.TUNED_TILES, key, {"num_stages": stages})
        runs.append(fwd(logits, target, *_op_args({"per_image": False})))
    monkeypatch.delitem(kernels.TUNED_TILES, key)
    runs.append(fwd(logits, target, *_op_args({"per_image": False})))  # autotuned
    for loss, coef in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(coef, runs[0][1])


@pytest.mark.cuda
def test_cuda_a_new_image_size_in_the_same_bucket_does_not_retune(monkeypatch):
    from r2unet_fast.ops.triton import hybrid_loss as kernels
    from r2unet_fast.ops.triton import tuning

    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    before = {k: len(v) for k, v in kernels.tuned_configs().items()}
    for h, w in ((70, 80), (75, 90), (64, 128)):  # 5600, 6750, 8192 pixels: all bucket 8192
        x = torch.randn(2, 1, h, w, device="cuda", dtype=torch.float16, requires_grad=True)
        lib.hybrid_loss_triton(x, torch.rand(2, 1, h, w, device="cuda", dtype=torch.float16)).backward()
    after = kernels.tuned_configs()
    assert {k: len(v) - before[k] for k, v in after.items()} == {"fwd": 1, "bwd": 1}, after
