"""The GPU benchmarks' train steps, lowered for CUDA on a CPU (lowering needs no GPU): each
config traces through JAX's own cuDNN functions with the kernels jaxlm's chooser picks, as
on an H200 (cuDNN 9.10, compute capability 9.0), so a lent GPU's minutes are not spent on a
step that cannot be built."""

import re

import jax
import numpy as np
import pytest
from conftest import ROOT

from jaxlm import attention, config, sharding
from jaxlm.step import build, make_train_step

DENSE = ["fmhaScaleBiasSoftmax", "fmhaScaleBiasSoftmaxBackward"]  # a bias: the dense mask
OWN = ["fmhaSoftmax", "fmhaSoftmaxBackward"]  # cuDNN's own masks or the packed layout
CASES = {
    "gpt.py:gpt2_124m": ([], DENSE),
    "gpt.py:gpt2_124m packed": (["model.max_segments=16"], DENSE + OWN),
    "gpt.py:gpt2_124m causal": (["model.document_mask=false"], OWN),
    "bert.py:bert_base packed": (["model.max_segments=16"], DENSE + OWN),
    "clip.py:vit_b16": ([], OWN),  # patches: no mask; captions: their lengths
}


@pytest.mark.parametrize("case", CASES)
def test_gpu_benchmark_steps_lower_to_cudnn(monkeypatch, case):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "_hopper", lambda: True)
    overrides, want = CASES[case]
    cfg = config.load(str(ROOT / "configs" / case.split()[0]), overrides)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    s = build(cfg, mesh)
    batch = s.objective.synthetic_batch(cfg, cfg.train.batch_size, np.random.default_rng(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in batch.items()
    }
    with jax.set_mesh(mesh):
        traced = make_train_step(s).trace(s.abstract, batch)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert sorted(set(re.findall(r"custom_call @__cudnn\$(\w+)\(", text))) == sorted(want)
    layers = cfg.model.num_layers + (cfg.vision.num_layers if cfg.objective == "clip" else 0)
    forward = len(re.findall(r"custom_call @__cudnn\$fmha\w*Softmax\(", text))
    assert forward == layers * (2 if want == DENSE + OWN else 1)  # every layer, both branches
