"""`jaxlm bench --data`: the training batches' rate without a model, and how many documents
their rows hold (what model.max_segments must cover for cuDNN's packed layout); and the
training step's own count of the micro-batches over model.max_segments."""

import json
import logging
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from conftest import load_tiny, read_metrics

from jaxlm import attention, bench, lm
from jaxlm.shards import document_starts
from jaxlm.start import fresh_tokenizer
from jaxlm.train import train


def test_documents_per_row_counts_what_the_packed_layout_counts():
    """Per batch, the most documents a row holds decides whether a step runs the packed
    layout (every row within model.max_segments) or the dense mask: the shares per M follow,
    and the counts equal attention.segment_runs' (the step's own) on the same rows."""
    batches = [
        np.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 3, 3, 3]]),  # 1 and 3 documents
        np.array([[1, 2, 3, 4, 5, 5], [1, 1, 1, 1, 0, 0]]),  # 5; padding is a run: 2
        np.array([[1, 1, 2, 2, 2, 2], [7, 7, 7, 8, 8, 9]]),  # 2 and 3
    ]
    got = bench.documents_per_row(iter({"segment_ids": b} for b in batches), 3, max_segments=3)
    counts = [np.asarray(attention.segment_runs(jnp.asarray(b), 8)[2]) for b in batches]
    assert [c.tolist() for c in counts] == [[1, 3], [5, 2], [2, 3]]
    assert got["documents_per_row"] == {"mean": round(16 / 6, 2), "max": 5}
    two_thirds = round(2 / 3, 4)  # the second batch's row of 5 does not fit 3 or 4
    want = {"3": two_thirds, "4": two_thirds, "8": 1.0, "16": 1.0, "32": 1.0, "64": 1.0}
    assert got["batches_within_max_segments"] == want


def test_bench_data_reports_the_built_in_corpus(tmp_path):
    """The command end to end on the built-in corpus (prepared into --workdir once)."""
    cmd = [sys.executable, "-m", "jaxlm.cli", "bench", "configs/gpt.py:tiny", "--data"]
    cmd += ["--steps", "20", "--workdir", str(tmp_path), "model.seq_len=1024"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["prepared_tokens_per_s"] > 0 and result["on_the_fly_tokens_per_s"] > 0
    rows = result["documents_per_row"]
    # the plays are cut into documents of about 4,096 characters (inputs.DOC_CHARS): a
    # 1024-token row holds one or two, sometimes three
    assert 1.0 < rows["mean"] < 3.0 and 2 <= rows["max"] <= 4, rows
    assert result["batches_within_max_segments"]["4"] == 1.0


def test_training_counts_the_micro_batches_over_max_segments(tmp_path, caplog):
    """Each step counts its micro-batches with a row of more than model.max_segments
    documents (those that run the dense mask on a Hopper GPU): the metric, summed between
    logged steps, and the run's total equal a count made here on the same batches."""
    steps, accum = 8, 2
    cfg = load_tiny(
        **{"model.max_segments": 1, "model.seq_len": 512, "train.log_every": 3},
        **{"train.steps": steps},
        **{"train.grad_accum": accum, "mesh.data": 4, "mesh.fsdp": 1, "mesh.tensor": 2},
    )
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(cfg, tmp_path)
    dataset = lm.load_data(cfg, fresh_tokenizer(cfg, lm, tmp_path), tmp_path)
    batches = dataset.train_batches(0)
    per_step = []
    for _ in range(steps):
        rows = next(batches)["segment_ids"]
        micro = [rows[a::accum] for a in range(accum)]  # row r * accum + a of micro-batch a
        per_step.append(sum(int((document_starts(m).sum(-1) > 1).any()) for m in micro))
    total = sum(per_step)
    assert 0 < total < steps * accum, per_step  # 512-token rows: some hold two documents
    logged = {r["step"]: r["max_segments_exceeded"] for r in read_metrics(tmp_path) if "loss" in r}
    since = {1: per_step[:1], 3: per_step[1:3], 6: per_step[3:6], 8: per_step[6:]}
    assert logged == {step: sum(counts) for step, counts in since.items()}
    want = f"model.max_segments=1: {total} of {steps * accum} micro-batches held a row of more"
    assert want in caplog.text
    # the evaluation at the last step counts its batches the same way (a count, not a mean)
    held_out = [b["segment_ids"] for s in dataset.eval_sets() for b in s.batches]
    over = sum(int((document_starts(b).sum(-1) > 1).any()) for b in held_out)
    assert over > 0, len(held_out)
    (last,) = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert last["eval_max_segments_exceeded"] == over
