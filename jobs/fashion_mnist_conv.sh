#!/usr/bin/env bash
# Fashion-MNIST: the conv encoder/decoder against the paper's MLP at the same epochs, optimizer and
# global batch (configs/fashion_mnist_conv.yaml), 2 workers on the embedded Ray; then test log p(x)
# by importance sampling with K samples (K=5000 is the literature's; on a 2-core CPU it costs ~1 h per
# model, so this script takes K=${K:-200} unless told otherwise). Needs Debian's dataset-fashion-mnist.
# Usage: bash jobs/fashion_mnist_conv.sh [EPOCHS]   (from the repository root)
set -euo pipefail
EPOCHS=${1:-20}
K=${K:-200}
SRC=/usr/share/datasets/fashion-mnist
[ -d data/fashion ] || aevb-dist prepare "$SRC" data/fashion --format fashion-mnist
for arch in conv mlp; do
  start=$(date +%s)
  aevb-dist train configs/fashion_mnist_conv.yaml model.architecture=$arch run.name=fashion_$arch \
      train.num_epochs="$EPOCHS"
  echo "fashion_$arch: trained $EPOCHS epochs in $(( $(date +%s) - start )) s"
  aevb-dist evaluate runs/fashion_$arch data/fashion/test --num-importance-samples "$K" \
      --output runs/fashion_$arch/eval_test_k$K.json > /dev/null
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"fashion_$arch: test ELBO {r['elbo']:.2f}, log p(x) (K=$K) {r['log_marginal_likelihood']:.2f} ± {r['log_marginal_likelihood_sem']:.2f}\")" \
      runs/fashion_$arch/eval_test_k$K.json
done
