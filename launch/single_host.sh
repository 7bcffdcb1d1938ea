#!/usr/bin/env bash
# One host, all of its GPUs: JAX sees every local GPU and the train step shards the batch over them
# (global batch = config.global_batch_size, split evenly; BN statistics over the whole batch = SyncBN).
#   launch/single_host.sh configs/idrid.py runs/idrid [--config.x=y ...]
set -euo pipefail
config=${1:?config file}; workdir=${2:?workdir}; shift 2
# Let XLA take most of the GPU memory up front but leave room for cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m hrdecoder_jax.train --config "$config" --workdir "$workdir" "$@"
