#!/usr/bin/env bash
# Run jaxlm on every host of a Cloud TPU pod slice: copy this checkout to all workers, install,
# and start the same command on each. JAX reads the coordinator, process count and process id
# from the TPU metadata.
#   launch/tpu_pod.sh my-tpu us-central2-b configs/gpt.py:gpt2_124m --workdir gs://bucket/gpt2 mesh.data=1 mesh.fsdp=-1
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [jaxlm train args...]}; zone=${2:?zone}; shift 2
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all . "$tpu":~/jaxlm
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  cd ~/jaxlm && pip install -q -e . 'jax[tpu]'
  ~/.local/bin/jaxlm train $* --distributed
"
