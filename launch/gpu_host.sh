#!/usr/bin/env bash
# One process driving every GPU of this host (JAX sees them all as devices of one process).
#   launch/gpu_host.sh configs/ddpo_sdxl.py runs/x [--config.a=b ...]
set -euo pipefail
if (( $# < 2 )); then
  echo "usage: $0 CONFIG WORKDIR [--config.a=b ...]" >&2
  exit 2
fi
config=$1 workdir=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m didr_jax.main --config="$config" --workdir="$workdir" "$@"
