#!/usr/bin/env bash
# Everything a lent GPU session measures, in one call of about 7 minutes: the most important
# figures first, each command under its own timeout, each result written to $OUT as soon as it
# is there (so a session that runs out of time still returns what finished). jaxlm runs from
# the source tree (the GPU image has jax, flax, optax, orbax and sentencepiece, but no Grain,
# which the bench path does not need). Copy ../shared/bench/peers.py into gpu/ (git-ignored):
#   run(command="bash launch/gpu_bench.sh", carry=["gpu"], timeout_s=560)
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: one measurement, its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep -E '^\{' "$OUT/$name.log" | tail -1 | tee -a "$OUT/results.jsonl"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
} | tee "$OUT/device.txt"

bench="python3 -m jaxlm.cli bench"
step gpt2_124m 90 $bench configs/gpt.py:gpt2_124m --steps 30
[ -f gpu/peers.py ] && step hf_gpt2 90 python3 gpu/peers.py gpt2
step bert_base 75 $bench configs/bert.py:bert_base --steps 30
[ -f gpu/peers.py ] && step hf_bert 75 python3 gpu/peers.py bert
step vit_b16 75 $bench configs/clip.py:vit_b16 --steps 30
[ -f gpu/peers.py ] && step hf_clip 75 python3 gpu/peers.py clip
# cuDNN (packed documents: a mask, hence a bias) against XLA's attention, same model
step gpt2_124m_xla_attention 60 $bench configs/gpt.py:gpt2_124m --steps 20 model.attention=xla
step gpt2_124m_scanned 60 $bench configs/gpt.py:gpt2_124m --steps 20 model.scan_layers=true
[ -f gpu/peers.py ] || echo "no gpu/peers.py: peers not run" | tee -a "$OUT/results.jsonl"
