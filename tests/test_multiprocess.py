"""Two processes x 4 fake devices joined by jax.distributed, as two hosts of a pod would be."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from conftest import ROOT, losses, tiny_overrides


def launch(workdir: Path, **overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("XLA_FLAGS", None)
    args = ["bash", str(ROOT / "launch/local.sh"), "2", "train", str(ROOT / "configs/gpt.py:tiny")]
    args += ["--workdir", str(workdir), *tiny_overrides(**overrides)]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hung collective ignores SIGTERM
        out, _ = proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, None)


def test_two_process_training_checkpoints_and_resumes(tmp_path):
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "checkpoint.every": 4}
    first = launch(tmp_path, **mesh)
    assert first.returncode == 0, first.stdout[-4000:]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]  # written once, by process 0
    data_files = sorted(p.name for p in (tmp_path / "checkpoints/4/data").glob("process_*"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # one per process

    second = launch(tmp_path, **mesh, **{"train.steps": 6})
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from" in second.stdout
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]

    from jaxlm.evaluate import load

    loaded = load(tmp_path)  # the 2-process checkpoint, on this single process
    assert loaded.step == 6 and jax.process_count() == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(loaded.params))
