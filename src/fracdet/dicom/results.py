"""A prediction as standard DICOM objects a radiology department's viewers show, originals untouched.

For one analysed radiograph, three objects in one new series of the original study, made with highdicom:

* a **Comprehensive SR** following TID 1500 (Measurement Report): the finding at the model's operating
  points (fracture *definite*, *suspicious* or *not detected*), the calibrated probability and the thresholds
  used, the algorithm (name and version) as the observer device, and each shown box as an image region
  referencing the analysed instance;
* a **Grayscale Softcopy Presentation State** referencing the original: the boxes and their scores as
  graphic annotations, one layer per level, so a viewer toggles them over the untouched image. It repeats the
  original's display: its window (or VOI LUT) and, for MONOCHROME1, an INVERSE presentation LUT;
* a **Secondary Capture** of the radiograph with the map and boxes burned in under a visible banner, "AI
  RESULT - NOT A DIAGNOSIS", for viewers that show neither SR graphics nor presentation states.

Each carries the original's patient and study (so the PACS files it with the study; these identifiers stay
inside the DICOM objects, never in logs), new series and instance UIDs, and the model's identity
(manufacturer ``fracdet``, model name and version). ``Manufacturer`` and the series description mark them as
fracdet's own, so the PACS node never analyses them again (:func:`is_fracdet_result`).

Needs the ``dicom`` extra (highdicom, pydicom).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fracdet.data.dicom import DICOM_HINT
from fracdet.inference.predictor import Prediction
from fracdet.models.release import TrainedModel

__all__ = [
    "MANUFACTURER",
    "DicomResults",
    "build_results",
    "dataset_bytes",
    "is_fracdet_result",
    "results_for",
    "write_results",
]

# highdicom logs the source image's SOP Instance UID at INFO ("copy ... attributes from dataset <UID>"): a
# full UID in a log is an identifier, so only its warnings and errors get through.
logging.getLogger("highdicom").setLevel(max(logging.getLogger("highdicom").level, logging.WARNING))

#: What fracdet writes in Manufacturer: how its own objects are recognised when routed back.
MANUFACTURER = "fracdet"
SERIES_DESCRIPTION = "fracdet AI result (not a diagnosis)"
BANNER = "AI RESULT - NOT A DIAGNOSIS"
#: Codes of fracdet's own concepts (a private coding scheme, as DICOM allows for what no standard codes).
_SCHEME = "99FRACDET"
_LEVEL_TEXT = {"definite": "Fracture definite", "suspicious": "Fracture suspicious", None: "Fracture not detected"}


def _verdict_text(prediction: Prediction) -> str:
    """The verdict a viewer shows, marked when it is borderline (a re-saved copy may get the other one)."""
    return _LEVEL_TEXT[prediction.level] + (", borderline" if prediction.borderline else "")


@dataclass
class DicomResults:
    """The three objects made for one radiograph."""

    sr: Any
    gsps: Any
    sc: Any

    def all(self) -> list[Any]:
        return [self.sr, self.gsps, self.sc]


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError as exc:
        raise ImportError(DICOM_HINT) from exc
    return highdicom


def is_fracdet_result(ds: Any) -> bool:
    """A dataset fracdet made (its SR, presentation state or secondary capture), not a radiograph to analyse."""
    return str(getattr(ds, "Manufacturer", "")) == MANUFACTURER or str(getattr(ds, "SeriesDescription", "")).startswith(
        "fracdet"
    )


def build_results(
    source: Any,
    prediction: Prediction,
    model: TrainedModel,
    *,
    display: np.ndarray,
    series_number: int = 9000,
) -> DicomResults:
    """The SR, presentation state and secondary capture of ``prediction`` on the radiograph ``source``.

    Args:
        source: the analysed radiograph's pydicom dataset (its pixels are not changed).
        prediction: what :class:`fracdet.inference.Predictor` said about it (with its heatmap for the capture).
        model: the model that said it (its name, version and thresholds go into the objects).
        display: the radiograph's display pixels (float [0, 1], the source's rows x columns), as decoded.
        series_number: of the new series (a high number keeps it after the original's in viewers).
    """
    hd = _highdicom()
    uid = _uids(source, model)
    common = {"series_instance_uid": uid("series"), "series_number": series_number, "manufacturer": MANUFACTURER}
    sr = _structured_report(hd, source, prediction, model, common, uid)
    gsps = _presentation_state(source, prediction, model, common, uid)
    sc = _secondary_capture(hd, source, prediction, model, common, display, uid)
    for ds in (sr, gsps, sc):
        ds.SeriesDescription = SERIES_DESCRIPTION
    laterality = source.get("Laterality", "") or source.get("ImageLaterality", "")
    for ds in (gsps, sc):  # General Series, Type 2C for paired body parts (a hand, a leg): the source's, or empty
        ds.Laterality = laterality
    return DicomResults(sr=sr, gsps=gsps, sc=sc)


def results_for(
    data: bytes, prediction: Prediction, model: TrainedModel, *, force_modality: bool = False
) -> DicomResults:
    """:func:`build_results` for the DICOM file ``data`` that ``prediction`` was made from."""
    from pydicom import dcmread

    from fracdet.data.dicom import decode_dicom, quiet_pydicom

    display, _ = decode_dicom(data, max_pixels=1 << 62, force_modality=force_modality)
    with quiet_pydicom():  # copying the patient module reads its values: a malformed one is not quoted
        source = dcmread(io.BytesIO(data), force=True)
        return build_results(_with_type2(source), prediction, model, display=display)


#: Type 2 attributes of the Patient and General Study modules: present in every object made from the source,
#: empty when the source lacks them (as DICOM allows), so the objects stay valid.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _with_type2(source: Any) -> Any:
    """The source with every Type 2 patient and study attribute present, and emptied where its value is not
    valid DICOM (a date that is not a date, a sex outside M/F/O): the results are still made and filed with
    the study, and the malformed value is neither copied nor quoted."""
    from pydicom.valuerep import DA, DT, TM

    parsers = {"DA": DA, "DT": DT, "TM": TM}
    for keyword in _TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
            continue
        element = source[keyword]
        try:
            value = element.value
            if value and element.VR in parsers:
                parsers[element.VR](value)
            if keyword == "PatientSex" and value not in ("M", "F", "O", ""):
                raise ValueError
        except (ValueError, TypeError):
            source[keyword].value = ""
    return source


def write_results(results: DicomResults, folder: str | Path) -> list[Path]:
    """Write the objects as DICOM files named by their modality and instance number (no identifiers)."""
    from fracdet.utils.atomic import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in results.all():
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        atomic_write_bytes(path, dataset_bytes(ds))
        paths.append(path)
    return paths


def dataset_bytes(ds: Any) -> bytes:
    """A dataset as a DICOM file (preamble, file meta), as it is written, sent over DICOMweb or scored."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- the structured report --------------------------------------------------------------------------------


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=_SCHEME, meaning=meaning)


