"""`jaxlm plan`: ahead-of-time compiles on fake devices, and what they show about memory."""

import json
import re

import pytest
from conftest import ROOT, run_python

from jaxlm import config, plan
from jaxlm.config import ConfigError

DENSE = ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]
PACKED = ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]  # no bias: the packed layout

LOGITS_MEMORY = """
from jaxlm import config
from jaxlm.plan import compile_train_step
import jax
for chunk in (0, 256):
    cfg = config.load({config!r}, [f"train.loss_chunk={{chunk}}", "model.num_layers=1"])
    _, compiled = compile_train_step(cfg, jax.devices())
    full_logits = "f32[12,1024,50304]" in compiled.as_text()
    print(chunk, compiled.memory_analysis().temp_size_in_bytes, full_logits)
"""


# what JAX raises for a GPU topology where its CUDA plugin is not installed
NO_CUDA_PLUGIN = """
from jax.experimental import topologies
def missing(*args, platform=None, **kwargs):
    raise NotImplementedError(f"topology not implemented for {{platform}}")
topologies.get_topology_desc = missing
from jaxlm import cli
raise SystemExit(cli.main({argv!r}))
"""


def test_plan_llama_7b_on_64_devices():
    """A GPU kind without JAX's CUDA plugin: 64 fake CPU devices, and the line says how to
    compile for the GPU itself."""
    argv = ["plan", "configs/gpt.py:llama_7b", "--devices", "64", "--device", "h200"]
    proc = run_python(NO_CUDA_PLUGIN.format(argv=argv + ["mesh.fsdp=64"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 64 and plan["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert 6.73e9 < plan["params"] < 6.75e9
    # float32 parameters and two AdamW moments, spread over 64 devices
    expected = 12 * plan["params"] / 64
    assert abs(plan["state_bytes_per_device"] / expected - 1) < 0.05, plan
    assert plan["temp_bytes_per_device"] > 0 and "cpu x 64" in plan["compiled_for"]
    assert "pip install 'jax[cuda12]'" in plan["compiled_for"]
    assert plan["peak_bytes_per_device"] > plan["state_bytes_per_device"]
    assert plan["device_memory_bytes"] == 141 * 10**9 and isinstance(plan["fits"], bool)
    assert plan["flops_per_step"] > 6 * plan["params"] * 256 * 4096
    # fsdp gathers one weight at a time, never a stack of 32 layers: the largest is the
    # 32000 x 4096 embedding / head table
    assert plan["collectives"]["all-gather"]["largest_bytes"] == 32000 * 4096 * 4, plan


def test_chunked_loss_never_holds_the_full_logits():
    """gpt2_124m at batch 12 on one CPU device: the plain loss holds [12, 1024, 50304] float32
    logits, the chunked one does not, and the temporaries fall by more than their 2.4 GB. One
    of its 12 layers: the logits are the same, and the two compiles take 9 s instead of 38."""
    proc = run_python(LOGITS_MEMORY.format(config=str(ROOT / "configs/gpt.py:gpt2_124m")), 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    (_, plain_temp, plain_full), (_, chunked_temp, chunked_full) = lines
    assert plain_full == "True" and chunked_full == "False"
    assert int(plain_temp) - int(chunked_temp) > 12 * 1024 * 50304 * 4, lines


def test_plan_compiles_for_gpus_it_does_not_have(monkeypatch):
    """--device h200 with JAX's CUDA plugin (the test extra's jax[cuda12-local]): XLA's GPU
    compiler builds the step for 16 H200s (2 hosts of 8) from the GPU's spec, with no GPU or
    driver here, and XLA's GPU memory analysis answers. cuDNN's library is not installed
    here: JAX's cuDNN checks answer as cuDNN 9.10 (as in the lowering tests). jaxlm's
    attention chooser reads the compute capability of the device compiled for, not of this
    CPU: model.max_segments gets cuDNN's packed layout (beside the dense mask, for rows over
    it) on the H200 (9.0), the dense mask alone on an A100 (8.0; lowered only). One layer of
    gpt2_124m: the same kernels, a shorter compile."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    gpt2 = str(ROOT / "configs/gpt.py:gpt2_124m")
    overrides = ["model.num_layers=1", "model.max_segments=16"]
    cfg = config.load(gpt2, overrides + ["train.batch_size=16", "mesh.fsdp=16"])
    h200 = plan.plan(cfg, 16, "h200")
    assert h200["compiled_for"] == "h200 x 16 (GPU compile, no GPU needed)", h200
    assert h200["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert sorted(h200["custom_calls"]) == sorted(DENSE + PACKED), h200["custom_calls"]
    state, temp = h200["state_bytes_per_device"], h200["temp_bytes_per_device"]
    assert state == pytest.approx(12 * h200["params"] / 16, rel=0.02)
    assert {"all-gather", "reduce-scatter"} <= set(h200["collectives"]), h200["collectives"]
    assert h200["peak_source"].startswith(
        ("XLA's peak_memory_in_bytes", "arguments + outputs - donated + temporaries (XLA's")
    ), h200["peak_source"]
    assert state + temp <= h200["peak_bytes_per_device"] < h200["device_memory_bytes"]
    assert h200["device_memory_bytes"] == 141 * 10**9 and h200["fits"] is True

    with pytest.raises(ConfigError, match="--devices 12: GPUs come 8 to a host"):
        plan.plan(cfg, 12, "h200")

    a100 = plan.setup(config.load(gpt2, overrides), plan._gpu_devices("a100", 1))
    kernels = re.findall(r"custom_call @(__cudnn\$\w+)\(", plan.lower_step(a100).as_text())
    assert sorted(set(kernels)) == sorted(DENSE), kernels


def test_a_gpu_step_must_fit_the_pool_jax_allocates_not_the_whole_card(h200, monkeypatch):
    """JAX's allocator holds a pool of 75% of a GPU's memory (JAX 0.10 and 0.11, a fixed cap),
    so a step that fits the card but not the pool runs out of memory at its first step:
    `fits` asks the pool, as the memory-fraction settings make it. One tiny GPT compiled for
    an H200 twice: in JAX's default pool, and in a pool set just under its peak."""
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    cfg = config.load(str(ROOT / "configs/gpt.py:tiny"), ["model.num_layers=1"])
    default = plan.plan(cfg, 1, "h200")
    assert default["device_memory_bytes"] == 141 * 10**9
    assert default["memory_limit_bytes"] == 105_750_000_000 and default["fits"] is True
    assert default["memory_limit_source"] == (
        "75% of the h200's memory (JAX's default pool: XLA_CLIENT_MEM_FRACTION unset)"
    )
    under = 0.9 * default["peak_bytes_per_device"] / (141 * 10**9)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{under:.3e}")
    tight = plan.plan(cfg, 1, "h200")
    assert tight["peak_bytes_per_device"] == default["peak_bytes_per_device"]
    assert tight["memory_limit_bytes"] < tight["peak_bytes_per_device"] and tight["fits"] is False
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=" in tight["memory_limit_source"]

    def limit(**environ) -> int:
        return plan.memory_limit("h100", environ)[0]

    card = 80 * 2**30
    assert limit() == int(0.75 * card) and limit(XLA_CLIENT_MEM_FRACTION=".9") == int(0.9 * card)
    assert limit(XLA_CLIENT_MEM_FRACTION="0.5-0.85") == int(0.85 * card)  # newer XLA: the cap
    assert limit(XLA_CLIENT_MEM_FRACTION="0.75+") == card
    assert limit(XLA_PYTHON_CLIENT_ALLOCATOR="platform") == card
    flag = "--xla_gpu_enable_triton_gemm=false --xla_gpu_memory_fraction_policy=0.6-0.95"
    assert limit(XLA_FLAGS=flag, XLA_CLIENT_MEM_FRACTION=".5") == int(0.95 * card)
    assert plan.memory_limit("v5p", {"XLA_CLIENT_MEM_FRACTION": ".5"})[0] == 95 * 2**30
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='most': expected"):
        limit(XLA_PYTHON_CLIENT_MEM_FRACTION="most")
    with pytest.raises(ConfigError, match="policy='0.5-0': the pool would hold nothing"):
        limit(XLA_FLAGS="--xla_gpu_memory_fraction_policy=0.5-0")


def test_vit_step_on_a_gpu_keeps_the_stream_batch_major_and_pads_each_tower_once(h200):
    """The ViT's learned positions are summed over the batch in the backward pass. As a
    reduction, XLA's GPU compiler lays the backward residual stream out batch-minor
    ([197, 768, B]) to make it one, with transposes around every norm (13 of ViT-B/16's 103
    ms on an H200, BENCHMARKS.md); vit.add_positions sums with a matmul instead. Compiled for
    an H200 here at a batch of 32 (at which a matmul with a ones vector, not matrix, is still
    rewritten into the reduction): only the patch embedding's transposes are left. And the
    odd lengths (197 patches, 77 tokens) are padded once a tower, not around every layer's
    cuDNN call (q, k, v padded, the output and their gradients cut: 4.0 ms of 103)."""
    overrides = ["vision.num_layers=2", "model.num_layers=1", "train.batch_size=32"]
    cfg = config.load(str(ROOT / "configs/clip.py:vit_b16"), overrides)
    _, compiled = plan.compile_train_step(cfg, h200)
    text = compiled.as_text()
    transposes = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]*transpose[\w.\-]*) = ", text, re.M)
    assert "[197,768,32]" not in text
    assert len(transposes) <= 2, transposes  # the patches: forward and backward
    pads = re.findall(r"^\s*(?:ROOT )?%?(\w*pad\w*fusion[\w.\-]*) = ", text, re.M)
    assert len(pads) <= 4, pads  # each tower's input, and its gradient
    cudnn = [line for line in text.splitlines() if 'custom_call_target="__cudnn' in line]
    lengths = {int(t) for line in cudnn for t in re.findall(r"= \(?bf16\[32,\d+,(\d+),64\]", line)}
    assert lengths == {198, 78}, lengths  # cuDNN's calls (layers of both towers): even lengths


def test_lm_loss_reads_the_logits_twice_and_writes_their_gradient_once_on_a_gpu(h200):
    """token_loss.token_cross_entropy compiled for an H200: the [B, T, V] logits are read by two
    passes, the forward's one (max, sum) reduction and the backward's elementwise gradient,
    written once in bfloat16 (besides the head's matmuls and the gather of the targets'
    logits). Autodiff of the textbook form read them three times: a max, a sum, and a pass
    that wrote the gradient and summed the targets' logits (0.43 + 0.33 + 1.00 ms of GPT-2
    124M's 28 ms on an H200, BENCHMARKS.md); with a gather, its gradient was a scatter into
    a float32 [B, T, V] copy."""
    overrides = ["model.num_layers=1", "train.batch_size=2"]
    cfg = config.load(str(ROOT / "configs/gpt.py:gpt2_124m"), overrides)
    _, compiled = plan.compile_train_step(cfg, h200)
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]  # the buffers the step holds, not fusions' insides
    assert "f32[2,1024,50304]" not in entry
    logits = re.search(r"%?([\w.\-]+) = bf16\[2048,50304\]\{1,0\} fusion\(", entry).group(1)
    passes = {}  # the fusions that take the logits, other than the targets' gather
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) fusion\((.*)$", entry, re.M):
        name, shape, rest = m.groups()
        if re.search(rf"%{re.escape(logits)}[,)]", rest.split(", kind=")[0]):
            body = re.search(r"calls=%([\w.\-]+)", rest).group(1)
            body_text = text[text.index(f"%{body} ") :]
            if "gather(" not in body_text[: body_text.index("\n}\n")]:
                passes[name] = (shape, re.search(r"kind=(k\w+)", rest).group(1))
    assert len(passes) == 2, passes
    gradient = [kind for shape, kind in passes.values() if shape.startswith("bf16[2,1024,50304]")]
    assert gradient == ["kLoop"], passes  # elementwise: no reduction left in the backward


def test_bert_base_head_needs_no_padding_for_cublas_on_a_gpu(h200):
    """bert_base's vocabulary is 30522 padded to 30528 (configs/bert.py): compiled for an
    H200 with cuBLAS for the matmuls (Triton's GEMMs off, as an H200's autotuner may choose),
    the head's matmuls take the logits as they are. With 30522, XLA pads the table and the
    logits' gradient to 30528 (a [B * P, V] copy) for cuBLAS's aligned rows."""
    cfg = config.load(str(ROOT / "configs/bert.py:bert_base"), ["model.num_layers=1"])
    assert cfg.model.vocab_size % 64 == 0
    s = plan.setup(cfg, h200)
    options = {"xla_gpu_enable_triton_gemm": False}
    text = plan.lower_step(s).compile(compiler_options=options).as_text()
    entry = text[text.index("ENTRY") :]
    assert re.search(r"__cublas\$lt\$matmul", entry)
    assert not re.findall(r"^\s*%?[\w.\-]*pad[\w.\-]* = ", entry, re.M)
