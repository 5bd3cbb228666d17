#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU pod slice (each worker runs the same command;
# jax.distributed.initialize() finds the other workers from the TPU metadata).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/ddpo_sdxl.py gs://bucket/runs/x [--config.a=b ...]
# Every argument reaches the workers' python unchanged (spaces, quotes and $ included): the
# remote command is built with printf %q for the workers' bash. DRY_RUN=1 prints that command
# instead of running it.
set -euo pipefail
if (( $# < 4 )); then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.a=b ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
args=$(printf ' %q' "--config=$config" "--workdir=$workdir" "$@")
remote="cd ~/didr_jax && pip install -q -e . && python -m didr_jax.main$args"
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%s\n' "$remote"
  exit 0
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote"
