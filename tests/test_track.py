"""Tracking: TensorBoard's event files and Weights & Biases (`train.track=...,wandb`,
offline), each read back from the files they wrote; a W&B resume continues the same run."""

import json
import os
import shutil
import signal
import struct

import pytest
from conftest import load_tiny, run_python

from jaxlm import train as train_lib
from jaxlm.train import train

BLOCK = 32768  # W&B's .wandb files: a header, then LevelDB-log framed protobuf records


def wandb_records(path):
    """(kind, record) of each protobuf Record in a .wandb file, as W&B's own reader frames
    them: 7-byte chunk headers (crc, length, type) in 32 KiB blocks, records split over
    chunks of type FIRST / MIDDLE / LAST."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record.WhichOneof("record_type"), record


def history(run_dir) -> tuple[str, dict, list[dict]]:
    (path,) = run_dir.glob("run-*.wandb")
    run_id, config, rows = None, {}, []
    for kind, r in wandb_records(path):
        if kind == "run":
            run_id = r.run.run_id
            config |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    return run_id, config, rows


def run_name(run_dir) -> str:
    (path,) = run_dir.glob("run-*.wandb")
    return next(r.run.display_name for kind, r in wandb_records(path) if kind == "run")


def test_wandb_offline_run_and_its_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "jaxlm-test")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "run"
    opts = {"train.track": "jsonl,wandb", "checkpoint.every": 2}
    train(load_tiny(**opts, **{"train.steps": 2}), run)
    run_id = (run / "wandb_run_id").read_text().strip()
    (first,) = (run / "wandb").glob("offline-run-*")
    got_id, config, rows = history(first)
    assert got_id == run_id and first.name.endswith(run_id)
    assert run_name(first) == "run"  # the workdir's name
    assert config["num_params"] > 0 and config["devices"] == 8 and config["device"]
    assert config["model"]["d_model"] == 64  # jaxlm's config, whole
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2]
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses == {r["step"]: r["loss"] for r in jsonl if "loss" in r}
    assert not (run / "tensorboard").exists()  # not in train.track

    train(load_tiny(**opts, **{"train.steps": 4}), run)  # resumes from step 2
    (second,) = set((run / "wandb").glob("offline-run-*")) - {first}
    got_id, _, rows = history(second)
    assert got_id == run_id and second.name.endswith(run_id)  # the same W&B run
    assert sorted(r["step"] for r in rows if "loss" in r) == [3, 4]

    # an attempt that died before its first checkpoint: the rerun starts at step 0, so it is
    # a new W&B run (a continued one would drop its steps up to the old run's last)
    shutil.rmtree(run / "checkpoints")
    monkeypatch.setenv("WANDB_NAME", "second attempt")  # W&B's variable names the run
    train(load_tiny(**opts, **{"train.steps": 2}), run)
    new_id = (run / "wandb_run_id").read_text().strip()
    (third,) = set((run / "wandb").glob("offline-run-*")) - {first, second}
    got_id, _, rows = history(third)
    assert new_id != run_id and got_id == new_id and third.name.endswith(new_id)
    assert run_name(third) == "second attempt"
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2]


def _ended(run_dir) -> tuple[int, bool]:
    """The exit code W&B recorded and whether the run was marked as preempting."""
    (path,) = run_dir.glob("run-*.wandb")
    records = list(wandb_records(path))
    codes = [r.exit.exit_code for kind, r in records if kind == "exit"]
    return codes[-1], any(kind == "preempting" for kind, _ in records)


def test_wandb_records_how_the_run_ended(tmp_path, monkeypatch):
    """W&B takes a run's state from its exit code: a run that raised was shown finished. Now
    a failure ends the W&B run with 1, a preemption (SIGTERM during step 2) marks it
    preempting with 143, and a finished run ends with 0."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    make, calls = train_lib.make_train_step, []

    def step_2_does(what):
        def made(s):
            step = make(s)

            def run(state, batch):
                calls.append(1)
                if len(calls) == 2:
                    if what == "raise":
                        raise RuntimeError("injected: step 2 failed")
                    os.kill(os.getpid(), signal.SIGTERM)
                return step(state, batch)

            return run

        return made

    opts = {"train.track": "jsonl,wandb", "train.steps": 4}
    monkeypatch.setattr(train_lib, "make_train_step", step_2_does("raise"))
    with pytest.raises(RuntimeError, match="injected"):
        train(load_tiny(**opts), tmp_path / "failed")
    calls.clear()
    monkeypatch.setattr(train_lib, "make_train_step", step_2_does("preempt"))
    train(load_tiny(**opts), tmp_path / "preempted")
    monkeypatch.setattr(train_lib, "make_train_step", make)
    train(load_tiny(**opts), tmp_path / "finished")
    ended = {
        name: _ended(next((tmp_path / name / "wandb").glob("offline-run-*")))
        for name in ("failed", "preempted", "finished")
    }
    assert ended == {"failed": (1, False), "preempted": (143, True), "finished": (0, False)}


TENSORBOARD = """
import sys
sys.path.insert(0, {fake!r})  # a torch package that says whether it was imported
from etils import epath
from jaxlm.track import MetricsWriter
writer = MetricsWriter(epath.Path({workdir!r}), start=1, track=("tensorboard",))
writer.write(2, {{"loss": 2.5, "lr": 0.125, "note": "text is not a scalar"}})
writer.write(3, {{"loss": 2.0}})
writer.close()
print("torch loaded by the writer:", "torch" in sys.modules)
import torch  # still importable after
print("torch after:", torch.FAKE)
"""


def tensorboard_events(path):
    """The Event protos of a TensorBoard event file: TFRecord framing (length, its CRC, the
    data, its CRC), read with tensorboardX's own Event message."""
    from tensorboardX.proto import event_pb2

    raw, pos = path.read_bytes(), 0
    while pos < len(raw):
        (length,) = struct.unpack("<Q", raw[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(raw[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        yield event


def test_tensorboard_events_hold_the_scalars_and_the_writer_loads_without_torch(tmp_path):
    """A fresh process where `import torch` works (a stand-in package first on the path: the
    tests' environment has no torch): tensorboardX's writer never imports it (3 s of every
    start with the real one), it imports after, and the events hold each step's scalars plus
    the resume's purge of steps after the start."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("FAKE = True\n\n\nclass Tensor:\n    pass\n")
    proc = run_python(TENSORBOARD.format(fake=str(fake), workdir=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch loaded by the writer: False" in proc.stdout
    assert "torch after: True" in proc.stdout
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = list(tensorboard_events(path))
    scalars = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
    assert scalars == {(2, "loss"): 2.5, (2, "lr"): 0.125, (3, "loss"): 2.0}
    purges = [e.step for e in events if e.HasField("session_log")]
    assert purges == [2]  # TensorBoard drops what an earlier run logged from step 2 on
