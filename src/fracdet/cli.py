"""The ``fracdet`` command: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("fracdet")


def _duplicate_config(args: argparse.Namespace):
    from fracdet.data import DuplicateConfig

    return DuplicateConfig(near_duplicates=not args.exact_only, cache_dir=args.cache_dir, use_cache=not args.no_cache)


def _with_manifest_splits(table, manifest_path: Path):
    """Restrict ``table`` to a manifest's files and take the manifest's split column."""
    from fracdet.data.split import apply_manifest

    try:
        return apply_manifest(table, manifest_path)
    except ValueError as exc:
        raise SystemExit(f"error: {manifest_path}: {exc}") from None


def _data_root(given: str | None, folder: Path | None) -> str | None:
    """``--data`` when given, else the data root a run folder's ``run.json`` records."""
    import json

    run_json = folder / "run.json" if folder else None
    if given or run_json is None or not run_json.is_file():
        return given
    return json.loads(run_json.read_text()).get("data_root")


def cmd_audit(args: argparse.Namespace) -> int:
    from fracdet.data import audit_dataset, load_dataset, report_text, write_html, write_json
    from fracdet.data.report import closest_pairs_montage

    for option in ("json", "html", "montage"):
        _check_output(f"--{option}", getattr(args, option))
    table = load_dataset(args.path)
    if args.splits:
        table = _with_manifest_splits(table, Path(args.splits))
    against = load_dataset(args.against) if args.against else None
    report = audit_dataset(table, against=against, config=_duplicate_config(args), seed=args.seed)
    print(report_text(report))
    if args.json:
        print(f"JSON report: {write_json(report, args.json)}")
    if args.html:
        print(f"HTML report: {write_html(report, args.html)}")
    if args.montage:
        if report.closest_cross_split.empty:
            print("no cross-split pairs to draw (the table has no split column)")
        else:
            from PIL import Image

            from fracdet.utils.atomic import atomic_file

            kind = Image.registered_extensions().get(Path(args.montage).suffix.lower(), "PNG")
            with atomic_file(args.montage) as tmp:
                closest_pairs_montage(report).save(tmp, format=kind)
            print(f"closest cross-split pairs: {args.montage}")
    if len(report.unreadable) == len(report.files):
        print(f"error: none of the {len(report.files)} files could be decoded: nothing was audited")
        return 4
    if args.strict and (report.has_leakage or report.has_conflicts or len(report.unreadable)):
        return 3
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from fracdet.data import audit_dataset, find_duplicates, load_dataset, make_splits, report_text
    from fracdet.data.split import SplitResult, read_split_manifest, repair_splits

    _check_output("--out", args.out)
    if args.repair:  # refused now, not after the duplicate search (minutes on a full dataset)
        try:
            read_split_manifest(args.repair, needs=("path", "label", "split"))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {args.repair}: {exc}") from None
    table = load_dataset(args.path)
    config = _duplicate_config(args)
    dups = find_duplicates(table, config)
    if args.repair:
        try:
            result = repair_splits(table, args.repair, duplicates=dups)
        except ValueError as exc:  # a manifest of another dataset, or splits it does not know
            raise SystemExit(f"error: {args.repair}: {exc}") from None
        moved = result.manifest[result.manifest["moved_from"] != ""]
        print(f"{len(moved)} files of groups that straddled splits moved to the first of their splits:")
        if len(moved):
            print(moved.groupby(["moved_from", "split"]).size().rename("files").to_string())
    elif args.keep_published:
        if table["split"].isna().any():
            raise SystemExit(f"error: {args.path} has no published split for every file")
        report = audit_dataset(table, config=config, seed=args.seed)
        print("\n".join(report_text(report).split("\n")))
        manifest = table[["path", "label", "split"]].assign(group=report.files["near_group"].map("n{:05d}".format))
        result = SplitResult(manifest[["path", "label", "group", "split"]], table.iloc[:0][["path", "label"]])
    else:
        result = make_splits(
            table,
            fractions=args.fractions,
            seed=args.seed,
            keep_truncated=args.keep_truncated,
            duplicates=dups,
        )
    if result.manifest.empty:
        reasons = result.excluded["reason"].value_counts().to_dict()
        raise SystemExit(f"error: no file of {args.path} can go into a split ({reasons}); nothing written")
    out = result.write(args.out)
    print(f"wrote {out} ({len(result.manifest)} files, {result.manifest['group'].nunique()} groups)")
    if len(result.excluded):
        print(f"left out {len(result.excluded)} files, listed in {out.with_suffix('.excluded.csv')}:")
        print(result.excluded["reason"].value_counts().to_string())
    print(result.class_fractions().to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _load_split_table(data: str, splits: str | None, *, fallback: bool = False):
    """The dataset at ``data`` with the split column of ``splits`` (or the dataset's own split).

    With ``fallback``, a manifest that does not describe this dataset (a model's own manifest, when the
    model is tested on another dataset) gives way to the dataset's own split instead of an error.
    """
    from fracdet.data import load_dataset
    from fracdet.data.split import apply_manifest

    table = load_dataset(data)
    if splits:
        try:
            table = apply_manifest(table, splits)
            table.attrs["split_source"] = splits
            return table
        except ValueError as exc:
            if not fallback:
                raise SystemExit(f"error: {splits}: {exc}") from None
            print(f"{splits} does not describe {data}: using the dataset's own split")
    if table["split"].isna().all():
        raise SystemExit(f"error: {data} has no split of its own: make one with `fracdet split` and pass --splits")
    table.attrs["split_source"] = "the dataset's own split"
    return table


def cmd_pack(args: argparse.Namespace) -> int:
    from fracdet.data import load_dataset
    from fracdet.data.pack import pack_dataset

    _check_output("--out", args.out, folder=True)
    table = _load_split_table(args.path, args.splits) if args.splits or args.only else load_dataset(args.path)
    try:
        result = pack_dataset(table, args.out, size=args.size, fmt=args.format, quality=args.quality, splits=args.only)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"packed {result.images} images into {result.root} ({result.bytes / 2**20:.1f} MiB, {args.format} "
          f"quality {args.quality}, mean error {result.mean_abs_error:.2f} grey levels)")  # fmt: skip
    if len(result.skipped):
        print(f"left out {len(result.skipped)} unreadable files (listed in {result.root / 'PACK.json'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fracdet.training import load_config, train
    from fracdet.training.distributed import launch, launched, process_group
    from fracdet.training.stopping import stop_on_signals

    processes = args.devices * args.nodes
    if args.nodes > 1 and not args.rendezvous:
        raise SystemExit("error: --nodes > 1 needs --rendezvous HOST:PORT (one machine's address, the same on all)")
    if processes > 1 and not launched():  # start the processes; each runs this same command line
        return launch(args.argv, devices=args.devices, nodes=args.nodes, rendezvous=args.rendezvous)
    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise SystemExit("error: --resume needs --out RUN_FOLDER")
        missing = [name for name in ("config.yaml", "splits.csv") if not (out / name).is_file()]
        if missing:  # an [Errno 2] about splits.csv before, for a typo in the folder's name
            raise SystemExit(f"error: --resume --out {out}: not a run folder (no {' or '.join(missing)}); "
                             "to start a run there, leave out --resume")  # fmt: skip
        data = _data_root(args.data, out)
        if not data:
            raise SystemExit("error: pass --data (the run folder does not record its data root)")
        table = _load_split_table(data, args.splits or str(out / "splits.csv"))
        # What --config and --set ask is checked against the run's own config, never silently dropped: only
        # what does not change the weights (TrainConfig.RESUMABLE_KEYS, such as workers) may differ.
        config = load_config(args.config or out / "config.yaml", args.set) if args.config or args.set else None
    else:
        if not args.config or not args.data:
            raise SystemExit("error: --config and --data are required (or --resume with --out)")
        config = load_config(args.config, args.set)
        out = out or Path("runs") / Path(args.config).stem
        table = _load_split_table(args.data, args.splits)
    with process_group() as ranks:
        if not ranks.main:
            logging.getLogger("fracdet").setLevel(logging.WARNING)  # rank 0 reports
        # one process stops between batches when asked, saved there; several keep the signals' defaults
        with nullcontext() if ranks.distributed else stop_on_signals() as stop:
            result = train(config, table, out, resume=args.resume, stop_after=args.stop_after, ranks=ranks,
                           stop=stop)  # fmt: skip
    if not ranks.main:
        return 0
    print(f"run folder: {result.out_dir}")
    if result.stopped_as_asked:
        print(f"stopped by {stop.name}, saved where it stopped: continue with --resume --out {result.out_dir}",
              file=sys.stderr)  # fmt: skip
        return 128 + (stop.signum or 0)  # as the shell reports a process a signal ended
    if result.best_epoch == 0:
        print(f"stopped after epoch {len(result.history)} as asked: continue with --resume --out {result.out_dir}")
        return 0
    best = result.history.iloc[result.best_epoch - 1]
    print(f"best epoch {result.best_epoch}: val AUC {best['val_auc']:.4f}, val accuracy {best['val_accuracy']:.4f}")
    if stop is not None and stop.is_set():  # asked while the model was written, which was finished first
        print(f"stopped by {stop.name} once the model was written: {result.out_dir} is complete", file=sys.stderr)
        return 128 + (stop.signum or 0)  # a caller that asked for a stop goes no further (evaluation, next seed)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fracdet.training import load_config
    from fracdet.training.sweep import run_sweep

    config = load_config(args.config, args.set)
    table = _load_split_table(args.data, args.splits)
    out = Path(args.out or Path("runs") / f"sweep-{Path(args.config).stem}")
    result = run_sweep(config, table, out, lrs=args.lr, batch_sizes=args.batch_size, epochs=args.epochs)
    print(result.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"table: {out / 'sweep.md'} (validation metrics; the test split is not used)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fracdet.data.split import leave_out_trained_on
    from fracdet.evaluation import evaluate, metrics_table, write_report
    from fracdet.evaluation.evaluate import TEST_SELECTION_WARNING
    from fracdet.models import load

    _check_output("--out", args.out, folder=True)
    model = load(args.run)
    data = _data_root(args.data, model.folder)
    if not data:
        raise SystemExit("error: pass --data (the dataset the model is evaluated on)")
    splits = args.splits or (str(model.splits_path) if model.splits_path else None)
    table = _load_split_table(data, splits, fallback=args.splits is None)
    if args.exclude_shared_with:
        from fracdet.data import load_dataset
        from fracdet.data.duplicates import shared_with

        shared = shared_with(table, load_dataset(args.exclude_shared_with))
        print(f"left out {int(shared.sum())} files that show a radiograph of {args.exclude_shared_with}")
        attrs = dict(table.attrs)
        table = table[~shared].reset_index(drop=True)
        table.attrs.update(attrs)
    if args.split == "all":  # every file is scored, whatever its split
        table = table.assign(split="all")
    table = leave_out_trained_on(table, model.splits_path, model=model.name)  # the heatmaps' files too
    if note := _fitted_elsewhere(model, data, table, args.split):
        print(f"{note}: fit them here with `fracdet calibrate {args.run} --data {data} --out NEW_FOLDER`")
    try:
        result = evaluate(model, table, split=args.split, n_boot=args.bootstrap, tta=args.tta,
                          stability=args.stability)  # fmt: skip
    except ValueError as exc:
        hint = ""
        left_out = table.attrs["left_out_trained_on"].get(args.split)
        if args.splits is None and args.split not in set(table["split"].dropna()) and not left_out:
            hint = (f" (the split manifest came with the model and has no {args.split!r} rows, as when it was trained"
                    " on a pack of train and val: pass --splits with the full manifest)")  # fmt: skip
        raise SystemExit(f"error: {exc}{hint}") from None
    out = Path(args.out or Path("runs") / "eval" / f"{model.name}-{args.split}")
    if not args.no_heatmaps:
        from fracdet.explain.localisation import localise_split

        compare = load(args.compare) if args.compare else None
        result.localisation = localise_split(model, table, args.split, out, compare=compare)
        if result.localisation:
            result.figures["localisation"] = out / "localisation.png"
            _print_localisation(result.localisation)
    report = write_report(result, out, curves=model.folder / "curves.png" if model.folder else None)
    if not result.honest:
        print(f"WARNING: {TEST_SELECTION_WARNING}")
    print(f"{model.name} on {args.split}: {len(result.predictions)} images, splits from {table.attrs['split_source']}")
    print(metrics_table(result).to_string(index=False))
    if moves := result.points[result.default_point].get("threshold_choice_ci95"):
        (t0, t1), (s0, s1) = moves["threshold"], moves["specificity"]
        print(f"{result.default_point} threshold had validation held other patients: {t0:.3f}-{t1:.3f}, "
              f"giving specificity {s0:.3f}-{s1:.3f} on {args.split}")  # fmt: skip
    roc = ", ".join(f"{r['specificity']:.3f} at {sens}" for sens, r in result.roc_specificity.items())
    print(f"specificity on the {args.split} split's own ROC curve (threshold-free): {roc}")
    if result.stability:
        from fracdet.evaluation.evaluate import near_line, stability_table

        print(f"verdict stability at threshold {result.stability['threshold']:.3f}: {near_line(result.stability)}")
        print(stability_table(result.stability).to_string(index=False))
    if result.lesions:
        from fracdet.evaluation.evaluate import lesion_summary

        print(f"boxes against expert boxes (levels {result.lesions['levels']}):")
        print(lesion_summary(result.lesions).to_string(index=False))
    print(f"report: {report}")
    return 0


def _fitted_elsewhere(model, data: str, table, split: str) -> str | None:
    """A note naming what of ``model``'s validation fit ``evaluate`` keeps although it was fitted on other files
    than ``data``'s (a run trained on a pack, evaluated on the originals), or ``None``."""
    fitted_on = _data_root(None, model.folder)
    if not fitted_on or Path(fitted_on).resolve() == Path(data).resolve():
        return None
    if not model.splits_path or table.attrs.get("split_source") != str(model.splits_path):
        return None  # another dataset, judged by the thresholds chosen where the model was made
    kept = ["temperature and thresholds"] if split in ("val", "all") else []  # others are refitted on val
    if getattr(model.module, "fusion", None) is not None:
        kept.insert(0, "fusion and box edge")
    if not kept:
        return None
    return f"note: {model.name}'s {' and '.join(kept)} were fitted on the validation files of {fitted_on}, not on these"


def _print_localisation(loc: dict) -> None:
    other = loc.get("compare")
    for name, part in (("heatmaps", loc), (f"compared: {other['model']}" if other else "", other)):
        if part:
            print(f"{name} ({part['method']}): pointing game {part['pointing_game']:.3f} "
                  f"(centre {part['centre_pointing_game']:.3f}), box IoU {part['iou']:.3f} "
                  f"(centre {part['centre_iou']:.3f}) on {part['images']} boxed images")  # fmt: skip


def cmd_ensemble(args: argparse.Namespace) -> int:
    from fracdet.models import load
    from fracdet.training.ensemble import build_ensemble

    models = [load(run) for run in args.runs]
    data = _data_root(args.data, models[0].folder)
    if not data or not models[0].splits_path:
        raise SystemExit(f"error: {args.runs[0]} records no data root or split manifest: pass --data")
    table = _load_split_table(data, str(models[0].splits_path))
    try:
        ensemble = build_ensemble(models, table, args.out, half=args.half)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    size = (Path(args.out) / "model.safetensors").stat().st_size / 2**20
    what = _describe_members(ensemble)
    print(f"{what} in {args.out} ({size:.1f} MiB of weights): temperature {ensemble.temperature:.3f}, "
          f"sens90 threshold {ensemble.threshold:.3f} (on val)")  # fmt: skip
    if fusion := ensemble.meta.get("fusion_val_auc"):
        print("val AUC of each part and fused: " + ", ".join(f"{k} {v:.3f}" for k, v in fusion.items()))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fracdet.models import load
    from fracdet.training.checkpoint import RunExistsError
    from fracdet.training.recalibrate import recalibrate

    model = load(args.run)
    splits = args.splits or (str(model.splits_path) if model.splits_path else None)
    if not splits:
        raise SystemExit(f"error: {args.run} carries no split manifest: pass --splits")
    table = _load_split_table(args.data, splits)
    before = model.temperature, model.threshold
    try:
        model = recalibrate(model, table, args.out)
    except (RunExistsError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(
        f"{model.name}: fitted on the validation files of {args.data}: temperature {before[0]:.3f} -> "
        f"{model.temperature:.3f}, {model.operating_point} threshold {before[1]:.3f} -> {model.threshold:.3f}"
    )
    if fusion := model.meta.get("fusion_val_auc"):
        print("val AUC of each part and fused: " + ", ".join(f"{k} {v:.3f}" for k, v in fusion.items()))
    print(f"model folder: {model.folder} (evaluate it with `fracdet evaluate {model.folder}`)")
    return 0


def _describe_members(model) -> str:
    """``ensemble of 3 efficientnet_lite0 models``, ``localiser_lite0 fused with efficientnet_lite2``, or the arch."""
    if fused := model.meta.get("fused"):
        return f"{model.arch} fused with {', '.join(m['model'] for m in fused[1:])}"
    if members := model.meta.get("members"):
        return f"ensemble of {len(members)} {model.arch} models"
    return model.arch


def cmd_models(args: argparse.Namespace) -> int:
    from fracdet.models import get_spec, list_models, list_releases, load

    print("architectures (fracdet.models.create_model):")
    for name in list_models():
        spec = get_spec(name)
        print(f"  {name:20s} {spec.task:8s} {spec.preprocess.input_size:4d} px  {spec.description}")
    print("trained models (fracdet.models.load):")
    for name in list_releases():
        model = load(name)
        print(f"  {name:20s} {model.task}: {_describe_members(model)} at {model.preprocess.input_size} px"
              f"{' with flip TTA' if model.tta else ''}{f', {model.precision} graph' if model.graph else ''}, "
              f"version {model.version}, "
              f"threshold {model.threshold:.3f} ({model.operating_point})")  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fracdet.inference.gate import InputGate
    from fracdet.inference.onnx import export_onnx
    from fracdet.models import load

    name = args.model or args.model_option
    if not name:
        raise SystemExit("fracdet export: name the model (MODEL or --model MODEL)")
    _check_output("--out", args.out)
    model = load(name)
    gate = InputGate.of(model)
    # A compiled model's graph runs its gate's embedder already.
    embedder = gate.embedder().network if gate.checks_appearance and model.graph is None else None
    path = export_onnx(model, args.out, embedder=embedder)
    inputs = "image" + (" and appearance" if gate.checks_appearance else "")
    print(f"exported {model.name} ({model.task}, {model.preprocess.input_size} px) to {path} "
          f"({path.stat().st_size / 2**20:.1f} MiB; uint8 {inputs} in, dynamic batch; "
          "model.json in its metadata)")  # fmt: skip
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from fracdet.inference.quantize import quantize_model
    from fracdet.models import load

    model = load(args.model)
    splits = args.splits or (str(model.splits_path) if model.splits_path else None)
    table = _load_split_table(args.data, splits)
    extra = [_load_split_table(*(spec.split("=", 1) if "=" in spec else (spec, None))) for spec in args.extra]
    result = quantize_model(model, table, args.out, name=args.name, version=args.version,
                            calibration=args.calibration, extra=extra, max_auc_drop=args.max_auc_drop,
                            float_map_head=not args.int8_map_head, float_stride=args.float_stride,
                            calibration_batch=args.calibration_batch)  # fmt: skip
    made = result.model
    auc = result.val_auc
    print(f"{made.name} {made.version}: int8 graph of {model.name} {model.version} in {made.folder} "
          f"({made.graph.stat().st_size / 2**20:.1f} MiB); validation AUC {auc['int8']:.4f} "
          f"(float {auc['float32']:.4f}); "
          f"margins moved by {result.margin_change['median']:.3f} (median), {result.margin_change['max']:.3f} (most); "
          f"this CPU's kernels within {result.kernel_change['max']:.3f} of the graph's reference arithmetic; "
          f"refitted on its own validation outputs: temperature {made.temperature:.3f}, "
          f"{made.operating_point} threshold {made.threshold:.4f}"
          + (f", input gate ({made.meta['gate']['chosen_on']})" if "gate" in made.meta else ""))  # fmt: skip
    return 0


def _add_backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "pytorch"],
                   help="what runs the model (auto: ONNX Runtime when installed, else PyTorch)")  # fmt: skip


def cmd_gate(args: argparse.Namespace) -> int:
    from fracdet.inference.gate import fit_gate_on_splits, save_gate
    from fracdet.models import load

    model = load(args.model)
    if model.folder is None:
        raise SystemExit("error: the gate is written beside the model: pass a model folder or release name")
    splits = args.splits or (str(model.splits_path) if model.splits_path else None)
    table = _load_split_table(args.data, splits)
    extra = [_load_split_table(*(spec.split("=", 1) if "=" in spec else (spec, None))) for spec in args.extra]
    distance, limits, summary, appearance = fit_gate_on_splits(model, table, extra=extra)
    path = save_gate(model, distance, limits, model.folder, appearance)
    print(f"input gate of {model.name} {model.version}: warn beyond distance {limits.warn:.2f}, refuse beyond "
          f"{limits.refuse:.2f}, appearance distance {limits.appearance_refuse:.2f} or {limits.colour_fraction:.0%} "
          f"coloured; fitted on {limits.fitted_on}, chosen on "
          f"{limits.chosen_on}")  # fmt: skip
    quantiles = " / ".join(f"{v:.2f}" for v in summary["val_distance_quantiles"].values())
    print(f"validation distances (quantiles 0.5 / 0.9 / 0.99 / max): {quantiles}; written to {path}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from fracdet.models import package_release

    target = package_release(
        args.run, args.name, version=args.version, dest=args.dest, report=args.report, command=args.command
    )
    weights = next(p for p in (target / "model.safetensors", target / "model.onnx") if p.is_file())
    print(f"released {args.name} {args.version} to {target} ({weights.stat().st_size / 2**20:.1f} MiB: {weights.name})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fracdet.inference import Predictor, collect_inputs
    from fracdet.models import load
    from fracdet.utils.workers import worker_count

    if args.engine == "dask":
        return _predict_archive(args)
    if not args.inputs and not args.manifest:
        raise SystemExit("error: give images (files, folders, globs) or --manifest FILE")
    for option, table_path in (("--out", args.out), ("--studies", args.studies)):
        _check_output(option, table_path)
    sources = _read_manifest(args.manifest) if args.manifest else []
    model = load(args.model)
    paths: list = [*(collect_inputs(args.inputs) if args.inputs else []), *sources]
    reader = _url_reader(sources)
    heatmaps = args.heatmaps is not None or args.dicom_out is not None
    # A folder keeps every core busy on its own: in ONNX Runtime, one single-threaded pass per core beats one
    # pass on all of them (their threads wait on each other between layers). PyTorch keeps one pass at a time.
    predictor = Predictor(model, heatmaps=heatmaps, method=args.cam, force_modality=args.force_modality,
                          backend=args.backend, threads=1)  # fmt: skip
    scorers = worker_count() if predictor.backend == "onnxruntime" else 1
    then = _dicom_writer(model, Path(args.dicom_out), args.force_modality) if args.dicom_out else None
    table = predictor.predict_files(paths, heatmap_dir=Path(args.heatmaps) if args.heatmaps else None, then=then,
                                    batch_size=args.batch_size, scorers=scorers, reader=reader)  # fmt: skip
    if args.out:
        _write_table(table, Path(args.out))
    else:
        print(table.drop(columns="heatmap").to_string(index=False))
    if args.studies:
        from fracdet.inference import study_summary

        studies = study_summary(table)
        _write_table(studies, Path(args.studies))
        print(f"{len(studies)} DICOM studies: {int((studies['label'] == 'fracture').sum())} flagged "
              f"({int(studies['borderline'].eq(True).sum())} borderline)")  # fmt: skip
    failed = int(table["error"].notna().sum())
    flagged = int((table["label"] == "fracture").sum())
    borderline = int(table["borderline"].eq(True).sum())  # near the threshold: a re-save may flip them
    print(f"{len(table)} images: {flagged} flagged as fracture at threshold {model.threshold:.3f} "
          f"({borderline} borderline), {failed} unreadable")  # fmt: skip
    return 4 if failed == len(table) else 1 if failed else 0


def _predict_archive(args: argparse.Namespace) -> int:
    """``fracdet predict --manifest FILE --engine dask --out FOLDER``: partitioned Parquet, resumable."""
    from fracdet.inference.archive import predict_archive

    if not args.manifest or not args.out or args.inputs:
        raise SystemExit("error: --engine dask reads --manifest FILE and writes Parquet into --out FOLDER")
    if args.heatmaps or args.dicom_out or args.studies:
        raise SystemExit("error: --engine dask writes rows only (no --heatmaps, --dicom-out or --studies)")
    logging.getLogger("distributed").setLevel(logging.WARNING)  # the cluster's own start and stop
    sources = _read_manifest(args.manifest)
    result = predict_archive(args.model, sources, args.out, scheduler=args.scheduler, workers=args.workers,
                             partition_size=args.partition_size, backend=args.backend,
                             reader=_url_reader(sources))  # fmt: skip
    print(f"{result.partitions} partitions in {result.out_dir}: {result.scored} scored now "
          f"({result.images} images, {result.images_per_second:.1f} images/s), {result.kept} kept")  # fmt: skip
    return 0


def _read_manifest(path: str) -> list[str]:
    """``--manifest``'s entries, or one line saying why the file is not a manifest (before any model loads)."""
    from fracdet.inference.archive import read_manifest

    try:
        return read_manifest(path)
    except (OSError, ValueError) as exc:  # missing, a folder, not UTF-8, no 'path' column, an empty table
        raise SystemExit(f"error: --manifest {path}: {exc}") from None


def _url_reader(sources: list[str]):
    """What reads a manifest's DICOMweb instance URLs (WADO-RS); ``None`` when every entry is a file."""
    if not any(source.startswith(("http://", "https://")) for source in sources):
        return None
    from fracdet.dicom.pull import read_instance

    return read_instance


def _dicom_writer(model, folder: Path, force_modality: bool):
    """``then`` of ``predict_files``: each DICOM radiograph's SR, presentation state and secondary capture."""
    from fracdet.data.dicom import is_dicom
    from fracdet.dicom import results_for, write_results

    def write(path: Path, data: bytes, prediction) -> None:
        if is_dicom(data):
            write_results(results_for(data, prediction, model, force_modality=force_modality), folder)

    return write


def cmd_pacs_listen(args: argparse.Namespace) -> int:
    import contextlib
    import signal
    import threading

    from fracdet.dicom.node import Destination, NodeConfig, PacsNode
    from fracdet.models import load

    try:
        config = NodeConfig(spool=Path(args.spool), allowed_callers=tuple(args.allow), ae_title=args.ae_title,
                            host=args.host, port=args.port,
                            send_to=Destination.parse(args.send_to) if args.send_to else None, stow_url=args.stow,
                            queue_size=args.queue_size, workers=args.workers,
                            retention_days=args.retention_days, max_store_mb=args.max_store_mb,
                            max_associations=args.max_associations,
                            delivery_give_up_h=args.deliver_within_hours)  # fmt: skip
        node = PacsNode(load(args.model), config)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        with node:  # starting it raises OSError when it cannot listen (a port already taken was a traceback)
            where = f"{config.host}:{config.port}; results to {args.send_to or args.stow}; spool {config.spool}"
            print(f"{config.ae_title} listening on {where} (Ctrl-C or SIGTERM stops)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stopped.wait()
    except OSError as exc:
        raise SystemExit(f"error: the node {exc.strerror}") from None
    return 0


def cmd_pacs_pull(args: argparse.Namespace) -> int:
    from fracdet.dicom.dicomweb import DicomWeb
    from fracdet.dicom.pull import PullError, pull
    from fracdet.models import load

    _check_output("--out", args.out)
    try:
        with DicomWeb(args.dicomweb, max_mb=args.max_image_mb) as server:
            table = pull(server, load(args.model), study=args.study, since=args.since)
    except (PullError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.out:
        _write_table(table, Path(args.out))
    else:
        print(table.to_string(index=False))
    images, unlisted = table[table["image"] > 0], int((table["image"] == 0).sum())
    failed = int(images["error"].notna().sum())
    print(
        f"{len(images)} radiographs in {images['study'].nunique()} studies: "
        f"{int((images['label'] == 'fracture').sum())} flagged, {failed} failed, results stored back for "
        f"{int((images['stored'] > 0).sum())}" + (f"; {unlisted} studies could not be listed" if unlisted else "")
    )
    return 1 if failed or unlisted else 0


def _iso_date(text: str) -> str:
    """An argparse type: a calendar date as ``YYYY-MM-DD`` (``yesterday`` was sent to the PACS as it was)."""
    import datetime

    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _check_output(option: str, path: str | Path | None, *, folder: bool = False) -> None:
    """Refuse an output that cannot be written before the work, not after it (an audit, a duplicate search,
    an evaluation or a folder's predictions take minutes to hours): a file's path that names a folder, a
    folder's path that names a file, or a place under a file or where fracdet may not write."""
    if path is None:
        return
    out = Path(path)
    if folder and out.exists() and not out.is_dir():
        raise SystemExit(f"error: {option} {out} is a file: name a folder for the results")
    if not folder and out.is_dir():
        raise SystemExit(f"error: {option} {out} is a folder: name a file (in it, or elsewhere)")
    parent = next(p for p in out.absolute().parents if p.exists())  # missing folders are made
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {option} {out}: {parent} is not a folder fracdet may write in")


def _write_table(table, out: Path) -> None:
    """Whole or not at all: a run killed midway leaves no half-written table to trust."""
    from fracdet.utils.atomic import atomic_write_bytes

    text = table.to_json(orient="records", indent=2) if out.suffix == ".json" else table.to_csv(index=False)
    atomic_write_bytes(out, text.encode())
    print(f"wrote {out}")


def cmd_serve(args: argparse.Namespace) -> int:
    from fracdet.models import load
    from fracdet.serve import ServeConfig, create_app, run

    token = None  # from a file or the environment, never the command line (other users see argv)
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, bytes that are not text
            print(f"error: cannot read the token file {args.token_file} ({type(exc).__name__})", file=sys.stderr)
            return 2
        if not token:  # it served without a token before: a secret not yet written left the uploads open
            print(f"error: {args.token_file} is empty: write the access token into it (or serve without "
                  "--token-file)", file=sys.stderr)  # fmt: skip
            return 2
    elif "FRACDET_TOKEN" in os.environ:
        token = os.environ["FRACDET_TOKEN"].strip()
        if not token:
            print("error: FRACDET_TOKEN is set but empty: set the access token (or unset it)", file=sys.stderr)
            return 2
    try:
        config = ServeConfig(max_upload_mb=args.max_upload_mb, timeout_s=args.timeout, queue_size=args.queue_size,
                             workers=args.workers, threads=args.threads, backend=args.backend,
                             access_token=token)  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = load(args.model)
    app = create_app(model, config)  # reads the model's gate: a damaged one stops here, before "serving"
    print(f"serving {model.name} {model.version} ({model.arch}) on http://{args.host}:{args.port}"
          f"{' (uploads need the access token)' if token else ''}")  # fmt: skip
    run(app, host=args.host, port=args.port)
    return 0


def _whole(low: int, high: int | None = None, *, says: str = "a whole number"):
    """An argparse type: a whole number from ``low`` (to ``high``). Counts of 0 or less did harm before:
    `predict --batch-size 0` scored nothing and said "0 images", -3 was a traceback, a Dask cluster of
    `--workers 0` waited for ever; `serve --port 99999` was a traceback from the event loop's bind."""
    span = f"{low} or more" if high is None else f"{low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{says} is {span}, not {text!r}")
        return value

    return parse


_count, _quality, _port = _whole(1), _whole(1, 100, says="a quality"), _whole(1, 65535, says="a port")


def _share(text: str) -> float:
    """A split's share: refused before the audit it follows runs (minutes on a full dataset), not after."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a share must be a positive number, not {text}")
    return value


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", default=None, help="feature cache folder (default: $FRACDET_CACHE or ~/.cache/fracdet)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--exact-only", action="store_true", help="skip the near-duplicate search")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from fracdet import __version__

    parser = argparse.ArgumentParser(prog="fracdet", description="Bone-fracture detection with honest numbers.")
    parser.add_argument("--version", action="version", version=f"fracdet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audit", help="find unreadable files, duplicates, leakage, label conflicts, confounders")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument(
        "--splits",
        help="audit this split manifest (paths relative to PATH) instead of the layout's own split",
    )
    p.add_argument("--against", help="a second dataset: report files shared with it")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--html", help="write a self-contained HTML report")
    p.add_argument("--montage", help="PNG of the closest cross-split pairs not grouped as copies")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when leakage or label conflicts are found")
    _add_cache_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("split", help="write a grouped, stratified, leakage-free split manifest")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument(
        "--fractions",
        type=_share,
        nargs=3,
        default=(0.7, 0.15, 0.15),
        metavar=("TRAIN", "VAL", "TEST"),
        help="shares of the three splits, scaled to sum to 1 (default: 0.7 0.15 0.15)",
    )
    p.add_argument("--keep-truncated", action="store_true", help="keep truncated files (left out by default)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--keep-published", action="store_true", help="keep the dataset's own split and report its leakage"
    )
    how.add_argument(
        "--repair",
        metavar="MANIFEST",
        help="mend this manifest instead of drawing a new one: groups that straddle splits (by today's audit) "
        "move whole to the first of their splits (train, val, test); every other file stays",
    )
    _add_cache_options(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("pack", help="a compact copy (shrunk WebP + manifest) to move a dataset to a training machine")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument("--out", required=True, help="folder for the copy (manifest.csv, PACK.json, images)")
    p.add_argument("--splits", help="split manifest whose split column travels with the copy")
    p.add_argument("--only", nargs="+", metavar="SPLIT", help="pack only these splits (e.g. train val)")
    p.add_argument("--size", type=_count, default=384, help="shrink until the shorter side is at most this")
    p.add_argument("--format", default="webp", choices=["webp", "jpeg"])
    p.add_argument("--quality", type=_quality, default=90)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("train", help="train a model from a YAML config into a run folder (resumable)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--data", help="dataset folder or CSV manifest")
    p.add_argument("--splits", help="split manifest from `fracdet split` (default: the dataset's own split)")
    p.add_argument("--out", help="run folder (default: runs/CONFIG_NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (with --resume, only keys that leave the weights as they would be, "
                   "such as workers)")  # fmt: skip
    p.add_argument("--stop-after", type=_count, metavar="EPOCHS",
                   help="stop once this many epochs are done (a sitting); continue later with --resume")  # fmt: skip
    p.add_argument("--devices", type=_count, default=1,
                   help="training processes per machine (GPUs or CPU processes); >1 runs torchrun")  # fmt: skip
    p.add_argument("--nodes", type=_count, default=1, help="machines; run the same command on each (docs/SCALE.md)")
    p.add_argument("--rendezvous", metavar="HOST:PORT", help="with --nodes > 1: one machine's address, the same on all")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="hyper-parameter study: learning rate x batch size x epochs (validation)")
    p.add_argument("--config", required=True, help="base YAML config")
    p.add_argument("--data", required=True, help="dataset folder or CSV manifest")
    p.add_argument("--splits", help="split manifest (default: the dataset's own split)")
    p.add_argument("--out", help="sweep folder (default: runs/sweep-CONFIG_NAME); rerun to continue")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--batch-size", type=_count, nargs="+", default=[16, 32, 64])
    p.add_argument(
        "--epochs", type=_count, nargs="+", default=[10, 25, 49],
        help="epoch counts; when the schedule ignores the total (none, step, plateau) one run per learning rate"
        " x batch size trains to the largest and the shorter counts are read off its history",
    )  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("predict", help="predict images (files, folders, globs) -> CSV/JSON with heatmaps")
    p.add_argument("inputs", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--model", default="fracatlas-default", help="release name, run folder or checkpoint")
    p.add_argument("--out", help="results .csv or .json (default: print a table)")
    p.add_argument("--heatmaps", metavar="DIR", help="write heatmap overlays here (a localiser's map, else Grad-CAM)")
    p.add_argument("--cam", default="gradcam", choices=["gradcam", "gradcam++"])
    p.add_argument("--studies", metavar="FILE", help="also write one row per DICOM study (.csv or .json): its "
                   "highest probability and level, as studies are read")  # fmt: skip
    p.add_argument("--dicom-out", metavar="DIR", help="for each DICOM radiograph, write a structured report, a "
                   "presentation state and a secondary capture of the result here (originals untouched)")  # fmt: skip
    p.add_argument("--force-modality", action="store_true",
                   help="analyse DICOM that is not a projection radiograph (CT, MR, ...): never validated")  # fmt: skip
    _add_backend_option(p)
    p.add_argument("--batch-size", type=_count, default=2, help="images per forward pass; one pass per core runs at "
                   "once, one thread each (on 2 cores the fastest; an int8 graph gains from pairs, a float one "
                   "neither gains nor loses: docs/BENCHMARKS.md)")  # fmt: skip
    p.add_argument("--manifest", metavar="FILE", help="paths or DICOMweb instance URLs to score: a text file (one "
                   "per line), or a CSV or Parquet file with a 'path' column")  # fmt: skip
    p.add_argument("--engine", default="local", choices=["local", "dask"],
                   help="dask: score --manifest on a Dask cluster into partitioned Parquet in --out (resumable; "
                   "docs/SCALE.md)")  # fmt: skip
    p.add_argument("--scheduler", metavar="ADDRESS", help="with --engine dask: a running Dask scheduler "
                   "(tcp://host:8786); default: a local cluster of --workers processes")  # fmt: skip
    p.add_argument("--workers", type=_count, default=2, help="with --engine dask and no --scheduler: worker processes")
    p.add_argument("--partition-size", type=_count, default=256, help="with --engine dask: manifest entries per file")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("pacs", help="a DICOM node: radiographs in from a PACS, results back")
    pacs = p.add_subparsers(dest="pacs_command", required=True)
    p = pacs.add_parser("listen", help="C-STORE SCP: analyse received radiographs, send SR + GSPS + SC back")
    p.add_argument("--ae-title", default="FRACDET")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--allow", action="append", default=[], metavar="AE",
                   help="a calling AE title to accept (repeat; associations from others are rejected)")  # fmt: skip
    p.add_argument("--send-to", metavar="AE@HOST:PORT", help="C-STORE destination of the results")
    p.add_argument("--stow", metavar="URL", help="DICOMweb STOW-RS endpoint of the results")
    p.add_argument("--spool", default="fracdet-spool", help="working folder (queue, done, outbox, quarantine)")
    p.add_argument("--model", default="fracatlas-default")
    p.add_argument("--queue-size", type=int, default=32, help="waiting images beyond which stores get 0xA700")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--retention-days", type=float, default=7.0, help="how long done/ and quarantine/ keep files")
    p.add_argument("--max-store-mb", type=float, default=256.0,
                   help="the largest image a caller may send; a larger one ends its association")  # fmt: skip
    p.add_argument("--max-associations", type=int, default=4, help="associations at once; more are rejected")
    p.add_argument("--deliver-within-hours", type=float, default=24.0,
                   help="how long results wait in outbox/ for a destination that is away")  # fmt: skip
    p.set_defaults(func=cmd_pacs_listen)
    p = pacs.add_parser("pull", help="analyse studies in a PACS over DICOMweb (QIDO, WADO) and STOW the results")
    p.add_argument("--dicomweb", required=True, metavar="URL", help="the DICOMweb root, e.g. http://pacs/dicom-web")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", help="one study")
    which.add_argument("--since", metavar="YYYY-MM-DD", type=_iso_date, help="every study from this date on")
    p.add_argument("--model", default="fracatlas-default")
    p.add_argument("--out", help="the table (.csv or .json); studies appear as keyed hashes")
    p.add_argument("--max-image-mb", type=float, default=256.0,
                   help="the largest image fetched; a larger one is that image's error row")  # fmt: skip
    p.set_defaults(func=cmd_pacs_pull)

    p = sub.add_parser("gate", help="fit a model's input gate (what is not a radiograph gets no verdict)")
    p.add_argument("model", help="release name or model folder (the gate is written into it)")
    p.add_argument("--data", required=True, help="the dataset the model was trained on")
    p.add_argument("--splits", help="split manifest (default: the model's own)")
    p.add_argument("--extra", action="append", default=[], metavar="DATASET[=MANIFEST]",
                   help="another radiograph dataset (with its leakage-free split manifest): its val split joins "
                        "the validation radiographs, its train split the appearance fit")  # fmt: skip
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("serve", help="the web application and JSON API")
    p.add_argument("--model", default="fracatlas-default", help="release name, run folder or checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a prediction may take, waiting included")
    p.add_argument("--queue-size", type=int, default=64, help="requests that may wait (503 + Retry-After beyond)")
    p.add_argument("--token-file", help="uploads need the access token in this file (or $FRACDET_TOKEN); serve "
                   "behind a TLS-terminating proxy")  # fmt: skip
    p.add_argument("--workers", type=int, help="predictions at once (default: one per CPU core)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per prediction (default: every core, "
                   "the fastest lone answer; 1: a little more throughput under load)")  # fmt: skip
    _add_backend_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "ensemble",
        help="combine finished runs into one model (classifiers averaged, or one localiser "
        "fused with classifiers), calibrated on their val split",
    )
    p.add_argument("runs", nargs="+", help="run folders (or releases) trained on one split manifest")
    p.add_argument("--out", required=True, help="folder for the ensemble (a trained-model folder)")
    p.add_argument("--data", help="dataset folder (default: the first run's data root)")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser(
        "calibrate",
        help="fit a finished model's fusion, box edge, temperature and thresholds again on the validation files "
        "of --data (a run trained on a pack, fitted on the originals), into a new model folder",
    )
    p.add_argument("run", help="run folder (or release) with float weights")
    p.add_argument("--data", required=True, help="the dataset it will be judged on (e.g. the originals of its pack)")
    p.add_argument("--splits", help="split manifest (default: the one the model carries)")
    p.add_argument("--out", required=True, help="new folder for the recalibrated model (same weights)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("models", help="list architectures and trained (released) models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("release", help="copy a finished run's model into models/NAME with a version")
    p.add_argument("run", help="run folder of a finished `fracdet train`")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--dest", help="releases folder (default: the repository's models/ or $FRACDET_MODELS)")
    p.add_argument("--report", help="metrics.json of `fracdet evaluate` on the test split, quoted by the card; "
                   "the release takes its calibration and test-time augmentation setting")  # fmt: skip
    p.add_argument("--command", help="the command that reproduces --report")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("export", help="a trained model as one ONNX graph (dynamic batch), for ONNX Runtime")
    p.add_argument("model", nargs="?", help="run folder or released model name (or --model)")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as the positional MODEL")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="the only format so far")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="an int8 copy of a model (faster on CPUs), refitted on its own outputs")
    p.add_argument("model", help="release name or model folder (with PyTorch weights)")
    p.add_argument("--data", required=True, help="the dataset the model was trained on (its train and val splits)")
    p.add_argument("--splits", help="split manifest (default: the model's own)")
    p.add_argument("--out", required=True, help="the compiled model's folder (e.g. models/fracatlas-default)")
    p.add_argument("--name", help="its name (default: MODEL-int8)")
    p.add_argument("--version", help="its version (default: the model's version +int8)")
    p.add_argument("--calibration", type=_count, default=64, help="training radiographs that set the int8 ranges")
    p.add_argument("--calibration-batch", type=int, default=1, metavar="K",
                   help="calibration radiographs whose activations are held in memory at once; must divide "
                   "--calibration (default 1: 1.4 GiB in all at 320 px; 0: all at once, as 1.1.1 was made, "
                   "0.3 GiB each)")  # fmt: skip
    p.add_argument(
        "--int8-map-head",
        action="store_true",
        help="quantise a localiser's map head too (by default it stays float: its boxes hit more)",
    )
    p.add_argument(
        "--float-stride",
        type=int,
        default=0,
        metavar="N",
        help="keep the layers at stride N or finer in float too (2: the stem; 4: also the first stages); "
        "their margins then follow the float model's 3-7x closer, for up to 10%% more time (try 2 when an "
        "anti-aliased model's int8 graph fails --max-auc-drop)",
    )
    p.add_argument("--max-auc-drop", type=float, default=0.005,
                   help="write nothing when validation AUC falls by more than this")  # fmt: skip
    p.add_argument("--extra", action="append", default=[], metavar="DATASET[=MANIFEST]",
                   help="as for `fracdet gate`: another radiograph dataset for the refitted input gate")  # fmt: skip
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="metrics with intervals, operating points, calibration, report")
    p.add_argument("run", help="run folder, checkpoint (.pt) or released model name (e.g. fracatlas-default)")
    p.add_argument("--data", help="dataset folder or CSV manifest (default: the run's data root)")
    p.add_argument("--splits", help="split manifest (default: the one saved with the run or model)")
    p.add_argument("--split", default="test", help="split to measure: train, val, test or all (default: test)")
    p.add_argument("--out", help="report folder (default: runs/eval/MODEL-SPLIT)")
    p.add_argument("--bootstrap", type=_count, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation: average with the mirror image (default: as the model does)",
    )
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap localisation check")
    p.add_argument("--stability", action="store_true",
                   help="re-save every image (PNG, JPEG 95/75, WebP 80, half size): verdict flips, |dp|")  # fmt: skip
    p.add_argument("--compare", metavar="MODEL", help="also score MODEL's Grad-CAM on the same boxed images "
                   "(e.g. fracatlas-default beside a localiser's own map)")  # fmt: skip
    p.add_argument(
        "--exclude-shared-with",
        metavar="DATASET",
        help="leave out files showing a radiograph that DATASET also holds (cross-dataset tests)",
    )
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a launcher repeats in each process
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it logs a COCO table per mAP at INFO
    if argv is None and args.func in (cmd_audit, cmd_split, cmd_train):  # from a shell: it owns its process
        from fracdet.utils.memory import TRAINING_THRESHOLDS, keep_freed_memory

        # the duplicate search's temporaries, or a training step's activations, reused, not faulted in again
        keep_freed_memory(**(TRAINING_THRESHOLDS if args.func is cmd_train else {}))
    from fracdet.data import DatasetLayoutError
    from fracdet.models.release import ModelLoadError, NoWeightsError
    from fracdet.training import ConfigError, RunExistsError
    from fracdet.utils.lock import FolderInUseError

    try:
        return args.func(args)
    except (FileNotFoundError, DatasetLayoutError, ConfigError, RunExistsError, NoWeightsError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FolderInUseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:  # an output where a file or folder is
        print(f"error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        # Every file fracdet keeps (checkpoints, run records, tables, models) is written atomically, so
        # what was written before is whole and what was being written is not there at all.
        print(
            f"error: no space left to write {exc.filename or 'a file'} ({exc.strerror}). Files written before "
            "are intact and nothing was left half-written; free space and run the command again "
            "(a training continues with --resume).",
            file=sys.stderr,
        )
        return EXIT_NO_SPACE


#: errno values of a write that found no room: a full disk, a full quota, a file-size limit.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
EXIT_NO_SPACE = 74  # EX_IOERR of sysexits.h
EXIT_IN_USE = 75  # EX_TEMPFAIL: another process works in the folder; the same command works once it ends


if __name__ == "__main__":
    sys.exit(main())
