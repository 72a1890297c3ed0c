"""A torch Dataset over one cached split, with the patient of each slice for DP grouping."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from privseg.data.cache import SliceSplit


class SliceDataset(Dataset):
    """Items are ``(image [1, R, R] float32, label [1, R, R] float32)``.

    ``groups`` is the patient index of each slice, so patient-level DP and patient-level
    batching can group slices without touching the images.
    """

    def __init__(self, split: SliceSplit) -> None:
        self.split = split
        self.groups = np.asarray(split.patient)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(self.split.images[index], dtype=np.float32)
        label = np.asarray(self.split.labels[index], dtype=np.float32)
        return torch.from_numpy(image)[None], torch.from_numpy(label)[None]
