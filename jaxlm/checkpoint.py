"""Orbax checkpoints holding everything a resume or an evaluation needs, in one step directory:

    WORKDIR/checkpoints/<step>/{state, data, config, tokenizer}

`state` is the sharded train state, `data` the Grain iterator position (one file per process),
`config` the full config as JSON and `tokenizer` the tokenizer (sentencepiece or WordPiece).
The state restores onto whatever shardings the caller's abstract state carries: any mesh, one
CPU device too; a step without `data` (an imported checkpoint) starts the data afresh.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import CheckpointConfig, Config

log = logging.getLogger("jaxlm")


class Checkpointer:
    def __init__(self, workdir: str | Path, cfg: CheckpointConfig):
        self.root = Path(workdir).absolute() / "checkpoints"
        self.quarantine = Path(workdir).absolute() / "checkpoints_unreadable"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.root, options=options)

    def steps(self) -> list[int]:
        """Finalised steps, newest first (Orbax never lists a save that did not finish)."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: Any, data_iter: Any, cfg: Config, tokenizer):
        args = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config_lib.to_dict(cfg)),
            "tokenizer": ocp.args.JsonSave(tokenizer.to_dict()),
        }
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_meta(self, step: int) -> tuple[Config, Any]:
        meta = self.manager.restore(
            step,
            args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()
            ),
        )
        return config_lib.from_dict(meta["config"]), tokenizer_lib.from_dict(meta["tokenizer"])

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restore the state onto abstract_state's shardings (and the iterator in place)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and (self.root / str(step) / "data").is_dir():
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif data_iter is not None:
            log.info("step %d has no data iterator state (imported?): data starts afresh", step)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def set_aside(self, step: int, error: Exception) -> None:
        """An unreadable step is moved out of the manager's way (never deleted): the run goes
        on from an older step, and the bad one stays on disk for a post-mortem."""
        self.quarantine.mkdir(parents=True, exist_ok=True)
        target = self.quarantine / str(step)
        log.warning(
            "checkpoint step %d in %s is unreadable (%s: %.200s); moved to %s, trying an older one",
            step,
            self.root,
            type(error).__name__,
            error,
            target,
        )
        if target.exists():
            target = self.quarantine / f"{step}.{len(list(self.quarantine.iterdir()))}"
        if jax.process_index() == 0:
            shutil.move(str(self.root / str(step)), target)
        multihost_utils.sync_global_devices(f"jaxlm_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
