"""The masked LM and the contrastive objective on processes joined by jax.distributed (4 fake
devices each): training, evaluation and resumes on another process count. (Apart from
test_multiprocess.py, so that pytest-xdist can run the two files side by side.)"""

import jax
import numpy as np
import rowhash
from conftest import load_tiny
from test_multiprocess import _batch_rows, _ok, _preempted_step, _records, launch, prepared

from jaxlm.train import train

__all__ = ["prepared"]  # the fixture, shared with test_multiprocess.py


def test_mlm_trains_and_evaluates_on_2_processes(tmp_path, prepared):
    """(That its global batches are those of one process is tested in test_prepare; resumes
    across process counts, objective-agnostic, in test_multiprocess.py and below.)"""
    opts = {"train.steps": 4, "checkpoint.every": 100, "train.eval_every": 2}
    out = _ok(launch(tmp_path / "run", 2, "bert", **opts, **{"data.files": prepared}))
    assert sorted(_records(tmp_path / "run", "loss")) == [1, 2, 3, 4]
    assert sorted(_records(tmp_path / "run", "eval_loss")) == [2, 4]
    assert sorted(_records(tmp_path / "run", "eval_accuracy")) == [2, 4]
    assert _batch_rows(out) == {8}, out[-3000:]
    from jaxlm.evaluate import load

    assert load(tmp_path / "run").step == 4 and jax.process_count() == 1


def _row_hashes(out: str) -> dict[tuple[int, int], str]:
    """(step, global row) -> hash of the pair's pixels and tokens, from ROW_HASHES lines; a
    row read twice (a resume re-reads its first batches) must hash the same both times."""
    found: dict[tuple[int, int], str] = {}
    for line in out.splitlines():
        if line.startswith("row "):
            _, step, row, digest = line.split()
            assert found.setdefault((int(step), int(row)), digest) == digest, line
    return found


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
    want: dict[tuple[int, int], str] = {}  # the uninterrupted run, 1 x 8, in this process
    undo = rowhash.install(lambda step, row, digest: want.setdefault((step, row), digest))
    try:
        train(load_tiny("clip", **opts), tmp_path / "straight")
    finally:
        undo()
    hashes = {"ROW_HASHES": "1"}
    run = tmp_path / "run"
    sigterm = {"SIGNAL": "SIGTERM", "SIGNAL_AT": "3", "SIGNAL_PROCESS": "1", **hashes}
    outs = [_ok(launch(run, 2, "clip", env=sigterm, **opts))]
    first = _preempted_step(outs[0])
    outs.append(_ok(launch(run, 1, "clip", env={**sigterm, "SIGNAL_PROCESS": "0"}, **opts)))
    assert f"resumed from {run}/checkpoints/{first}" in outs[1]
    second = _preempted_step(outs[1])
    assert second > first
    outs.append(_ok(launch(run, 2, "clip", env=hashes, **opts)))
    assert f"resumed from {run}/checkpoints/{second}" in outs[2]
    assert _batch_rows(outs[2]) == {8}, outs[2][-3000:]
    # Every pair of every step, pixels and tokens, as the uninterrupted run read it.
    got, every = _row_hashes("\n".join(outs)), {(s, r) for s in range(9) for r in range(8)}
    assert every <= got.keys() and every <= want.keys()
    assert [k for k in sorted(every) if got[k] != want[k]] == []
    assert len(list((run / "prepared").iterdir())) == 2  # source and zero-shot set, once
    straight = tmp_path / "straight"
    got, want = _records(run, "loss"), _records(straight, "loss")
    assert sorted(got) == list(range(1, 10))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-4, rtol=0)
    for key in ("eval_loss", "eval_i2t_recall_at_5", "eval_zeroshot_top1", "eval_zeroshot_top5"):
        got, want = _records(run, key), _records(straight, key)
        assert sorted(got) == sorted(want) == [3, 6, 9], key
        np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-5)
