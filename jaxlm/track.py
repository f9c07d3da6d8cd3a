"""Weights & Biases tracking: `train.track=tensorboard,jsonl,wandb` (optional extra:
`pip install 'jaxlm[wandb]'`).

From process 0 only, like the other writers. The run's config holds jaxlm's whole config, the
parameter count and the devices. The run id is stored in WORKDIR/wandb_run_id before the run
starts, so a resume (a preempted run's rerun included) continues the same W&B run instead of
starting a new one. WANDB_PROJECT (default `jaxlm`), WANDB_ENTITY, WANDB_MODE (`offline`: no
server) and WANDB_DIR are W&B's own variables and are honoured as W&B honours them; without
WANDB_DIR a local workdir holds W&B's files (`WORKDIR/wandb/`).
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

import jax
from etils import epath

from jaxlm import config as config_lib
from jaxlm.config import Config, ConfigError

log = logging.getLogger("jaxlm")
RUN_ID = "wandb_run_id"


class Wandb:
    def __init__(self, workdir: epath.Path, cfg: Config, num_params: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "train.track includes wandb, which is not installed: pip install 'jaxlm[wandb]'"
            ) from None
        id_file = workdir / RUN_ID
        resumed = id_file.exists()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        if not resumed:
            id_file.write_text(run_id + "\n")
        local = "://" not in str(workdir)
        devices = jax.devices()
        settings = {
            "project": os.environ.get("WANDB_PROJECT") or "jaxlm",
            "id": run_id,
            "resume": "allow",
            "name": str(workdir).rstrip("/").rsplit("/", 1)[-1],
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

    def close(self) -> None:
        self.run.finish()
