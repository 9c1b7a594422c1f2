"""The pictures of docs/PACS.md: what fracdet's DICOM results look like in a viewer.

    python scripts/pacs_pictures.py MODEL [--image samples/fracatlas/images/Fractured/IMG0000261.jpg] \
        [--out docs/evidence]

Stores a bundled radiograph as a MONOCHROME1 12-bit DX object (as many detectors export), analyses it with
MODEL, builds the three result objects and draws, from the objects themselves (read back from their bytes):

* ``pacs-secondary-capture.png``: the secondary capture as any viewer shows it;
* ``pacs-presentation-state.png``: the original displayed through the presentation state (its VOI window and
  INVERSE presentation LUT) with the presentation state's graphic layers drawn over it: solid for the
  DEFINITE layer, dashed for SUSPICIOUS, and its text objects.
"""

from __future__ import annotations

import argparse
import io
import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread

from fracdet.data.decode import decode_image
from fracdet.dicom import results_for
from fracdet.inference import Predictor
from fracdet.models import load
from fracdet.models.scoring import LEVEL_STYLE


def dx_monochrome1(image: Path) -> bytes:
    """A DX object holding ``image`` as MONOCHROME1 12-bit with a window (no real patient: made-up names)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.dicom_files import mono1_12bit, write_bytes

    return write_bytes(mono1_12bit(np.asarray(Image.open(image).convert("L"))))


def draw_presentation_state(original: bytes, gsps) -> Image.Image:
    """The original as the presentation state displays it, with its graphic layers drawn."""
    grey = np.uint8(decode_image(original).pixels * 255)  # window + INVERSE: what the GSPS asks for
    picture = Image.fromarray(grey).convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, picture.height // 40))
    for annotation in gsps.GraphicAnnotationSequence:
        level = annotation.GraphicLayer.lower()
        style, colour = LEVEL_STYLE.get(level, ("solid", (255, 220, 0)))
        for obj in annotation.get("GraphicObjectSequence", []):
            data = [float(v) for v in obj.GraphicData]
            points = list(zip(data[0::2], data[1::2], strict=True))
            for start, end in itertools.pairwise(points):
                if style == "solid":
                    draw.line([start, end], fill=colour, width=3)
                else:
                    steps = max(1, int(np.hypot(end[0] - start[0], end[1] - start[1]) // 8))
                    for k in range(0, steps, 2):
                        a, b = k / steps, min(1.0, (k + 1) / steps)
                        draw.line([tuple(s + t * (e - s) for s, e in zip(start, end, strict=True)) for t in (a, b)],
                                  fill=colour, width=3)  # fmt: skip
        for text in annotation.get("TextObjectSequence", []):
            if "BoundingBoxTopLeftHandCorner" in text:  # the summary: inside its box
                x, y = map(float, text.BoundingBoxTopLeftHandCorner)
                size = font.size
                while size > 8 and draw.textlength(text.UnformattedTextValue, font=font) > picture.width - 2 * x:
                    size -= 1
                    font = ImageFont.load_default(size=size)
                draw.rectangle([0, 0, picture.width, y + 1.6 * font.size], fill=(0, 0, 0))
                draw.text((x, y), text.UnformattedTextValue, fill=(255, 220, 0), font=font)
                font = ImageFont.load_default(size=max(12, picture.height // 40))
            else:  # a box's label: just above its anchor
                x, y = map(float, text.AnchorPoint)
                draw.text((x, y - font.size), text.UnformattedTextValue, fill=colour, font=font)
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--image", default="samples/fracatlas/images/Fractured/IMG0000261.jpg")
    parser.add_argument("--out", default="docs/evidence")
    args = parser.parse_args()
    model = load(args.model)
    original = dx_monochrome1(Path(args.image))
    prediction = Predictor(model).predict_bytes(original, "radiograph.dcm")
    results = results_for(original, prediction, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def reread(ds):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return dcmread(io.BytesIO(buf.getvalue()))

    capture = Image.fromarray(reread(results.sc).pixel_array)
    capture.thumbnail((720, 720))
    capture.save(out / "pacs-secondary-capture.png")
    overlay = draw_presentation_state(original, reread(results.gsps))
    overlay.thumbnail((720, 720))
    overlay.save(out / "pacs-presentation-state.png")
    print(f"{model.name}: {prediction.label} (p={prediction.probability:.2f}, level {prediction.level}), "
          f"{len(prediction.boxes)} boxes; pictures in {out}")  # fmt: skip


if __name__ == "__main__":
    main()
