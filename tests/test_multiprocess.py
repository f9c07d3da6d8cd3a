"""Processes joined by jax.distributed, as the hosts of a pod would be (4 fake devices each):
resume on another process count, preemption, a dead peer, and every objective."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import ROOT, SMALL_CORPUS, load_tiny, read_metrics, tiny_overrides, xla_flags

from jaxlm import prepare, tokenizer
from jaxlm.train import train

# One process of a run, through `jaxlm train`. SIGNAL_AT=k with SIGNAL=NAME: process
# SIGNAL_PROCESS sends itself that signal while its k-th batch is placed (as a preemption notice
# or a crash would arrive); with SIGNAL=raise it raises an OSError there instead (a disk or a
# reader failing on one host).
PROCESS = """
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO)  # before orbax's import installs absl's WARNING handler
from jaxlm import cli, sharding, train
to_global, calls = sharding.to_global, []
rows_seen = set()
def to_global_with_signal(batch, mesh):
    calls.append(1)
    if os.environ.get("SLOW_STEP"):  # seconds added to every batch (time-based checkpoints)
        import time
        time.sleep(float(os.environ["SLOW_STEP"]))
    if len(calls) == int(os.environ.get("SIGNAL_AT", 0)) and os.environ["JAX_PROCESS_ID"] == (
        os.environ.get("SIGNAL_PROCESS", "0")
    ):
        if os.environ["SIGNAL"] == "raise":
            raise OSError("injected: the disk failed on this host")
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    placed = to_global(batch, mesh)
    for rows in {v.shape[0] for v in placed.values()} - rows_seen:  # train and eval batches
        rows_seen.add(rows)
        print("global batch rows", rows, flush=True)
    return placed
train.sharding.to_global = to_global_with_signal
if os.environ.get("ROW_HASHES"):  # every contrastive training pair read: step, global row, hash
    sys.path.insert(0, "tests")
    import rowhash
    rowhash.install(rowhash.printed)
args = ["train", sys.argv[1], "--workdir", sys.argv[2], *sys.argv[3:]]
if int(os.environ["JAX_NUM_PROCESSES"]) > 1:
    args += ["--distributed", "--heartbeat-timeout", os.environ.get("HEARTBEAT", "100")]
rc = cli.main(args)
if rc == 0:
    print("process", os.environ["JAX_PROCESS_ID"], "returned normally", flush=True)
