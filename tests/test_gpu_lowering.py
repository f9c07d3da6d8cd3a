"""The GPU benchmarks' train steps, lowered for CUDA on a CPU (lowering needs no GPU): each
config traces through JAX's own cuDNN functions with the kernels jaxlm's chooser picks, as
on an H200 (cuDNN 9.10, compute capability 9.0), so a lent GPU's minutes are not spent on a
step that cannot be built (the `h200_cudnn` fixture: tests/conftest.py)."""

import re

import jax
import pytest
from conftest import ROOT

from jaxlm import config, plan

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
def test_gpu_benchmark_steps_lower_to_cudnn(h200_cudnn, case):
    overrides, want = CASES[case]
    cfg = config.load(str(ROOT / "configs" / case.split()[0]), overrides)
    text = plan.lower_step(plan.setup(cfg, jax.devices()[:1]), ("cuda",)).as_text()
    assert sorted(set(re.findall(r"custom_call @__cudnn\$(\w+)\(", text))) == sorted(want)
    layers = cfg.model.num_layers + (cfg.vision.num_layers if cfg.objective == "clip" else 0)
    forward = len(re.findall(r"custom_call @__cudnn\$fmha\w*Softmax\(", text))
    assert forward == layers * (2 if want == DENSE + OWN else 1)  # every layer, both branches


def test_the_gpu_call_runs_end_to_end_as_a_dry_run(tmp_path):
    """launch/gpu_bench.sh, the one call a lent GPU gets, run here with a stand-in for `jaxlm
    bench` (it echoes its arguments) and a short attention check: every step runs in order,
    each result lands in results.jsonl, and the attention script prints its seven ways. A shell
    mistake found here costs no GPU minutes."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(
        OUT=str(tmp_path / "out"),
        LOGS=str(tmp_path / "logs"),
        ATTENTION_ARGS="64 1",
        PEERS=str(tmp_path / "no_peers.py"),
        PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}",
    )
    fake = tmp_path / "bench.py"
    fake.write_text("import json, sys\nprint(json.dumps({'args': sys.argv[1:]}))\n")
    env["BENCH"] = f"{sys.executable} {fake}"
    proc = subprocess.run(
        ["bash", "launch/gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line a JSON record
    ways = [r["way"] for r in records if "way" in r]
    assert len(ways) == 7 and not [r for r in records if "error" in r], records
    runs = [r for r in records if "run" in r]
    assert [r["run"] for r in runs][:3] == ["gpt2_124m", "gpt2_124m_packed", "bert_base"]
    assert runs[0]["args"][:2] == ["configs/gpt.py:gpt2_124m", "--steps"]
    assert "--profile" in runs[0]["args"] and "model.max_segments=16" in runs[1]["args"]
    assert len(runs) == 10 and "== done" in proc.stdout, proc.stdout


def test_the_gpu_call_sets_only_flags_xla_knows():
    """Every XLA flag launch/gpu_bench.sh tries is one this jaxlib parses (XLA aborts on an
    unknown one, costing that step): GPU flags are parsed on any backend. A flag renamed in
    the GPU image's newer jaxlib is not caught here."""
    import os
    import subprocess
    import sys

    script = (ROOT / "launch" / "gpu_bench.sh").read_text()
    flags = sorted(set(re.findall(r"--xla_\w+=\w*", script)))
    assert len(flags) >= 6, flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    code = "import jax; print(jax.numpy.ones(2).sum())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-500:]
