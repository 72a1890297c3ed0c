"""Evaluation: Dice per volume, surface distances, scoring a model on a slice split."""

from privseg.evaluation.evaluate import evaluate_split, predict_volume
from privseg.evaluation.metrics import dice, surface_distances

__all__ = ["dice", "evaluate_split", "predict_volume", "surface_distances"]
