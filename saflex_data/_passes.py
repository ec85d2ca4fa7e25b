"""How SAFLEX runs its own passes of the user's model without a trace: the raw module behind wrappers, eval mode
restored module by module, torch's random state saved, compared and restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ._hooks import internal_pass

_BatchNorm = nn.modules.batchnorm._BatchNorm
_MODULE_TRAIN = nn.Module.train

__all__ = [
    "unwrap_model",
    "model_device",
    "rng_preserved",
    "validation_pass",
    "rng_state",
    "set_rng_state",
    "same_rng_state",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The raw module behind ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model



@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Leave torch's global random state (CPU, and ``device``'s when it is a CUDA device) as it was."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@contextlib.contextmanager
def validation_pass(model: nn.Module, device: torch.device) -> Iterator[None]:
    """SAFLEX's own validation forward: ``model`` in eval mode (every submodule's flag restored one by one
    afterwards, so a frozen submodule stays in eval), BatchNorm buffers untouched (as :func:`running_stats_frozen`
    of ``_autodiff``, should a module keep itself in train mode), ignored by SAFLEX's hooks, outside autocast, and
    torch's global random state left as it was. One walk over the modules."""
    modules = list(model.modules())
    modes = [m.training for m in modules]
    tracking = [m for m in modules if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in modules:  # model.eval(), without a Python call and nn.Module.__setattr__ per module
        if type(m).train is _MODULE_TRAIN:
            m.__dict__["training"] = False
        else:  # a module with its own train(): called, as model.eval() would
            m.train(False)
    for m in tracking:
        m.track_running_stats = False
    try:
        with internal_pass(), rng_preserved(device), torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        for m in tracking:
            m.track_running_stats = True
        for module, training in zip(modules, modes, strict=True):
            # the flag itself, as nn.Module.train sets it (without nn.Module.__setattr__'s checks: a walk over a
            # large model's modules every step)
            module.__dict__["training"] = training


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Torch's global random state for a forward on ``device`` (CPU, plus the CUDA generator there)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def same_rng_state(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None or b[1] is None or torch.equal(a[1], b[1]))


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
