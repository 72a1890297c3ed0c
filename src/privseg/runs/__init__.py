"""Runs: the layer above training and federation (``train``, ``study``, ``attack``)."""
