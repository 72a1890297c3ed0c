"""Segmentation classes (``data.classes``): encoding, the loss per class, label values out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privseg.config import Config, DataConfig
from privseg.core.classes import Classes, bits_to_target, probabilities_to_bits
from privseg.core.errors import ConfigError
from privseg.evaluation.evaluate import evaluate_split
from privseg.models import build_model
from privseg.training.losses import DiceBCELoss

TWO = {"liver": [1, 2], "tumour": [2]}


def test_default_is_the_papers_merged_foreground() -> None:
    classes = Classes.of(DataConfig())
    assert classes.names == ("foreground",) and DataConfig().n_classes == 1
    assert classes.encode(np.array([0, 1, 2, 7])).tolist() == [0, 1, 1, 1]
    assert classes.to_label_map(np.array([0, 1], np.uint8)).tolist() == [0, 1]


def test_overlapping_classes_round_trip_to_the_training_label_values() -> None:
    classes = Classes.of(DataConfig(classes=TWO))
    label = np.array([[0, 1, 2], [2, 1, 0]])
    bits = classes.encode(label)
    assert bits.tolist() == [[0, 1, 3], [3, 1, 0]]
    assert classes.output_values() == (1, 2)
    assert np.array_equal(classes.to_label_map(bits), label)
    disjoint = Classes.of(DataConfig(classes={"kidney": [1], "tumour": [2], "cyst": [3]}))
    label = np.array([0, 3, 2, 1])
    assert np.array_equal(disjoint.to_label_map(disjoint.encode(label)), label)


def test_targets_and_predictions_are_one_channel_per_class() -> None:
    bits = np.array([[[0, 1], [3, 2]]], np.uint8)
    target = bits_to_target(bits, 2)
    assert target.shape == (1, 2, 2, 2)
    assert target[0, 0].tolist() == [[0, 1], [1, 0]] and target[0, 1].tolist() == [[0, 0], [1, 1]]
    assert np.array_equal(probabilities_to_bits(target, 0.5), bits)


@pytest.mark.parametrize(
    ("table", "labels", "rule"),
    [
        ({"liver": [1], "tumour": [0]}, [], "label values > 0"),
        ({"liver": []}, [], "label values > 0"),
        ({"2nd": [1]}, [], "must start with a letter"),
        ({"a b": [1]}, [], "must start with a letter"),
        ({"liver": [1]}, [1], "data.labels = []"),
        ({f"c{i}": [i + 1] for i in range(9)}, [], "at most 8 classes"),
    ],
)
def test_bad_class_tables_are_refused_naming_the_field(table, labels, rule) -> None:
    with pytest.raises(ConfigError, match="data.classes") as err:
        Config.from_dict({"data": {"classes": table, "labels": labels}})
    assert rule in str(err.value)


def test_classes_survive_the_toml_round_trip(tmp_path) -> None:
    cfg = Config().with_overrides(["data.classes={liver = [1, 2], tumour = [2]}"])
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert Config.load(tmp_path / "c.toml").data.classes == TWO


def test_the_loss_is_per_sample_and_per_class() -> None:
    """Each sample's loss depends on that sample alone (DP-SGD clips per sample), and each class
    counts: a perfect liver but a missed tumour costs more than both right."""
    loss = DiceBCELoss()
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1
    target[:, 1, 3:5, 3:5] = 1
    perfect = (target * 40 - 20).clone()
    missed = perfect.clone()
    missed[:, 1] = -20
    both = loss(perfect, target)
    assert both.shape == (2,) and float(both.max()) < 1e-3
    assert float(loss(missed, target)[0]) > 0.4
    mixed = torch.cat([perfect[:1], missed[1:]])
    assert torch.allclose(loss(mixed, target)[0], both[0])  # sample 0 ignores sample 1


class _Split:
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def volumes(self):
        yield "p0", np.zeros(self.labels.shape, np.float32), self.labels


class _Oracle(torch.nn.Module):
    """Returns logits for fixed bit sets, whatever the input."""

    def __init__(self, bits: np.ndarray, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logits = bits_to_target(bits, n) * 40 - 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)] + self.w


def test_evaluation_scores_each_class() -> None:
    label = np.zeros((4, 16, 16), np.uint8)
    label[:, 4:12, 4:12] = 1  # liver only
    label[1:3, 6:10, 6:10] = 3  # liver and tumour
    pred = label.copy()
    pred[pred == 3] = 1  # the tumour missed, the liver right
    res = evaluate_split(_Oracle(pred, 2), _Split(label), classes=("liver", "tumour"))
    assert res["classes"]["liver"]["dice"] == pytest.approx(1.0)
    assert res["classes"]["tumour"]["dice"] == pytest.approx(0.0)
    assert res["dice"] == pytest.approx(0.5)
    assert res["patients"][0]["classes"]["tumour"]["dice"] == pytest.approx(0.0)
    one = evaluate_split(_Oracle(label & 1, 1), _Split(label & 1))
    assert one["dice"] == pytest.approx(1.0) and list(one["classes"]) == ["foreground"]


def test_the_network_has_one_output_channel_per_class() -> None:
    cfg = Config().with_overrides(["data.classes={liver = [1, 2], tumour = [2]}"])
    for name in ("unet", "monet"):
        model = build_model(cfg.model.__class__(name=name), cfg.data.n_classes)
        assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_a_cache_prepared_for_other_classes_is_refused(phantom_cache) -> None:
    """The checkpoint's config is what predict trusts: training on labels encoded for other
    classes would save a model whose channels mean something else."""
    from privseg.core.errors import DataError
    from privseg.training.trainer import SiteTrainer

    site = phantom_cache.sites[0]
    train = phantom_cache.split(site, "train")
    assert train.classes == Classes.of(DataConfig())
    cfg = Config().with_overrides(["data.resolution=32", "data.classes={a = [1], b = [2]}"])
    with pytest.raises(DataError, match="prepared for classes"):
        SiteTrainer(cfg, name=site, train=train)


def test_a_class_value_the_task_does_not_declare_is_refused(phantom_dir, tmp_path) -> None:
    from privseg.data.prepare import prepare_cache

    cfg = DataConfig(resolution=16, classes={"liver": [1, 2], "vessel": [5]})
    with pytest.raises(ConfigError, match=r"data.classes = .* value\(s\) \[5\] are not among"):
        prepare_cache(phantom_dir, tmp_path / "cache", cfg, seed=0)
    assert not (tmp_path / "cache").exists()


def test_a_two_class_cache_holds_both_classes_on_both_grids(phantom_dir, tmp_path) -> None:
    """The cache's labels are class bit sets: liver where 1 or 2, tumour where 2, on the model
    grid and on each test case's original grid."""
    from privseg.data.msd import read_task
    from privseg.data.nifti import load_image
    from privseg.data.prepare import prepare_cache

    cfg = DataConfig(resolution=32, classes={"liver": [1, 2], "tumour": [2]})
    cache = prepare_cache(phantom_dir, tmp_path / "cache", cfg, seed=0)
    assert cache.classes == Classes.of(cfg)
    seen = set()
    for site in cache.sites:
        split = cache.split(site, "test")
        seen |= set(np.unique(split.labels).tolist())
        for pid, grid in split.native.items():
            case = next(c for c in read_task(phantom_dir).cases if c.case_id == pid)
            label, _ = load_image(case.label)
            assert np.array_equal(grid.label(), Classes.of(cfg).encode(label.astype(np.uint8)))
    assert seen <= {0, 1, 3} and 3 in seen  # tumour never outside liver
