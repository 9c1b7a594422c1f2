#!/usr/bin/env bash
# Every number in docs/RESULTS.md, in order. Each step is an ordinary fracdet command: rerunning the
# script continues interrupted runs (--resume) and skips finished ones. Runs go to runs/, reports to
# runs/eval/. Set SHARED to the folder holding data/fracatlas and data/multiregion.
#
# The epoch counts are those of the CPU runs reported in RESULTS.md (2 cores; the paper trains up to 49
# epochs): raise them on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
FA="$SHARED/data/fracatlas"
MR="$SHARED/data/multiregion"
F="${FRACDET:-.venv/bin/fracdet}"

train() {  # train RUN ARGS...: start, resume, or skip when finished
    local run="$1"; shift
    if [ -f "runs/$run/model.json" ]; then return; fi
    if [ -f "runs/$run/checkpoints/last.pt" ]; then "$F" train --resume --out "runs/$run"; return; fi
    "$F" train --out "runs/$run" "$@"
}

# 1. The paper's CNN on the published multiregion split, best epoch chosen on TEST as the paper did.
train paper-multiregion-published-testselected --config configs/paper.yaml --data "$MR" --set epochs=2 --set select_on=test
"$F" evaluate runs/paper-multiregion-published-testselected --data "$MR" --split test --no-heatmaps --out runs/eval/study1-published-test
# ... and trained long enough to memorise, at 64 px so that 30 epochs fit the CPU (about 30 s per epoch alone).
train paper-multiregion-published-testselected-64px --config configs/paper.yaml --data "$MR" --set select_on=test --set epochs=30 --set image_size=64
"$F" evaluate runs/paper-multiregion-published-testselected-64px --data "$MR" --split test --no-heatmaps --out runs/eval/study1-published-64px-test
.venv/bin/python scripts/memorisation_baseline.py "$MR"
.venv/bin/python scripts/memorisation_baseline.py "$MR" --splits splits/multiregion_seed0.csv

# 2. The same on a leakage-free split of multiregion, best epoch chosen on validation.
train paper-multiregion-leakfree-seed0 --config configs/paper.yaml --data "$MR" --splits splits/multiregion_seed0.csv --set epochs=2
"$F" evaluate runs/paper-multiregion-leakfree-seed0 --data "$MR" --split test --no-heatmaps --out runs/eval/study2-leakfree-test

# 3. The paper's CNN on the leakage-free 70/15/15 FracAtlas split.
train paper-fracatlas-seed0 --config configs/paper.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set epochs=10
"$F" evaluate runs/paper-fracatlas-seed0 --data "$FA" --split test --out runs/eval/study3-paper-fracatlas-test

# 4. The default model on the same FracAtlas split, three training seeds.
for seed in 0 1 2; do
    train "fracatlas-default-seed$seed" --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set seed=$seed
    "$F" evaluate "runs/fracatlas-default-seed$seed" --data "$FA" --split test --out "runs/eval/study4-default-seed$seed-test"
    "$F" evaluate "runs/fracatlas-default-seed$seed" --data "$FA" --split test --tta --no-heatmaps --out "runs/eval/study4-default-seed$seed-test-tta"
done
# ... and the three seeds as one ensemble (mean logit margin, calibrated on val), without and with flip TTA.
if [ ! -f runs/fracatlas-ensemble-3seeds/model.json ]; then
    "$F" ensemble runs/fracatlas-default-seed0 runs/fracatlas-default-seed1 runs/fracatlas-default-seed2 --half --out runs/fracatlas-ensemble-3seeds
fi
"$F" evaluate runs/fracatlas-ensemble-3seeds --data "$FA" --split test --out runs/eval/study4-ensemble-3seeds-test
"$F" evaluate runs/fracatlas-ensemble-3seeds --data "$FA" --split test --tta --no-heatmaps --out runs/eval/study4-ensemble-3seeds-test-tta

# ... and seed 0 (the release 0.1.0) re-measured: how far its validation-chosen thresholds would move.
"$F" evaluate runs/fracatlas-default-seed0 --data "$FA" --split test --no-heatmaps --out runs/eval/thresholds-default-seed0-test

