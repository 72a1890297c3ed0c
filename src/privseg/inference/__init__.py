"""Using a trained checkpoint: segment CT volumes, export the network for use outside privseg."""

from privseg.inference.folder import segment_folder
from privseg.inference.volume import segment_nifti

__all__ = ["segment_folder", "segment_nifti"]
