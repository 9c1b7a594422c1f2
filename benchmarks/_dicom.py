"""The DX images the PACS benchmarks send: made-up UIDs, no patient data, uncompressed."""

from __future__ import annotations

import numpy as np

#: Digital X-Ray Image Storage, For Presentation.
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def dx(pixels: np.ndarray, *, bits: int = 8, study: str | None = None, series: str | None = None, **elements):
    """A DX dataset (pydicom) of grey ``pixels`` stored in ``bits`` bits (8: one byte a pixel, else two),
    MONOCHROME2, explicit VR little endian, with a file meta so that it can be saved as a Part 10 file.
    ``study`` and ``series`` default to new UIDs; ``elements`` are set by keyword (``InstanceNumber=1``)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = DX, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8 if bits <= 8 else 16, bits, bits - 1, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8 if bits <= 8 else np.uint16).tobytes()
    return ds