# ... and one lever at a time against seed 0 (same split, same 6 CPU epochs).
train fracatlas-lever-no-balance-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set balance=none
train fracatlas-lever-no-augment-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv \
    --set augment.hflip=0 --set augment.rotation=0 --set augment.scale=0 --set augment.translate=0 --set augment.contrast=0
train fracatlas-lever-scratch-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set pretrained=false
# no balancing once more with seed 1, to tell its effect from seed noise
train fracatlas-lever-no-balance-seed1 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set balance=none --set seed=1
# longer training, higher resolution, and under-sampling instead of class weights
train fracatlas-lever-epochs12-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set epochs=12
train fracatlas-lever-size320-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set image_size=320
train fracatlas-lever-undersample-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set balance=undersample
for run in no-balance-seed0 no-augment-seed0 scratch-seed0 no-balance-seed1 epochs12-seed0 size320-seed0 undersample-seed0; do
    "$F" evaluate "runs/fracatlas-lever-$run" --data "$FA" --split test --no-heatmaps --out "runs/eval/lever-$run-test"
done
"$F" evaluate runs/fracatlas-lever-size320-seed0 --data "$FA" --split test --tta --no-heatmaps --out runs/eval/lever-size320-seed0-test-tta
# 320 px with two more seeds: does the gain of seed 0 hold for the mean the target is about?
for seed in 1 2; do
    train "fracatlas-lever-size320-seed$seed" --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set image_size=320 --set seed=$seed
    "$F" evaluate "runs/fracatlas-lever-size320-seed$seed" --data "$FA" --split test --no-heatmaps --out "runs/eval/lever-size320-seed$seed-test"
    "$F" evaluate "runs/fracatlas-lever-size320-seed$seed" --data "$FA" --split test --tta --no-heatmaps --out "runs/eval/lever-size320-seed$seed-test-tta"
done
# Larger backbones of the same family at their native resolutions (ImageNet weights from the -lite1/-lite2 packages).
for seed in 0 1 2; do
    train "fracatlas-lever-lite2-260-seed$seed" --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set model=efficientnet_lite2 --set image_size=260 --set seed=$seed
done
train fracatlas-lever-lite1-240-seed0 --config configs/default.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set model=efficientnet_lite1 --set image_size=240
for run in lite2-260-seed0 lite2-260-seed1 lite2-260-seed2 lite1-240-seed0; do
    "$F" evaluate "runs/fracatlas-lever-$run" --data "$FA" --split test --no-heatmaps --out "runs/eval/lever-$run-test"
    "$F" evaluate "runs/fracatlas-lever-$run" --data "$FA" --split test --tta --no-heatmaps --out "runs/eval/lever-$run-test-tta"
done
# The release 0.2.0 was chosen on validation: Lite2 at 260 px (3-seed mean validation AUC 0.918, Lite0 at
# 224 px 0.909) and its seed with the best validation AUC (seed 2), packaged with
#   fracdet release runs/fracatlas-lever-lite2-260-seed2 --name fracatlas-default --version 0.2.0 \
#       --report runs/eval/lever-lite2-260-seed2-test/metrics.json --command "fracdet evaluate fracatlas-default ..."
# The release 0.3.0 (after the GPU runs below, by the rule in docs/RESULTS.md): Lite2 at 320 px, 18 GPU epochs,
# seed 1, packaged with
#   fracdet release runs/gpu320/gpu-seed1 --name fracatlas-default --version 0.3.0 \
#       --report runs/eval/gpu320-gpu-seed1-test/metrics.json --command "fracdet evaluate fracatlas-default ..."
# and the split manifest of 0.2.0; renamed fracatlas-classifier when 1.0.0 (section 6) took the name. The committed
# weights are re-measured here, with heatmaps and the threshold resampling of the model card.
"$F" evaluate fracatlas-classifier --data "$FA" --split test --out runs/eval/release-fracatlas-default-test

