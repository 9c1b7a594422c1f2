"""How well the input gate refuses what is not a radiograph, and how rarely it refuses real radiographs.

    python benchmarks/input_gate.py [MODEL] --fracatlas ../shared/data/fracatlas \
        --multiregion ../shared/data/multiregion [--dev] [--out benchmarks/results-input-gate.json]
    python benchmarks/input_gate.py --fracatlas ... --multiregion ... --dev --components 32 64 128 192 256 384

Builds a held-out set of non-radiographs at radiograph sizes from what is available offline (nothing of it
was used to fit or choose the gate, which saw only radiographs), seed 0:

* ``photo``: the sample photographs scikit-image and scikit-learn ship, in random crops, scales and
  rotations, half of them made grey (a grey photograph is the hard case: the colour check cannot help);
* ``document``: text pages rendered with DejaVu fonts, and scikit-image's scanned page and text;
* ``screenshot``: screenshots of fracdet's own web page in chromium at phone and desktop widths;
* ``ct_mr``: CT and MR slices from pydicom's test files, windowed, cropped, scaled and rotated;
* ``noise``: uniform, Gaussian, salt-and-pepper and smoothed noise of many sizes;
* ``blank``: constant and nearly constant images of many sizes.

Every item goes through the same :class:`fracdet.inference.Predictor` the server uses, as PNG or JPEG bytes.

``--dev`` builds a *development* set instead (seed 1: other crops, pages, noise and slices from the same
generators) and measures the radiograph side on the *validation* splits, recording each item's distance:
the place to design the gate's rules. The held-out set (seed 0, test radiographs) is measured once a
design is chosen, and never used to choose it.
Reports, per kind, the share refused with a 95% Clopper-Pearson interval, and the share of FracAtlas test
and multiregion test radiographs refused (must stay <= 1%) or warned about. Needs ``scikit-image``,
``pydicom`` and, for screenshots, ``playwright`` with chromium.
"""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import binomtest

from fracdet.data import ImageReadError, load_dataset
from fracdet.data.table import absolute_paths
from fracdet.inference import NotARadiographError, Predictor
from fracdet.models import load
from fracdet.utils.progress import progress

SIZES = (128, 224, 384, 512, 800, 1024)
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
#: Words of the rendered pages (clinical-looking text, as a scanned report would hold).
WORDS = "the patient was seen in the emergency department with pain and swelling after a fall report imaging findings no acute fracture is identified soft tissue alignment normal joint space follow up recommended clinical correlation radiology department hospital discharge summary"  # noqa: E501


