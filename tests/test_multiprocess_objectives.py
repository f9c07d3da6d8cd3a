"""The masked LM and the contrastive objective on processes joined by jax.distributed (4 fake
devices each): training, evaluation and resumes on another process count. (Apart from
test_multiprocess.py, so that pytest-xdist can run the two files side by side.)"""

import jax
import numpy as np
from conftest import load_tiny
from test_multiprocess import _batch_rows, _ok, _preempted_step, _records, launch, prepared

from jaxlm.train import train

__all__ = ["prepared"]  # the fixture, shared with test_multiprocess.py


def test_mlm_trains_evaluates_and_resumes_on_2_processes(tmp_path, prepared):
    """(That its global batches are those of one process is tested in test_prepare.)"""
    opts = {"train.steps": 6, "checkpoint.every": 100, "train.eval_every": 3}
    opts["data.files"] = prepared
    sigterm = {"SIGNAL": "SIGTERM", "SIGNAL_AT": "2", "SIGNAL_PROCESS": "1"}
    stopped = _preempted_step(_ok(launch(tmp_path / "run", 2, "bert", env=sigterm, **opts)))
    out = _ok(launch(tmp_path / "run", 2, "bert", **opts))
    assert f"resumed from {tmp_path}/run/checkpoints/{stopped}" in out
    assert sorted(_records(tmp_path / "run", "loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(_records(tmp_path / "run", "eval_loss")) == [3, 6]
    assert _batch_rows(out) == {8}, out[-3000:]
    from jaxlm.evaluate import load

    assert load(tmp_path / "run").step == 6 and jax.process_count() == 1


def test_clip_resumes_exactly_on_2_then_1_then_2_processes(tmp_path):
    """Image-text pairs and a zero-shot set apart from them, prepared into the workdir at the
    first start (by process 0); random crops and captions keyed by each pair's global index:
    preempted on 2 x 4, then on 1 x 8, finished on 2 x 4, the losses equal an uninterrupted
    1 x 8 run's within 1e-4, and the held-out loss, recall and zero-shot figures (each
    process embeds its share) within 1e-5."""
    opts = {
        "train.steps": 9,
        "train.eval_every": 3,
        "checkpoint.every": 100,
        "clip.random_crop": "true",
        "clip.zeroshot": "digits",  # a set apart: all 1,797 digits, the first 40 used
        "clip.zeroshot_images": 40,
    }
    train(load_tiny("clip", **opts), tmp_path / "straight")
    run = tmp_path / "run"
    sigterm = {"SIGNAL": "SIGTERM", "SIGNAL_AT": "3", "SIGNAL_PROCESS": "1"}
    first = _preempted_step(_ok(launch(run, 2, "clip", env=sigterm, **opts)))
    out = _ok(launch(run, 1, "clip", env={**sigterm, "SIGNAL_PROCESS": "0"}, **opts))
    assert f"resumed from {run}/checkpoints/{first}" in out
    second = _preempted_step(out)
    assert second > first
    out = _ok(launch(run, 2, "clip", **opts))
    assert f"resumed from {run}/checkpoints/{second}" in out
    assert _batch_rows(out) == {8}, out[-3000:]
    assert len(list((run / "prepared").iterdir())) == 2  # source and zero-shot set, once
    straight = tmp_path / "straight"
    got, want = _records(run, "loss"), _records(straight, "loss")
    assert sorted(got) == list(range(1, 10))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-4, rtol=0)
    for key in ("eval_loss", "eval_i2t_recall_at_5", "eval_zeroshot_top1", "eval_zeroshot_top5"):
        got, want = _records(run, key), _records(straight, key)
        assert sorted(got) == sorted(want) == [3, 6, 9], key
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-5)