# On a GPU (docs/RESULTS.md, "GPU runs"): configs/default-gpu.yaml (Lite2, 384 px, 18 epochs) with seeds 0-2
# and one lever each, and the same 3 seeds at 320 px, trained on a lent GPU by scripts/gpu_runs.py and
# unpacked into runs/gpu and runs/gpu320. Only their evaluation on the original files runs here (skipped
# while those folders are absent).
for group in gpu gpu320; do
    for run in runs/"$group"/*/; do
        [ -f "$run/model.json" ] || continue
        name="$group-$(basename "$run")"
        "$F" evaluate "$run" --data "$FA" --splits splits/fracatlas_seed0.csv --split test --no-heatmaps --out "runs/eval/$name-test"
        case "$name" in *-gpu-seed*)
            "$F" evaluate "$run" --data "$FA" --splits splits/fracatlas_seed0.csv --split test --tta --no-heatmaps --out "runs/eval/$name-test-tta";;
        esac
    done
done

# The hyper-parameter study (validation only), the paper's network at 64 px on the same split.
"$F" sweep --config configs/paper.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --out runs/sweep-paper-fracatlas-64px \
    --set image_size=64 --lr 0.001 0.0001 --batch-size 16 32 --epochs 5 10

# 5. Across datasets, without the images the two sets share.
"$F" evaluate runs/fracatlas-default-seed0 --data "$MR" --split all --exclude-shared-with "$FA" --no-heatmaps --bootstrap 300 --out runs/eval/study5-fracatlas-model-on-multiregion
"$F" evaluate runs/paper-multiregion-leakfree-seed0 --data "$FA" --splits splits/fracatlas_seed0.csv --split all --exclude-shared-with "$MR" --no-heatmaps --bootstrap 300 --out runs/eval/study5-multiregion-model-on-fracatlas

# 6. Where: the localiser (configs/localiser.yaml: EfficientNet-Lite0 + map head, 256 px, 8 CPU epochs), seed 0.
# The release rule of RESULTS.md section 6 reads validation first; the test split is read after it.
train localiser-lite0-256-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv
"$F" evaluate runs/localiser-lite0-256-seed0 --data "$FA" --split val --compare fracatlas-classifier --out runs/eval/localiser-lite0-256-seed0-val
"$F" evaluate runs/localiser-lite0-256-seed0 --data "$FA" --split test --compare fracatlas-classifier --out runs/eval/localiser-lite0-256-seed0-test
"$F" evaluate runs/localiser-lite0-256-seed0 --data "$MR" --split all --exclude-shared-with "$FA" --no-heatmaps --bootstrap 300 --out runs/eval/study5-localiser-on-multiregion
# The levers of issue 15, one seed each, compared on validation only (scripts/results_tables.py prints the table):
# augmentation (no re-encoding), the detection head, resolution, backbone.
train localiser-lite0-256-noreencode-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set augment.reencode=0 --set augment.rescale=0
train detector-lite0-256-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set model=detector_lite0
train localiser-lite0-320-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set image_size=320
train localiser-lite1-256-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set model=localiser_lite1
# stability training from the start (issue 16's verdict flips); each step scores twice the images
train localiser-lite0-256-stable-seed0 --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set stability.weight=1
"$F" evaluate runs/localiser-lite0-256-stable-seed0 --data "$FA" --split val --stability --no-heatmaps --bootstrap 300 --out runs/eval/localiser-lite0-256-stable-seed0-val-stability
for run in localiser-lite0-256-seed0 localiser-lite0-256-noreencode-seed0 detector-lite0-256-seed0 localiser-lite0-320-seed0 localiser-lite1-256-seed0; do
    [ "$run" = localiser-lite0-256-seed0 ] || "$F" evaluate "runs/$run" --data "$FA" --split val --out "runs/eval/$run-val"
    "$F" evaluate "runs/$run" --data "$FA" --split val --stability --no-heatmaps --bootstrap 300 --out "runs/eval/$run-val-stability"
    # fusion with the classifier: the localiser's score also weighs 0.3.0's margin (weights fitted on val)
    "$F" ensemble "runs/$run" fracatlas-classifier --out "runs/fused-$run"
    "$F" evaluate "runs/fused-$run" --data "$FA" --split val --out "runs/eval/fused-$run-val"
done
# The recipe chosen on seed 0's fused validation AUC (Lite1 at 256 px), with seeds 0-2, each fused with 0.3.0
# (float16, as released) and measured on validation; the seed with the median validation AUC is the candidate
# of the release rule. Only then are the three read on test (the targets are means of 3 seeds), on the test
# split of the manifest and on the repaired one (its leakage-free subset).
for seed in 0 1 2; do
    train localiser-lite1-256-seed$seed --config configs/localiser.yaml --data "$FA" --splits splits/fracatlas_seed0.csv --set model=localiser_lite1 --set seed=$seed
    [ -f runs/fused-localiser-lite1-256-seed$seed/model.json ] || "$F" ensemble runs/localiser-lite1-256-seed$seed fracatlas-classifier --half --out runs/fused-localiser-lite1-256-seed$seed
    "$F" evaluate runs/fused-localiser-lite1-256-seed$seed --data "$FA" --split val --compare fracatlas-classifier --out runs/eval/fused-localiser-lite1-256-seed$seed-val
done
for seed in 0 1 2; do
    "$F" evaluate runs/fused-localiser-lite1-256-seed$seed --data "$FA" --split test --compare fracatlas-classifier --out runs/eval/fused-localiser-lite1-256-seed$seed-test
    "$F" evaluate runs/fused-localiser-lite1-256-seed$seed --data "$FA" --splits splits/fracatlas_seed0_repaired.csv --split test --compare fracatlas-classifier --out runs/eval/fused-localiser-lite1-256-seed$seed-testrepaired
done
# the release rule's latency (rule 3), side by side in one sitting
.venv/bin/python benchmarks/latency.py --model runs/fused-localiser-lite1-256-seed0 --backend pytorch --clients 0 --out benchmarks/results-fused-lite1-cpu2.json
.venv/bin/python benchmarks/latency.py --model fracatlas-classifier --backend pytorch --clients 0 --out benchmarks/results-default-pytorch-cpu2.json
.venv/bin/python scripts/reencode_flips.py runs/localiser-lite0-256-seed0 --data "$FA" --split test --quality 75
.venv/bin/python scripts/reencode_flips.py fracatlas-classifier --data "$FA" --split test --quality 75
# Stability training from the start, on a lent GPU (RESULTS.md section 6): `SIZE=320 LITE=1 bash scripts/gpu_prepare.sh`,
# then there the command in scripts/gpu_runs.py's docstring with --run stable-seed{0,1,2} (seed=K stability.weight=1),
# plain-seed0 (seed=0) and stable-w3-seed0 (seed=0 stability.weight=3); unpacked into runs/gpu-stable, each run's
# splits.csv (the packed rows) replaced by 0.3.0's full manifest after checking its train and val rows are equal.
for run in stable-seed0 stable-seed1 stable-seed2 plain-seed0; do
    [ -f "runs/gpu-stable/$run/model.json" ] || continue
    "$F" ensemble "runs/gpu-stable/$run" fracatlas-classifier --half --data "$FA" --out "runs/fused-gpu-stable/$run"
    "$F" evaluate "runs/fused-gpu-stable/$run" --data "$FA" --split val --stability --compare fracatlas-classifier --out "runs/eval/fused-gpu-$run-val-stability"
done
"$F" evaluate runs/fused-localiser-lite1-256-seed0 --data "$FA" --split val --stability --no-heatmaps --out runs/eval/fused-localiser-lite1-256-seed0-val-stability
# The release 1.0.0 (the rule held; the stability recipe did not replace the candidate): seed 0, fused again with
# the classifier under its new name (the same weights), released with its test report, then its input gate.
"$F" ensemble runs/localiser-lite1-256-seed0 fracatlas-classifier --half --data "$FA" --out runs/release-fused-localiser-lite1-256-seed0
cp runs/localiser-lite1-256-seed0/{config.yaml,metrics.csv,curves.png} runs/release-fused-localiser-lite1-256-seed0/
# (released as fracatlas-default 1.0.0; named fracatlas-localiser since its int8 graph took that name, 1.1.0)
#   fracdet release runs/release-fused-localiser-lite1-256-seed0 --name fracatlas-default --version 1.0.0 \
#       --report runs/eval/fused-localiser-lite1-256-seed0-test/metrics.json --command "fracdet evaluate fracatlas-default ..."
#   fracdet gate fracatlas-default --data "$FA" --extra "$MR=splits/multiregion_seed0.csv"
"$F" evaluate fracatlas-localiser --data "$FA" --split test --compare fracatlas-classifier --out runs/eval/release-fracatlas-default-1.0.0-test
# its card's latency (docs/BENCHMARKS.md) and input gate on the held-out non-radiographs (docs/RELIABILITY.md)
.venv/bin/python benchmarks/latency.py --model fracatlas-localiser --clients 0 --out benchmarks/results-default-1.0.0-cpu2.json
.venv/bin/python benchmarks/latency.py --model fracatlas-localiser --backend pytorch --clients 0 --out benchmarks/results-default-1.0.0-pytorch-cpu2.json
.venv/bin/python benchmarks/latency.py --model fracatlas-classifier --clients 0 --out benchmarks/results-classifier-0.3.0-cpu2.json
.venv/bin/python benchmarks/input_gate.py fracatlas-localiser --fracatlas "$FA" --multiregion "$MR" --out benchmarks/results-input-gate-1.0.0.json

# The default 1.1.1 (issues 18, 16): the localiser's int8 graph (7-bit weights, so that every CPU computes the same
# integers), refitted on its own validation outputs (models/README.md), released with its test report; then its
# kernels against its reference arithmetic on this CPU, beside 1.1.0 (8-bit weights; made by the same commands
# with "--version 1.1.0" at commit 0f38307), and the real-time run against 0.3.0 as main served it (docs/BENCHMARKS.md).
# (--calibration-batch 0: its 64 calibration radiographs at once, as it was made; the default now runs them one
# at a time, in a twentieth of the memory: docs/BENCHMARKS.md, "What int8 calibration holds in memory")
"$F" quantize fracatlas-localiser --data "$FA" --extra "$MR=splits/multiregion_seed0.csv" --calibration-batch 0 \
    --name fracatlas-default --version 1.1.1 --out runs/int8/fracatlas-default-1.1.1
"$F" evaluate runs/int8/fracatlas-default-1.1.1 --data "$FA" --split val --out runs/eval/default-1.1.1-val
"$F" evaluate runs/int8/fracatlas-default-1.1.1 --data "$FA" --split test --stability --out runs/eval/default-1.1.1-test
#   fracdet release runs/int8/fracatlas-default-1.1.1 --name fracatlas-default --version 1.1.1 \
#       --report runs/eval/default-1.1.1-test/metrics.json --command "fracdet evaluate fracatlas-default ..."
.venv/bin/python benchmarks/int8_formats.py --data "$FA" --out benchmarks/results-int8-formats.json
.venv/bin/python benchmarks/int8_cpu.py runs/int8/fracatlas-default-1.1.1 runs/int8/fracatlas-default-1.1.0 --data "$FA" --out benchmarks/results-int8-cpu.json
.venv/bin/python benchmarks/input_gate.py runs/int8/fracatlas-default-1.1.1 --fracatlas "$FA" --multiregion "$MR" --out benchmarks/results-input-gate-1.1.1.json
.venv/bin/python benchmarks/realtime.py --data "$FA" --images 200 --out benchmarks/results-realtime-1.1.1.json  # 1.1.0: results-realtime-1.1.0.json

# docs/STABILITY.md: does the shipped model's verdict survive re-saving (PNG, JPEG 95/75, WebP 80, half size)?
"$F" evaluate fracatlas-localiser --data "$FA" --split test --stability --no-heatmaps --out runs/eval/stability-fracatlas-default-1.0.0-test
"$F" evaluate fracatlas-classifier --data "$FA" --split test --stability --no-heatmaps --out runs/eval/stability-fracatlas-default-test

# The tables of RESULTS.md, with sensitivity by fracture size and surgical hardware.
.venv/bin/python scripts/results_tables.py --data "$FA"
