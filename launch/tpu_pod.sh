#!/usr/bin/env bash
# Run the same jaxsr command on every worker of a Cloud TPU pod slice.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh train \
#       --config configs/seesr_train.py --workdir gs://bucket/runs/seesr \
#       --config.init.weights=/mnt/weights/seesr --config.data.source=folder:/mnt/lsdir
#
# jaxsr joins the slice with --distributed (jax.distributed.initialize() reads the TPU
# topology itself). Every worker needs jaxsr installed and the same paths (weights and
# data on a shared disk or bucket); SETUP runs first on each worker (default: none).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
setup=${SETUP:-true}
cmd="cd ${REPO_DIR:-\$HOME/jaxsr} && ${setup} && jaxsr $* --distributed"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "$cmd"
