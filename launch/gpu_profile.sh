#!/usr/bin/env bash
# Issue 18 item 6's second GPU call (after launch/gpu_bench.sh), about 5 minutes: where the
# step time goes before anything is changed, then the XLA flags MaxText sets on GPUs, each
# measured beside the default. `jaxlm bench --profile` prints, in its JSON line, the device
# milliseconds per step by part (attention_kernel, attention, mlp, norm, embed, loss,
# optimizer, other) and the host gap (jaxlm/profile.py); the traces stay on the machine.
#   run(command="bash launch/gpu_profile.sh", timeout_s=420)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
bench="python3 -m jaxlm.cli bench"

step() {  # step NAME SECONDS COMMAND...: one measurement, its JSON line to $OUT/profile.jsonl
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep -E '^\{' "$OUT/$name.log" | tail -1 | sed "s/^{/{\"run\": \"$name\", /" \
    | tee -a "$OUT/profile.jsonl"
}

step profile_gpt2_124m 90 $bench configs/gpt.py:gpt2_124m --steps 20 --profile /tmp/trace_gpt2
step profile_bert_base 90 $bench configs/bert.py:bert_base --steps 20 --profile /tmp/trace_bert
step profile_vit_b16 100 $bench configs/clip.py:vit_b16 --steps 20 --profile /tmp/trace_vit
# MaxText's GPU flags (its gpu_multi_process / single-GPU recipes), one group at a time
lhs="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_highest_priority_async_stream=true"
XLA_FLAGS="$lhs" step flags_lhs_gpt2_124m 70 $bench configs/gpt.py:gpt2_124m --steps 20
XLA_FLAGS="--xla_gpu_enable_command_buffer=" step flags_no_cmdbuf_gpt2_124m 70 \
  $bench configs/gpt.py:gpt2_124m --steps 20
echo "== done $(date +%T)"
