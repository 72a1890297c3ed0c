"""Differential privacy at each site: accounting (pure), ledger (durable), budget, DP-SGD.

Import the modules themselves (``privseg.privacy.ledger``, ``privseg.privacy.dp_sgd``...): this
package imports nothing, so the ledger, the budget and a non-DP run load neither torch's DP
paths nor Opacus.
"""
