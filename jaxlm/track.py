"""Where a run's metrics go (`train.track=tensorboard,jsonl,wandb`): metrics.jsonl and
TensorBoard events in the workdir (the default), Weights & Biases (optional extra:
`pip install 'jaxlm[wandb]'`), all from process 0 only.

W&B: the run's config holds jaxlm's whole config, the parameter count and the devices. The
run id is stored in WORKDIR/wandb_run_id before the run starts, so a resume (a preempted run's
rerun included) continues the same W&B run instead of starting a new one; a run from step 0
is a new W&B run. WANDB_PROJECT (default `jaxlm`), WANDB_NAME (default: the workdir's name),
WANDB_ENTITY, WANDB_MODE (`offline`: no server) and WANDB_DIR are W&B's own
variables and are honoured as W&B honours them; without WANDB_DIR a local workdir holds W&B's
files (`WORKDIR/wandb/`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
from etils import epath

from jaxlm import config as config_lib
from jaxlm import markers, sharding
from jaxlm.config import Config, ConfigError

log = logging.getLogger("jaxlm")
RUN_ID = "wandb_run_id"


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only.

    Cloud objects cannot be appended to: for a `gs://` workdir both are written to a local
    directory and copied up at every checkpoint and at the end (`sync`).

    A run that starts at step `start` (a resume, or a fresh start after a run that died
    before its first checkpoint) drops what was logged after that step, and the header
    record of an earlier start at that same step, so no step is recorded twice; TensorBoard
    purges its events after `start` the same way. `track` (train.track) chooses among
    jsonl, tensorboard and wandb (given `wandb`: a callable making a `Wandb` from `start`)."""

    def __init__(
        self,
        workdir: epath.Path,
        start: int = 0,
        track: tuple[str, ...] = ("tensorboard", "jsonl"),
        wandb=None,
    ):
        self.enabled = jax.process_index() == 0
        self.remote = "://" in str(workdir)
        self.workdir, self.track = workdir, track
        self.tb = self.wandb = None
        # process 0's files and W&B run; a failure there (W&B not installed, no network)
        # stops every process at once
        sharding.on_process_0("opening train.track's writers", lambda: self._open(start, wandb))

    def _open(self, start: int, wandb) -> None:
        workdir, track = self.workdir, self.track
        self.local = (
            Path(tempfile.mkdtemp(prefix="jaxlm_metrics_")) if self.remote else Path(str(workdir))
        )
        self.local.mkdir(parents=True, exist_ok=True)
        self.path = self.local / "metrics.jsonl"
        if (workdir / "metrics.jsonl").exists():  # continue the file, up to the start
            kept, dropped = [], 0
            for line in (workdir / "metrics.jsonl").read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the half-written last line of a killed run
                    dropped += 1
                    continue
                later = record["step"] > start
                header = record["step"] == start and "peak_flops_source" in record
                if later or header:
                    dropped += not header
                else:
                    kept.append(line + "\n")
            # rewritten in place, a full disk would lose it all
            markers.write_whole(self.path, "".join(kept))
            if dropped:
                log.info("metrics.jsonl: dropped %d records logged after step %d", dropped, start)
        if "tensorboard" in track:
            self.tb = _summary_writer(self.local / "tensorboard", purge_step=start + 1)
        if "wandb" in track and wandb is not None:
            self.wandb = wandb(start)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if "jsonl" in self.track:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if self.tb and k != "step" and isinstance(v, float | int):
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(step, record)

    def sync(self) -> None:
        if not self.enabled:
            return
        if self.tb:
            self.tb.flush()
        if self.remote:
            files = [self.path] if self.path.exists() else []
            for f in [*files, *sorted((self.local / "tensorboard").glob("*"))]:
                target = self.workdir / f.relative_to(self.local)
                target.parent.mkdir(parents=True, exist_ok=True)
                epath.Path(f).copy(target, overwrite=True)

    def close(self, ended: str = "finished") -> None:
        """ended: finished | preempted | failed, how the run stopped (W&B records it)."""
        if self.enabled:
            self.sync()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.close(ended)
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)


def _summary_writer(logdir: Path, purge_step: int):
    """tensorboardX's writer, loaded without torch. tensorboardX imports torch wherever it is
    installed, only to accept torch tensors (jaxlm gives it floats): 3 of a start's 8 seconds.
    While tensorboardX loads, `import torch` fails (a None in sys.modules, as Python's import
    system defines) and tensorboardX takes its path for no torch; torch stays importable after.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


class Wandb:
    def __init__(self, workdir: epath.Path, cfg: Config, num_params: int, start: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.track includes wandb, which is not installed: pip install 'jaxlm[wandb]'"
            ) from None
        id_file = workdir / RUN_ID
        # a run from step 0 is a new W&B run even where an earlier attempt left its id (it
        # died before its first checkpoint): W&B keeps a run's steps, so the new attempt's
        # steps up to the old one's last would be dropped from a continued run
        resumed = start > 0 and id_file.exists()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        if not resumed:
            if id_file.exists():
                old = id_file.read_text().strip()
                log.info("wandb: run %s of this workdir left no checkpoint: a new run", old)
            id_file.write_text(run_id + "\n")
        local = "://" not in str(workdir)
        devices = jax.devices()
        settings = {
            "project": os.environ.get("WANDB_PROJECT") or "jaxlm",
            "id": run_id,
            "resume": "allow",
            "name": os.environ.get("WANDB_NAME") or str(workdir).rstrip("/").rsplit("/", 1)[-1],
            "config": {
                **config_lib.to_dict(cfg),
                "num_params": num_params,
                "device": devices[0].device_kind,
                "devices": len(devices),
                "processes": jax.process_count(),
            },
        }
        if local and not os.environ.get("WANDB_DIR"):
            settings["dir"] = str(workdir)
        self.run = wandb.init(**settings)
        log.info("wandb: run %s (%s)", run_id, "resumed" if resumed else "new")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        if numbers and step >= self.run.step:  # a resume's first record may repeat a step
            self.run.log(numbers, step=step)

    def close(self, ended: str) -> None:
        """W&B takes a run's state from its exit code: 0 finished, anything else failed (a
        run that raised showed as finished before). A preemption is marked as W&B's docs
        ask, with 143 (128 + SIGTERM), so that the run shows as preempted, to be resumed."""
        if ended == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code={"finished": 0, "preempted": 143}.get(ended, 1))