sys.exit(rc)
"""


def launch(workdir, n: int, objective: str = "gpt", timeout: int = 240, env=None, **overrides):
    """n processes x 8/n devices; returns [(returncode, output, seconds)] per process."""
    port = portpicker.pick_unused_port()
    args = [
        str(ROOT / f"configs/{objective}.py:tiny"),
        str(workdir),
        *tiny_overrides(objective, **overrides),
    ]
    procs, start = [], time.monotonic()
    for i in range(n):
        penv = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(n),
            JAX_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=xla_flags(8 // n),
            **(env or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", PROCESS, *args],
                cwd=ROOT,
                env=penv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # a hung collective ignores SIGTERM
            out, _ = p.communicate()
        results.append((p.returncode, out, time.monotonic() - start))
    return results


def _ok(results) -> str:
    for rc, out, _ in results:
        assert rc == 0, out[-4000:]
    return "\n".join(out for _, out, _ in results)


def _preempted_step(out: str) -> int:
    steps = {
        int(line.split("preempted at step ")[1].split(":")[0])
        for line in out.splitlines()
        if "preempted at step " in line
    }
    assert len(steps) == 1, out[-3000:]  # every process stopped at the same step
    return steps.pop()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    tok = tokenizer.train([(ROOT / "jaxlm/corpus/othello.txt").read_text()], 512)
    files = [str(ROOT / "jaxlm/corpus/othello.txt"), str(ROOT / "jaxlm/corpus/lear.txt")]
    prepare.prepare(files, tok, str(root / "plays"), 32, eval_fraction=0.05, progress=False)
    return str(root / "plays")


def _batch_rows(out: str) -> set[int]:
    return {int(line.split()[-1]) for line in out.splitlines() if "global batch rows" in line}


def _records(workdir, key: str) -> dict[int, float]:
    """step -> value of key in metrics.jsonl; a step logged twice fails."""
    found = [(r["step"], r[key]) for r in read_metrics(workdir) if key in r]
    steps = [step for step, _ in found]
    assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {sorted(steps)}"
    return dict(found)


def test_preempted_and_resumed_on_2_then_1_then_2_processes(tmp_path, prepared):
    """Training and evaluation: every global batch (train and eval) holds train.batch_size
    rows whatever the process count, and losses, eval losses and the count of batches over
    model.max_segments (of the global batch, not one process's rows) equal one process's."""
    opts = {
        "data.files": prepared,
        "train.steps": 12,
        "checkpoint.every": 100,
        "train.eval_every": 4,
        "model.max_segments": 1,
    }
    train(load_tiny(**opts), tmp_path / "straight")  # 1 process x 8 devices, uninterrupted
    run = tmp_path / "run"
    sigterm = {"SIGNAL": "SIGTERM", "SIGNAL_AT": "3", "SIGNAL_PROCESS": "1"}

    out = _ok(launch(run, 2, env=sigterm, **opts))  # SIGTERM to process 1 (not the coordinator)
    first = _preempted_step(out)
    assert out.count("returned normally") == 2
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [first]

    out = _ok(launch(run, 1, env={**sigterm, "SIGNAL_PROCESS": "0"}, **opts))  # 1 x 8
    assert f"resumed from {run}/checkpoints/{first}" in out
    second = _preempted_step(out)
    assert second > first

    out = _ok(launch(run, 2, **opts))  # and back to 2 x 4
    assert f"resumed from {run}/checkpoints/{second}" in out
    assert _batch_rows(out) == {8}, out[-3000:]  # train and eval: B rows, not n x B
    got, want = _records(run, "loss"), _records(tmp_path / "straight", "loss")
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-4, rtol=0)
    got, want = _records(run, "eval_loss"), _records(tmp_path / "straight", "eval_loss")
    assert sorted(got) == sorted(want) == [4, 8, 12]
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), atol=1e-5, rtol=0)
    got = _records(run, "max_segments_exceeded")
    want = _records(tmp_path / "straight", "max_segments_exceeded")
    assert got == want and sum(want.values()) > 0, (got, want)
    got = _records(run, "eval_unigram_loss")
    want = _records(tmp_path / "straight", "eval_unigram_loss")
    np.testing.assert_allclose(list(got.values()), [want[0]] * len(got), atol=1e-5, rtol=0)


def test_a_dead_peer_ends_the_survivor_with_an_error(tmp_path, prepared):
    opts = {"data.files": prepared, "train.steps": 200, "checkpoint.every": 1000}
    env = {"SIGNAL": "SIGKILL", "SIGNAL_AT": "3", "SIGNAL_PROCESS": "1", "HEARTBEAT": "10"}
    (rc0, out0, seconds), (rc1, _, _) = launch(tmp_path, 2, env=env, timeout=300, **opts)
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0 and seconds < 120, (rc0, seconds, out0[-3000:])
    # JAX's coordination service names the lost process (task 1) in the survivor's log.
    assert "tasks are unhealthy (stopped sending heartbeats):\n1\n" in out0, out0[-3000:]


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_on_one_process_mid_run_ends_every_process(tmp_path, prepared, failing):
    """An exception on one host in the middle of training (a disk, a reader) used to leave
    that process in jax.distributed's shutdown barrier and the others in the step's
    collectives until the barrier gave up 5 minutes later with an abort (on CPU, Gloo's 30 s
    rendezvous timeout cut that to 43 s, with its own error). The failing process now prints
    its traceback and leaves at once; the others end within the heartbeat timeout (10 s here)
    with JAX's error naming it, or at once when it was process 0."""
    opts = {"data.files": prepared, "train.steps": 200, "checkpoint.every": 1000}
    env = {"SIGNAL": "raise", "SIGNAL_AT": "3", "SIGNAL_PROCESS": str(failing), "HEARTBEAT": "10"}
    results = launch(tmp_path, 2, env=env, timeout=200, **opts)
    rc, out, _ = results[failing]
    assert rc == 1 and "OSError: injected: the disk failed on this host" in out, out[-3000:]
    other_rc, other_out, seconds = results[1 - failing]
    assert other_rc != 0 and seconds < 90, (other_rc, seconds, other_out[-3000:])
    # JAX's own words: process 1 is named by the coordination service; process 0 hosted it.
    said = "stopped sending heartbeats):\n1\n" if failing else "the leader task was preempted/died"
    assert said in other_out, other_out[-3000:]


def test_a_mistake_found_on_process_0_alone_stops_every_process_at_once(tmp_path):
    """Process 0 alone loads the tokenizer and prepares a local workdir's corpus; a user
    mistake it finds there reaches the others, which used to wait at the next collective
    until jax.distributed's shutdown gave up (5 minutes, then an abort with a stack dump)."""
    missing = tmp_path / "no.model"
    results = launch(tmp_path / "a", 2, timeout=150, **{"data.tokenizer": str(missing)})
    for rc, out, _ in results:
        assert rc == 2 and f"jaxlm: error: tokenizer file '{missing}' not found" in out, out[-3000:]
    assert "(found on process 0, while making the tokenizer)" in results[1][1]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    tok = tmp_path / "tok.model"
    tokenizer.train([(ROOT / SMALL_CORPUS[0]).read_text()], 512).save(tok)
    results = launch(
        tmp_path / "b", 2, timeout=150, **{"data.files": str(empty), "data.tokenizer": str(tok)}
    )
    for rc, out, _ in results:
        assert rc == 2 and f"data file '{empty}' is empty" in out, out[-3000:]
    assert "while preparing data.files entry 0" in results[1][1]


@pytest.mark.parametrize("together", [True, False], ids=["on_process_0", "one_process"])
def test_under_distributed_only_an_error_of_every_process_waits_for_the_others(
    monkeypatch, capsys, together
):
    """The choice behind the test above and the mid-run one, without their race between
    exits: an error sharding.on_process_0 raised (on every process at once) returns its exit
    status, so all leave through jax.distributed's shutdown barrier together; any other
    error leaves at once (cli._leave_now), so that JAX's heartbeat names the process. Two
    processes faked for on_process_0: this is process 0, and the broadcast returns its own
    message."""
    import jax
    from jax.experimental import multihost_utils

    from jaxlm import cli, sharding
    from jaxlm.config import ConfigError

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)

    def mistake():
        raise ConfigError("data.tokenizer: a mistake")

    def run(args):
        return sharding.on_process_0("making the tokenizer", mistake) if together else mistake()

    left = []

    def leave(rc):
        left.append(rc)
        raise SystemExit(rc)

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(cli, "_leave_now", leave)
    argv = ["train", str(ROOT / "configs/gpt.py:tiny"), "--distributed"]
    if together:
        assert cli.main(argv) == 2 and left == []
    else:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert left == [2]
    assert "jaxlm: error: data.tokenizer: a mistake" in capsys.readouterr().err


