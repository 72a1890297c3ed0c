"""privseg: differentially private federated CT segmentation across hospitals."""

__version__ = "0.1.0"
