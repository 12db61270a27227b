"""Test setup: Triton kernels run through the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton is imported; on a CUDA machine it is
left alone so the compiled kernels are what gets tested.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (`pytest -n auto`) there is one worker per core: each runs one torch thread,
# since several OpenMP pools on the same cores spin against each other (docs/training.md,
# "Sharing the machine"). Tests that vary the thread count set it themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _ieee_fp32_on_cuda():
    """fp32 parity is asserted against IEEE fp32: the Triton kernels' fp32 dots are IEEE, while
    PyTorch lets cuDNN convolutions use TF32 by default, which put the reference gate's channels_last
    gradient 8e-3 (relative) off on an H200. Restored after each test."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
