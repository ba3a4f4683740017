#!/usr/bin/env bash
# One host, all its GPUs (or TPU cores): JAX sees every local device and the step is
# data-parallel over them (pmap, or --config.parallel=shard_map). No distributed runtime.
#
#   launch/single_host.sh configs/paper.py runs/paper \
#       --config.data.public_dir=PUBLIC --config.data.clinical_dir=CLINICAL
#
# Pick GPUs with CUDA_VISIBLE_DEVICES; config.batch_size must divide by the device count.
# Re-running the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
config="${1:?usage: single_host.sh CONFIG WORKDIR [flags...]}"
workdir="${2:?usage: single_host.sh CONFIG WORKDIR [flags...]}"
shift 2
cd "$(dirname "$0")/.."
# Let XLA take GPU memory as it needs it instead of 75% up front (other jobs may share the node).
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec python launch/main.py --config "$config" --workdir "$workdir" "$@"
