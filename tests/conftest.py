from __future__ import annotations

import pytest
import torch
from torch import nn

# Tolerances per dtype for comparisons with the float64 references: (rtol, atol).
DTYPE_PRECISIONS = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared CPU OpenMP spinning costs up to 40x
    (measured: 385 ms vs 8.5 ms per jvp step with 2 threads on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_and_cuda() -> tuple:
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


class SmallCNN(nn.Module):
    """Conv -> BN -> ReLU -> pool -> linear head named ``fc`` (like torchvision/timm ResNets)."""

    def __init__(self, num_classes: int = 4, channels: int = 6, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(channels * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def make_model(kind: str, num_classes: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, num_classes))
    elif kind == "mlp_bn":
        model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, num_classes))
    elif kind == "cnn":
        model = SmallCNN(num_classes)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def make_inputs(kind: str, batch: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1, 6, 6) if kind == "cnn" else (batch, 5)
    return torch.randn(shape, generator=g, dtype=dtype)
