#!/usr/bin/env bash
# Everything a lent GPU session measures, in one call of about 8 minutes: the most important
# figures first, each command under its own timeout, each result written to $OUT as soon as it
# is there (so a session that runs out of time still returns what finished). jaxlm runs from
# the source tree (the GPU image has jax, flax, optax, orbax and sentencepiece, but no Grain,
# which the bench path does not need). Copy ../shared/bench/peers.py into gpu/ (git-ignored):
#   run(command="bash launch/gpu_bench.sh", carry=["gpu"], timeout_s=600)
# If jaxlm's first benchmark fails outright (not a timeout), the script stops there and prints
# the log's end, so that a second call, after the fix, still has the time for everything.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: one measurement, its output in $OUT/NAME.log
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "rc=$rc" >> "$OUT/$name.log"
  grep -h "attention for" "$OUT/$name.log" | sed 's/^.*attention for/  attention for/' | sort -u
  grep -E '^\{' "$OUT/$name.log" | tail -1 | sed "s/^{/{\"run\": \"$name\", /" \
    | tee -a "$OUT/results.jsonl"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c 'import jax, flax, optax, orbax.checkpoint; print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$OUT/device.txt"

bench="python3 -m jaxlm.cli bench"
peers=gpu/peers.py
[ -f $peers ] || echo "no $peers: peers not run" | tee -a "$OUT/results.jsonl"
peer() { [ -f $peers ] && step "hf_$1" "$2" python3 $peers "$1"; }

# GPT-2 124M as nanoGPT trains it (a row is one causal sequence: cuDNN without a bias), then
# with jaxlm's default document mask (packed documents: a dense mask, a bias for cuDNN).
step gpt2_124m_causal 100 $bench configs/gpt.py:gpt2_124m --steps 30 model.document_mask=false
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
  echo "jaxlm's first benchmark failed (rc=$rc); stopping. Its log ends:"
  tail -40 "$OUT/gpt2_124m_causal.log"
  exit 1
fi
peer gpt2 100
step gpt2_124m 80 $bench configs/gpt.py:gpt2_124m --steps 30
step bert_base 80 $bench configs/bert.py:bert_base --steps 30
peer bert 90
step vit_b16 80 $bench configs/clip.py:vit_b16 --steps 30
peer clip 110
# XLA's attention (materialised scores) against cuDNN on the same model, and lax.scan layers
step gpt2_124m_xla_attention 60 $bench configs/gpt.py:gpt2_124m --steps 20 model.attention=xla
step gpt2_124m_scanned 60 $bench configs/gpt.py:gpt2_124m --steps 20 model.scan_layers=true
echo "== done $(date +%T)"
