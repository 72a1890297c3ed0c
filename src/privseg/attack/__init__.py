"""Gradient-inversion attack on a site's update and an empirical audit of the reported epsilon.

``threat`` (what the server sees), ``inversion`` (Inverting Gradients, Geiping et al. 2020),
``metrics`` (scoring, apart from the attack), ``audit`` (K-way identification game),
``runner`` (attack and audit a model on a site's slices), ``one_run`` (the one-run audit's
scores and bounds); run folders and the study's attack are ``privseg.runs.attack``.
"""

from privseg.attack.inversion import Reconstruction, reconstruct, simulate_site_update
from privseg.attack.threat import ServerPayload, ThreatModel

__all__ = ["Reconstruction", "ServerPayload", "ThreatModel", "reconstruct", "simulate_site_update"]
