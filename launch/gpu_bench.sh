#!/usr/bin/env bash
# Everything a lent GPU session measures (a task gets 15 minutes of device time, start-up
# included): the most important first, each command under its own timeout, each result
# written to $OUT as soon as it is there (a call cut short still returns what finished).
# jaxlm runs from the source tree (the GPU image has jax, flax, optax, orbax and
# sentencepiece, no Grain: the bench path needs none). Copy ../shared/bench/peers.py into
# gpu/ (git-ignored), then: run(command="bash launch/gpu_bench.sh", carry=["gpu"], timeout_s=590)
# Two calls, the second sent while the machine is still warm (it waits 30 s):
#   1. `bash launch/gpu_bench.sh` (about 510 s): per model a profile (`jaxlm bench --profile`:
#      the timing, then device ms per step by part and the host gap, from a second compile
#      without command buffers) with its trace and HLO copied to $OUT (NAME.tar), then the
#      same model with `model.norm_kernel=pallas`; GPT-2, then CLIP (the farthest from its
#      goal), then BERT;
#      then GPT-2 with XLA's dot merger off; last, GPT-2 with nanoGPT's attention (no
#      document mask).
#   2. `bash launch/gpu_bench.sh peers` (about 260 s): the Hugging Face peers on the same card.
# Measured on 2026-12-04 and no longer run here (BENCHMARKS.md): launch/gpu_attention.py (the
# document mask's kernels alone; run it by hand), cuDNN's packed layout in the whole step,
# MaxText's XLA flags (cuBLASLt on ViT too), ViT-B/16's loss with XLA's attention beside
# cuDNN's (the towers' one pad). If jaxlm's first step benchmark fails outright (not a
# timeout), the script stops there and prints the log's end. Steps get what is left of
# BUDGET seconds (default 570) at most; one with under 20 s left is skipped.
set -u
BUDGET=${BUDGET:-570}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
LOGS=${LOGS:-/tmp/gpu_logs}  # each step's log stays on the machine (few files come back)
mkdir -p "$OUT" "$LOGS"

step() {  # step NAME SECONDS COMMAND...: one measurement, its output in $LOGS/NAME.log
  local name=$1 limit=$2 rc left=$((BUDGET - SECONDS))
  shift 2
  if [ $left -lt 20 ]; then echo "== $name skipped: ${left}s of the budget left"; return 124; fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  echo "rc=$rc" >> "$LOGS/$name.log"
  grep -h "attention for" "$LOGS/$name.log" | sed 's/^.*attention for/  attention for/' | sort -u
  grep -E '^\{' "$LOGS/$name.log" | tail -1 | sed "s/^{/{\"run\": \"$name\", /" \
    | tee -a "$OUT/results.jsonl"
  [ $rc -ne 0 ] && { echo "  rc=$rc; the log ends:"; tail -12 "$LOGS/$name.log" | cut -c1-300; }
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c 'import jax, flax, optax, orbax.checkpoint; print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/device.txt"

bench=${BENCH:-python3 -m jaxlm.cli bench}  # BENCH, PEERS: a CPU dry run (tests)
peers=${PEERS:-gpu/peers.py}
[ -f $peers ] || echo "no $peers: peers not run"
peer() { [ -f $peers ] && step "hf_$1" "$2" python3 $peers "$1"; }
trace() {  # trace NAME: the profile's trace and the program it ran back to this machine, as
  local f  # $OUT/NAME.tar (one file of the 8 that come back): NAME.xplane.pb (every kernel
  # with its HLO op) and train_step.hlo.txt.gz (those ops' fusions and scopes); read them
  # with jaxlm.profile.summarize_saved(DIR) after `tar -xf NAME.tar -C DIR` (a DIR each)
  local pack="$LOGS/pack_$1"
  f=$(find "/tmp/trace_$1" -name '*.xplane.pb' 2>/dev/null | sort | tail -1)
  [ -n "$f" ] || return 0
  rm -rf "$pack" && mkdir -p "$pack" && cp "$f" "$pack/$1.xplane.pb"
  f=$(find "/tmp/trace_$1" -name train_step.hlo.txt.gz 2>/dev/null | head -1)
  [ -n "$f" ] && cp "$f" "$pack/"  # its own name: what profile.summarize_saved looks for
  tar -cf "$OUT/$1.tar" -C "$pack" .
}

if [ "${1:-}" = peers ]; then  # the second call: the peers on the same card
  for model in gpt2 clip bert; do peer $model 110; done
  echo "== done $(date +%T)"
  exit 0
fi

# GPT-2 124M with jaxlm's default packed-document mask (a dense bias for cuDNN), profiled
step gpt2_124m 120 $bench configs/gpt.py:gpt2_124m --steps 30 --profile /tmp/trace_gpt2
rc=$?
trace gpt2
if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
  echo "jaxlm's first benchmark failed (rc=$rc); stopping. Its log ends:"
  tail -40 "$LOGS/gpt2_124m.log"
  exit 1
fi
# each model again with the fused Pallas Triton norms (model.norm_kernel=pallas, not timed yet)
step gpt2_124m_pallas_norm 80 $bench configs/gpt.py:gpt2_124m --steps 30 model.norm_kernel=pallas
step vit_b16 150 $bench configs/clip.py:vit_b16 --steps 30 --profile /tmp/trace_vit
trace vit
step vit_b16_pallas_norm 100 $bench configs/clip.py:vit_b16 --steps 30 model.norm_kernel=pallas
step bert_base 130 $bench configs/bert.py:bert_base --steps 30 --profile /tmp/trace_bert
trace bert
step bert_base_pallas_norm 80 $bench configs/bert.py:bert_base --steps 30 model.norm_kernel=pallas
# XLA's dot merger off (compiled for an H200 here it merges q, k, v into one matmul, whose
# backward concatenates dq, dk, dv and leaves their weight gradient transposed for AdamW)
step gpt2_124m_no_dot_merger 70 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dot_merger_threshold_mb=0" \
  $bench configs/gpt.py:gpt2_124m --steps 30
# lower priority: one causal sequence a row, as nanoGPT trains (cuDNN without a bias)
step gpt2_124m_causal 80 $bench configs/gpt.py:gpt2_124m --steps 30 model.document_mask=false
echo "== done $(date +%T)"
