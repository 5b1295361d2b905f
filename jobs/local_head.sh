#!/usr/bin/env bash
# Start a Ray head on this machine, submit the smoke config to it as a Ray Job, stop the head.
set -euo pipefail
cd "$(dirname "$0")/.."
ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --dashboard-port=8265 --disable-usage-stats
trap 'ray stop' EXIT
[ -d data/mnist/train ] || aevb-dist prepare ../shared/data/mnist data/mnist --format mnist
aevb-dist submit configs/smoke.yaml --address http://127.0.0.1:8265 train.num_workers=2 run.name=smoke_job
