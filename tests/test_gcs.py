"""gs:// workdirs and prepared output against a real GCS API served locally
(the PyPI package gcp-storage-emulator): tensorstore (Orbax's arrays) and etils.epath / gcsfs
(everything else) talk to it as they would to Google Cloud Storage."""

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, load_tiny, tiny_overrides, train_killed_after_save, xla_flags
from etils import epath
from test_bad_input import RefusingStorage

from jaxlm import cli
from jaxlm.train import train

BUCKET = "jaxlm-test"


@pytest.fixture(scope="module")
def gcs():
    import portpicker

    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen(
        [
            exe,
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, hence etils.epath
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore, hence Orbax
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket probing
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"gs://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.kill()


def _jaxlm(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def prepared(gcs, tmp_path_factory):
    """`jaxlm data prepare --out gs://...`, then a local copy (array_record reads gs:// with
    its own client, which the emulator cannot serve; pods mount the bucket with gcsfuse)."""
    tmp = tmp_path_factory.mktemp("gcs_prepare")
    tok = tmp / "tok.model"
    from jaxlm import tokenizer

    tokenizer.train([(ROOT / "jaxlm/corpus/othello.txt").read_text()], 512).save(tok)
    (tmp / "a.txt").write_text((ROOT / "jaxlm/corpus/othello.txt").read_text())
    epath.Path(tmp / "a.txt").copy(epath.Path(f"{gcs}/text/othello.txt"))
    out = f"{gcs}/prepared/othello"
    proc = _jaxlm(
        "data",
        "prepare",
        f"{gcs}/text/*.txt",
        "--tokenizer",
        str(tok),
        "--out",
        out,
        "--seq-len",
        "32",
        "--workers",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["out"] == out and summary["documents"] > 10
    assert "MB/s" in proc.stderr
    local = tmp / "othello"
    local.mkdir()
    for f in epath.Path(out).iterdir():
        f.copy(epath.Path(local / f.name))
    assert json.loads((local / "manifest.json").read_text())["tokens"] == summary["tokens"]
    return local


def test_train_kill_resume_and_eval_with_the_workdir_on_gcs(gcs, prepared, tmp_path, capsys):
    workdir = f"{gcs}/runs/gpt"
    overrides = tiny_overrides(
        **{
            "data.files": str(prepared),
            "train.steps": 6,
            "checkpoint.every": 2,
            "train.eval_every": 2,
            # The emulator ignores GCS's generation preconditions, which the manifest updates
            # of Orbax's OCDBT layout rely on ("Malformed StorageGeneration"): plain zarr here.
            "checkpoint.ocdbt": "false",
        }
    )
    proc = train_killed_after_save("configs/gpt.py:tiny", overrides, workdir, 4, devices=1)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run = epath.Path(workdir)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        2,
        4,
    ]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # copied up at the step-4 checkpoint

    # The newest checkpoint is damaged as well: set aside object by object (GCS has no
    # directories and no rename), and the rerun resumes from the one before.
    import fsspec

    fs, step4 = fsspec.core.url_to_fs(f"{workdir}/checkpoints/4")
    damaged = [f for f in fs.find(step4) if "/state/" in f]
    for f in damaged:
        fs.pipe(f, b"\x00garbage" * 7)
    proc = train_killed_after_save("configs/gpt.py:tiny", overrides, workdir, None, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"moved to {workdir}/checkpoints_unreadable/4" in proc.stderr
    assert f"resumed from {workdir}/checkpoints/2" in proc.stderr
    kept = fs.find(step4.replace("/checkpoints/4", "/checkpoints_unreadable/4"))
    assert len([f for f in kept if "/state/" in f]) == len(damaged) > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # each once
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    # `jaxlm eval` and `jaxlm plot` read the gs:// workdir (in this process: the emulator's
    # environment is set here too)
    assert cli.main(["eval", workdir]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6 and result["eval_loss"] > 0
    assert cli.main(["plot", workdir, "--out", str(tmp_path / "plot.png")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lines"] >= 3
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_image_tars_on_gcs_prepared_to_gcs_then_trained(gcs, tmp_path):
    """WebDataset tars on gs:// named by a brace range -> `jaxlm data prepare --images --out
    gs://...` -> a local copy (as gcsfuse gives a pod) -> a CLIP run trains on it as it is."""
    from test_images import pairs, write_tar

    for k in range(2):
        write_tar(tmp_path / f"shard-{k:05d}.tar", pairs(k * 20, 20, size=(24, 20)))
        epath.Path(tmp_path / f"shard-{k:05d}.tar").copy(
            epath.Path(f"{gcs}/tars/shard-{k:05d}.tar")
        )
    out = f"{gcs}/prepared/pairs"
    args = ["data", "prepare", "--images", f"{gcs}/tars/shard-{{00000..00001}}.tar", "--out", out]
    proc = _jaxlm(*args, "--workers", "1", "--eval-count", "8", "--image-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 40 and summary["shards"] == 2 and "pairs/s" in proc.stderr
    local = tmp_path / "pairs"
    local.mkdir()
    for f in epath.Path(out).iterdir():
        f.copy(epath.Path(local / f.name))
    opts = {"clip.source": str(local), "train.steps": 2, "train.eval_steps": 0}
    result = train(load_tiny("clip", **opts), tmp_path / "run")
    assert np.isfinite(result["loss"]) and not (tmp_path / "run" / "prepared").exists()


class RefusingWrites(RefusingStorage):
    message = "svc@p.iam.gserviceaccount.com does not have storage.objects.create access"


def test_a_bucket_that_refuses_the_checkpoint_writes_is_one_line(gcs, tmp_path):
    """A credential that may list and read the bucket but not write to it (a common service
    account role): the workdir is made, the run starts, and TensorStore's first checkpoint
    write is refused (403, from a stand-in for its GCS endpoint; gcsfs talks to the
    emulator). The run stops at the next logged step with the refusal in one line (it was
    a traceback, TensorStore's ValueError PERMISSION_DENIED)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), RefusingWrites)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    workdir = f"{gcs}/runs/refused"
    overrides = tiny_overrides(
        **{"train.steps": 10, "checkpoint.every": 2, "checkpoint.ocdbt": "false"}
    )
    saved = os.environ["TENSORSTORE_GCS_HTTP_URL"]
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{server.server_port}"
    try:
        proc = _jaxlm("train", str(ROOT / "configs/gpt.py:tiny"), *overrides, "--workdir", workdir)
    finally:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = saved
        server.shutdown()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = proc.stderr.strip().splitlines()[-1]
    assert said.startswith(
        "jaxlm: error: Google Cloud Storage refused access (PERMISSION_DENIED: Error "
    ), said
    assert f"{workdir}/checkpoints/2/" in said and RefusingWrites.message in said, said
    assert said.endswith(f"This run's gs:// arguments: --workdir {workdir}"), said
    assert "http_response_body" not in said
