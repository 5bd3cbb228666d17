#!/usr/bin/env bash
# A real two-process (multi-host) run on one machine's CPU: two jax.distributed processes on
# localhost, each with its own CPU devices. Useful to try multi-host code paths without a pod.
#   launch/local_multiprocess_cpu.sh configs/toy_ddpo.py workdirs/mp [--config.a=b ...]
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 CONFIG WORKDIR [--config.a=b ...]" >&2
  exit 2
fi
config=$1 workdir=$2; shift 2
port=${PORT:-23456}
export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=${JAX_NUM_CPU_DEVICES:-2} JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=2
JAX_PROCESS_ID=1 python -m didr_jax.main --config="$config" --workdir="$workdir" "$@" &
JAX_PROCESS_ID=0 python -m didr_jax.main --config="$config" --workdir="$workdir" "$@"
wait
