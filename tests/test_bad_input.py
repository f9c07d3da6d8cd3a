"""Each user mistake gets a message naming the thing at fault, and no traceback."""

import errno
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import ROOT, load_tiny, losses, tiny_overrides, xla_flags

from jaxlm import cli, evaluate, failures
from jaxlm.config import ConfigError
from jaxlm.train import train

GPT = str(ROOT / "configs/gpt.py:tiny")
PLAY = str(ROOT / "jaxlm/corpus/othello.txt")


def cli_error(capsys, *args) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def train_error(capsys, workdir, overrides: dict) -> str:
    """`jaxlm train` of the tiny GPT with these overrides fails with a message, no trace."""
    return cli_error(capsys, "train", GPT, "--workdir", str(workdir), *tiny_overrides(**overrides))


def test_mesh_that_does_not_match_the_devices(tmp_path, capsys):
    err = train_error(capsys, tmp_path, {"mesh.data": 3, "mesh.fsdp": 2})
    assert "mesh (data=3, fsdp=2, tensor=1) needs 6 devices, but there are 8" in err
    with pytest.raises(ConfigError, match=r"does not divide the 8 devices"):
        train(load_tiny(**{"mesh.data": -1, "mesh.fsdp": 3}), tmp_path)


def test_batch_not_divisible_by_data_parallel_size(tmp_path, capsys):
    err = train_error(capsys, tmp_path, {"train.batch_size": 6})
    assert "train.batch_size=6 (micro-batch 6 with train.grad_accum=1)" in err
    assert "is not divisible by the data-parallel size 8" in err


def test_a_workdir_that_is_a_file(tmp_path, capsys):
    """train, data prepare (text and images) and import hf name an output directory that is a
    file before any work (prepare and import raised FileExistsError / NotADirectoryError)."""
    (tmp_path / "run").write_text("my notes")
    err = train_error(capsys, tmp_path / "run", {})
    assert f"--workdir {tmp_path / 'run'}: a file, not a directory" in err
    out = str(tmp_path / "run")
    prepare = ["data", "prepare", "--out", out]
    for argv, flag in (
        ([*prepare, PLAY, "--tokenizer", "x.model"], "--out"),
        ([*prepare, "--images", "digits"], "--out"),
        (["import", "hf", str(tmp_path), "--out", out], "import hf --out"),
    ):
        assert f"{flag} {out}: a file, not a directory" in cli_error(capsys, *argv)
    assert (tmp_path / "run").read_text() == "my notes"


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    err = train_error(capsys, tmp_path, {"data.files": str(missing)})
    assert f"data.files: '{missing}' matches no file" in err


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    err = train_error(capsys, tmp_path / "w", {"data.files": str(empty)})
    assert f"data file '{empty}' is empty" in err


def test_mixture_weights_are_checked_before_anything_is_prepared(tmp_path, capsys):
    text = tmp_path / "plays.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    err = train_error(capsys, tmp_path / "w", {"data.files": str(text), "data.weights": "1,2"})
    assert "data.weights=1.0,2.0: expected 1 non-negative weights, one per data.files" in err
    assert not (tmp_path / "w" / "prepared").exists()  # refused before the preparation


def test_tokenizer_training_names_its_own_flags(tmp_path, capsys):
    missing, out = str(tmp_path / "nope.txt"), str(tmp_path / "t.model")
    err = cli_error(
        capsys, "tokenizer", "train", "--input", missing, "--vocab-size", "300", "--out", out
    )
    assert f"--input: '{missing}' matches no file" in err
    corpus = str(ROOT / "jaxlm/corpus/othello.txt")
    err = cli_error(
        capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", "5", "--out", out
    )
    assert "--vocab-size=5: training a sentencepiece model of that size failed" in err
    mine = tmp_path / "mine.model"  # a file of the user's: never written over
    mine.write_bytes(b"my tokenizer")
    err = cli_error(
        capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", str(mine)
    )
    assert f"tokenizer train --out {mine}: exists; choose a new path" in err
    assert mine.read_bytes() == b"my tokenizer"


def test_missing_tokenizer_file(tmp_path, capsys):
    err = train_error(capsys, tmp_path, {"data.tokenizer": "no.model"})
    assert "tokenizer file 'no.model' not found" in err


def test_corrupt_latest_checkpoint_is_skipped_not_loaded_nor_deleted(tmp_path, caplog):
    opts = {"train.steps": 4, "checkpoint.every": 2}
    train(load_tiny(**opts), tmp_path / "straight")
    workdir = tmp_path / "run"
    train(load_tiny(**opts), workdir)
    latest = workdir / "checkpoints" / "4"
    corrupted = 0
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 7)
            corrupted += 1
    assert corrupted
    # An interrupted save leaves a temporary directory; it must be ignored too.
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234").mkdir()

    with caplog.at_level(logging.WARNING, logger="jaxlm"):
        train(load_tiny(**{**opts, "train.steps": 6}), workdir)
    assert "checkpoint step 4" in caplog.text and "is damaged" in caplog.text
    assert (workdir / "checkpoints_unreadable" / "4" / "state").is_dir()  # kept for a post-mortem
    # Resumed from step 2: steps 3 and 4 are recomputed and equal the uninterrupted run's.
    resumed = losses(workdir)
    assert resumed[3] == losses(tmp_path / "straight")[3]


