#!/usr/bin/env bash
# Issue 13 part 3, prepared for a lent GPU (NOT run in this session: none was lent).
# CIFAR-10 SimCLR recipe (resnet18_cifar, batch 512, bf16), R-Crop vs C-Crop, on a schedule scaled to
# a short device budget: EPOCHS epochs, C-Crop warm-up = EPOCHS/5, localization every EPOCHS/5 after it
# (the paper's 100/500 proportions). Views are made on the GPU (batched_views, device_resident).
# Data: the CIFAR-10 train parquet in DATA (last 5,000 rows held out for the kNN monitor, every epoch).
# Per epoch time and kNN top-1 land in RUNS/<mode>/metrics.json (history); a one-line summary per
# mode is printed at the end.
#
#   bash benchmarks/gpu_cifar10.sh                   # 20 epochs per mode
#   EPOCHS=5 bash benchmarks/gpu_cifar10.sh          # a 2-minute smoke run
set -euo pipefail
EPOCHS=${EPOCHS:-20}
DATA=${DATA:-../shared/data/cifar10}
RUNS=${RUNS:-runs/gpu_cifar10}
PY=${PY:-python}
WARMUP=$(( EPOCHS / 5 > 0 ? EPOCHS / 5 : 1 ))
for mode in rcrop ccrop; do
  $PY -m hub_ccrop train "recipes/simclr_cifar10_${mode}.yaml" --output-dir "$RUNS/$mode" \
    --set data.data_dir="$DATA" --set data.holdout=5000 --set train.epochs="$EPOCHS" \
    --set crop.warmup_epochs="$WARMUP" --set crop.loc_interval="$WARMUP" --set train.knn_every=1 \
    --set data.batched_views=true --set data.device_resident=true --set data.num_workers=4 \
    --set train.checkpoint_every="$EPOCHS" --set train.show_images=8
done
$PY - "$RUNS" <<'EOF'
import json, sys
from pathlib import Path
for mode in ("rcrop", "ccrop"):
    m = json.loads((Path(sys.argv[1]) / mode / "metrics.json").read_text())
    h = m["history"]
    secs = sorted(x["epoch_seconds"] for x in h)
    print(f"{mode}: kNN top-1 per epoch {[round(x.get('knn_top1', float('nan')), 2) for x in h]}; "
          f"median epoch {secs[len(secs) // 2]:.1f} s; {m['train_images_per_s']:.0f} images/s; "
          f"final box area {m.get('box_area')}")
EOF
