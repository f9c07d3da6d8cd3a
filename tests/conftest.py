"""8 fake CPU devices for every test, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import tempfile
from importlib.metadata import version


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of this test session and of every process it starts (the same in all: runs
    compared across processes must compile alike).

    The tests compile hundreds of tiny programs and run each for milliseconds, so they trade
    generated-code speed for compile time: LLVM at level 1 without its expensive passes, and
    the classic loop emitters instead of the MLIR fusion emitters (train_step, init and
    eval_step of a tiny GPT: ~8 s -> ~6 s; tests/test_train.py + test_optimizers.py: 300 s and
    262 s -> 252 s and 227 s, runs interleaved; SmolLM2's greedy generation, the one test that
    runs a real model, unchanged at 14-20 s; level 0 doubled it).

    The concurrency-optimised HLO scheduler is off: with it, a train step with gradient
    accumulation on a (4, 1, 2) or (4, 2, 1) mesh, loaded from the persistent compilation
    cache below instead of compiled, deadlocks its collectives (devices wait in different
    all-reduces until the timeout aborts the process; jax 0.10.2 CPU; compiled fresh it runs).
    A hung CPU collective gives up after 60 s instead of never."""
    return (
        f"--xla_force_host_platform_device_count={devices}"
        " --xla_backend_optimization_level=1"
        " --xla_llvm_disable_expensive_passes=true"
        + (" --xla_cpu_use_fusion_emitters=false" if _JAXLIB < (0, 11) else "")
        + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
        " --xla_cpu_collective_call_terminate_timeout_seconds=60"
    )


# jaxlib 0.11 (Python >= 3.12; the GPU image has 0.11.2) dropped the fusion-emitter flag, and
# XLA aborts on a flag it does not know. Read from the package metadata: JAX is not imported yet.
_JAXLIB = tuple(int(x) for x in version("jaxlib").split(".")[:2])


os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the session, shared with every subprocess the tests start:
# most of them compile the same tiny models again (a resume, another process count), and
# compiling is most of their time on 2 cores (a 3-launch test: 115 s -> 75 s).
CACHE = tempfile.mkdtemp(prefix="jaxlm_tests_xla_cache_")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL_CORPUS = ("jaxlm/corpus/othello.txt", "jaxlm/corpus/julius_caesar.txt")


def tiny_overrides(config_file: str = "gpt", **extra) -> list[str]:
    """2-layer towers small enough to compile and run in seconds (keys of objectives other
    than the config's own are set too, and unused)."""
    base = {
        "model.vocab_size": 512,
        "model.seq_len": 32,
        "model.num_layers": 2,
        "model.d_model": 64,
        "model.num_heads": 4,
        "model.mlp_dim": 128,
        "model.dtype": "float32",
        "data.files": ",".join(str(ROOT / f) for f in SMALL_CORPUS),
        "train.batch_size": 8,
        "train.steps": 4,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.eval_steps": 2,
        "train.peak_flops": 1e11,
        "train.eval_tasks": "",  # configs/gpt.py:tiny scores plays_next_line; tests ask for it
        "optim.warmup_steps": 2,
        "optim.lr": 1e-2,
        "checkpoint.every": 1000,
        "vision.image_size": 16,
        "vision.d_model": 64,
        "vision.mlp_dim": 128,
    }
    if config_file == "clip":  # images come from clip.source; data.files would be refused
        del base["data.files"]
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def load_tiny(config_file: str = "gpt", **extra):
    """configs/<config_file>.py:tiny shrunk by tiny_overrides (gpt: causal LM, bert: masked LM)."""
    from jaxlm import config

    return config.load(
        str(ROOT / f"configs/{config_file}.py:tiny"), tiny_overrides(config_file, **extra)
    )


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@contextlib.contextmanager
def sigint_as_in_a_terminal():
    """Around starting a process that a test sends Ctrl-C: SIGINT handled here, so the child
    starts with it at its default (exec resets a handled signal, not an ignored one), as a
    shell in a terminal starts a command. A job a shell starts in the background (`.ci/run
    &`) ignores SIGINT, every process under it inherits that, and Python then installs no
    KeyboardInterrupt handler: the test would pass or fail for that alone. (A preexec_fn
    would run Python in a fork of this multithreaded process.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def mounted(target: Path, *mounts: list[str]):
    """`mount ARGS... target` for each of `mounts`, in order, for the duration: a real
    filesystem's limits (a tmpfs that fills up, a read-only bind mount), which a test cannot
    put on the machine's own. Needs root (CI runs as root); skipped elsewhere."""
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for args in mounts:
            if subprocess.run(["mount", *args, str(target)], capture_output=True).returncode:
                pytest.skip(f"mount {' '.join(args)} needs root (CI runs as root)")
            done += 1
        yield target
    finally:
        if done:  # a remount (`-o remount,bind,ro`) adds no layer: one umount
            subprocess.run(["umount", str(target)], check=True)


def run_python(code: str, devices: int = 8, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter with its own fake device count (killed on timeout:
    a hung CPU collective ignores SIGTERM)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


KILLED_AFTER_SAVE = """
import logging, os, signal
logging.basicConfig(level=logging.INFO)
from jaxlm import checkpoint, config, train
save = checkpoint.Checkpointer.save
def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == {step}:  # once the save has finished: the hard kill of a lost host
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
train.train(config.load({config!r}, {overrides!r}), {workdir!r})
"""


def train_killed_after_save(
    config: str, overrides: list[str], workdir: str, step: int | None, devices: int = 8
) -> subprocess.CompletedProcess:
    """`jaxlm train` in a fresh process, SIGKILLed right after checkpoint `step` is saved
    (step None: never killed)."""
    code = KILLED_AFTER_SAVE.format(
        config=str(ROOT / config), overrides=overrides, workdir=str(workdir), step=step
    )
    return run_python(code, devices=devices)


@pytest.fixture
def libtpu_alone():
    """One test at a time starts libtpu (a TPU compile, or a process that looks for a TPU
    first): libtpu takes /tmp/libtpu_lockfile, and one starting while another process takes
    it fails with "Internal error when accessing libtpu multi-process lockfile" (the v5e
    compile of tests/test_splash.py beside tests/test_profile.py's `jaxlm bench` in the
    other xdist worker, 2026-12-03). A lock file of the tests' own serialises them."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "jaxlm_tests_libtpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def h200_cudnn(monkeypatch):
    """JAX's cuDNN checks and jaxlm's attention chooser answer as on an H200 (cuDNN 9.10,
    compute capability 9.0), so GPU programs lower for CUDA here (lowering needs no GPU)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from jaxlm import attention

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "_hopper", lambda: True)


@pytest.fixture
def h200(h200_cudnn) -> list:
    """One H200 of an XLA GPU topology, for `plan.compile_train_step` without a GPU. Without
    JAX's CUDA plugin there is no such topology, and the step would silently compile for this
    process's CPU devices instead (then fail on an unrelated check, as batch divisibility)."""
    from jaxlm import plan

    devices = plan._gpu_devices("h200", 1)
    assert devices, "no CUDA topology: JAX's CUDA plugin (the test extra) is not installed"
    return devices


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A workdir with a tiny causal LM trained for 2 steps (shared by the tests that only read
    a checkpoint: generate, eval --data)."""
    from jaxlm.train import train

    workdir = tmp_path_factory.mktemp("tiny_lm")
    train(load_tiny(**{"train.steps": 2}), workdir)
    return workdir
