#!/usr/bin/env bash
# The four models of Burda et al.'s (2015) MNIST table, briefly, on this machine's CPU: the one-layer VAE
# (estimator B) and IWAE k=50 (configs/mnist_burda.yaml), the two-layer IWAE k=50 and VAE
# (configs/mnist_burda_2layer.yaml), each trained for a few epochs at the schedule's first rate, then test
# log p(x) over all 10,000 test images by importance sampling with K samples (K=5000 is the literature's;
# this script takes K=${K:-1000}). The full 3,280-epoch schedule needs a GPU (docs/results.md).
# Usage: bash jobs/burda_table_cpu.sh [VAE_EPOCHS] [IWAE_EPOCHS]   (from the repository root; MNIST=IDX folder)
set -euo pipefail
VAE_EPOCHS=${1:-10}
IWAE_EPOCHS=${2:-1}
K=${K:-1000}
MNIST=${MNIST:-../shared/data/mnist}
[ -d data/mnist ] || aevb-dist prepare "$MNIST" data/mnist --format mnist
run() {  # NAME CONFIG EPOCHS OVERRIDES...
  local name=$1 config=$2 epochs=$3
  shift 3
  local start
  start=$(date +%s)
  aevb-dist train "$config" run.name="$name" train.num_epochs="$epochs" optim.lr_schedule=constant \
      ray.local_mode=true train.eval_every_steps=0 "$@"
  local trained=$(( $(date +%s) - start ))
  aevb-dist evaluate "runs/$name" data/mnist/test -k "$K" --output "runs/$name/eval_test_k$K.json" > /dev/null
  python -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"$name: $epochs epochs in $trained s; test ELBO {r['elbo']:.2f}, log p(x) (K=$K) {r['log_marginal_likelihood']:.2f} ± {r['log_marginal_likelihood_sem']:.2f}, active units {r.get('active_units_per_layer', r['active_units'])}\")" \
      "runs/$name/eval_test_k$K.json"
}
run burda_vae configs/mnist_burda.yaml "$VAE_EPOCHS"
run burda_iwae50 configs/mnist_burda.yaml "$IWAE_EPOCHS" train.estimator=iwae train.num_latent_samples=50
run burda_2layer_iwae50 configs/mnist_burda_2layer.yaml "$IWAE_EPOCHS"
run burda_2layer_vae configs/mnist_burda_2layer.yaml "$VAE_EPOCHS" train.estimator=A train.num_latent_samples=1
