"""Dataset layouts -> sample table.

Four layouts are recognised by looking at the files, so users point fracdet at a folder and go:

1. FracAtlas: ``dataset.csv`` + ``images/Fractured|Non_fractured`` + ``annotations/`` (COCO, YOLO).
2. Image folders: ``[split/]class/`` with common class names in any case; DICOM files in them are grouped
   by patient (a keyed hash of the Patient ID, :func:`fracdet.data.dicom.keyed_hash`).
3. MURA-style trees: ``.../patientNNNNN/studyK_positive|negative/imageN.png``.
4. A CSV manifest ``path,label[,group,split,...]`` with paths relative to a data root.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from fracdet.data.decode import IMAGE_SUFFIXES, ImageReadError, is_image_file, read_file
from fracdet.data.table import new_table

__all__ = [
    "CLASS_NAMES",
    "FRACTURE_SIZES",
    "SPLIT_NAMES",
    "DatasetLayoutError",
    "fracture_size",
    "load_dataset",
    "load_manifest",
]


class DatasetLayoutError(ValueError):
    """The folder or manifest is not a dataset layout fracdet knows; the message says what was expected."""


#: Folder names (compared in lower case, with ``_`` and ``-`` read as spaces) -> label.
CLASS_NAMES = {
    "fracture": 1, "fractured": 1, "fractures": 1, "abnormal": 1, "positive": 1, "yes": 1,
    "no fracture": 0, "not fractured": 0, "non fractured": 0, "nonfractured": 0, "unfractured": 0,
    "no fractures": 0, "normal": 0, "negative": 0, "no": 0,
}  # fmt: skip
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
_MURA_STUDY = re.compile(r"^(study\d+)_(positive|negative)$", re.IGNORECASE)
_MURA_PATIENT = re.compile(r"^patient\d+$", re.IGNORECASE)
_FRACATLAS_REGIONS = ("hand", "leg", "hip", "shoulder", "mixed")
_FRACATLAS_VIEWS = ("frontal", "lateral", "oblique")
#: Per-image annotation columns holding lists (normalised boxes and polygons); a CSV manifest stores them as JSON.
ANNOTATION_COLUMNS = ("boxes", "polygons")
#: Size classes of a fracture: the side of a square as large as its biggest expert box, as a share of the
#: image side (FracAtlas: about a fifth of the annotated fractures are small, three fifths medium).
FRACTURE_SIZES = ((0.05, "small (<5% of side)"), (0.10, "medium (5-10%)"), (float("inf"), "large (>=10%)"))


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def load_dataset(path: str | Path, *, data_root: str | Path | None = None) -> pd.DataFrame:
    """Load a dataset folder or CSV manifest as a sample table, recognising the layout by itself.

    Args:
        path: a dataset folder, or a CSV manifest (``path,label[,group,split,...]``).
        data_root: for a manifest, the folder its paths are relative to (default: the manifest's folder).

    Returns:
        The sample table (see :mod:`fracdet.data.table`): ``path`` relative to the root, ``label``
        (1 = fracture / abnormal), ``group``, ``split`` and whatever metadata the layout has.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DatasetLayoutError: empty folder, unknown layout or unknown class name.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetLayoutError(f"{path}: expected a dataset folder or a CSV manifest (.csv)")
        return load_manifest(path, data_root=data_root)
    if (path / "dataset.csv").is_file() and (path / "images").is_dir():
        return _load_fracatlas(path)
    files = _image_files(path)
    if not files:
        raise DatasetLayoutError(
            f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files below it)"
        )
    if any(_MURA_STUDY.match(f.parent.name) for f in files[:1000]):
        return _load_mura(path, files)
    return _load_image_folders(path, files)


