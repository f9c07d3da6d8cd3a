"""Resume never silently restarts: a changed config is refused or logged, SIGTERM saves a
checkpoint at the step it arrives and the rerun resumes exactly."""

import json
import logging
import shutil

import pytest
from conftest import ROOT, load_tiny, losses, mounted, run_python, tiny_overrides

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
    assert "the learning-rate schedule now ends at step 3 (it was made for 2)" in caplog.text
    (first,) = [r.message for r in caplog.records if r.message.startswith("step 3/3 |")]
    assert first.endswith("(compile included)"), first  # the first step after a start
    assert sorted(losses(tmp_path)) == [1, 2, 3]

    # How a step runs may change too (more remat on fewer chips): logged, and it resumes.
    caplog.clear()
    how = {
        "model.remat": "full",
        "model.scan_layers": "false",
        "model.attention": "xla",
        "model.max_segments": "8",
    }
    where = {"train.track": "jsonl", "train.eval_tasks": "plays_next_line"}  # metrics, eval
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**{"train.steps": 4, "train.loss_chunk": 8, **how, **where}), tmp_path)
    assert "resume: model.remat changed from 'none' to 'full'" in caplog.text
    assert "resume: model.scan_layers changed from True to False" in caplog.text
    assert "resume: model.attention changed from 'auto' to 'xla'" in caplog.text
    assert "resume: model.max_segments changed from 0 to 8" in caplog.text
    assert "resume: train.loss_chunk changed from 256 to 8" in caplog.text
    assert "resume: train.track changed from ['tensorboard', 'jsonl'] to ['jsonl']" in caplog.text
    assert "resume: train.eval_tasks changed from [] to ['plays_next_line']" in caplog.text
    assert f"resumed from {tmp_path}/checkpoints/3" in caplog.text

    # fewer steps than the checkpoint has done: nothing trained, and the log says so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**{"train.steps": 3, **how, **where}), tmp_path)
    assert "nothing to train: the checkpoint is at step 4 and train.steps=3" in caplog.text
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


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


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoints at steps 1 and 2 (copied by each test that damages it)."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    train(load_tiny(**{"train.steps": 2, "checkpoint.every": 1}), workdir)
    return workdir


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.1G"),
        MemoryError(),
        OSError(5, "Input/output error"),  # EIO of a network filesystem
        OSError(116, "Stale file handle"),  # ESTALE
        PermissionError("403 PERMISSION_DENIED"),
        ValueError(
            "User-provided restore item and on-disk value metadata tree structures do not match"
        ),
    ],
    ids=["oom", "memory", "eio", "estale", "permission", "tree"],
)
def test_an_error_that_is_not_damage_fails_the_run_and_moves_nothing(
    two_checkpoints, tmp_path, monkeypatch, error
):
    from jaxlm import checkpoint

    tmp_path = tmp_path / "run"
    shutil.copytree(two_checkpoints, tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()

    def failing(self, step, abstract, params_only=False):
        raise error

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", failing)
    with pytest.raises(checkpoint.RestoreError, match=r"could not restore checkpoint .*/2: "):
        train(load_tiny(**{"train.steps": 4}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing trained


def test_every_step_damaged_stops_with_each_reason_and_trains_nothing(two_checkpoints, tmp_path):
    from jaxlm.checkpoint import NoReadableCheckpoint

    tmp_path = tmp_path / "run"
    shutil.copytree(two_checkpoints, tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    for f in (tmp_path / "checkpoints").glob("*/state/**/*"):
        if f.is_file():  # truncated, as a copy that ran out of space leaves them
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(NoReadableCheckpoint) as e:
        train(load_tiny(**{"train.steps": 4}), tmp_path)
    assert "step 2: " in str(e.value) and "step 1: " in str(e.value)
    assert "does not start over" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert not (tmp_path / "checkpoints_unreadable").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_a_resume_from_an_older_checkpoint_records_each_step_once(tmp_path, caplog):
    """Steps after the resumed checkpoint were logged by the run that went on past it: they
    are dropped from metrics.jsonl (and TensorBoard purges them), then logged again."""
    import json

    train(load_tiny(**{"train.steps": 4, "checkpoint.every": 2}), tmp_path)
    shutil.move(tmp_path / "checkpoints" / "4", tmp_path / "step4")  # as if its save was lost
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**{"train.steps": 6, "checkpoint.every": 2}), tmp_path)
    assert f"resumed from {tmp_path}/checkpoints/2" in caplog.text
    assert "metrics.jsonl: dropped 3 records logged after step 2" in caplog.text
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    headers = [r["step"] for r in records if "peak_flops_source" in r]
    assert headers == [0, 2]


FULL_DISK_AT = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO)
from jaxlm import checkpoint, cli
save = checkpoint.Checkpointer.save
def fill_then_save(self, step, *args, **kwargs):
    if step == {at}:  # the disk fills up (another job, the logs) before this save
        self.wait()  # the save before it has finished
        with open({filler!r}, "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 20))
                    f.flush()
            except OSError:
                pass
        Path({filler!r}).write_bytes(bytes(Path({filler!r}).stat().st_size - (256 << 10)))
    save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = fill_then_save
sys.exit(cli.main(["train", {config!r}, "--workdir", {workdir!r}, *{overrides!r}]))
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs: a disk that really fills up (a test cannot fill the machine's own)."""
    with mounted(tmp_path / "disk", ["-t", "tmpfs", "-o", "size=64m", "tmpfs"]) as disk:
        yield disk


def test_a_full_disk_stops_the_run_at_once_and_the_rerun_resumes(small_disk, tmp_path):
    """A save that fails in the background (Orbax's async writer finds the disk full) stops
    the run at the next logged step, in one line that says it is the disk (TensorStore's
    RESOURCE_EXHAUSTED had read as the device's memory); the checkpoint before it is kept,
    and once there is room the same command resumes from it. Orbax itself raised the error
    only at the next save, checkpoint.every steps later."""
    run, filler = small_disk / "run", small_disk / "filler"
    opts = {"train.steps": 40, "checkpoint.every": 10}

    def launch(at: int):
        code = FULL_DISK_AT.format(
            at=at,
            filler=str(filler),
            config=str(ROOT / "configs/gpt.py:tiny"),
            overrides=tiny_overrides(**opts),
            workdir=str(run),
        )
        return run_python(code)

    proc = launch(20)
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    # the checkpoint's write, or (the disk being full) the metrics' next line
    assert said.startswith(f"jaxlm: error: no space left on the disk (writing {run}/"), said
    for noise in ("Traceback", "out of device memory", "Event loop is closed"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    logged = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in logged if line.endswith("}")]  # not torn
    assert 20 <= max(steps) < 30  # stopped, not trained on to the next save
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == ["10"]

    filler.unlink()
    proc = launch(0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/10" in proc.stderr
    assert max(losses(run)) == 40
