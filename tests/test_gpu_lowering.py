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
    bench` (it echoes its arguments): every step runs in order and each result lands in
    results.jsonl. A shell mistake found here costs no GPU minutes."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.update(
        OUT=str(tmp_path / "out"),
        LOGS=str(tmp_path / "logs"),
        PEERS=str(tmp_path / "no_peers.py"),
        PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}",
    )
    fake = tmp_path / "bench.py"
    fake.write_text(  # and, with --profile DIR, a trace file where jax.profiler puts one
        "import json, pathlib, sys\nargs = sys.argv[1:]\n"
        "if '--profile' in args:\n"
        "    run = pathlib.Path(args[args.index('--profile') + 1], 'plugins/profile/run')\n"
        "    run.mkdir(parents=True, exist_ok=True)\n"
        "    (run / 'host.xplane.pb').write_text(args[0])\n"
        "    import gzip\n"
        "    with gzip.open(run.parents[2] / 'train_step.hlo.txt.gz', 'wt') as f:\n"
        "        f.write('HloModule ' + args[0])\n"
        "import os\n"
        "print(json.dumps({'args': args, 'xla_flags': os.environ.get('XLA_FLAGS')}))\n"
    )
    env["BENCH"] = f"{sys.executable} {fake}"
    proc = subprocess.run(
        ["bash", "launch/gpu_bench.sh"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line a JSON record
    runs = [r for r in records if "run" in r]
    names = ["gpt2_124m", "gpt2_124m_pallas_norm", "vit_b16", "vit_b16_pallas_norm"]
    names += ["bert_base", "bert_base_pallas_norm", "gpt2_124m_no_dot_merger", "gpt2_124m_causal"]
    assert [r["run"] for r in runs] == names and "== done" in proc.stdout, proc.stdout
    assert runs[0]["args"][:2] == ["configs/gpt.py:gpt2_124m", "--steps"]
    assert all("--profile" in runs[i]["args"] for i in (0, 2, 4))
    for i in (1, 3, 5):  # each model again with the fused norms
        assert runs[i]["args"][0] == runs[i - 1]["args"][0], runs[i]
        assert "model.norm_kernel=pallas" in runs[i]["args"], runs[i]
    assert runs[6]["args"][0] == "configs/gpt.py:gpt2_124m"  # XLA_FLAGS set for it alone
    flags = os.environ.get("XLA_FLAGS")  # the test's own (conftest); none on the GPU image
    assert runs[6]["xla_flags"] == f"{flags or ''} --xla_gpu_dot_merger_threshold_mb=0"
    assert [r["xla_flags"] for i, r in enumerate(runs) if i != 6] == [flags] * 7
    assert "model.document_mask=false" in runs[7]["args"]
    import gzip
    import tarfile

    from jaxlm.profile import HLO_FILE

    for name, path in (("gpt2", "gpt.py:gpt2_124m"), ("vit", "clip.py:vit_b16")):
        with tarfile.open(tmp_path / "out" / f"{name}.tar") as tar:  # the trace, its program
            tar.extractall(tmp_path / name, filter="data")
        assert (tmp_path / name / f"{name}.xplane.pb").read_text() == f"configs/{path}", name
        with gzip.open(tmp_path / name / HLO_FILE, "rt") as f:  # as summarize_saved finds it
            assert f.read() == f"HloModule configs/{path}", name
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what a call brings back


def test_the_attention_script_runs_every_way():
    """launch/gpu_attention.py (run by hand on a GPU: every way jaxlm runs the document mask,
    its errors against float32 XLA, forward + backward ms) at a small size on this CPU: its
    seven ways print, none with an error."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "launch/gpu_attention.py", "64", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ways = [r["way"] for r in records if "way" in r]
    assert len(ways) == 7 and not [r for r in records if "error" in r], records


def test_the_second_gpu_call_runs_the_peers(tmp_path):
    """`launch/gpu_bench.sh peers`: the three Hugging Face peers, each a result line."""
    import json
    import os
    import subprocess

    fake = tmp_path / "peers.py"
    fake.write_text("import json, sys\nprint(json.dumps({'peer': sys.argv[1]}))\n")
    env = dict(os.environ, OUT=str(tmp_path / "out"), LOGS=str(tmp_path / "logs"), PEERS=str(fake))
    env["BENCH"] = "false"  # no jaxlm run in this call
    proc = subprocess.run(
        ["bash", "launch/gpu_bench.sh", "peers"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    runs = [json.loads(line) for line in lines]
    assert [(r["run"], r["peer"]) for r in runs] == [
        ("hf_gpt2", "gpt2"),
        ("hf_clip", "clip"),
        ("hf_bert", "bert"),
    ]
