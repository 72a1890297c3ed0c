"""A predicted mask as a DICOM Segmentation object (DICOM-SEG), the form a PACS viewer takes.

The object references its source series (study, series and instance UIDs, frame of
reference), holds one binary segment per class with a coded description (SNOMED CT: liver,
neoplasm, else an anatomical structure) and one frame per source slice that holds any
foreground. highdicom builds and validates it.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from privseg import __version__
from privseg.core.errors import DataError
from privseg.core.io import atomic_write_bytes
from privseg.data.dicom import series_datasets

# What each class name means, coded: (segmented property category, segmented property type).
_CODES = {
    "liver": (codes.SCT.Organ, codes.SCT.Liver),
    "tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "tumor": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
    "lesion": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
}
_OTHER = (codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure)


def write_dicom_seg(
    out: Path,
    series_folder: Path,
    channels: np.ndarray,
    names: tuple[str, ...],
    *,
    series: str | None,
) -> None:
    """Write ``channels`` (bool ``[X, Y, Z, C]`` on the series' own grid, Z in the order of
    :func:`~privseg.data.dicom.series_datasets`) as a DICOM-SEG referencing that series."""
    import highdicom as hd

    sources = series_datasets(series_folder, series)
    if channels.shape[2] != len(sources):
        raise DataError(
            f"{series_folder}: the mask has {channels.shape[2]} slices, the series {len(sources)}"
        )
    # highdicom wants frames x rows x columns x segments, frames in the sources' order
    pixels = np.ascontiguousarray(np.transpose(channels, (2, 1, 0, 3))).astype(bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="privseg", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=name,
            segmented_property_category=_CODES.get(name.lower(), _OTHER)[0],
            segmented_property_type=_CODES.get(name.lower(), _OTHER)[1],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for k, name in enumerate(names)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="privseg",
        manufacturer_model_name="privseg",
        software_versions=__version__,
        device_serial_number="none",
        content_description="privseg segmentation",
    )
    buffer = BytesIO()
    seg.save_as(buffer)
    atomic_write_bytes(out, buffer.getvalue())
