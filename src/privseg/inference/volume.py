"""Inference on whole CT volumes with the same windowing and resizing as training."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from privseg.io import atomic_write_bytes
from privseg.output import check_output_file

MASK_SUFFIXES = (".nii.gz", ".nii")


def segment_nifti(
    checkpoint: Path,
    image: Path,
    out: Path,
    *,
    batch_size: int = 32,
    threshold: float = 0.5,
    overwrite: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Segment ``image`` with ``checkpoint`` and write the mask NIfTI ``out`` atomically.

    ``out`` is checked before any work: a NIfTI name in an existing folder, never the input,
    an existing file only with ``overwrite``. ``device``: "auto", "cpu", "cuda" or "cuda:N"
    (see :func:`privseg.device.resolve_device`).
    """
    from privseg.data.msd import load_image, replace_nan
    from privseg.data.preprocess import image_to_model_input, mask_to_image_space
    from privseg.device import resolve_device
    from privseg.models.checkpoint import load_checkpoint

    target = resolve_device(device, field="device")  # a GPU this machine lacks: refused first
    image, out = Path(image), Path(out)
    check_output_file(out, inputs=[image, checkpoint], suffixes=MASK_SUFFIXES, overwrite=overwrite)
    model, cfg, _ = load_checkpoint(checkpoint)
    model.to(target)
    # Predict in the canonical (RAS) frame the model was trained in, then map back.
    hu, canonical = load_image(image)  # validated: a readable 3D NIfTI with a usable affine
    hu = replace_nan(hu, image, cfg.data.nan_hu)
    img = nib.load(image)
    slices = image_to_model_input(hu, cfg.data)
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(slices), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(slices[i : i + batch_size]))[:, None]
            prob = torch.sigmoid(model(x.float().to(target)))
            preds.append((prob[:, 0] > threshold).cpu().numpy())
    mask_canonical = mask_to_image_space(np.concatenate(preds).astype(np.uint8), hu.shape)
    # Reorient to the input's own orientation so the mask overlays the input voxel for voxel.
    orig_ornt = nib.orientations.io_orientation(img.affine)
    can_ornt = nib.orientations.io_orientation(canonical.affine)
    transform = nib.orientations.ornt_transform(can_ornt, orig_ornt)
    mask = nib.orientations.apply_orientation(mask_canonical, transform).astype(np.uint8)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    result = nib.Nifti1Image(mask, img.affine, header)
    result.set_qform(img.affine)
    result.set_sform(img.affine)
    data = result.to_bytes()  # in memory: no temporary file of our own to leave behind
    # atomic_write_bytes writes through mkstemp: the mask (patient data) is 0600.
    atomic_write_bytes(out, gzip.compress(data) if out.name.lower().endswith(".gz") else data)
    return {"slices": int(mask.shape[2]), "foreground_voxels": int(mask.sum())}