def _uids(source: Any, model: TrainedModel) -> Callable[[str], str]:
    """UIDs derived from the analysed image, the model and fracdet's version, one per role: a name-based UUID
    (RFC 4122 version 5) in the 2.25 form of PS3.5 B.2. Results made again for the same image by the same
    model and code are the same instances, so a pull run twice, or an image sent again after its retention,
    files no second copy in the PACS. (pydicom's ``generate_uid`` ignores its entropy under the 2.25 root.)"""
    import uuid

    from fracdet import __version__

    key = "|".join([str(source.SOPInstanceUID), model.name, str(model.version), __version__])
    return lambda role: f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{key}|{role}').int}"


def _structured_report(hd: Any, source: Any, prediction: Prediction, model: TrainedModel, common: dict,
                       uid: Callable[[str], str]) -> Any:  # fmt: skip
    from pydicom.sr.codedict import codes

    sr = hd.sr
    algorithm = sr.AlgorithmIdentification(name=model.name, version=model.version, manufacturer=MANUFACTURER)
    device = sr.DeviceObserverIdentifyingAttributes(
        uid=uid("device"), name=f"{MANUFACTURER} {model.name}", manufacturer_name=MANUFACTURER, model_name=model.name
    )
    observer = sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    context = sr.ObservationContext(observer_device_context=observer)
    fracture = sr.CodedConcept(value="125605004", scheme_designator="SCT", meaning="Fracture of bone")
    finding = sr.CodedConcept(value="121071", scheme_designator="DCM", meaning="Finding")
    unit = sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

    def number(code: str, meaning: str, value: float) -> Any:
        return sr.Measurement(
            name=_code(code, meaning), value=round(float(value), 6), unit=unit, algorithm_id=algorithm
        )

    def level_of(level: str | None) -> Any:
        return sr.QualitativeEvaluation(name=finding, value=_code(f"L-{(level or 'none').upper()}", _LEVEL_TEXT[level]))

    # borderline: within half a logit of the threshold the verdict is read at, where a re-saved copy of the
    # image may get the other verdict (fracdet.models.scoring.borderline); answered Yes or No in SNOMED's codes
    borderline = sr.QualitativeEvaluation(name=_code("B-VERDICT", "Verdict borderline"),
                                          value=codes.SCT.Yes if prediction.borderline else codes.SCT.No)  # fmt: skip
    measurements = [number("P-FRACTURE", "Calibrated probability of fracture", prediction.probability)]
    for level, threshold in sorted(prediction.levels.items()):
        measurements.append(number(f"T-{level.upper()}", f"Probability threshold, {level}", threshold))
    groups: list[Any] = [
        sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(uid=uid("finding"), identifier="image-level finding"),
            finding_type=fracture,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[level_of(prediction.level), borderline],
            source_images=[sr.SourceImageForMeasurementGroup.from_source_image(source)],
        )
    ]
    rows, columns = int(source.Rows), int(source.Columns)
    for k, box in enumerate(prediction.boxes, start=1):
        region = sr.ImageRegion(
            graphic_type=sr.GraphicTypeValues.POLYLINE,
            graphic_data=_outline(box, rows, columns),
            source_image=sr.SourceImageForRegion.from_source_image(source),
        )
        groups.append(
            sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=sr.TrackingIdentifier(uid=uid(f"box {k}"), identifier=f"suspected fracture {k}"),
                referenced_region=region,
                finding_type=fracture,
                algorithm_id=algorithm,
                measurements=[number("P-BOX", "Calibrated probability of fracture in region", box.score)],
                qualitative_evaluations=[level_of(box.level)],
            )
        )
    report = sr.MeasurementReport(
        observation_context=context,
        procedure_reported=sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    document = sr.ComprehensiveSR(
        evidence=[source], content=report, sop_instance_uid=uid("sr"), instance_number=1, is_complete=True, **common
    )
    from pydicom.dataset import Dataset

    scheme = Dataset()  # the private coding scheme, declared as DICOM asks (PS3.3 C.12.1.1.2)
    scheme.CodingSchemeDesignator, scheme.CodingSchemeName = _SCHEME, "fracdet fracture findings"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    document.CodingSchemeIdentificationSequence = [scheme]
    return document


def _outline(box: Any, rows: int, columns: int) -> np.ndarray:
    """A box's closed outline in the source's pixel coordinates (column, row)."""
    x0, y0, x1, y1 = box.x0 * columns, box.y0 * rows, box.x1 * columns, box.y1 * rows
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


# --- the presentation state -------------------------------------------------------------------------------


def _presentation_state(source: Any, prediction: Prediction, model: TrainedModel, common: dict,
                        uid: Callable[[str], str]) -> Any:  # fmt: skip
    from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        GrayscaleSoftcopyPresentationState,
        TextObject,
    )

    rows, columns = int(source.Rows), int(source.Columns)
    layers = {level: GraphicLayer(layer_name=level.upper(), order=k, description=f"fracdet: fracture {level}")
              for k, level in enumerate(("definite", "suspicious"), start=1)}  # fmt: skip
    annotations = []
    for level, layer in layers.items():
        boxes = [b for b in prediction.boxes if b.level == level]
        if not boxes:
            continue
        objects = [GraphicObject(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=_outline(b, rows, columns),
                                 units=AnnotationUnitsValues.PIXEL) for b in boxes]  # fmt: skip
        texts = [TextObject(text_value=f"{level} {b.score:.2f}", units=AnnotationUnitsValues.PIXEL,
                            anchor_point=(float(b.x0 * columns), float(max(b.y0 * rows - 4, 0))),
                            anchor_point_visible=False) for b in boxes]  # fmt: skip
        annotations.append(GraphicAnnotation(referenced_images=[source], graphic_layer=layer, graphic_objects=objects,
                                             text_objects=texts))  # fmt: skip
    summary = TextObject(  # across the top of the image, where a viewer fits it into the box
        text_value=f"{BANNER}: {_verdict_text(prediction)} (p={prediction.probability:.2f}, "
        f"{model.name} {model.version})",
        units=AnnotationUnitsValues.PIXEL,
        bounding_box=(4.0, 4.0, float(columns - 4), float(max(24, rows // 20))),
    )
    banner = GraphicLayer(layer_name="SUMMARY", order=3, description="fracdet: verdict and warning")
    annotations.append(GraphicAnnotation(referenced_images=[source], graphic_layer=banner, text_objects=[summary]))
    inverse = str(getattr(source, "PhotometricInterpretation", "")) == "MONOCHROME1"
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    return GrayscaleSoftcopyPresentationState(  # modality and VOI LUT: the original's, copied by highdicom
        referenced_images=[source],
        sop_instance_uid=uid("gsps"),
        instance_number=1,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number="0",
        content_label="FRACDET",
        content_description=f"fracdet {model.name} {model.version}",
        graphic_layers=[*layers.values(), banner],
        graphic_annotations=annotations,
        presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=shape),
        **common,
    )


# --- the secondary capture --------------------------------------------------------------------------------


def _secondary_capture(hd: Any, source: Any, prediction: Prediction, model: TrainedModel, common: dict,
                       display: np.ndarray, uid: Callable[[str], str]) -> Any:  # fmt: skip
    picture = burned_in(display, prediction, model)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=picture,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # replaced below: highdicom wants one, the source's is what holds
        sop_instance_uid=uid("sc"),
        instance_number=1,
        **common,
    )
    sc.PatientOrientation = source.get("PatientOrientation", "")  # Type 2: empty when the source does not say
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName, sc.SoftwareVersions = model.name, model.version
    sc.ImageComments = BANNER
    return sc


def burned_in(display: np.ndarray, prediction: Prediction, model: TrainedModel) -> np.ndarray:
    """The radiograph (grey [0, 1]) with the map where it is warm and the boxes drawn, under a banner that says
    what it is: RGB uint8 at the radiograph's own size."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    from fracdet.explain import draw_boxes, overlay

    grey = np.uint8(np.clip(display, 0, 1) * 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if prediction.heatmap is not None:  # tint only where the map says something: the rest stays the radiograph
        heat = cv2.resize(prediction.heatmap.astype(np.float32), grey.shape[::-1], interpolation=cv2.INTER_LINEAR)
        rgb = np.where((heat >= 0.2)[..., None], overlay(grey, prediction.heatmap, opacity=0.35), rgb)
    rgb = draw_boxes(rgb, prediction.boxes, width=max(2, rgb.shape[0] // 250))
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    text = f"{BANNER} | {_verdict_text(prediction)} | p={prediction.probability:.2f} | {model.name} {model.version}"
    size = max(8, rgb.shape[0] // 30)
    font = ImageFont.load_default(size=size)
    while size > 8 and draw.textlength(text, font=font) > rgb.shape[1] - 12:  # the whole warning fits the width
        size -= 1
        font = ImageFont.load_default(size=size)
    height = int(size * 1.6)
    draw.rectangle([0, 0, rgb.shape[1], height], fill=(0, 0, 0))
    draw.text((6, height * 0.15), text, fill=(255, 220, 0), font=font)
    return np.asarray(picture)
