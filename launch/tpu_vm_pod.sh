#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize (--distributed)
# discovers the pod from the TPU metadata, and each worker feeds its own cores.
#
#   launch/tpu_vm_pod.sh TPU_NAME ZONE configs/paper.py gs-or-nfs/workdir \
#       --config.data.public_dir=PUBLIC --config.data.clinical_dir=CLINICAL
#
# Assumes the repository (and its virtual environment) is at the same path on every worker, e.g.
# after `gcloud compute tpus tpu-vm scp --worker=all`, and that the cohorts and the workdir are on
# storage every worker reads (NFS / a mounted bucket). config.batch_size must divide by the
# total core count (e.g. 10 -> use 16 or 32 on a v4-32).
set -euo pipefail
tpu="${1:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}"
zone="${2:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}"
config="${3:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}"
workdir="${4:?usage: tpu_vm_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}"
shift 4
repo="${U2AD_REPO:-\$HOME/u2ad_jax}"
extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd $repo && python launch/main.py --distributed --config $(printf '%q' "$config") \
   --workdir $(printf '%q' "$workdir")$extra"
