#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU pod slice (each worker runs the same command;
# jax.distributed.initialize() finds the other workers from the TPU metadata).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ddpo_sdxl.py gs://bucket/runs/x [--config.a=b ...]
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ~/didr_jax && pip install -q -e . &&
  python -m didr_jax.main --config=$config --workdir=$workdir $*"
