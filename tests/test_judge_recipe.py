"""The rule that decides whether a training recipe may ship (scripts/judge_recipe.py), and the chain that
trains and judges its seeds (scripts/recipe_seeds.sh): the verdict follows the rule written before the
seeds were trained, and a first seed that misses the screen stops the arm before hours go into the next."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEADY = {"png": 0.0, "jpeg95": 0.005, "jpeg75": 0.01, "webp80": 0.015, "half": 0.015}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


judge_recipe = _script("judge_recipe")


def _report(path: Path, name: str, auc: float, *, flips: dict[str, float] | None = None, small: int = 20) -> Path:
    """A validation report with what the rule reads of it, as ``fracdet evaluate --stability`` writes it."""
    small_at_suspicious = {"by": "fracture_size", "value": "small (< 1% of the image)", "level": "suspicious",
                           "flagged": small / 21, "fractures": 21}  # fmt: skip
    report = {
        "model": name,
        "split": "val",
        "lesions": {"all": {"image_auc": {"value": auc}}, "subgroups": [small_at_suspicious]},
        "stability": {"variants": {v: {"flip_rate": rate} for v, rate in flips.items()}} if flips else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def _seeds(tmp_path: Path, *rows: tuple[float, dict[str, float]]):
    return [judge_recipe.Seed.read(_report(tmp_path / f"s{i}.json", f"seed{i}", auc, flips=flips))
            for i, (auc, flips) in enumerate(rows)]  # fmt: skip


def test_a_recipe_passes_when_its_median_seed_is_steady_whatever_the_other_seeds_flip(tmp_path):
    shaky = {**STEADY, "webp80": 0.05}
    reference = judge_recipe.Seed.read(_report(tmp_path / "ref.json", "1.0.0", 0.939, small=19), stability=False)
    seeds = _seeds(tmp_path, (0.95, shaky), (0.94, STEADY), (0.93, shaky))
    verdict = judge_recipe.judge(seeds, reference, margin=0.005, mean_flips=0.03, each_flip=0.02)
    assert "median seed: seed1 (AUC 0.9400)" in verdict
    assert verdict[-1].startswith("PASS")


def test_one_variant_above_two_percent_on_the_median_seed_fails_the_recipe(tmp_path):
    reference = judge_recipe.Seed.read(_report(tmp_path / "ref.json", "1.0.0", 0.939, small=19), stability=False)
    seeds = _seeds(tmp_path, (0.95, STEADY), (0.94, {**STEADY, "half": 0.025}), (0.93, STEADY))
    verdict = judge_recipe.judge(seeds, reference, margin=0.005, mean_flips=0.03, each_flip=0.02)
    assert any(line.startswith("(c)") and line.endswith("NOT met") for line in verdict)
    assert verdict[-1].startswith("FAIL")


def test_a_recipe_ranking_below_the_bar_fails_before_its_flips_are_read(tmp_path):
    reference = judge_recipe.Seed.read(_report(tmp_path / "ref.json", "1.0.0", 0.939, small=19), stability=False)
    seeds = _seeds(tmp_path, (0.935, STEADY), (0.93, STEADY), (0.932, STEADY))
    verdict = judge_recipe.judge(seeds, reference, margin=0.005, mean_flips=0.03, each_flip=0.02)
    assert verdict[0].endswith("NOT met") and verdict[-1].startswith("FAIL")
    assert not any(line.startswith("median seed") for line in verdict)


@pytest.mark.parametrize(
    ("auc", "worst", "goes_on"),
    [(0.93, 0.03, True), (0.93, 0.031, False), (0.924, 0.01, False), (0.925, 0.0, True)],
)
def test_the_screen_stops_an_arm_whose_first_seed_ranks_too_low_or_flips_too_often(tmp_path, auc, worst, goes_on):
    (seed,) = _seeds(tmp_path, (auc, {**STEADY, "webp80": worst}))
    verdict = judge_recipe.screen(seed, min_auc=0.925, max_flip=0.03)
    assert verdict[-1].startswith("GO ON" if goes_on else "STOP")


def _chain(tmp_path: Path, first_flips: dict[str, float], seeds: str = "0 1 2") -> subprocess.CompletedProcess:
    """The chain over ``seeds`` judged from kept reports (no run folders), screened after the first; seed 2
    has no report, so going on to it would call ``fracdet train``, here a command that is not there."""
    kept = tmp_path / "kept" / "arm"
    _report(Path(f"{kept}-seed0-val-metrics.json"), "seed0", 0.94, flips=first_flips)
    _report(Path(f"{kept}-seed1-val-metrics.json"), "seed1", 0.945, flips=STEADY)
    env = {**os.environ, "RUNS": str(tmp_path / "runs" / "arm"), "EVALS": str(tmp_path / "evals" / "arm"),
           "KEPT": str(kept), "SEEDS": seeds, "SCREEN": "0.925 0.03", "PYTHON": sys.executable,
           "FRACDET": str(tmp_path / "no-fracdet"),
           "REFERENCE": str(_report(tmp_path / "ref.json", "1.0.0", 0.939, small=19))}  # fmt: skip
    return subprocess.run(["bash", str(REPO / "scripts" / "recipe_seeds.sh"), "--config", "unused.yaml"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_chain_stops_after_a_first_seed_that_misses_the_screen_and_trains_nothing_more(tmp_path):
    done = _chain(tmp_path, {**STEADY, "half": 0.04})
    assert done.returncode == 1, done.stderr
    assert "the arm stops after its first seed" in done.stdout
    assert "seed 1:" not in done.stdout and "no-fracdet" not in done.stderr


def test_the_chain_goes_on_past_a_first_seed_that_meets_the_screen(tmp_path):
    done = _chain(tmp_path, STEADY)
    assert "GO ON" in done.stdout and "seed 1: judged from its kept report" in done.stdout
    assert done.returncode == 127 and "no-fracdet" in done.stderr  # it went on to train seed 2


def test_the_chain_asked_for_its_first_seed_alone_screens_it_and_judges_no_recipe_on_it(tmp_path):
    done = _chain(tmp_path, STEADY, seeds="0")
    assert done.returncode == 0, done.stderr
    assert "GO ON" in done.stdout and "1 seed(s) done, not judged: the rule reads three" in done.stdout
    assert "judging the recipe" not in done.stdout
    assert _chain(tmp_path, {**STEADY, "half": 0.04}, seeds="0").returncode == 1  # a first seed that misses it
