"""launch/tpu_pod.sh with a stand-in gcloud (tests/fake_gcloud): what travels to the workers,
and the command each runs. The whole launch, installing and training on two workers, needs
root and the package index (DEVELOPERS.md)."""

import os
import subprocess
import tarfile

from conftest import ROOT


def test_tpu_pod_sends_the_checkout_not_its_venvs_and_each_argument_as_given(tmp_path):
    env = dict(
        os.environ,
        FAKE_TPU=str(tmp_path),
        FAKE_TPU_RUN="0",
        PATH=f"{ROOT / 'tests/fake_gcloud'}:{os.environ['PATH']}",
    )
    args = ["configs/gpt.py:tiny", "--workdir", "gs://b/runs/a b", "train.eval_tasks=it's"]
    subprocess.run(
        ["bash", str(ROOT / "launch/tpu_pod.sh"), "my-tpu", "us-central2-b", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    with tarfile.open(tmp_path / "w0/jaxlm.tar.gz") as archive:
        names = {n.removeprefix("./") for n in archive.getnames()}
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(tracked) <= names
    assert not [n for n in names if n.startswith((".venv", "runs/", "build/", ".git/"))]

    command = (tmp_path / "command.sh").read_text()
    assert "--worker=all --command" in (tmp_path / "calls.log").read_text()
    argv = command.replace("exec .venv/bin/jaxlm", "printf '%s\\n'")
    printed = subprocess.run(
        ["bash", "-c", argv.replace("set -e", "set -e; cd() { :; }; uv() { :; }; tar() { :; }")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "HOME": str(tmp_path)},
    )
    assert printed.stdout.splitlines()[-len(args) - 2 :] == ["train", *args, "--distributed"]


def test_local_launch_refuses_a_process_count_that_is_not_a_count(tmp_path):
    """launch/local.sh 0 ... started no process and exited 0, as if the job had run; a count
    left out took the subcommand for it. Both stop, naming what was given."""
    for given in (["0", "train", "configs/gpt.py:tiny"], ["train", "configs/gpt.py:tiny"]):
        proc = subprocess.run(
            ["bash", str(ROOT / "launch/local.sh"), *given],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"NUM_PROCESSES must be a positive integer, got '{given[0]}'" in proc.stderr
