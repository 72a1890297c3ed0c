"""Preprocessing: fixed HU window, resizing, label mapping, slice policy, mask back to image."""

from __future__ import annotations

import numpy as np
import pytest

from privseg.config import DataConfig
from privseg.data.preprocess import (
    image_to_model_input,
    map_labels,
    mask_to_image_space,
    select_slices,
    volume_to_slices,
    window,
)


def test_window_maps_the_hu_range_to_unit_interval() -> None:
    hu = np.array([-1000.0, -150.0, 25.0, 200.0, 1500.0])
    assert np.allclose(window(hu, -150, 200), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_real_dicom_ct_slice_through_model_input() -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom import examples

    ds = examples.ct
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert -1000 < hu.min() < -800 and hu.max() > 1000, pydicom.__version__
    x = image_to_model_input(hu[:, :, None], DataConfig(resolution=128))
    assert x.shape == (1, 128, 128) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(x[0] == 0.0, hu <= -150) and np.array_equal(x[0] == 1.0, hu >= 200)
    small = image_to_model_input(hu[:, :, None], DataConfig(resolution=32))
    assert small.shape == (1, 32, 32) and small.min() >= 0.0 and small.max() <= 1.0
    assert abs(small.mean() - x.mean()) < 0.02  # antialiased resize keeps the mean


def test_model_input_of_a_slice_ignores_the_rest_of_the_volume() -> None:
    """No per-patient statistics: one slice's input depends on that slice alone."""
    rng = np.random.default_rng(0)
    volume = rng.normal(40, 80, size=(48, 40, 6)).astype(np.float32)
    other = volume.copy()
    other[:, :, 1:] += 900.0
    cfg = DataConfig(resolution=32)
    assert np.array_equal(image_to_model_input(volume, cfg)[0], image_to_model_input(other, cfg)[0])


def test_label_mapping() -> None:
    label = np.array([0, 1, 2, 3])
    assert map_labels(label, DataConfig()).tolist() == [0, 1, 1, 1]
    assert map_labels(label, DataConfig(labels=[2])).tolist() == [0, 0, 1, 0]
    assert map_labels(label, DataConfig(labels=[1, 2])).tolist() == [0, 1, 1, 0]
    # overlapping classes: bit 0 liver (1 or 2), bit 1 tumour (2)
    two = DataConfig(classes={"liver": [1, 2], "tumour": [2]})
    assert map_labels(label, two).tolist() == [0, 1, 3, 0]


def test_slice_policy_foreground_keeps_fraction_of_empty_slices() -> None:
    fg = np.zeros(40, bool)
    fg[10:18] = True
    picked = select_slices(fg, "foreground", 0.5, np.random.default_rng(1))
    assert set(range(10, 18)) <= set(picked) and len(picked) == 12
    assert np.all(np.diff(picked) > 0)
    again = select_slices(fg, "foreground", 0.5, np.random.default_rng(1))
    assert np.array_equal(picked, again)
    assert len(select_slices(fg, "foreground", 10.0, np.random.default_rng(1))) == 40
    assert np.array_equal(select_slices(fg, "all", 0.0, np.random.default_rng(1)), np.arange(40))


def test_volume_to_slices_shapes_and_z() -> None:
    image = np.full((50, 40, 10), 25.0, np.float32)
    label = np.zeros((50, 40, 10), np.uint8)
    label[10:30, 10:30, 3:6] = 2
    cfg = DataConfig(resolution=16, slice_policy="foreground", empty_fraction=0.0)
    images, masks, z = volume_to_slices(image, label, cfg, rng=np.random.default_rng(0))
    assert z.tolist() == [3, 4, 5]
    assert images.shape == masks.shape == (3, 16, 16)
    assert np.allclose(images, 0.5) and set(np.unique(masks)) == {0, 1}


def test_mask_back_to_image_space_round_trip() -> None:
    shape = (100, 80, 5)
    truth = np.zeros(shape, np.uint8)
    truth[20:70, 30:60, 1:4] = 1
    model_mask = image_to_model_input(truth * 1000.0 - 500.0, DataConfig(resolution=64)) > 0.5
    back = mask_to_image_space(model_mask.astype(np.uint8), shape)
    assert back.shape == shape and back.dtype == np.uint8
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.95
    with pytest.raises(ValueError, match="slices"):
        mask_to_image_space(model_mask, (100, 80, 6))
