"""Exact and near-duplicate detection: copies of one radiograph group, different radiographs do not."""

from __future__ import annotations

import io
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from fracdet.data import DuplicateConfig, find_duplicates, load_dataset, neardup
from fracdet.data.duplicates import cross_dataset_matches
from fracdet.data.neardup import (
    GeometricMatch,
    KeypointCache,
    NearDuplicateConfig,
    UnionFind,
    confirm_pairs,
    match_thumbnails,
)
from fracdet.utils.cache import FeatureCache

from .images import jpeg_bytes, rotated_crop, save

ORIGINAL = "images/Fractured/IMG0000261.jpg"
SMOOTH = "images/Non_fractured/IMG0000400.jpg"  # a shin on black: few keypoints
LARGE_ANGLES = (45, 90, 165, 250)
MIRRORED_ANGLE = 120


@pytest.fixture(scope="module")
def copies_dataset(
    tmp_path_factory,
):
    """An image-folder dataset of one radiograph and its copies, plus other radiographs of the same region."""
    from .conftest import SAMPLE

    root = tmp_path_factory.mktemp("copies")
    original = Image.open(SAMPLE / ORIGINAL)
    table = load_dataset(SAMPLE).set_index("path")
    region = table.loc[ORIGINAL, "region"]
    others = [p for p in table.index if table.loc[p, "region"] == region and p != ORIGINAL][:3]
    raw = (SAMPLE / ORIGINAL).read_bytes()
    save(root / "fractured" / "original.jpg", raw)
    save(root / "fractured" / "exact.jpg", raw)
    save(root / "fractured" / "rotated7.jpg", jpeg_bytes(rotated_crop(original, 7.0), quality=85))
    save(
        root / "fractured" / "rotated-13.jpg",
        jpeg_bytes(rotated_crop(original, -13.0, crop=0.05), quality=80),
    )
    save(
        root / "fractured" / "rescaled.jpg",
        jpeg_bytes(original.resize((original.width // 2, original.height // 2))),
    )
    save(root / "fractured" / "mirrored.jpg", jpeg_bytes(ImageOps.mirror(original)))
    for degrees in LARGE_ANGLES:  # on the original canvas: the corners cut away, as augmentation tools write them
        save(root / "fractured" / f"turned{degrees}.jpg", jpeg_bytes(rotated_crop(original, degrees, 0.03), 75))
    mirrored_turned = rotated_crop(ImageOps.mirror(original), MIRRORED_ANGLE, 0.05)
    save(root / "fractured" / f"mirrored-turned{MIRRORED_ANGLE}.jpg", jpeg_bytes(mirrored_turned, 70))
    for k, path in enumerate(others):
        save(root / "normal" / f"other{k}.jpg", (SAMPLE / path).read_bytes())
    return root


@pytest.fixture(scope="module")
def grouped(copies_dataset, tmp_path_factory):
    table = load_dataset(copies_dataset)
    cache = tmp_path_factory.mktemp("dupcache")
    dups = find_duplicates(table, DuplicateConfig(cache_dir=str(cache)))
    return table.assign(**dups.files[["exact_group", "near_group"]]).set_index("path"), cache


def test_exact_copy_shares_the_content_group(grouped):
    files, _ = grouped
    assert files.loc["fractured/exact.jpg", "exact_group"] == files.loc["fractured/original.jpg", "exact_group"]
    assert files.loc["fractured/rotated7.jpg", "exact_group"] != files.loc["fractured/original.jpg", "exact_group"]


COPIES = [
    "rotated7.jpg",
    "rotated-13.jpg",
    "rescaled.jpg",
    "mirrored.jpg",
    "turned45.jpg",
    "turned165.jpg",
    f"mirrored-turned{MIRRORED_ANGLE}.jpg",
]


# Turned a quarter on its own tall canvas, this radiograph loses both ends of its two forearms: the centre
# disc is what the copy and the original still share.
@pytest.mark.parametrize("copy", [*COPIES, "turned250.jpg", "turned90.jpg"])
def test_rotated_cropped_rescaled_and_mirrored_copies_are_grouped(grouped, copy):
    files, _ = grouped
    assert files.loc[f"fractured/{copy}", "near_group"] == files.loc["fractured/original.jpg", "near_group"]


def test_upright_turns_copies_at_any_angle_into_one_pose():
    from fracdet.data.embed import upright

    from .conftest import SAMPLE

    image = Image.open(SAMPLE / ORIGINAL).convert("L").reduce(4)
    reference = np.asarray(upright(np.asarray(image)), np.float32)
    for degrees in (30, 90, 200, 315):
        turned = upright(np.asarray(image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)))
        turned = np.asarray(Image.fromarray(turned).resize(reference.shape[::-1]), np.float32)
        assert np.corrcoef(reference.ravel(), turned.ravel())[0, 1] > 0.9, degrees


def test_centre_disc_puts_copies_turned_on_their_own_canvas_and_mirrored_in_one_pose():
    from fracdet.data.embed import centre_disc

    from .conftest import SAMPLE

    image = Image.open(SAMPLE / ORIGINAL).convert("L").reduce(4)
    reference = np.asarray(centre_disc(np.asarray(image)), np.float32)
    for degrees, mirror in ((30, False), (90, True), (200, False), (315, True)):
        copy = rotated_crop(ImageOps.mirror(image) if mirror else image, degrees, crop=0.03)  # cut corners
        disc = centre_disc(np.asarray(copy))
        disc = np.asarray(Image.fromarray(disc).resize(reference.shape[::-1]), np.float32)
        assert np.corrcoef(reference.ravel(), disc.ravel())[0, 1] > 0.9, (degrees, mirror)


def test_each_view_proposes_only_neighbours_above_its_own_floor():
    """Pairs that only the plain view proposes are nearly all different radiographs (docs/BENCHMARKS.md),
    so its floor is the highest; a copy below it is still proposed where the centre disc finds it."""
    from fracdet.data.neardup import view_candidate_pairs

    config = NearDuplicateConfig()
    assert config.min_similarity > max(config.upright_min_similarity, config.disc_min_similarity)
    between = (config.min_similarity + config.disc_min_similarity) / 2  # above the disc floor, below the plain

    def at(*cosines: float) -> np.ndarray:  # content 0 and, for each cosine, a content that similar to it
        return np.array([[1.0, 0.0]] + [[c, (1 - c * c) ** 0.5 * (-1) ** k] for k, c in enumerate(cosines)])

    plain, disc = at(between, between, 0.95), at(0.95, 0.2, 0.2)  # 1: a copy the disc finds; 2: neither
    similarity = view_candidate_pairs([plain, None, disc], None, config).set_index(["i", "j"])["similarity"]
    assert (0, 1) in similarity and (0, 3) in similarity and (0, 2) not in similarity
    assert similarity[(0, 1)] == pytest.approx(0.95)  # the disc's similarity, the plain one being under its floor


def test_the_embedder_folds_its_batch_norms_without_changing_what_it_computes():
    import timm
    import torch

    from fracdet.data.embed import ImageEmbedder, fold_batch_norms
    from fracdet.utils.pretrained import efficientnet_lite_state_dict

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(efficientnet_lite_state_dict(0, reference.state_dict()))
    reference.reset_classifier(0)
    reference.eval()
    embedder = ImageEmbedder()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.network.modules())
    x = torch.rand(3, 3, 128, 128) * 2 - 1
    with torch.inference_mode():
        folded, unfolded = embedder.network(x), reference(x)
    assert torch.allclose(folded, unfolded, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(reference.train())


def test_ratio_matches_are_those_of_opencvs_brute_force_knn_match(sample_root):
    """The popcount matcher keeps exactly the pairs that ``BFMatcher.knnMatch`` and Lowe's test keep, on real
    keypoints: a copy (many matches), a mirrored copy and other radiographs (few), and descriptors with ties."""
    import cv2

    images = [np.asarray(Image.open(sample_root / p).convert("L")) for p in (ORIGINAL, SMOOTH)]
    images += [np.asarray(rotated_crop(Image.open(sample_root / ORIGINAL).convert("L"), 7.0)), images[0][:, ::-1]]
    orb = cv2.ORB_create(nfeatures=500, fastThreshold=10, edgeThreshold=15, patchSize=15)
    descriptors = [orb.detectAndCompute(np.ascontiguousarray(im), None)[1] for im in images]
    tied = np.repeat(descriptors[0][:5], 2, axis=0)  # every row twice: each nearest row has an equal twin
    descriptors += [tied, descriptors[0][:1]]
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    kept = 0
    for des_a in descriptors:
        for des_b in descriptors:
            expected = [(m.queryIdx, m.trainIdx) for m, *rest in matcher.knnMatch(des_a, des_b, k=2)
                        if rest and m.distance < 0.8 * rest[0].distance]  # fmt: skip
            query, train = neardup._ratio_matches(des_a, des_b)
            assert list(zip(query.tolist(), train.tolist(), strict=True)) == expected
            kept += len(expected)
    assert kept > 500  # the copies matched: the comparison was not between empty lists
    assert len(neardup._ratio_matches(descriptors[0], tied)[0]) == 0  # a tie at the nearest never passes


@pytest.mark.parametrize("side", [128, 97])  # even and odd: "same" pads a strided convolution by one or by two
def test_the_embedder_pads_its_strided_convolutions_in_its_own_layout_without_changing_a_bit(side):
    import copy

    import torch
    from timm.layers import Conv2dSame

    from fracdet.data.embed import ImageEmbedder

    network = ImageEmbedder().network
    as_timm = copy.deepcopy(network)
    for module in as_timm.modules():
        module.__dict__.pop("forward", None)  # timm's own forward: F.pad, then the convolution
    assert sum(isinstance(m, Conv2dSame) and "forward" in m.__dict__ for m in network.modules()) == 5
    x = (torch.rand(3, 3, side, side) * 2 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(network(x), as_timm(x))
        assert torch.equal(network(x.contiguous()), as_timm(x.contiguous()))  # another layout: timm's way


def test_an_exported_embedder_pads_as_timm_does():
    import torch
    from timm.layers import Conv2dSame

    from fracdet.data.embed import pad_channels_last

    conv = Conv2dSame(8, 8, 3, stride=2, groups=8).eval()
    patched = pad_channels_last(torch.nn.Sequential(Conv2dSame(8, 8, 3, stride=2, groups=8).eval()))
    x = torch.rand(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)

    def ops(module: torch.nn.Module) -> list[str]:
        graph = torch.export.export(module, (x,)).graph
        return [str(node.target) for node in graph.nodes if node.op == "call_function"]

    assert "forward" in patched[0].__dict__
    assert ops(patched) == ops(torch.nn.Sequential(conv)) == ["aten.pad.default", "aten.conv2d.default"]


@pytest.mark.parametrize(
    ("inliers", "flipped", "angle", "mismatch", "spread", "refined", "copy"),
    [
        (40, False, 2.0, 3.5, 9.0, False, True),  # the first tier: keypoints and the median
        (40, False, 2.0, 3.5, 9.0, True, False),  # ... but not refined at 0 degrees: a second exposure
        (40, False, 30.0, 3.5, 9.0, True, True),  # refined when turned: the rotation's resampling repaired
        (15, False, 44.0, 2.4, 6.3, False, False),  # turned on few keypoints (a detector's lines): pixels unproven
        (15, False, 44.0, 1.2, 3.0, True, True),  # ... the same once refined, its pixels agreeing everywhere
        (15, False, 2.0, 2.4, 6.3, False, True),  # few keypoints unturned: the first tier as before
        (35, True, 120.0, 3.5, 9.0, False, True),  # mirrored with many keypoints
        (35, True, 120.0, 3.5, 9.0, True, False),  # ... but not once refined: that brings the other wrist close
        (20, True, 120.0, 3.5, 9.0, False, False),  # mirrored with few keypoints, pixels not proven
        (20, True, 120.0, 1.5, 3.0, True, True),  # the third tier: refined, the pixels agree everywhere
        (20, True, 120.0, 1.5, 6.0, True, False),  # ... a low median, but somewhere they differ
        (13, False, 0.0, 2.0, 4.0, True, True),  # few keypoints (smooth anatomy), pixels agree everywhere
        (10, True, 120.0, 0.5, 1.0, True, False),  # too few keypoints for any tier
    ],
)
def test_a_match_is_a_copy_by_keypoints_and_median_or_once_refined_by_pixels_that_agree_everywhere(
    inliers, flipped, angle, mismatch, spread, refined, copy
):
    match = GeometricMatch(inliers, 60, 1.0, angle, flipped, mismatch, overlap=0.9, refined=refined, spread=spread)
    assert match.confirms(NearDuplicateConfig()) is copy


@pytest.mark.parametrize(
    ("inliers", "mismatch", "spread", "correlation", "copy"),
    [
        (12, 1.1, 1.4, 0.999, True),  # aligned on the pixels alone: they agree everywhere and correlate
        (12, 2.2, 2.7, 0.27, False),  # a knee laid on a foot: dark textured tiles agree, the images do not
        (12, 3.1, 6.9, 0.96, False),  # correlated, but somewhere the pixels differ
        (11, 1.1, 1.4, 0.999, False),  # too little keypoint evidence that the two are related at all
        (150, 3.5, 9.0, 0.9, False),  # many keypoints do not help a match judged on its pixels
    ],
)
def test_a_match_aligned_on_the_pixels_alone_counts_only_when_they_agree_everywhere_and_correlate(
    inliers, mismatch, spread, correlation, copy
):
    match = GeometricMatch(inliers, 60, 1.0, 105.0, False, mismatch, overlap=0.9, refined=True, spread=spread,
                           registered=True, correlation=correlation)  # fmt: skip
    assert match.confirms(NearDuplicateConfig()) is copy


def _augmented(image: Image.Image, degrees: float, scale: float) -> Image.Image:
    """Turned on its own canvas (cut corners), cropped unevenly, shrunk and saved as JPEG q70."""
    turned = image.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=0)
    w, h = turned.size
    cropped = turned.crop((int(0.02 * w), int(0.08 * h), w - int(0.06 * w), h - int(0.03 * h)))
    shrunk = cropped.resize((round(cropped.width * scale), round(cropped.height * scale)), Image.Resampling.LANCZOS)
    return Image.open(io.BytesIO(jpeg_bytes(shrunk, quality=70)))


def test_a_smooth_bone_on_black_whose_keypoints_fix_no_transform_is_aligned_on_its_pixels(sample_root):
    """A shin on black keeps a few ORB matches along one edge: turned 105 degrees, shrunk and cropped, its copy
    is found only by aligning the two on their pixels (Fourier-Mellin); a different radiograph (a leg) is not."""
    shin = Image.open(sample_root / SMOOTH).convert("L")
    thumbs = {
        "shin": _thumbnail_bytes(shin),
        "copy": _thumbnail_bytes(_augmented(shin, 105, scale=0.7)),
        "leg": _thumbnail_bytes(Image.open(sample_root / "images/Fractured/IMG0002521.jpg")),
    }
    keypoints, config = KeypointCache(thumbs), NearDuplicateConfig()
    by_keypoints = keypoints.match(keypoints.get("shin"), keypoints.get("copy"), flipped=False, config=config)
    assert not by_keypoints.confirms(config)
    evidence = GeometricMatch(config.pixel_min_inliers, 40, 0.0, 0.0, False)
    aligned = keypoints.register("shin", "copy", False, evidence)
    assert aligned.confirms(config) and aligned.registered
    assert abs(abs(aligned.angle) - 105) < 3 and aligned.scale == pytest.approx(1.1, abs=0.1)
    for flipped in (False, True):
        other = keypoints.register("shin", "leg", flipped, evidence)
        assert not other.confirms(config)


@pytest.mark.parametrize(("degrees", "zoom"), [(40, 1.25), (115, 0.8), (165, 1.0)])
def test_the_spectra_alone_read_the_turn_and_the_zoom_of_a_copy(sample_root, degrees, zoom):
    """The Fourier-Mellin step: the shift between two log-polar spectra is the turn (up to a half-turn) and
    the log of the zoom. Sampled in fixed point (OpenCV 4's warpPolar), every spectrum shared a pattern that
    phase correlation read as no turn at all."""
    import cv2

    from fracdet.data.neardup import _log_polar_spectrum, _turn_and_zoom

    image = np.asarray(Image.open(sample_root / SMOOTH).convert("L").resize((210, 256)))
    h, w = image.shape
    canvas = np.zeros((2 * h, 2 * w), np.uint8)
    canvas[h // 2 : h // 2 + h, w // 2 : w // 2 + w] = image
    transform = cv2.getRotationMatrix2D((w, h), degrees, zoom)
    copy = cv2.warpAffine(canvas, transform, (2 * w, 2 * h), flags=cv2.INTER_LINEAR)
    turn, found_zoom = _turn_and_zoom(cv2, _log_polar_spectrum(cv2, canvas, 256), _log_polar_spectrum(cv2, copy, 256))
    assert min(abs((turn - degrees) % 180), 180 - abs((turn - degrees) % 180)) < 2
    assert found_zoom == pytest.approx(zoom, rel=0.03)


def test_the_log_polar_cells_sample_the_spectrum_as_scipy_interpolates_it():
    """The log-polar spectrum gathers each cell from its four neighbours with precomputed weights, a fraction
    of ``ndimage.map_coordinates``'s time: it must give the same order-1 samples, to the bit."""
    from scipy import ndimage

    from fracdet.data.neardup import _log_polar_points, _log_polar_sample

    spectrum = np.log1p(np.random.default_rng(0).random((64, 64)).astype(np.float32) * 1000)
    expected = ndimage.map_coordinates(spectrum, _log_polar_points(64), order=1, cval=0.0)
    assert np.array_equal(_log_polar_sample(spectrum).astype(np.float32), expected)


def test_different_radiographs_of_the_same_region_are_not_grouped(grouped):
    files, _ = grouped
    original = files.loc["fractured/original.jpg", "near_group"]
    others = [p for p in files.index if p.startswith("normal/")]
    assert len(others) == 3
    assert all(files.loc[p, "near_group"] != original for p in others)
    assert len({files.loc[p, "near_group"] for p in others}) == 3


def test_second_run_reads_the_cache_instead_of_decoding(copies_dataset, grouped, monkeypatch):
    files, cache = grouped
    with FeatureCache(cache) as store:
        assert len(list(store.keys("props-v1"))) == 9 + len(LARGE_ANGLES)  # one of the files is an exact copy
    import fracdet.data.features as features

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds the features")

    monkeypatch.setattr(features, "_analyse", no_decoding)
    monkeypatch.setattr(features, "decode_image", no_decoding)
    table = load_dataset(copies_dataset)
    again = find_duplicates(table, DuplicateConfig(cache_dir=str(cache)))
    assert (again.files["near_group"].to_numpy() == files.loc[table["path"], "near_group"].to_numpy()).all()


def test_a_changed_file_is_recomputed(tmp_path, sample_root):
    save(tmp_path / "fracture" / "a.jpg", (sample_root / ORIGINAL).read_bytes())
    save(tmp_path / "normal" / "b.jpg", (sample_root / "images/Non_fractured/IMG0000003.jpg").read_bytes())
    config = DuplicateConfig(cache_dir=str(tmp_path / "cache"), near_duplicates=False)
    find_duplicates(load_dataset(tmp_path), config)
    save(tmp_path / "fracture" / "a.jpg", (sample_root / "images/Non_fractured/IMG0000005.jpg").read_bytes())
    dups = find_duplicates(load_dataset(tmp_path), config)
    assert dups.files["exact_group"].nunique() == 1  # a.jpg now has the bytes of b.jpg's duplicate
    with FeatureCache(tmp_path / "cache") as store:
        assert len(list(store.keys("props-v1"))) == 2


@pytest.mark.parametrize("workers", ["1", "3"])
def test_groups_do_not_depend_on_the_number_of_matching_threads(copies_dataset, grouped, monkeypatch, workers):
    files, cache = grouped
    monkeypatch.setenv("FRACDET_WORKERS", workers)
    again = find_duplicates(load_dataset(copies_dataset), DuplicateConfig(cache_dir=str(cache)))
    assert again.files["near_group"].tolist() == files["near_group"].tolist()


def test_a_content_found_in_another_set_is_matched_once_and_its_later_pairs_are_skipped(copies_dataset, grouped):
    """A search of another set asks whether each content is there: once one pair of a content has confirmed,
    no pair of it submitted after that result was in is checked, and its first confirmed pair is the one
    reported."""
    _, cache = grouped
    table = load_dataset(copies_dataset)
    ours_rows = table["path"].isin(["fractured/rotated-13.jpg", "normal/other0.jpg"])
    features_only = DuplicateConfig(cache_dir=str(cache), near_duplicates=False)
    ours, theirs = (find_duplicates(part, features_only) for part in (table[ours_rows], table[~ours_rows]))
    shas_a, shas_b = list(ours.features.props.index), list(theirs.features.props.index)
    copy = ours.files["sha256"][table[ours_rows]["path"] == "fractured/rotated-13.jpg"].iloc[0]
    i = shas_a.index(copy)
    candidates = pd.DataFrame({"i": i, "j": np.tile(np.arange(len(shas_b)), 3)})  # its copies, three times over
    thumbs = {**ours.features.thumbnails, **theirs.features.thumbnails}
    near = DuplicateConfig().near
    every = confirm_pairs(candidates, shas_a, shas_b, thumbs, near, workers=1)
    assert every["confirmed"].notna().all()
    found = int(np.flatnonzero(every["confirmed"].to_numpy(bool))[0])  # the first pair that confirms
    for window in (1, 4):
        first = confirm_pairs(candidates, shas_a, shas_b, thumbs, near, first_only=True, workers=1, window=window)
        in_flight = found + window  # pairs submitted before the first confirmation was known
        assert first["confirmed"][:in_flight].tolist() == every["confirmed"][:in_flight].tolist()
        assert first["confirmed"][in_flight:].isna().all() and len(first) > in_flight

    matches = cross_dataset_matches(ours, theirs, DuplicateConfig(cache_dir=str(cache)))
    all_pairs = cross_dataset_matches(ours, theirs, DuplicateConfig(cache_dir=str(cache)), every_pair=True)
    assert matches["i"].tolist() == [i] and (all_pairs["i"] == i).sum() > 1  # the copy only, once
    assert matches[["j", "kind"]].iloc[0].tolist() == all_pairs[["j", "kind"]].iloc[0].tolist()


def test_which_pairs_a_search_skips_depends_on_their_order_not_on_which_thread_finishes_first(
    copies_dataset, monkeypatch
):
    """Pairs run several at a time and finish in any order (here each is held up for a random while); the
    rows (checked or implied, and what each found) are the same on every run, and the groups the same for
    any number of workers."""
    table = load_dataset(copies_dataset)
    config = DuplicateConfig(use_cache=False)
    dups = find_duplicates(table, config)
    shas, thumbs = list(dups.features.props.index), dups.features.thumbnails
    candidates = dups.pairs[["i", "j", "similarity"]]
    match, delays = neardup.match_thumbnails, np.random.default_rng(0)

    def held_up(*args, **kwargs):
        time.sleep(delays.uniform(0, 0.02))
        return match(*args, **kwargs)

    monkeypatch.setattr(neardup, "match_thumbnails", held_up)
    runs = [
        confirm_pairs(candidates, shas, shas, thumbs, config.near, union=UnionFind(len(shas)), workers=workers,
                      window=window)
        for workers, window in ((3, 6), (3, 6), (3, 6), (1, 1))
    ]  # fmt: skip
    assert runs[0].equals(runs[1]) and runs[0].equals(runs[2])
    assert runs[0]["confirmed"].isna().any()  # some pairs were implied by earlier ones: skipping mattered
    assert all((_groups(run, len(shas)) == _groups(runs[0], len(shas))).all() for run in runs)


def test_the_search_runs_opencv_on_its_own_workers_and_leaves_its_thread_pool_as_it_was(copies_dataset, monkeypatch):
    """OpenCV's own pool would compete with the search's worker threads for the cores: it is off while
    pairs are matched, and back at its size afterwards (other OpenCV users in the process keep it)."""
    import cv2

    seen, match = [], neardup.match_thumbnails

    def watched(*args, **kwargs):
        seen.append(cv2.getNumThreads())
        return match(*args, **kwargs)

    monkeypatch.setattr(neardup, "match_thumbnails", watched)
    before = cv2.getNumThreads()
    find_duplicates(load_dataset(copies_dataset), DuplicateConfig(use_cache=False))
    assert seen and set(seen) == {1}
    assert cv2.getNumThreads() == before


def _groups(pairs: pd.DataFrame, contents: int) -> np.ndarray:
    """The group of each content that a search's confirmed pairs join."""
    union = UnionFind(contents)
    for pair in pairs[pairs["confirmed"].eq(True)].itertuples():
        union.union(pair.i, pair.j)
    return union.labels()


def test_an_exact_only_search_of_another_set_finds_byte_identical_contents_and_checks_no_pair(
    copies_dataset, grouped, monkeypatch
):
    """``fracdet audit --exact-only --against``: the byte-identical contents, without a geometric check."""
    _, cache = grouped
    table = load_dataset(copies_dataset)
    ours_rows = table["path"].isin(["fractured/exact.jpg", "fractured/rotated7.jpg", "normal/other0.jpg"])
    exact_only = DuplicateConfig(cache_dir=str(cache), near_duplicates=False)
    ours, theirs = (find_duplicates(part, exact_only) for part in (table[ours_rows], table[~ours_rows]))
    monkeypatch.setattr("fracdet.data.duplicates.confirm_pairs", None)  # called, it would raise
    matches = cross_dataset_matches(ours, theirs, exact_only)
    shas_a = list(ours.features.props.index)
    exact = ours.files["sha256"][table[ours_rows]["path"] == "fractured/exact.jpg"].iloc[0]
    assert matches["i"].tolist() == [shas_a.index(exact)] and matches["kind"].tolist() == ["exact"]


def _thumbnail_bytes(image: Image.Image) -> bytes:
    image = image.convert("L")
    image.thumbnail((256, 256))
    return jpeg_bytes(image, quality=92)


def test_a_strip_squashed_into_a_square_is_matched_after_stretching(sample_root):
    """Augmented sets resize a narrow radiograph to a square; ORB alone does not survive that distortion."""
    original = Image.open(sample_root / ORIGINAL).convert("L")
    w, h = original.size
    strip = original.crop((int(0.3 * w), 0, int(0.62 * w), h))  # aspect about 1:4 at most
    squashed = strip.resize((224, 224), Image.Resampling.BICUBIC)
    keypoints = KeypointCache({"strip": _thumbnail_bytes(strip), "square": _thumbnail_bytes(squashed)})
    config = NearDuplicateConfig()
    unstretched = keypoints.match(keypoints.get("strip"), keypoints.get("square"), flipped=False)
    assert not unstretched.confirms(config)
    assert match_thumbnails(keypoints, "strip", "square", config).confirms(config)
    assert match_thumbnails(keypoints, "square", "strip", config).confirms(config)


def test_each_content_gets_its_own_embeddings_however_many_threads_compute_them(copies_dataset, tmp_path, monkeypatch):
    import fracdet.data.features as features
    from fracdet.data.embed import ImageEmbedder, centre_disc, upright

    monkeypatch.setenv("FRACDET_WORKERS", "3")
    monkeypatch.setattr(features, "_EMBED_PIECE", 2)  # several pieces in flight at once
    config = DuplicateConfig(cache_dir=str(tmp_path / "cache"), near_duplicates=False)
    found = find_duplicates(load_dataset(copies_dataset), config).features
    embedder = ImageEmbedder()
    for sha, row in found.row_of().items():
        thumbnail = features.load_thumbnail(found.thumbnails[sha])
        for view, turn in zip(found.views, (None, upright, centre_disc), strict=True):
            alone = embedder([turn(thumbnail) if turn else thumbnail])[0]
            np.testing.assert_allclose(view[row], alone, atol=2e-3)  # stored as float16


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("angle", [0.0, 30.0])
def test_a_keypoint_match_below_the_fewest_inliers_any_tier_uses_confirms_whatever_its_pixels(flipped, angle):
    """Why the pixels of such a match are not measured: no mismatch, spread or overlap could make it a copy."""
    config = NearDuplicateConfig()
    for inliers in range(config.fewest_inliers):
        perfect = GeometricMatch(inliers, inliers, 1.0, angle, flipped, 0.0, overlap=1.0, spread=0.0)
        assert not perfect.confirms(config)
    refined = GeometricMatch(config.fewest_inliers, 40, 1.0, angle, flipped, 0.0, 1.0, refined=True, spread=0.0)
    assert refined.confirms(config)  # the fewest a tier uses: enough to be refined, and then a copy


@pytest.mark.parametrize(("mismatch", "refined"), [(8.0, True), (40.0, False)])
def test_only_a_keypoint_match_a_pixel_or_two_off_is_refined_on_the_pixels(sample_root, monkeypatch, mismatch, refined):
    """The refinement repairs a small misalignment; a match whose pixels differ far more is left as it is."""
    import fracdet.data.neardup as neardup

    original = Image.open(sample_root / ORIGINAL).convert("L")
    keypoints = KeypointCache({"a": _thumbnail_bytes(original), "b": _thumbnail_bytes(_augmented(original, 20, 0.9))})
    config = NearDuplicateConfig()
    unrefined = keypoints.match(keypoints.get("a"), keypoints.get("b"), flipped=False)
    assert unrefined.inliers >= config.pixel_min_inliers  # enough keypoints to be refined at all
    calls = []
    monkeypatch.setattr(neardup, "_aligned_mismatch", lambda *args: (mismatch, 2 * mismatch, 0.9))
    monkeypatch.setattr(neardup, "_refine", lambda *args: calls.append(args))
    keypoints.match(keypoints.get("a"), keypoints.get("b"), flipped=False, config=config)
    assert bool(calls) is refined
