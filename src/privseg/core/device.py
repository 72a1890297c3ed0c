"""Where privseg computes: a device name (``train.device``, ``--device``) made a torch device.

The one place that decides it, so training, the DP step, evaluation, inference and the attack
agree. ``"auto"`` is the first CUDA GPU when torch sees one, else the CPU; ``"cuda"`` means
``"cuda:0"``. A GPU this machine does not have is a :class:`~privseg.core.errors.ConfigError` naming
the field, raised before any output is written. Resolved devices always carry their index
(``cuda:0``, never ``cuda``): tensors report it so, and ``torch.device("cuda") !=
torch.device("cuda:0")``.
"""

from __future__ import annotations

import torch

from privseg.config import DEVICE_PATTERN, DEVICE_VALUES
from privseg.core.errors import ConfigError


def resolve_device(name: str, *, field: str = "train.device") -> torch.device:
    """The torch device for ``name`` ("auto", "cpu", "cuda", "cuda:N") on this machine."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"{field} = {name!r} is invalid: allowed values are {DEVICE_VALUES}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    index = 0 if name in ("auto", "cuda") else int(name.split(":")[1])
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise ConfigError(
            f"{field} = {name!r} is invalid on this machine: torch sees no CUDA GPU "
            f"(torch {torch.__version__}, built with {built}); use 'cpu' or 'auto'"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"{field} = {name!r} is invalid on this machine: it has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """What results.json and the report record: ``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else 0
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
