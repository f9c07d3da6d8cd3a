#!/usr/bin/env bash
# Run jaxlm on every host of a Cloud TPU pod slice: copy this checkout's files to all workers,
# install, and start the same command on each. JAX reads the coordinator, process count and
# process id from the TPU metadata.
#   launch/tpu_pod.sh my-tpu us-central2-b configs/gpt.py:gpt2_124m --workdir gs://bucket/gpt2 mesh.data=1 mesh.fsdp=-1
# What travels: the files git tracks or would track (not .venv, runs/ or anything .gitignore'd),
# as one archive. Each worker keeps a venv in ~/jaxlm/.venv made by uv with Python >= 3.11
# (TPU VM images have 3.10 or 3.12; uv fetches a Python where the image's is too old).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [jaxlm train args...]}; zone=${2:?zone}; shift 2
cd "$(dirname "$0")/.."
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$archive" "$tpu":jaxlm.tar.gz
args=$(printf '%q ' "$@")  # each argument arrives as given, spaces and quotes included
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm && cd ~/jaxlm
  command -v uv >/dev/null || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv
  export PATH=\$HOME/.local/bin:\$PATH
  [ -x .venv/bin/python ] || uv venv -q --python '>=3.11' .venv
  uv pip install -q --python .venv/bin/python -e . 'jax[tpu]'
  exec .venv/bin/jaxlm train $args --distributed
"