def encode(array: np.ndarray, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        Image.fromarray(array).save(buffer, "PNG")
    else:
        Image.fromarray(array).convert("RGB" if array.ndim == 3 else "L").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def vary(image: np.ndarray, rng: np.random.Generator, *, grey: bool) -> np.ndarray:
    """A random crop (40-100% of each side), rotation and scale to a radiograph-like size."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    picture = Image.fromarray(image[y : y + ch, x : x + cw])
    picture = picture.rotate(float(rng.choice([0, 90, 180, 270, rng.uniform(0, 360)])), expand=True)
    side = int(rng.choice(SIZES[1:]))
    scale = side / max(picture.size)
    picture = picture.resize((max(64, int(picture.width * scale)), max(64, int(picture.height * scale))))
    if grey:
        picture = picture.convert("L")
    return np.asarray(picture.convert("L" if picture.mode in ("L", "1", "I", "F") else "RGB"))


def photos(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    sources = [np.asarray(Image.fromarray(a).convert("RGB")) for a in load_sample_images().images]
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "moon",
        "brick",
        "grass",
        "gravel",
        "clock",
        "colorwheel",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "logo",
        "horse",
    ):
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download is left out offline
            continue
        image = image.astype(np.uint8) if image.dtype == bool else image
        if image.dtype != np.uint8:
            image = (255 * (image - image.min()) / max(np.ptp(image), 1)).astype(np.uint8)
        sources.append(image[..., :3] if image.ndim == 3 else image)
    for k in range(n):
        yield vary(sources[k % len(sources)], rng, grey=rng.random() < 0.5)


def documents(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    import skimage.data

    scans = [skimage.data.page(), skimage.data.text()]
    fonts = sorted(FONT_DIR.glob("*.ttf"))
    for k in range(n):
        if k % 5 == 0:
            yield vary(scans[(k // 5) % 2], rng, grey=True)
            continue
        w, h = int(rng.choice([400, 595, 800, 1024])), int(rng.choice([300, 560, 842, 1024]))
        page = Image.new("L", (w, h), int(rng.integers(200, 256)))
        draw = ImageDraw.Draw(page)
        font = ImageFont.truetype(str(fonts[k % len(fonts)]), int(rng.integers(10, 28)))
        y = int(rng.integers(5, 40))
        while y < h - 20:
            line = " ".join(rng.choice(WORDS.split(), size=int(rng.integers(4, 12))))
            draw.text((int(rng.integers(5, 40)), y), line, fill=int(rng.integers(0, 80)), font=font)
            y += int(font.size * rng.uniform(1.2, 2.0))
        yield np.asarray(page)


def screenshots(rng: np.random.Generator, n: int, model_name: str) -> Iterator[np.ndarray]:
    import threading

    import uvicorn
    from playwright.sync_api import sync_playwright

    from fracdet.serve import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(load(model_name)), port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and server.servers):
        pass
    port = server.servers[0].sockets[0].getsockname()[1]
    shots = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            for width, height in ((375, 812), (768, 1024), (1280, 800), (1920, 1080)):
                page = browser.new_page(viewport={"width": width, "height": height})
                for path in ("/", "/docs"):
                    page.goto(f"http://127.0.0.1:{port}{path}")
                    page.wait_for_timeout(300)
                    shots.append(np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    for k in range(n):
        yield vary(shots[k % len(shots)], rng, grey=rng.random() < 0.5)


def ct_mr(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    slices = []
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "liver_1frame.dcm", "MR2_UNCI.dcm"):
        try:
            path = get_testdata_file(name, download=False)
            array = pydicom.dcmread(path).pixel_array.astype(np.float64)
        except Exception:  # a test file pydicom does not ship offline is left out
            continue
        lo, hi = np.percentile(array, [1, 99])
        slices.append((255 * np.clip((array - lo) / max(hi - lo, 1), 0, 1)).astype(np.uint8))
    for k in range(n):
        image = vary(slices[k % len(slices)], rng, grey=True)
        side = int(rng.choice(SIZES[2:]))  # the slices are small: scale up to a radiograph's size
        yield np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC))


def noise(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    import cv2

    for k in range(n):
        h, w = int(rng.choice(SIZES)), int(rng.choice(SIZES))
        kind = k % 4
        if kind == 0:
            image = rng.integers(0, 256, (h, w))
        elif kind == 1:
            image = np.clip(rng.normal(128, rng.uniform(10, 80), (h, w)), 0, 255)
        elif kind == 2:
            image = np.where(rng.random((h, w)) < rng.uniform(0.05, 0.5), 255, 0)
        else:
            sigma = float(rng.uniform(1, 20))
            image = cv2.GaussianBlur(rng.normal(0, 1, (h, w)), (0, 0), sigma)
            image = 255 * (image - image.min()) / max(np.ptp(image), 1e-9)
        yield np.asarray(image, np.uint8)


def blanks(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    for k in range(n):
        h, w = int(rng.choice(SIZES)), int(rng.choice(SIZES))
        image = np.full((h, w), float(rng.integers(0, 256)))
        if k % 2:  # nearly uniform: a faint gradient and a little noise
            image += np.linspace(0, rng.uniform(0, 4), w)[None, :] + rng.normal(0, 0.5, (h, w))
        yield np.clip(image, 0, 255).astype(np.uint8)


def held_out_set(model_name: str, *, seed: int = 0) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    kinds = {"photo": photos(rng, 180), "document": documents(rng, 100), "screenshot": screenshots(rng, 40, model_name),
             "ct_mr": ct_mr(rng, 80), "noise": noise(rng, 100), "blank": blanks(rng, 60)}  # fmt: skip
    return [(kind, encode(image, rng)) for kind, images in kinds.items() for image in images]


def refusal_rate(
    predictor: Predictor, items: list[tuple[str, bytes]], desc: str, distances: dict[str, list] | None = None
) -> dict[str, dict]:
    """Share refused per kind; with ``distances``, also each item's gate distance (None: refused before it)."""
    refused, warned, total = Counter(), Counter(), Counter()
    reasons: dict[str, Counter] = {}
    current = [""]
    judge = predictor.gate.judge

    def recording(features):  # the verdict's distance, kept for the development report
        verdict = judge(features)
        if distances is not None:
            distances[current[0]][-1] = verdict.distance
        return verdict

    predictor.gate.judge = recording
    for kind, data in progress(items, desc=desc):
        total[kind] += 1
        current[0] = kind
        if distances is not None:
            distances.setdefault(kind, []).append(None)
        try:
            prediction = predictor.predict_bytes(data, kind)
        except NotARadiographError as exc:
            refused[kind] += 1
            reasons.setdefault(kind, Counter())[str(exc).split(":")[0].split("(")[0].strip()] += 1
            continue
        except ImageReadError:
            continue
        warned[kind] += prediction.input_check == "unusual"
    predictor.gate.judge = judge
    out = {}
    for kind in total:
        ci = binomtest(refused[kind], total[kind]).proportion_ci(0.95)
        out[kind] = {"items": total[kind], "refused": refused[kind], "refused_rate": refused[kind] / total[kind],
                     "refused_ci95": [ci.low, ci.high], "warned": warned[kind],
                     "reasons": dict(reasons.get(kind, {}))}  # fmt: skip
    return out


def radiographs(root: str, manifest: str, split: str) -> list[tuple[str, bytes]]:
    """The ``split`` files of the dataset at ``root`` under the split ``manifest`` the gate was fitted with."""
    from fracdet.data.split import apply_manifest

    table = apply_manifest(load_dataset(root), manifest)
    rows = table[table["split"] == split]
    rows.attrs.update(table.attrs)
    return [(f"{Path(root).name} {split}", path.read_bytes()) for path in absolute_paths(rows)]


def training_radiographs(root: str, manifest: str, split: str, size: int) -> np.ndarray:
    """The ``split`` radiographs of a dataset at the model's input size, as the gate was fitted on them."""
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.utils.cache import FeatureCache

    table = apply_manifest(load_dataset(root), manifest)
    rows = table[table["split"] == split].reset_index(drop=True)
    rows.attrs.update(table.attrs)
    return load_pixels(rows, size, cache=FeatureCache(), desc=f"decoding {Path(root).name} {split}").images


def components_sweep(predictor: Predictor, args: argparse.Namespace, items: list) -> dict[str, dict]:
    """Refit the appearance distance with each number of components on the gate's own training radiographs,
    put its limit at the same quantile of the validation radiographs, and count what each lets through.

    How ``APPEARANCE_COMPONENTS`` was chosen (``docs/RELIABILITY.md``: on the development set, fewest
    photographs and CT/MR slices let through, then fewest components).
    """
    from dataclasses import replace

    from fracdet.inference.gate import FeatureDistance, appearance_embedder

    gate, size = predictor.gate, predictor.model.preprocess.input_size
    embed = appearance_embedder()
    train = [training_radiographs(args.fracatlas, args.fracatlas_splits, "train", size),
             training_radiographs(args.multiregion, args.multiregion_splits, "train", size)]  # fmt: skip
    val = [training_radiographs(args.fracatlas, args.fracatlas_splits, "val", size),
           training_radiographs(args.multiregion, args.multiregion_splits, "val", size)]  # fmt: skip
    looks = np.concatenate([embed(list(images)) for images in train]).astype(np.float64)
    val_looks = np.concatenate([embed(list(images)) for images in val]).astype(np.float64)
    shipped = (gate.appearance, gate.limits)
    sweep = {}
    try:
        for k in args.components:
            appearance = FeatureDistance.fit(looks, k)
            limit = float(np.quantile(appearance(val_looks), gate.limits.appearance_quantile))
            gate.appearance, gate.limits = appearance, replace(shipped[1], appearance_refuse=limit)
            rates = refusal_rate(predictor, items, f"{k} components")  # radiographs: the quantile by construction
            through = {kind: r["items"] - r["refused"] for kind, r in rates.items()}
            sweep[str(k)] = {"appearance_refuse": limit, "let_through": through,
                             "items": {kind: r["items"] for kind, r in rates.items()}}  # fmt: skip
            shown = ", ".join(f"{kind} {n}/{rates[kind]['items']}" for kind, n in through.items())
            print(f"{k:4d} components: limit {limit:.1f}; let through {shown}")
    finally:
        gate.appearance, gate.limits = shipped
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-default")
    parser.add_argument("--fracatlas", required=True)
    parser.add_argument("--fracatlas-splits", default="splits/fracatlas_seed0.csv")
    parser.add_argument("--multiregion", required=True)
    parser.add_argument(
        "--multiregion-splits",
        default="splits/multiregion_seed0.csv",
        help="the leakage-free split the gate was fitted with (its train split joins the fit)",
    )
    parser.add_argument("--out", default=None, help="default: benchmarks/results-input-gate[-dev].json")
    parser.add_argument("--dev", action="store_true", help="the development set (seed 1, validation radiographs)")
    parser.add_argument("--components", type=int, nargs="+", metavar="K",
                        help="with --dev: refit the appearance distance with each K and count what it lets through "
                        "(how its number of components was chosen)")  # fmt: skip
    args = parser.parse_args()
    if args.components and not args.dev:
        raise SystemExit("error: --components chooses a design, so it runs on the development set only: add --dev")
    args.out = args.out or f"benchmarks/results-input-gate{'-dev' if args.dev else ''}.json"
    seed, split = (1, "val") if args.dev else (0, "test")
    model = load(args.model)
    predictor = Predictor(model, heatmaps=False)
    if not predictor.gate.fitted:
        raise SystemExit(f"error: {args.model} has no fitted input gate (run: fracdet gate {args.model} ...)")
    real = radiographs(args.fracatlas, args.fracatlas_splits, split) + radiographs(
        args.multiregion, args.multiregion_splits, split
    )
    if args.components:
        sweep = components_sweep(predictor, args, held_out_set(args.model, seed=seed))
        out = Path(args.out).with_name("results-input-gate-components.json")
        out.write_text(json.dumps({"model": f"{model.name} {model.version}", "set": "development (seed 1, validation "
                                   "radiographs)", "components": sweep}, indent=2))  # fmt: skip
        print(f"wrote {out}")
        return
    distances: dict[str, list] | None = {} if args.dev else None
    result = {
        "model": f"{model.name} {model.version}",
        "gate": model.meta["gate"],
        "set": "development (seed 1, validation radiographs)" if args.dev else "held out (seed 0, test radiographs)",
        "non_radiographs": refusal_rate(predictor, held_out_set(args.model, seed=seed), "non-radiographs", distances),
        "radiographs": refusal_rate(predictor, real, "radiographs", distances),
    }
    if distances is not None:
        result["distances"] = distances
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    for part in ("non_radiographs", "radiographs"):
        for kind, r in result[part].items():
            lo, hi = r["refused_ci95"]
            print(f"{kind:16s} {r['refused']:4d}/{r['items']:<4d} refused ({r['refused_rate']:.1%}, 95% CI "
                  f"{lo:.1%}-{hi:.1%}); warned {r['warned']}; {r['reasons']}")  # fmt: skip
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")


def plot(result: dict, path: Path) -> None:
    from _figures import pyplot, save  # run as a script: benchmarks/ is on the path

    plt = pyplot()

    rows = [(k, r) for part in ("non_radiographs", "radiographs") for k, r in result[part].items()]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))
    rate = np.array([r["refused_rate"] for _, r in rows])
    lo, hi = np.array([r["refused_ci95"] for _, r in rows]).T
    colours = ["#4f81bd" if k in result["non_radiographs"] else "#c0504d" for k, _ in rows]
    ax.barh(y, rate, xerr=[rate - lo, hi - rate], color=colours, capsize=3)
    ax.set(yticks=y, yticklabels=[f"{k} ({r['items']})" for k, r in rows], xlim=(0, 1),
           xlabel="share refused (blue: should be ~100%; red: real radiographs, should be ~0%)",
           title=f"input gate of {result['model']}")  # fmt: skip
    ax.axvline(0.99, color="black", lw=0.6, ls="--")
    ax.axvline(0.01, color="black", lw=0.6, ls="--")
    save(fig, path, dpi=110)


if __name__ == "__main__":
    main()
