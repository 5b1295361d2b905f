#!/usr/bin/env bash
# Color images end to end: scikit-learn's two sample photographs cut into 32×32 patches (stride 4, so
# tens of thousands), written as PNG files into one folder per photograph, prepared with
# `--format imagefolder`, trained with the conv networks and a discretized logistic likelihood on
# 2 workers (configs/patches32_conv.yaml), and scored on the test split in bits per dimension.
# Usage: bash jobs/patches32_conv.sh [EPOCHS]   (from the repository root; K=${K:-100} importance samples)
set -euo pipefail
EPOCHS=${1:-10}
K=${K:-100}
if [ ! -d data/patches32_png ]; then
  python - <<'PY'
import os
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

photos = load_sample_images()
for name, image in zip(photos.filenames, photos.images):
    folder = os.path.join("data/patches32_png", os.path.splitext(os.path.basename(name))[0])
    os.makedirs(folder, exist_ok=True)
    count = 0
    for top in range(0, image.shape[0] - 32 + 1, 4):
        for left in range(0, image.shape[1] - 32 + 1, 4):
            Image.fromarray(np.ascontiguousarray(image[top:top + 32, left:left + 32])).save(
                os.path.join(folder, f"{top:03d}_{left:03d}.png"))
            count += 1
    print(f"{folder}: {count} patches")
PY
fi
[ -d data/patches32 ] || aevb-dist prepare data/patches32_png data/patches32 --format imagefolder
start=$(date +%s)
aevb-dist train configs/patches32_conv.yaml train.num_epochs="$EPOCHS"
echo "patches32_conv: trained $EPOCHS epochs in $(( $(date +%s) - start )) s"
aevb-dist evaluate runs/patches32_conv data/patches32/test --num-importance-samples "$K" \
    --output runs/patches32_conv/eval_test_k$K.json > /dev/null
python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"patches32_conv: test {r['num_examples']} patches, ELBO {r['elbo_bits_per_dim']:.3f} bits/dim, log p(x) (K=$K) {r['log_marginal_likelihood_bits_per_dim']:.3f} bits/dim\")" \
    runs/patches32_conv/eval_test_k$K.json
