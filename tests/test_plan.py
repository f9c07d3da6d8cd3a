"""`jaxlm plan`: ahead-of-time compiles on fake devices, and what they show about memory."""

import json
import os
import subprocess
import sys

from conftest import ROOT, run_python

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


def test_plan_llama_7b_on_64_devices():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan sets its own
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "plan", "configs/gpt.py:llama_7b", "--devices", "64"]
        + ["--device", "h200", "mesh.fsdp=64"],  # a GPU kind: always the fake-CPU compile
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 64 and plan["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
    assert 6.73e9 < plan["params"] < 6.75e9
    # float32 parameters and two AdamW moments, spread over 64 devices
    expected = 12 * plan["params"] / 64
    assert abs(plan["state_bytes_per_device"] / expected - 1) < 0.05, plan
    assert plan["temp_bytes_per_device"] > 0 and "cpu x 64" in plan["compiled_for"]
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
