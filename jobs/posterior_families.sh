#!/usr/bin/env bash
# The posterior-family table of docs/models.md: MNIST Nz=3 (configs/paper/mnist_nz3.yaml) trained for 10,000 steps
# with each q(z|x) family, then log p(x) on the first 200 test digits by importance sampling and by AIS
# (and Appendix D for the Gaussian). About 25 minutes on 2 CPU cores. DATA (default ../shared/data).
#
#   jobs/posterior_families.sh [extra overrides for every run...]
set -euo pipefail
cd "$(dirname "$0")/.."
src=${DATA:-../shared/data}
[ -d data/mnist/train ] || aevb-dist prepare "$src/mnist" data/mnist --format mnist
if [ ! -d data/mnist200/test ]; then
  # 250 test images, 200 of them in the "test" split: a small split AIS can afford.
  python -c "
import sys; from aevb_dist.data.sources import read_idx; import numpy as np
np.save('data/mnist_test250.npy', read_idx(sys.argv[1])[:250])" "$src/mnist/t10k-images-idx3-ubyte.gz"
  aevb-dist prepare data/mnist_test250.npy data/mnist200 --test-fraction 0.8 --rows-per-row-group 25 --num-shards 2
fi
for fam in gaussian laplace logistic kumaraswamy lognormal; do
  lr=0.02; [ "$fam" = lognormal ] && lr=0.002  # see docs/models.md: the log-normal's KL overflows at 0.02
  aevb-dist train configs/paper/mnist_nz3.yaml train.max_steps=10000 run.name=nz3_$fam model.posterior=$fam \
    optim.lr=$lr train.eval_every_steps=2000 checkpoint.every_steps=5000 "$@"
  aevb-dist evaluate runs/nz3_$fam data/mnist200/test -k 1000 --output runs/nz3_$fam/eval_is.json
  aevb-dist evaluate runs/nz3_$fam data/mnist200/test --estimator ais -k 8 --num-steps 500 --leapfrog-steps 5 \
    --output runs/nz3_$fam/eval_ais.json
done
aevb-dist evaluate runs/nz3_gaussian data/mnist200/test --estimator appendix-d -k 8 --num-steps 600 \
  --leapfrog-steps 5 --output runs/nz3_gaussian/eval_appendix_d.json
