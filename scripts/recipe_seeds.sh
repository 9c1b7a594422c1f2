#!/usr/bin/env bash
# Train a recipe's seeds one after another, evaluate each on validation with the re-save figures, and judge
# the recipe by the rule written before they were trained (scripts/judge_recipe.py; docs/STABILITY.md,
# *What follows the control*). Stopped at any point (a sitting's end, CI wanting the cores; SIGTERM to its
# `fracdet train`, `pkill -TERM -f "fracdet train"`, lets the batch in hand finish and saves there, and the
# script then ends with that command's 143), run again with the same arguments it picks up where it was:
# a run folder with a model.json is trained, one with a config.yaml is resumed (from its last epoch or its
# partial.pt), an evaluation with a metrics.json is done.
#
#   RUNS=~/fracdet-runs/exp/fused-aa-320-cpu-b32-noloss EVALS=~/fracdet-runs/eval/noloss \
#       bash scripts/recipe_seeds.sh --config configs/fused-gpu.yaml \
#       --splits splits/fracatlas_seed0_repaired.csv --set antialias=true --set micro_batch=16 \
#       --set stability.weight=0
#
# The arguments are `fracdet train`'s for a new run, without --out, --data or seed, which this script adds:
# seed S trains into $RUNS-seedS and is evaluated into $EVALS-seedS-val. Keep run folders outside the
# working tree (a sitting may lay the tree anew). SEEDS ("0 1 2"), DATA (../shared/data/fracatlas) and
# REFERENCE (1.0.0's report on the repaired validation split) may be set. KEPT, a prefix of reports kept
# in the repository (docs/evidence/NAME, for docs/evidence/NAME-seedS-val-metrics.json), lets a seed whose
# run folder went with its machine be judged from its kept report instead of trained again (its weights are
# needed only if the recipe passes and it is the seed that ships). SCREEN, two numbers "MIN_AUC MAX_FLIP",
# screens the first seed as soon as it is evaluated, before any other is trained (scripts/judge_recipe.py
# --screen): the arm stops there, exiting 1, when it ranks below MIN_AUC or flips more than MAX_FLIP under
# any re-save. Exits as the judgement does: 0 when the recipe passes, 1 when it does not, and otherwise with
# the first failing command's status; with fewer than three SEEDS (SEEDS=0: the first seed alone, screened)
# it exits 0 once they are done, without a judgement, since the rule reads three.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RUNS:?set RUNS, the prefix of the run folders (seed S trains into \$RUNS-seedS)}"
: "${EVALS:?set EVALS, the prefix of the validation reports (seed S is evaluated into \$EVALS-seedS-val)}"
SEEDS="${SEEDS:-0 1 2}"
DATA="${DATA:-../shared/data/fracatlas}"
REFERENCE="${REFERENCE:-docs/evidence/localiser-1.0.0-repaired-val-metrics.json}"
F="${FRACDET:-.venv/bin/fracdet}"
PY="${PYTHON:-.venv/bin/python}"
say() { echo "$(date -u +%FT%TZ) $*"; }
# gperftools' tcmalloc, where installed and nothing else is preloaded, keeps the memory an epoch frees for the
# next instead of faulting it in again: a CPU epoch in about four fifths of the time (docs/SCALE.md).
for lib in /usr/lib/*/libtcmalloc_minimal.so.4; do
    if [ -z "${LD_PRELOAD:-}" ] && [ -e "$lib" ]; then export LD_PRELOAD="$lib"; fi
done

reports=()
screen_first() {
    say "screening the first seed (SCREEN: $SCREEN)"
    read -r min_auc max_flip <<< "$SCREEN"
    "$PY" scripts/judge_recipe.py "${reports[0]}" --screen "$min_auc" "$max_flip" \
        || { say "the arm stops after its first seed, as written before it ran"; exit 1; }
}
for seed in $SEEDS; do
    run="$RUNS-seed$seed"
    report="$EVALS-seed$seed-val"
    kept="${KEPT:+$KEPT-seed$seed-val-metrics.json}"
    if [ ! -e "$run" ] && [ ! -f "$report/metrics.json" ] && [ -n "$kept" ] && [ -f "$kept" ]; then
        say "seed $seed: judged from its kept report $kept (no run folder: trained again only if it ships)"
        reports+=("$kept")
        if [ -n "${SCREEN:-}" ] && [ "${#reports[@]}" -eq 1 ]; then screen_first; fi
        continue
    fi
    if [ -f "$run/model.json" ]; then
        say "seed $seed: trained ($run)"
    elif [ -f "$run/config.yaml" ]; then
        say "seed $seed: resuming $run"
        "$F" train --resume --out "$run" --data "$DATA"
    else
        say "seed $seed: starting $run"
        "$F" train "$@" --data "$DATA" --set "seed=$seed" --out "$run"
    fi
    if [ ! -f "$report/metrics.json" ]; then
        say "seed $seed: evaluating on validation into $report"
        "$F" evaluate "$run" --data "$DATA" --split val --stability --no-heatmaps --out "$report"
    fi
    reports+=("$report/metrics.json")
    if [ -n "${SCREEN:-}" ] && [ "${#reports[@]}" -eq 1 ]; then screen_first; fi
done
if [ "${#reports[@]}" -lt 3 ]; then
    say "${#reports[@]} seed(s) done, not judged: the rule reads three (SEEDS=\"0 1 2\" goes on from here)"
    exit 0
fi
say "judging the recipe on ${#reports[@]} seeds against $REFERENCE"
"$PY" scripts/judge_recipe.py "${reports[@]}" --reference "$REFERENCE"
