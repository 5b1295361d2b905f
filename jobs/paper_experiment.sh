#!/usr/bin/env bash
# One of the paper's Figure 2 experiments end to end on the embedded Ray:
# prepare → train → evaluate → plot.
#
#   jobs/paper_experiment.sh mnist 20 [extra overrides...]        # configs/paper/mnist_nz20.yaml
#   jobs/paper_experiment.sh frey_face 2 train.num_epochs=200      # configs/paper/frey_face_nz2.yaml
#
# Rerunning resumes training from the run's checkpoints. DATA (default ../shared/data) holds the sources.
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=${1:?usage: jobs/paper_experiment.sh mnist|frey_face NZ [key=value ...]}
nz=${2:?usage: jobs/paper_experiment.sh mnist|frey_face NZ [key=value ...]}
shift 2
config="configs/paper/${dataset}_nz${nz}.yaml"
[ -f "$config" ] || { echo "no such config: $config" >&2; exit 2; }
src=${DATA:-../shared/data}
case "$dataset" in
  mnist) [ -d data/mnist/train ] || aevb-dist prepare "$src/mnist" data/mnist --format mnist ;;
  frey_face) [ -d data/frey_face/train ] || aevb-dist prepare "$src/frey_rawface.mat" data/frey_face --format frey-face ;;
  *) echo "dataset must be mnist or frey_face" >&2; exit 2 ;;
esac
aevb-dist train "$config" "$@"
run="runs/paper_${dataset}_nz${nz}"
k=${K:-1000}
aevb-dist evaluate "$run" "data/${dataset}/test" --num-importance-samples "$k" --output "$run/eval_test.json"
aevb-dist plot "$run"
echo "results: $run/eval_test.json, $run/plots/"