def load_manifest(manifest: str | Path, *, data_root: str | Path | None = None) -> pd.DataFrame:
    """Read a CSV manifest (what ``fracdet split`` writes) as a sample table."""
    manifest = Path(manifest)
    root = Path(data_root) if data_root is not None else manifest.parent
    frame = pd.read_csv(manifest, dtype={"path": str, "group": str, "split": str})
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise DatasetLayoutError(f"{manifest}: manifest needs columns path,label (missing {sorted(missing)})")
    labels = pd.to_numeric(frame["label"], errors="coerce")
    if labels.isna().any() or not labels.isin([0, 1]).all():
        raise DatasetLayoutError(f"{manifest}: label must be 0 or 1 in every row")
    frame["label"] = labels.astype(int)
    for column in ANNOTATION_COLUMNS:  # JSON lists (what `fracdet pack` writes) back to lists
        if column in frame:
            frame[column] = [json.loads(v) if isinstance(v, str) and v.startswith("[") else [] for v in frame[column]]
    absent = [p for p in frame["path"] if not (root / p).is_file()]
    if absent:
        raise DatasetLayoutError(
            f"{manifest}: {len(absent)} listed files are missing under {root}, e.g. {absent[0]} "
            "(is --data the folder the manifest's paths are relative to?)"
        )
    return new_table(frame.to_dict("records"), root=root, layout="manifest")


def _load_image_folders(root: Path, files: list[Path]) -> pd.DataFrame:
    rows = []
    for f in files:
        parts = f.relative_to(root).parts[:-1]
        if len(parts) not in (1, 2):
            raise DatasetLayoutError(
                f"{root}: {f.relative_to(root)} is not in a [split/]class/ folder "
                "(expected e.g. train/fractured/x.jpg or normal/x.png)"
            )
        class_name = _normalise(parts[-1])
        if class_name not in CLASS_NAMES:
            raise DatasetLayoutError(
                f"{root}: unknown class folder {parts[-1]!r}; expected one of "
                f"{', '.join(sorted(CLASS_NAMES))} (any case, '_' or '-' for spaces)"
            )
        split = None
        if len(parts) == 2:
            split = SPLIT_NAMES.get(_normalise(parts[0]))
            if split is None:
                raise DatasetLayoutError(
                    f"{root}: unknown split folder {parts[0]!r}; expected one of {', '.join(sorted(SPLIT_NAMES))}"
                )
        rows.append({"path": f.relative_to(root).as_posix(), "label": CLASS_NAMES[class_name], "split": split,
                     **_dicom_groups(f)})  # fmt: skip
    return new_table(rows, root=root, layout="image-folders")


def _dicom_groups(path: Path) -> dict[str, str]:
    """A DICOM file's patient and study as keyed hashes (never the IDs), its patient as its group, so a
    split keeps each patient's images together; nothing for other files."""
    from fracdet.data.dicom import is_dicom, read_dicom_info

    with path.open("rb") as fh:
        if not is_dicom(fh.read(132)):
            return {}
    try:
        info = read_dicom_info(read_file(path), name=str(path))
    except ImageReadError:
        return {}  # unreadable: the audit reports it
    groups = {"patient_id": info.patient, "study_id": info.study} if info.patient else {"study_id": info.study}
    if info.patient:
        groups["group"] = f"patient:{info.patient}"
    return {k: v for k, v in groups.items() if v}


def _load_mura(root: Path, files: list[Path]) -> pd.DataFrame:
    rows = []
    for f in files:
        rel = f.relative_to(root)
        study = _MURA_STUDY.match(f.parent.name)
        if study is None or not _MURA_PATIENT.match(f.parent.parent.name):
            raise DatasetLayoutError(f"{root}: {rel} is not in patientNNNNN/studyK_positive|negative/")
        patient = f.parent.parent.name
        region = next((p[3:].lower() for p in rel.parts if p.upper().startswith("XR_")), None)
        split = next((SPLIT_NAMES[_normalise(p)] for p in rel.parts[:-3] if _normalise(p) in SPLIT_NAMES), None)
        rows.append({
            "path": rel.as_posix(),
            "label": int(study.group(2).lower() == "positive"),
            "group": f"patient:{patient}",
            "split": split,
            "patient_id": patient,
            "study_id": f"{patient}/{study.group(1)}",
            "region": region,
        })  # fmt: skip
    return new_table(rows, root=root, layout="mura")


