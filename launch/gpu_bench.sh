#!/usr/bin/env bash
# Everything a lent GPU session measures, in one call, jaxlm first and then the peer on the
# same card. The GPU image has jax, flax, optax, orbax and sentencepiece but no Grain and no
# network, so jaxlm runs from the source tree (the bench path needs no Grain) instead of
# being pip-installed. Copy ../shared/bench/peers.py into gpu/ (git-ignored) and carry gpu/:
#   run(command="bash launch/gpu_bench.sh", carry=["gpu"])
set -u
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'
python3 -m jaxlm.cli bench configs/gpt.py:gpt2_124m --steps 30
python3 -m jaxlm.cli bench configs/gpt.py:gpt2_124m --steps 30 model.scan_layers=true
python3 -m jaxlm.cli bench configs/bert.py:bert_base --steps 30
python3 -m jaxlm.cli bench configs/clip.py:vit_b16 --steps 30
if [ -f gpu/peers.py ]; then
  python3 gpu/peers.py gpt2
  python3 gpu/peers.py bert
  python3 gpu/peers.py clip
else
  echo "no gpu/peers.py: peers not run"
fi
