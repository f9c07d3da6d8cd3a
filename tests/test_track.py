"""Weights & Biases tracking (`train.track=...,wandb`), offline: what W&B wrote is read back
from its own run files, and a resume continues the same run."""

import json
import struct

from conftest import load_tiny

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
