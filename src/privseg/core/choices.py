"""Fixed sets of values the CLI offers as choices and the library dispatches on.

Kept apart from the modules that act on them (which load torch) so that ``--help`` lists the
choices and a wrong one is refused without importing the library. The library's own tables
(``runs.study.PRESETS``, ``inference.export.FORMATS``, ``inference.volume.FORMATS``,
``data.phantom.ORGANS``) are keyed by these names; tests/test_cli.py checks they agree.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["central", "local", "federated"]
MODES: tuple[str, ...] = get_args(Mode)

Preset = Literal["full", "quick", "paper"]
ExportFormat = Literal["torchscript", "onnx"]
MaskFormat = Literal["nifti", "dicom-seg"]
Organ = Literal["liver", "pancreas"]
OutputFormat = Literal["table", "json"]
