#!/usr/bin/env bash
# Simulate a multi-host job on one machine: N processes, each with its own fake CPU devices,
# joined through jax.distributed exactly as the hosts of a pod would be.
#   launch/local.sh 2 train configs/gpt.py:tiny --workdir runs/gpt_tiny_2proc
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES jaxlm-args...}; shift
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: NUM_PROCESSES must be a positive integer, got '$n'" >&2; exit 2
fi
port=${JAXLM_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
pids=()
for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i jaxlm "$@" --distributed &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
