"""Differential privacy at each site: accounting (pure), ledger (durable), budget, DP-SGD."""

from privseg.privacy.accounting import calibrate_noise, epsilon
from privseg.privacy.dp_sgd import DPGradient
from privseg.privacy.ledger import PrivacyLedger
from privseg.privacy.sampling import PoissonUnitSampler, secure_generator

__all__ = [
    "DPGradient",
    "PoissonUnitSampler",
    "PrivacyLedger",
    "calibrate_noise",
    "epsilon",
    "secure_generator",
]
