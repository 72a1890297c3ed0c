"""Readers (MSD, nnU-Net v2, DICOM series), phantom, preprocessing, site partitions, cache."""

from privseg.data.cache import NativeGrid, SliceCache, SliceSplit
from privseg.data.dicom import load_dicom_image, read_dicom_series
from privseg.data.msd import load_case, read_task
from privseg.data.nifti import load_image
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.data.preprocess import (
    PlaneTransform,
    image_to_model_input,
    mask_to_image_space,
    window,
)
from privseg.data.sources import load_volume, read_source
from privseg.data.task import Case, Task, Volume

__all__ = [
    "Case",
    "NativeGrid",
    "PlaneTransform",
    "SliceCache",
    "SliceSplit",
    "Task",
    "Volume",
    "image_to_model_input",
    "load_case",
    "load_dicom_image",
    "load_image",
    "load_volume",
    "mask_to_image_space",
    "prepare_cache",
    "read_dicom_series",
    "read_source",
    "read_task",
    "synth_task",
    "window",
]