def test_clip_refuses_text_data_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data.files is for the text objectives.*clip.source"):
        train(load_tiny("clip", **{"data.files": "corpus.txt"}), tmp_path)


@pytest.mark.parametrize("data", [[], ["--data"]])
def test_bench_needs_a_positive_number_of_steps(capsys, data):
    err = cli_error(capsys, "bench", GPT, "--steps", "0", *data)
    assert "bench: --steps must be a positive number, got 0" in err


class RefusingStorage(http.server.BaseHTTPRequestHandler):
    """Google Cloud Storage's JSON API as it answers a caller without credentials."""

    code = 403
    message = "Anonymous caller does not have storage.objects.list access to the bucket."

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({"error": {"code": self.code, "message": self.message}}).encode()
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, *args):
        pass


def test_cloud_storage_out_of_reach_or_refusing_is_one_line_naming_the_gs_paths(tmp_path):
    """A gs:// path with no GCS to reach (no network; here an emulator address where nothing
    listens): gcsfs retries for about 35 s, then raises aiohttp's connection error under 200
    lines of asyncio traceback, which gcsfs also logs. A bucket that refuses the caller (no
    credentials: 403, or 401, from a stand-in server): gcsfs's OSError or HttpError under 50.
    jaxlm says each in one line, with the run's gs:// arguments, and exits 1; the local
    workdir holds no checkpoint."""
    import portpicker

    def run(storage: str, *args: str) -> str:
        env = dict(os.environ, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", XLA_FLAGS=xla_flags(8))
        env["STORAGE_EMULATOR_HOST"] = storage
        argv = ["train", GPT, *tiny_overrides(), *args]
        proc = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", *argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        return proc.stderr.strip().splitlines()[-1]

    nowhere = f"http://127.0.0.1:{portpicker.pick_unused_port()}"
    files = "data.files=gs://jaxlm-none/a.txt"
    last = run(nowhere, "--workdir", str(tmp_path), files)
    assert last.startswith("jaxlm: error: Google Cloud Storage not reachable (Cannot connect"), last
    assert last.endswith(f"This run's gs:// arguments: {files}"), last
    assert not list(tmp_path.glob("checkpoints/*")), list(tmp_path.glob("checkpoints/*"))

    for code, args in ((403, [files]), (401, ["--workdir", "gs://jaxlm-none/run"])):
        RefusingStorage.code = code
        server = http.server.HTTPServer(("127.0.0.1", 0), RefusingStorage)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            last = run(f"http://127.0.0.1:{server.server_port}", *args)
        finally:
            server.shutdown()
        assert last.startswith("jaxlm: error: Google Cloud Storage refused access ("), last
        assert "Anonymous caller does not have storage.objects.list access" in last, last
        assert "Credentials: `gcloud auth application-default login`" in last, last
        assert last.endswith(f"This run's gs:// arguments: {' '.join(args)}"), last


def test_reading_a_workdir_that_is_not_there_creates_nothing(tmp_path, capsys):
    """eval, generate and a --tokenizer directory only read: a mistyped workdir is an error
    naming it, and no WORKDIR/checkpoints is left behind (Orbax's manager made one)."""
    missing = tmp_path / "no_such_run"
    for command in (["eval", str(missing)], ["generate", str(missing), "--prompt", "To"]):
        err = cli_error(capsys, *command)
        assert f"no checkpoint in {missing}/checkpoints ({missing} does not exist)" in err
    notes = tmp_path / "notes"
    notes.mkdir()
    out = str(tmp_path / "out")
    err = cli_error(capsys, "data", "prepare", PLAY, "--tokenizer", str(notes), "--out", out)
    assert f"--tokenizer '{notes}': a directory with no checkpoint and no tokenizer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert not list(notes.iterdir())


def test_export_overwrites_nothing_and_import_names_a_broken_config(tiny_lm, tmp_path, capsys):
    """export hf into a directory that holds files (another model, the workdir itself) would
    replace its config.json, weights and tokenizer: refused, the files as they were. An
    import whose config.json is not a JSON object names the file."""
    held = tmp_path / "a_model"
    held.mkdir()
    (held / "config.json").write_text('{"model_type": "llama"}')
    for out in (held, tiny_lm, held / "config.json"):
        err = cli_error(capsys, "export", "hf", str(tiny_lm), "--out", str(out))
        assert f"export hf --out {out}: " in err and "overwrites nothing" in err
    assert sorted(p.name for p in held.iterdir()) == ["config.json"]
    assert (held / "config.json").read_text() == '{"model_type": "llama"}'
    assert not (tiny_lm / "config.json").exists()

    for text, said in (("{model_type: gpt2}", "not JSON"), ("[1, 2]", "a JSON list")):
        (held / "config.json").write_text(text)
        err = cli_error(capsys, "import", "hf", str(held), "--out", str(tmp_path / "w"))
        assert f"{held / 'config.json'}: {said}" in err


def test_prepare_needs_a_worker(tmp_path, capsys):
    for workers in ("0", "-2"):
        out = str(tmp_path / "out")
        argv = ["data", "prepare", PLAY, "--tokenizer", "x.model", "--out", out]
        err = cli_error(capsys, *argv, "--workers", workers)
        assert f"--workers must be at least 1 (1: no worker processes), got {workers}" in err
    assert not list(tmp_path.iterdir())


def test_image_eval_count_is_a_whole_count_or_a_fraction(tmp_path, capsys):
    """--eval-count 1.5 held out 1 pair: neither the count nor the fraction it could mean."""
    for count in ("1.5", "-3"):
        out = str(tmp_path / "out")
        err = cli_error(
            capsys, "data", "prepare", "--images", "digits", "--out", out, "--eval-count", count
        )
        said = "--eval-count must be a count of pairs (a whole number) or a fraction below 1"
        assert f"{said}, got {float(count)}" in err
    assert not list(tmp_path.iterdir())


def test_profile_into_a_file_is_refused_before_the_run(tmp_path, capsys):
    """jax.profiler raised at the end of the traced steps, a traceback in the middle of a run,
    when --profile named a file."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for command in (["train", GPT, "--workdir", str(tmp_path / "w")], ["bench", GPT]):
        err = cli_error(capsys, *command, "--profile", str(notes))
        assert f"--profile {notes}: a file, not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert notes.read_text() == "mine"


def test_cloud_storage_errors_name_the_arguments_main_was_given(capsys):
    """In-process (a notebook, a test), main's argv, not the interpreter's, holds the gs://
    arguments; gcsfs raises a 403 as OSError("Forbidden: ...") under what reached jaxlm."""
    try:
        try:
            raise OSError("Forbidden: b/jaxlm-none/o\nAnonymous caller does not have access.")
        except OSError as forbidden:
            raise RuntimeError("while listing") from forbidden
    except RuntimeError as error:
        rc = failures.said(error, ["train", GPT, "--workdir", "gs://jaxlm-none/run", "a=1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxlm: error: Google Cloud Storage refused access (Forbidden: ")
    assert err.rstrip().endswith("This run's gs:// arguments: --workdir gs://jaxlm-none/run")


def test_a_full_disk_is_said_to_be_the_disk(tmp_path, capsys):
    """Python's and TensorStore's ways of saying the disk is full are one line, naming the
    file written where the error does (TensorStore's was read as the device's memory:
    RESOURCE_EXHAUSTED)."""
    try:
        with open("/dev/full", "wb") as f:  # the kernel's always-full device: ENOSPC
            f.write(bytes(1 << 16))
    except OSError as e:
        written = e  # a write: no file name
    copied = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/x", None, "/w/shard.tmp")
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.embed" in OCDBT database at local file '
        '"/w/4.orbax-checkpoint-tmp/": Failed writing: "/w/4.orbax-checkpoint-tmp/d/12ab": '
        "Failed to write 3823 bytes to file 1: No space left on device [os_error_code='28']"
    )
    for error, what in (
        (written, "[Errno 28] No space left on device"),
        (copied, "writing /w/shard.tmp"),  # shutil's copy names both; the destination
        (tensorstore, "writing /w/4.orbax-checkpoint-tmp/d/12ab"),
    ):
        assert failures.said(error, []) == 1
        said = capsys.readouterr().err
        assert said.startswith(f"jaxlm: error: no space left on the disk ({what})"), said
        assert "memory" not in said


@pytest.mark.parametrize("log_every", [1, 1000])
def test_a_diverged_run_stops_in_one_line_before_saving_a_nan(tmp_path, capsys, log_every):
    """A loss that becomes NaN stops the run at the first logged step or save that sees it
    (logged every step; or logged only at the first step, so the save is what checks), in
    one line saying where a rerun would start and what to change (it was a traceback of
    FloatingPointError, and a save between logged steps kept the NaN state: the rerun
    resumed from it)."""
    overrides = tiny_overrides(
        **{"optim.lr": 1e4, "train.steps": 40, "train.log_every": log_every, "checkpoint.every": 4}
    )
    assert cli.main(["train", GPT, *overrides, "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = err.strip().splitlines()[-1]
    found = re.match(r"jaxlm: error: the loss is nan at step (\d+) \(checked every ", said)
    assert found, said
    step = int(found[1])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert not saved or max(saved) < step, (saved, step)
    newest = f"step {max(saved)}" if saved else "none yet"
    assert f"the newest checkpoint: {newest}" in said and "lower optim.lr (now 10000)" in said
    if saved:  # what a rerun would resume from holds no NaN
        params = evaluate.load(tmp_path, params_only=True).params
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
