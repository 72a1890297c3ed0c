"""MSD reader, phantom generator, preprocessing, site partitions and slice cache."""

from privseg.data.cache import SliceCache, SliceSplit
from privseg.data.msd import Case, MSDTask, Volume, load_case, load_image, read_task
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.data.preprocess import image_to_model_input, mask_to_image_space, window

__all__ = [
    "Case",
    "MSDTask",
    "SliceCache",
    "SliceSplit",
    "Volume",
    "image_to_model_input",
    "load_case",
    "load_image",
    "mask_to_image_space",
    "prepare_cache",
    "read_task",
    "synth_task",
    "window",
]
