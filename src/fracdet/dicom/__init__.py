"""DICOM in a radiology department: results as standard DICOM objects (and, next, a PACS node).

from fracdet.dicom import build_results, write_results
results = build_results(source_dataset, prediction, model, display=pixels)   # SR + GSPS + SC
write_results(results, "out/")

Reading DICOM input belongs to the data layer (:mod:`fracdet.data.dicom`); this package sits at the end of
the pipeline, beside :mod:`fracdet.serve`. Needs the ``dicom`` extra (pydicom, highdicom).
"""

from __future__ import annotations

from fracdet.dicom.results import (
    MANUFACTURER,
    DicomResults,
    build_results,
    is_fracdet_result,
    results_for,
    write_results,
)

__all__ = ["MANUFACTURER", "DicomResults", "build_results", "is_fracdet_result", "results_for", "write_results"]
