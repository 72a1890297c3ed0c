"""Inference on whole CT volumes with the same windowing and resizing as training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from privseg.io import atomic_write_bytes


def segment_nifti(
    checkpoint: Path, image: Path, out: Path, *, batch_size: int = 32, threshold: float = 0.5
) -> dict[str, Any]:
    """Segment ``image`` with ``checkpoint`` and write the mask NIfTI ``out`` atomically."""
    from privseg.data.msd import load_image
    from privseg.data.preprocess import image_to_model_input, mask_to_image_space
    from privseg.models.checkpoint import load_checkpoint

    model, cfg, _ = load_checkpoint(checkpoint)
    # Predict in the canonical (RAS) frame the model was trained in, then map back.
    hu, canonical = load_image(image)  # validated: a readable 3D NIfTI
    img = nib.load(image)
    slices = image_to_model_input(hu, cfg.data)
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(slices), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(slices[i : i + batch_size]))[:, None]
            preds.append((torch.sigmoid(model(x.float()))[:, 0] > threshold).numpy())
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
    out = Path(out)
    suffix = ".nii.gz" if out.name.endswith(".gz") else ".nii"
    tmp = out.with_name(f".{out.name}.partial{suffix}")
    nib.save(result, tmp)
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    return {"slices": int(mask.shape[2]), "foreground_voxels": int(mask.sum())}
