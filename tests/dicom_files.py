"""DICOM files the tests make from a bundled radiograph with pydicom (and DCMTK for JPEG Lossless).

Each variant stores the same grey radiograph ``g`` (uint8) another way, chosen so that the display pipeline
of DICOM gives back exactly ``g / 255`` (lossless) or what its codec decodes to (lossy): the bit depths,
MONOCHROME1 and MONOCHROME2, a window, a VOI LUT sequence, a Modality LUT sequence, every compressed
transfer syntax fracdet decodes, and a stream without preamble or file meta. Others must be refused.
Every file carries made-up identifiers (:data:`PHI`) that must never come out of fracdet.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Identifying values written into every file: none may appear in any output, message or log.
PHI = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-0042-7731",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC-99-1234",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111111111",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222222222222",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.33333333333333333333",
    "InstitutionName": "St Elsewhere General",
    "ReferringPhysicianName": "House^Gregory",
}


@dataclass(frozen=True)
class Variant:
    """One way of storing the radiograph: ``lossy`` ones are compared with what their codec decodes to."""

    name: str
    build: Callable[[np.ndarray], object]  # grey uint8 -> pydicom Dataset (or bytes for a raw stream)
    lossy: bool = False
    needs: str | None = None  # an executable the build needs (DCMTK)


def _dataset(stored: np.ndarray, *, bits: int, photometric: str = "MONOCHROME2", modality: str = "DX", **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = PHI["SOPInstanceUID"]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.Modality = modality
    ds.StudyDate, ds.StudyTime = "20261129", "101500"
    ds.BodyPartExamined = "HAND"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if photometric == "MONOCHROME1":
        ds.PresentationLUTShape = "INVERSE"  # as the DX IOD requires of MONOCHROME1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    return ds


def mono2_8bit(g):
    return _dataset(g, bits=8)


def mono2_12bit_window(g):  # 16 g in 12 bits, the window maps it back: (16 g - 2040) / 4080 + 0.5
    return _dataset(g.astype(np.uint16) * 16, bits=12, WindowCenter="2040.5", WindowWidth="4081")


def mono2_16bit_rescale(g):  # stored 256 g + 128; slope 0.5, intercept -64 -> 128 g; window over 0..32640
    return _dataset(g.astype(np.uint16) * 256 + 128, bits=16, RescaleSlope="0.5", RescaleIntercept="-64",
                    RescaleType="US", WindowCenter="16320.5", WindowWidth="32641")  # fmt: skip


def mono1_12bit(g):  # bright bone stored low; INVERSE presentation: inverted once
    return _dataset(4080 - g.astype(np.uint16) * 16, bits=12, photometric="MONOCHROME1", WindowCenter="2040.5",
                    WindowWidth="4081")  # fmt: skip


def several_windows(g):  # the first of several windows is the default
    return _dataset(g.astype(np.uint16) * 16, bits=12, WindowCenter=["2040.5", "1000"], WindowWidth=["4081", "200"])


def voi_lut_sequence(g):  # 12-bit stored 16 g; a 16-bit VOI LUT maps it to 257 g
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [min(65535, round(i * 257 / 16)) for i in range(4096)]
    ds = _dataset(g.astype(np.uint16) * 16, bits=12)
    ds.VOILUTSequence = [item]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    return ds


def modality_lut_sequence(g):  # 8-bit stored g; a modality LUT to 257 g; no window: its full output range
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [i * 257 for i in range(256)]
    ds = _dataset(g, bits=8)
    ds.ModalityLUTSequence = [item]
    ds["ModalityLUTSequence"][0]["LUTData"].VR = "US"
    return ds


def padded(g):  # a padding value outside the body: displayed black, not white
    stored = g.astype(np.uint16) * 16
    stored[:, :8] = 4095
    return _dataset(stored, bits=12, WindowCenter="2040.5", WindowWidth="4081", PixelPaddingValue=4095)


def signed_12bit(g):  # Pixel Representation 1: 16 g - 2048 as signed 12-bit; the window maps it back
    stored = (g.astype(np.int32) * 16 - 2048).astype(np.int16).view(np.uint16)
    return _dataset(stored, bits=12, PixelRepresentation=1, WindowCenter="-7.5", WindowWidth="4081")


def high_bits_set(g):  # bits above Bits Stored hold something else (an old overlay): they must be ignored
    return _dataset(g.astype(np.uint16) * 16 | 0xE000, bits=12, WindowCenter="2040.5", WindowWidth="4081")


def _compressed(syntax_name: str, **kwargs):
    def build(g):
        from pydicom import uid

        ds = _dataset(g, bits=8)
        ds.compress(getattr(uid, syntax_name), **kwargs)
        return ds

    return build


def jpeg_baseline(g):  # Pillow's JPEG encapsulated: the lossy transfer syntax most viewers export
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="JPEG", quality=90)
    ds = _dataset(g, bits=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def jpeg_lossless(g):  # DCMTK's encoder (pydicom encodes no JPEG Lossless)
    return ("dcmcjpeg", "+e1", mono2_8bit(g))


def deflated(g):  # the whole dataset deflated (PS3.5 A.5): lossless, as some archives send it
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = mono2_8bit(g)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds


def deflate_bomb(g, inflated: int) -> bytes:
    """A deflated radiograph with ``inflated`` bytes of zeros in a private element ahead of its pixels: the
    file is a thousandth of what it inflates to."""
    ds = deflated(g)
    ds.add_new(0x00091010, "OB", bytes(inflated))
    return write_bytes(ds)


def many_elements(g, count: int) -> bytes:
    """The radiograph with ``count`` empty private elements (8 bytes each) ahead of its pixels: parsed one by
    one in Python, 20 MB of them took 18 s and a gigabyte."""
    import struct

    data = write_bytes(mono2_8bit(g))
    elements = b"".join(struct.pack("<HH2sH", 0x0009 + 2 * (k // 0xF000), 0x1000 + k % 0xF000, b"LO", 0)
                        for k in range(count))  # fmt: skip
    at = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
    return data[:at] + elements + data[at:]


def no_preamble(g):  # a bare dataset stream (implicit VR little endian), as some archives store
    from pydicom import dcmwrite

    ds = mono2_8bit(g)
    del ds.file_meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


READABLE = (
    Variant("mono2_8bit", mono2_8bit),
    Variant("mono2_12bit_window", mono2_12bit_window),
    Variant("mono2_16bit_rescale", mono2_16bit_rescale),
    Variant("mono1_12bit", mono1_12bit),
    Variant("several_windows", several_windows),
    Variant("voi_lut_sequence", voi_lut_sequence),
    Variant("modality_lut_sequence", modality_lut_sequence),
    Variant("padded", padded),
    Variant("signed_12bit", signed_12bit),
    Variant("high_bits_set", high_bits_set),
    Variant("rle", _compressed("RLELossless")),
    Variant("jpeg_ls", _compressed("JPEGLSLossless")),
    Variant("jpeg_2000_lossless", _compressed("JPEG2000Lossless")),
    Variant("jpeg_lossless", jpeg_lossless, needs="dcmcjpeg"),
    Variant("no_preamble", no_preamble),
    Variant("deflated", deflated),
    Variant("jpeg_baseline", jpeg_baseline, lossy=True),
    Variant("jpeg_2000_lossy", _compressed("JPEG2000", j2k_cr=[15]), lossy=True),
)


def multi_frame(g):
    ds = _dataset(np.stack([g, g]).reshape(-1, g.shape[1]), bits=8)
    ds.Rows, ds.NumberOfFrames = g.shape[0], 2
    return ds


def ct_slice(g):
    return _dataset(g.astype(np.uint16) * 16, bits=12, modality="CT", WindowCenter="2040.5", WindowWidth="4081")


def no_pixel_data(g):
    ds = mono2_8bit(g)
    del ds.PixelData
    ds.Modality = "SR"
    return ds


def colour(g):
    ds = _dataset(np.repeat(g[..., None], 3, axis=2), bits=8, photometric="RGB", modality="OT")
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    return ds


def truncated(g):
    return write_bytes(mono2_8bit(g))[:-5000]


def larger_frame(syntax_name: str):
    """A frame compressed at twice the size the DICOM header gives: its codec would allocate what the frame
    says (a few kilobytes of JPEG-LS can ask for gigabytes)."""

    def build(g):
        big = np.kron(g, np.ones((2, 2), np.uint8))
        ds = jpeg_baseline(big) if syntax_name == "JPEGBaseline8Bit" else _compressed(syntax_name)(big)
        ds.Rows, ds.Columns = g.shape
        return ds

    return build


def multi_valued_rows(g):  # Rows written with two values: pydicom reads it as a list
    ds = mono2_8bit(g)
    ds.Rows = [g.shape[0], 1]
    return ds


def unknown_vr(g):  # Bits Stored with a VR no standard has: pydicom fails only when the value is read
    data = write_bytes(mono2_8bit(g))
    return data.replace(b"\x28\x00\x01\x01US", b"\x28\x00\x01\x01VS", 1)


def odd_length_value(g):  # Bits Stored (US, 2 bytes a value) given 3 bytes; the next element keeps its place
    data = write_bytes(mono2_8bit(g))
    at = data.index(b"\x28\x00\x01\x01US")
    return data[:at] + b"\x28\x00\x01\x01US\x03\x00\x08\x00\x00" + data[at + 10 :]


def jpeg_frame_of_many_scans(g):  # a progressive frame of 101 scans: libjpeg decodes each over the whole image
    from pydicom.encaps import encapsulate

    from tests.structure_files import progressive_jpeg_with_scans

    ds = jpeg_baseline(g)
    ds.PixelData = encapsulate([progressive_jpeg_with_scans(101, g.shape[1], g.shape[0])])
    return ds


#: (variant, the reason the refusal must name)
REFUSED = (
    (Variant("multi_frame", multi_frame), "multi-frame"),
    (Variant("ct_slice", ct_slice), "modality CT is not a projection radiograph"),
    (Variant("no_pixel_data", no_pixel_data), "no Pixel Data"),
    (Variant("colour", colour), "a radiograph is grey"),
    (Variant("truncated", truncated), "truncated"),
    (Variant("larger_jpeg_ls_frame", larger_frame("JPEGLSLossless")), "compressed frame is"),
    (Variant("larger_jpeg_2000_frame", larger_frame("JPEG2000Lossless")), "compressed frame is"),
    (Variant("larger_jpeg_frame", larger_frame("JPEGBaseline8Bit")), "compressed frame is"),
    (Variant("multi_valued_rows", multi_valued_rows), "malformed DICOM header"),
    (Variant("unknown_vr", unknown_vr), "malformed DICOM header"),
    (Variant("odd_length_value", odd_length_value), "malformed DICOM header"),
    (Variant("jpeg_frame_of_many_scans", jpeg_frame_of_many_scans), "more than 100 scans"),
)


def write_bytes(built) -> bytes:
    """The bytes of a built variant: a dataset as a Part 10 file, raw bytes as they are, DCMTK's output."""
    if isinstance(built, bytes):
        return built
    if isinstance(built, tuple):  # (tool, option, dataset): encoded by a DCMTK command
        tool, option, ds = built
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "in.dcm", Path(folder) / "out.dcm"
            source.write_bytes(write_bytes(ds))
            subprocess.run([tool, option, str(source), str(target)], check=True, capture_output=True)
            return target.read_bytes()
    buf = io.BytesIO()
    built.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def available(variant: Variant) -> bool:
    return variant.needs is None or shutil.which(variant.needs) is not None
