"""Segmentation classes: which label values make each class, and how masks carry them.

A class is a set of label values (``data.classes``, e.g. ``{liver = [1, 2], tumour = [2]}``);
classes may overlap, so the network is multi-label: one sigmoid channel per class and a
per-sample loss per channel (no coupling across the batch, as DP-SGD needs). Masks in the
cache and in evaluation are uint8 bit sets: bit ``k`` is class ``k``. With one class, the
paper's merged foreground, a mask is the plain 0/1 mask it always was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from privseg.config import DataConfig

#: The one class of the default config: every label value > 0 (or ``data.labels``).
FOREGROUND = "foreground"


@dataclass(frozen=True)
class Classes:
    """Class names and their label values, in the order of the network's channels."""

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]  # () = every label value > 0

    @classmethod
    def of(cls, data_cfg: DataConfig) -> Classes:
        """``data.classes``, else one class of ``data.labels`` (or every value > 0)."""
        table = dict(data_cfg.classes)
        if not table:
            return cls((FOREGROUND,), (tuple(data_cfg.labels),))
        return cls(tuple(table), tuple(tuple(int(v) for v in vs) for vs in table.values()))

    def __len__(self) -> int:
        return len(self.names)

    def __str__(self) -> str:
        return ", ".join(
            f"{n} = {list(v) if v else 'every label > 0'}"
            for n, v in zip(self.names, self.values, strict=True)
        )

    def encode(self, label: np.ndarray) -> np.ndarray:
        """A label volume of any shape -> uint8 bit set of the same shape."""
        label = np.asarray(label)
        out = np.zeros(label.shape, dtype=np.uint8)
        for k, values in enumerate(self.values):
            member = label > 0 if not values else np.isin(label, values)
            out |= member.astype(np.uint8) << k
        return out

    def channel(self, mask: np.ndarray, k: int) -> np.ndarray:
        """Bool mask of class ``k`` from a bit set."""
        return (np.asarray(mask) >> k) & 1 > 0

    def output_values(self) -> tuple[int, ...]:
        """The label value written for each class in a predicted label map.

        Classes are painted in order, later over earlier, so each writes the smallest of its
        values that no later class claims: ``{liver = [1, 2], tumour = [2]}`` writes liver 1
        and tumour 2, as in the training labels; the merged foreground writes 1.
        """
        out = []
        for k, values in enumerate(self.values):
            later = {v for vs in self.values[k + 1 :] for v in vs}
            own = sorted(set(values) - later) or sorted(values) or [1]
            out.append(own[0])
        return tuple(out)

    def to_label_map(self, mask: np.ndarray) -> np.ndarray:
        """A predicted bit set -> uint8 label values (see :meth:`output_values`)."""
        out = np.zeros(np.shape(mask), dtype=np.uint8)
        for k, value in enumerate(self.output_values()):
            out[self.channel(mask, k)] = value
        return out


def bits_to_target(labels: np.ndarray | torch.Tensor, n_classes: int) -> torch.Tensor:
    """uint8 bit sets ``[B, H, W]`` -> float32 network targets ``[B, C, H, W]``."""
    t = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    t = t.to(torch.int64)
    bits = torch.stack([(t >> k) & 1 for k in range(n_classes)], dim=1)
    return bits.to(torch.float32)


def probabilities_to_bits(prob: torch.Tensor, threshold: float) -> np.ndarray:
    """Sigmoid outputs ``[B, C, H, W]`` -> uint8 bit sets ``[B, H, W]``."""
    bits = torch.zeros(prob.shape[0], *prob.shape[2:], dtype=torch.uint8, device=prob.device)
    for k in range(prob.shape[1]):
        bits |= (prob[:, k] > threshold).to(torch.uint8) << k
    return bits.cpu().numpy()