def test_one_tokenizer_for_all_processes(tmp_path):
    """A fresh run whose corpus has more lines than sentencepiece samples: trained on
    process 0 alone (samples differ from one training to the next), loaded by the others
    from the workdir; every process logs the same fingerprint, and training goes on."""
    lines = sum(len((ROOT / f).read_text().splitlines()) for f in SMALL_CORPUS)
    assert lines > 10 * 500
    opts = {"data.tokenizer_sample": 500, "train.steps": 2}
    results = launch(tmp_path / "run", 2, env={"HEARTBEAT": "20"}, timeout=200, **opts)
    out = _ok(results)
    found = [
        line.split("fingerprint ")[1].split()[0]
        for line in out.splitlines()
        if "tokenizer: " in line and "fingerprint " in line
    ]
    assert len(found) == 2 and len(set(found)) == 1, out[-3000:]
    assert "step 2/2" in out
    assert out.count("returned normally") == 2
    saved = tokenizer.load(tmp_path / "run" / tokenizer.JAXLM_TOKENIZER)
    assert tokenizer.fingerprint(saved) == found[0]


def test_time_based_checkpoints_are_the_same_step_on_every_process(tmp_path, prepared):
    """checkpoint.every_minutes on 2 processes whose clocks differ: process 0's decision is
    broadcast, so both save the same steps (a step saved by one process alone would hang
    Orbax's collective save); several saves come by the clock."""
    opts = {"data.files": prepared, "train.steps": 6, "checkpoint.every": 1000}
    opts |= {"checkpoint.every_minutes": 0.01}
    results = launch(tmp_path / "run", 2, env={"SLOW_STEP": "0.4"}, **opts)
    out = _ok(results)
    assert out.count("returned normally") == 2
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [6], steps  # the clock's saves are temporary: the newest (final) stays
    saved = [
        [
            int(x.split("checkpoint at step ")[1].split(":")[0])
            for x in o.splitlines()
            if "checkpoint at step " in x
        ]
        for _, o, _ in results
    ]
    assert saved[0] == saved[1] and len(saved[0]) >= 2, saved  # by the clock, on both
