"""Resume never silently restarts: a changed config is refused or logged, SIGTERM saves a
checkpoint at the step it arrives and the rerun resumes exactly."""

import logging

import pytest
from conftest import ROOT, load_tiny, losses, run_python, tiny_overrides

from jaxlm import train as train_lib
from jaxlm.config import ConfigError
from jaxlm.train import train


def test_changed_model_is_refused_and_nothing_moves(tmp_path, caplog):
    train(load_tiny(**{"train.steps": 2, "checkpoint.every": 1}), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ConfigError) as e:
        train(load_tiny(**{"train.steps": 4, "model.d_model": 32}), tmp_path)
    assert "model.d_model: 64 in the checkpoint, 32 now" in str(e.value)
    with pytest.raises(ConfigError, match="train.seed: 0 in the checkpoint, 3 now"):
        train(load_tiny(**{"train.steps": 4, "train.seed": 3}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert not (tmp_path / "checkpoints_unreadable").exists()

    # Execution settings may change: logged, and the run resumes.
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(
            load_tiny(**{"train.steps": 3, "optim.lr": 0.005, "mesh.data": 2, "mesh.fsdp": 4}),
            tmp_path,
        )
    assert "resume: optim.lr changed from 0.01 to 0.005" in caplog.text
    assert f"resumed from {tmp_path}/checkpoints/2" in caplog.text
    assert sorted(losses(tmp_path)) == [1, 2, 3]


SIGNAL_AT = """
import logging, os, signal
logging.basicConfig(level=logging.INFO)
from jaxlm import config, sharding, train
to_global, calls = sharding.to_global, []
def to_global_then_signal(batch, mesh):
    calls.append(1)
    if len(calls) == {at}:  # as a preemption notice would arrive, mid-run
        os.kill(os.getpid(), signal.{signal})
    return to_global(batch, mesh)
train.sharding.to_global = to_global_then_signal
train.train(config.load({config!r}, {overrides!r}), {workdir!r})
print("returned normally")
"""


def test_signals_save_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path):
    opts = {"train.steps": 10, "checkpoint.every": 100}
    train(load_tiny(**opts), tmp_path / "straight")
    run = tmp_path / "run"

    def launch(sig: str, at: int):
        code = SIGNAL_AT.format(
            at=at,
            signal=sig,
            config=str(ROOT / "configs/gpt.py:tiny"),
            overrides=tiny_overrides(**opts),
            workdir=str(run),
        )
        proc = run_python(code)
        assert proc.returncode == 0 and "returned normally" in proc.stdout, proc.stderr[-3000:]
        return proc.stderr

    # Batch k is placed on the devices PREFETCH (2) steps ahead: during step k - 2 of a run.
    assert train_lib.PREFETCH == 2
    err = launch("SIGTERM", 7)  # preemption during step 5
    assert f"preempted at step 5: checkpoint saved in {run}/checkpoints/5" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["5"]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]

    err = launch("SIGINT", 5)  # Ctrl-C during the resumed run's third step, step 8
    assert f"resumed from {run}/checkpoints/5" in err
    assert f"preempted at step 8: checkpoint saved in {run}/checkpoints/8" in err

    err = launch("SIGINT", 0)
    assert f"resumed from {run}/checkpoints/8" in err
    assert losses(run) == losses(tmp_path / "straight")


def test_storage_error_fails_the_run_and_sets_nothing_aside(tmp_path, monkeypatch):
    from jaxlm import checkpoint

    train(load_tiny(**{"train.steps": 2, "checkpoint.every": 1}), tmp_path)

    def denied(self, step, abstract):
        raise PermissionError(f"403 PERMISSION_DENIED reading {self.root}/{step}")

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", denied)
    with pytest.raises(checkpoint.StorageError, match="checkpoint storage .* failed at step 2"):
        train(load_tiny(**{"train.steps": 4}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
