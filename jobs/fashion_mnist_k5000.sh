#!/usr/bin/env bash
# Test log p(x) at the literature's K=5000 for the two Fashion-MNIST models that jobs/fashion_mnist_conv.sh
# trains (runs/fashion_conv, runs/fashion_mlp). On a 2-core CPU, K=5000 over all 10,000 test images costs
# ~1 h for the conv model, so this evaluates the first test shard (the first N=2,500 test images, in
# their original order: data/fashion/test/part-00000.parquet) unless FULL=1.
# Usage: bash jobs/fashion_mnist_k5000.sh   (from the repository root, after jobs/fashion_mnist_conv.sh)
set -euo pipefail
K=${K:-5000}
TEST=data/fashion/test
if [ "${FULL:-0}" != 1 ]; then
  TEST=data/fashion/test_first_shard
  mkdir -p "$TEST" && cp data/fashion/test/part-00000.parquet "$TEST/"   # no index: read from its footer
fi
for arch in conv mlp; do
  start=$(date +%s)
  aevb-dist evaluate runs/fashion_$arch "$TEST" --num-importance-samples "$K" \
      --output runs/fashion_$arch/eval_test_k$K.json > /dev/null
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"fashion_$arch: {r['num_examples']} test images, test ELBO {r['elbo']:.2f}, log p(x) (K=$K) {r['log_marginal_likelihood']:.2f} ± {r['log_marginal_likelihood_sem']:.2f} ($(( $(date +%s) - start )) s)\")" \
      runs/fashion_$arch/eval_test_k$K.json
done
