"""On CUDA, a whole training step of the fast model (forward, hybrid loss, backward, Adam) can be
captured in a CUDA graph and replayed, matching the same steps run eagerly: no fused op syncs with
the host or allocates outside the graph's pool. Skipped without a CUDA device."""
from __future__ import annotations

import copy

import pytest
import torch

from r2unet_fast import HybridLoss, R2AttUNet

pytestmark = pytest.mark.cuda


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
          x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=False)  # the graph's gradient buffers stay in place
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


@pytest.fixture
def deterministic_cudnn():
    """The captured and the eager steps pick the same convolution algorithms; restored afterwards."""
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize("block", ["r2", "conv"])
def test_training_step_replays_from_a_cuda_graph(block: str, deterministic_cudnn) -> None:
    torch.manual_seed(0)
    model = R2AttUNet(base_channels=4, depth=3, t=2, block=block).cuda()
    eager = copy.deepcopy(model)
    loss_fn = HybridLoss(pos_weight=2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    eager_optimizer = torch.optim.Adam(eager.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    y = (torch.rand(2, 1, 32, 32, device="cuda") > 0.6).float()

    # warm up on a side stream (autotuning, lazy state), as torch.cuda.graph requires
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _step(model, optimizer, loss_fn, x, y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = _step(model, optimizer, loss_fn, x, y)  # recorded, not run

    losses = []
    for _ in range(3):
        graph.replay()
        losses.append(captured_loss.item())
    eager_losses = [_step(eager, eager_optimizer, loss_fn, x, y).item() for _ in range(6)]
    assert losses == pytest.approx(eager_losses[3:], rel=1e-4, abs=1e-5)
    for (name, got), want in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
