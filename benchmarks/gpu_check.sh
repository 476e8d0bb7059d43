#!/usr/bin/env bash
# The GPU checks of issue 14 in one run (about 5 minutes on one H200; each step has its own time limit).
# Writes $OUT (default benchmarks/gpu_check_results/): views.json, the training run's metrics.json and
# a summary. Run from the repository root with the project's environment: bash benchmarks/gpu_check.sh
set -euo pipefail
OUT=${OUT:-benchmarks/gpu_check_results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. views/s at 32 and 224 px: uint8 batches augmented on the GPU, JPEGs decoded on the GPU (nvJPEG)
#    then augmented, device-resident images; and the host syncs one augmented batch makes.
timeout 150 $PY benchmarks/gpu_check.py views --out "$OUT/views.json" 2>&1 | tee "$OUT/views.log"

# 2. training images/s of the CIFAR-10 SimCLR recipe (resnet18_cifar, batch 512) with bf16,
#    channels_last, device-resident batched views, on a CIFAR-10-shaped stand-in (50,000 random
#    32 px JPEGs: the real data cannot be downloaded there), and a localization pass after epoch 1.
DATA=$(mktemp -d)
timeout 60 $PY benchmarks/gpu_check.py data --rows 50000 --out "$DATA"
timeout 240 $PY -m hub_ccrop train recipes/simclr_cifar10_ccrop.yaml --output-dir "$OUT/run" \
  --set data.data_dir="$DATA" --set data.device_resident=true --set data.batched_views=true \
  --set model.channels_last=true --set train.mixed_precision=bf16 --set train.epochs=2 \
  --set crop.warmup_epochs=1 --set crop.loc_epochs=[1] --set train.knn_every=0 \
  --set train.checkpoint_every=2 --set train.show_images=0 2>&1 | tail -20 | tee "$OUT/train.log"
cp "$OUT/run/metrics.json" "$OUT/metrics.json"

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
views = json.loads((out / "views.json").read_text())
metrics = json.loads((out / "metrics.json").read_text())
first = metrics["history"][0]
print(f"GPU: {views['device']}, torch {views['torch']}")
for name, row in views["views"].items():
    print(name, ", ".join(f"{k} {v:,.0f}" for k, v in row.items()))
print(f"training: {metrics['train_images_per_s']:,.0f} images/s (epoch 1 {first['images_per_s']:,.0f}, "
      f"epoch 2 {metrics['history'][1]['images_per_s']:,.0f}); localization pass over {first['loc_images']:,} "
      f"images: {first['loc_seconds']:.2f} s")
PYEOF
