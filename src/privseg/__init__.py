"""privseg: differentially private federated CT segmentation across hospitals."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("privseg")  # one place: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
