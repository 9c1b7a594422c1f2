"""A training recipe judged on its seeds by the rule written before they were trained (docs/STABILITY.md,
*What follows the control*), from their validation reports alone.

    python scripts/judge_recipe.py REPORT [REPORT ...] --reference REFERENCE [--margin 0.005]
        [--mean-flips 0.030] [--each-flip 0.02] [--out judgement.md]

Each ``REPORT`` is the ``metrics.json`` that ``fracdet evaluate RUN --split val --stability`` wrote for one
seed; ``REFERENCE`` is the shipped model's on the same split. The rule, as the release rules since 0.3.0
judge recipes (docs/RESULTS.md):

(a) the seeds' mean validation ROC AUC is at least the reference's less ``--margin``; then the seed with the
    median AUC (the lower middle one for an even count) must meet
(b) at least as many small fractures flagged at *suspicious* as the reference, and
(c) mean verdict flips of JPEG q75, WebP q80 and half size at most ``--mean-flips``, and every variant's at
    most ``--each-flip`` (issue 16's target).

It prints a table of every seed and the verdict on each part, and exits 0 when the recipe passes, 1 when it
does not: no test split is read, and none is read for a recipe that fails.

    python scripts/judge_recipe.py REPORT --screen MIN_AUC MAX_FLIP

screens one seed before the others are trained, by bounds written down before it ran (docs/STABILITY.md,
*Measurement 11*): it exits 1, and the arm stops there, when the seed ranks below ``MIN_AUC`` or flips more
than ``MAX_FLIP`` under any re-save. Seeds take hours on a CPU; a first seed that misses the recipe's purpose
by more than one validation split can tell apart is not worth two more.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

#: The re-saves whose mean flips rule (c) bounds: the ones the shipped model flips most under.
MEAN_OF = ("jpeg75", "webp80", "half")


@dataclass(frozen=True)
class Seed:
    """What the rule reads of one validation report."""

    name: str
    auc: float
    small_flagged: int
    small: int
    flips: dict[str, float]

    @classmethod
    def read(cls, path: str | Path, *, stability: bool = True) -> Seed:
        """``stability``: the report must hold the re-save figures (a seed's does; the reference's need not)."""
        report = json.loads(Path(path).read_text())
        if report.get("split") != "val":
            raise SystemExit(f"{path}: a report of the {report.get('split')!r} split; the rule reads validation only")
        small = next(
            (g for g in report["lesions"]["subgroups"]
             if g["by"] == "fracture_size" and g["value"].startswith("small") and g["level"] == "suspicious"),
            None,
        )  # fmt: skip
        if small is None:
            raise SystemExit(f"{path}: no small-fracture subgroup (a report of a model without boxes?)")
        if stability and not report.get("stability"):
            raise SystemExit(f"{path}: no re-save figures (evaluate with --stability)")
        variants = (report.get("stability") or {}).get("variants", {})
        return cls(
            name=report["model"],
            auc=report["lesions"]["all"]["image_auc"]["value"],
            small_flagged=round(small["flagged"] * small["fractures"]),
            small=small["fractures"],
            flips={variant: figures["flip_rate"] for variant, figures in variants.items()},
        )

    @property
    def mean_flips(self) -> float:
        return statistics.fmean(self.flips[v] for v in MEAN_OF) if self.flips else float("nan")


def judge(seeds: list[Seed], reference: Seed, *, margin: float, mean_flips: float, each_flip: float) -> list[str]:
    """The verdict, line by line, each saying what was asked and what came; the last says pass or fail."""
    bar = reference.auc - margin
    mean_auc = statistics.fmean(s.auc for s in seeds)
    passed = mean_auc >= bar
    lines = [f"(a) mean validation AUC {mean_auc:.4f} of {len(seeds)} seeds; asked >= {bar:.4f} "
             f"({reference.name} {reference.auc:.4f} less {margin:g}): {'met' if passed else 'NOT met'}"]  # fmt: skip
    if passed:
        median = sorted(seeds, key=lambda s: s.auc)[(len(seeds) - 1) // 2]
        small_ok = median.small_flagged >= reference.small_flagged
        worst = max(median.flips.values())
        flips_ok = median.mean_flips <= mean_flips and worst <= each_flip
        lines += [
            f"median seed: {median.name} (AUC {median.auc:.4f})",
            f"(b) small fractures at suspicious {median.small_flagged}/{median.small}; asked >= "
            f"{reference.small_flagged}/{reference.small}: {'met' if small_ok else 'NOT met'}",
            f"(c) mean flips {'/'.join(MEAN_OF)} {median.mean_flips:.3f} (asked <= {mean_flips:g}), every variant "
            f"at most {worst:.3f} (asked <= {each_flip:g}): {'met' if flips_ok else 'NOT met'}",
        ]
        passed = small_ok and flips_ok
    return [*lines, "PASS: the recipe may go on to int8 and the test split" if passed else "FAIL: nothing ships"]


def screen(seed: Seed, *, min_auc: float, max_flip: float) -> list[str]:
    """Whether one seed warrants training the others, line by line; the last says go on or stop."""
    worst = max(seed.flips, key=seed.flips.get)
    ranked, steady = seed.auc >= min_auc, seed.flips[worst] <= max_flip
    return [
        f"validation AUC {seed.auc:.4f}; asked >= {min_auc:g}: {'met' if ranked else 'NOT met'}",
        f"most flips {worst} {seed.flips[worst]:.3f}; asked <= {max_flip:g}: {'met' if steady else 'NOT met'}",
        "GO ON: train the other seeds" if ranked and steady else f"STOP: {seed.name} ends the arm",
    ]


def table(seeds: list[Seed], reference: Seed | None) -> str:
    variants = list(seeds[0].flips)
    head = ["model", "AUC", "small at suspicious", *(f"flips {v}" for v in variants), "mean of three"]
    rows = [
        [s.name, f"{s.auc:.4f}", f"{s.small_flagged}/{s.small}",
         *(f"{s.flips[v]:.3f}" if v in s.flips else "-" for v in variants),
         f"{s.mean_flips:.3f}" if s.flips else "-"]
        for s in [*([reference] if reference else []), *seeds]
    ]  # fmt: skip
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("reports", nargs="+", help="each seed's validation metrics.json")
    parser.add_argument("--reference", help="the shipped model's validation metrics.json (not with --screen)")
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--mean-flips", type=float, default=0.030)
    parser.add_argument("--each-flip", type=float, default=0.02)
    parser.add_argument("--screen", nargs=2, type=float, metavar=("MIN_AUC", "MAX_FLIP"),
                        help="screen one seed before the others are trained (exit 1: the arm stops)")  # fmt: skip
    parser.add_argument("--out", help="also write the table and the verdict here (markdown)")
    args = parser.parse_args()
    if args.screen and len(args.reports) != 1:
        parser.error("--screen reads one seed's report")
    if not args.screen and not args.reference:
        parser.error("--reference is needed to judge a recipe")
    seeds = [Seed.read(path) for path in args.reports]
    if args.screen:
        verdict = screen(seeds[0], min_auc=args.screen[0], max_flip=args.screen[1])
        text = table(seeds, None)
    else:
        reference = Seed.read(args.reference, stability=False)
        verdict = judge(seeds, reference, margin=args.margin, mean_flips=args.mean_flips, each_flip=args.each_flip)
        text = table(seeds, reference)
    text += "\n\n" + "\n".join(f"- {line}" for line in verdict) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    raise SystemExit(0 if verdict[-1].startswith(("PASS", "GO ON")) else 1)


if __name__ == "__main__":
    main()