def _fracatlas_boxes(root: Path) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """Fracture boxes and polygons per file name, normalised to [0, 1]; COCO first, YOLO (boxes only) otherwise.

    Boxes are ``(x0, y0, x1, y1)``; a polygon is a flat ``[x, y, x, y, ...]`` list (COCO's segmentation),
    one per instance that has one.
    """
    boxes: dict[str, list[list[float]]] = {}
    polygons: dict[str, list[list[float]]] = {}
    coco = root / "annotations" / "coco_fracture_masks.json"
    if coco.is_file():
        data = json.loads(coco.read_text())
        images = {im["id"]: im for im in data["images"]}
        for ann in data["annotations"]:
            im = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            W, H = im["width"], im["height"]  # noqa: N806
            boxes.setdefault(im["file_name"], []).append([x / W, y / H, (x + w) / W, (y + h) / H])
            for poly in ann.get("segmentation") or []:
                if isinstance(poly, list) and len(poly) >= 6:
                    norm = [round(v / (W if i % 2 == 0 else H), 6) for i, v in enumerate(poly)]
                    polygons.setdefault(im["file_name"], []).append(norm)
        return boxes, polygons
    for txt in sorted((root / "annotations" / "yolo").glob("*.txt")):
        for line in txt.read_text().split("\n"):
            fields = line.split()
            if len(fields) == 5:
                cx, cy, w, h = map(float, fields[1:])
                boxes.setdefault(txt.stem + ".jpg", []).append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return boxes, polygons


def fracture_size(boxes: list[list[float]]) -> str | None:
    """Size class (:data:`FRACTURE_SIZES`) of the largest normalised ``(x0, y0, x1, y1)`` box; ``None`` if none.

    Small fractures are the ones a model at 224 px sees as a handful of pixels, so sensitivity per size class
    tells a reader which misses to expect.
    """
    if not boxes:
        return None
    side = max(((b[2] - b[0]) * (b[3] - b[1])) ** 0.5 for b in boxes)
    return next(name for upper, name in FRACTURE_SIZES if side < upper)


def _load_fracatlas(root: Path) -> pd.DataFrame:
    meta = pd.read_csv(root / "dataset.csv").set_index("image_id")
    boxes, polygons = _fracatlas_boxes(root)
    folders = {"Fractured": 1, "Non_fractured": 0}
    rows = []
    for folder, label in folders.items():
        for f in _image_files(root / "images" / folder):
            row: dict = {"path": f.relative_to(root).as_posix(), "label": label}
            if f.name in meta.index:
                m = meta.loc[f.name]
                row["region"] = "+".join(r for r in _FRACATLAS_REGIONS if m[r] == 1) or None
                row["view"] = "+".join(v for v in _FRACATLAS_VIEWS if m[v] == 1) or None
                row["hardware"] = bool(m["hardware"])
                row["multiscan"] = bool(m["multiscan"])
                row["fracture_count"] = int(m["fracture_count"])
                # The folder is the label; where the CSV disagrees the record is flagged for the audit.
                row["metadata_label"] = int(m["fractured"])
            row["boxes"] = boxes.get(f.name, [])
            row["polygons"] = polygons.get(f.name, [])
            row["fracture_size"] = fracture_size(row["boxes"]) if label == 1 else None
            rows.append(row)
    if not rows:
        raise DatasetLayoutError(f"{root}: no images in images/Fractured or images/Non_fractured")
    table = new_table(rows, root=root, layout="fracatlas")
    table["label_disagrees_with_metadata"] = table["metadata_label"].notna() & (
        table["metadata_label"] != table["label"]
    )
    return table
