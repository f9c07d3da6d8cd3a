"""Orbax checkpoints holding everything a resume or an evaluation needs, in one step directory:

    WORKDIR/checkpoints/<step>/{state, config, tokenizer}

`state` is the sharded train state (its `step` is also the data position: batches are a pure
function of the step, see data.py), `config` the full config as JSON and `tokenizer` the
tokenizer. The state restores onto whatever shardings the caller's abstract state carries:
any mesh, any number of processes, one CPU device too. WORKDIR may be local or a URL
(`gs://bucket/run`): Orbax writes through tensorstore, the rest through etils.epath.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import CheckpointConfig, Config, ConfigError, error_chain
from jaxlm.inputs import is_remote

log = logging.getLogger("jaxlm")

# Evidence that a step's own files are damaged (missing, truncated, unparsable): the only
# reason to set a step aside. Anything else (out of memory after a mesh change, an I/O error
# of a network filesystem, a tree that no longer matches) fails the run with its error.
DAMAGE_ERRORS = (FileNotFoundError, json.JSONDecodeError, EOFError, UnicodeDecodeError)
DAMAGE_MARKERS = (
    "DATA_LOSS",
    "NOT_FOUND",
    "No such file",
    "OUT_OF_RANGE",
    "Unexpected end",
    "nexpected EOF",
    "runcated",
    "orrupt",
    "Error decoding",
    "Error parsing",
    "not valid JSON",
)


# Orbax's replica-parallel save splits each replicated array into one slice per replica, each
# cut by its own dispatched op: worth it for the large arrays of a data-parallel pod, not for
# norm scales and biases (a tiny run's two saves on 8 devices cut 962 slices, 1.7 s of its
# 7.4 s). Arrays whose slice per replica would be under 1 MiB are written whole by replica 0.
MIN_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    """Orbax's jax.Array handler as registered by default (its array metadata store kept),
    with MIN_SLICE_BYTES; once per process (Orbax's registry is global)."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(default, "_min_slice_bytes_for_replica_parallel", None) == MIN_SLICE_BYTES:
        return
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES,
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    absl = logging.getLogger("absl")  # its "overriding jax.Array" warning is this, on purpose
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl.setLevel(level)


class RestoreError(RuntimeError):
    """A checkpoint could not be restored for a reason other than damage to its files: the
    run stops with it, and nothing is moved."""


class NoReadableCheckpoint(ConfigError):
    """Checkpoints exist and none restores: the run never starts over on top of them."""


def damage(error: BaseException) -> bool:
    """Whether an exception from restoring a step shows that the step's files are damaged."""
    return any(
        isinstance(e, DAMAGE_ERRORS) or any(m in str(e) for m in DAMAGE_MARKERS)
        for e in error_chain(error)
    )


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A local workdir made absolute; a URL (gs://...) kept as it is."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def retention(cfg: CheckpointConfig) -> ocp.checkpoint_managers.PreservationPolicy:
    """Which saves stay: the newest `checkpoint.keep` at multiples of `checkpoint.every`, and
    the newest save of any kind. A save made by the clock (`checkpoint.every_minutes`), at a
    preemption or at the end is temporary, as Levanter's time-based saves are: it goes once a
    newer save exists. Counting every save alike, a slow run's 15-minute saves pushed out its
    every-N-steps milestones."""
    managers = ocp.checkpoint_managers
    return managers.AnyPreservationPolicy(
        [managers.LatestN(1), managers.EveryNSteps(cfg.every, max_to_keep=cfg.keep)]
    )


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, cfg: CheckpointConfig, create: bool = True):
        """create=False: only read (eval, generate, a tokenizer or --init-from source), so a
        mistyped workdir is an error naming it, not a new empty WORKDIR/checkpoints."""
        _register_array_handler()
        self.workdir = workdir_path(workdir)
        if is_remote(str(self.workdir)):
            # fsspec keeps bucket listings for the life of the process: without this, a
            # second load of a run that has saved since (a notebook, `jaxlm eval` in-process)
            # would find only the steps of the first listing.
            epath.backend.fsspec_backend.fs(self.workdir).invalidate_cache()
        self.root = self.workdir / "checkpoints"
        self.quarantine = self.workdir / "checkpoints_unreadable"
        options = ocp.CheckpointManagerOptions(
            preservation_policy=retention(cfg),
            enable_async_checkpointing=cfg.async_save,
            create=create,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(use_ocdbt=cfg.ocdbt),
            "config": ocp.JsonCheckpointHandler(),
            "tokenizer": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.root, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        """Finalised steps, newest first (Orbax never lists a save that did not finish)."""
        return sorted(self.manager.all_steps(), reverse=True)

    def warn_of_retention(self, cfg: CheckpointConfig) -> None:
        """Say which earlier steps this run's retention will delete when a rerun changed
        `checkpoint.every`: every step not a multiple of it goes at the next save. (The newest
        step alone off the multiples is a preemption's or the clock's save: no warning.)"""
        steps = self.steps()
        if any(s % cfg.every for s in steps[1:]):
            temporary = sorted(s for s in steps if s % cfg.every)
            log.warning(
                "checkpoint.every=%d: steps %s in %s are not multiples of it, so the next save "
                "deletes them (checkpoint.keep counts multiples of checkpoint.every; copy them "
                "elsewhere to keep them)",
                cfg.every,
                ", ".join(map(str, temporary)),
                self.root,
            )

    def save(self, step: int, state: Any, cfg: Config, tokenizer) -> None:
        args = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config_lib.to_dict(cfg)),
            "tokenizer": ocp.args.JsonSave(tokenizer.to_dict()),
        }
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_meta(self, step: int) -> tuple[Config, Any]:
        meta = self.manager.restore(
            step,
            args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), tokenizer=ocp.args.JsonRestore()
            ),
        )
        return config_lib.from_dict(meta["config"]), tokenizer_lib.from_dict(meta["tokenizer"])

    def restore(self, step: int, abstract_state: Any, params_only: bool = False) -> Any:
        """The state, onto abstract_state's shardings; with params_only, the parameters alone
        (the optimizer state, twice their size, is never read: it stays Orbax's PLACEHOLDER)."""
        if params_only:
            target = {
                k: v if k == "params" else jax.tree.map(lambda _: ocp.PLACEHOLDER, v)
                for k, v in abstract_state.items()
            }
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
            # the manager's handler for "state" takes whole trees; read the item directly
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                return reader.restore(self.root / str(step) / "state", args=args)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def agreed(self, step: int, action) -> tuple[Any, Exception | None]:
        """Run action() on every process and agree on the outcome: (result, None) where all
        succeeded; (None, error) where a process found the step's files damaged. Any other
        error on any process (a config refused by the resume check too) fails every process
        with a RestoreError, and nothing is moved."""
        result, error, code = None, None, 0
        try:
            result = action()
        except Exception as e:
            error, code = e, 1 if damage(e) else 2
        codes = [code]
        if jax.process_count() > 1:
            codes = list(multihost_utils.process_allgather(np.int32(code)))
        if max(codes) == 2:
            if isinstance(error, ConfigError):
                raise error
            raise RestoreError(
                f"could not restore checkpoint {self.root}/{step}"
                + (f": {type(error).__name__}: {error}" if error else " on another process")
                + ". Its files look intact, so it was not set aside; fix the cause and rerun"
            ) from error
        if max(codes) == 1:
            return None, error or RuntimeError("damaged, as read by another process")
        return result, None

    def set_aside(self, step: int, error: Exception) -> None:
        """A damaged step, newer than the one the run resumed from, is moved out of the
        manager's way (never deleted): it stays for a post-mortem."""
        target = self.quarantine / str(step)
        log.warning(
            "checkpoint step %d in %s is damaged (%s: %.200s); moved to %s",
            step,
            self.root,
            type(error).__name__,
            error,
            target,
        )

        def move() -> None:  # beside an earlier one of the same step, if there is one
            taken = target.exists()
            n = len(list(self.quarantine.iterdir())) if taken else 0
            _move_tree(self.root / str(step), self.quarantine / f"{step}.{n}" if taken else target)

        sharding.on_process_0(f"moving step {step} to {self.quarantine}", move)
        self.manager.reload()

    def set_aside_steps(self) -> list[str]:
        """What earlier runs moved to checkpoints_unreadable/."""
        if not self.quarantine.exists():
            return []
        return sorted(p.name for p in self.quarantine.iterdir())

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check(self) -> None:
        """Raise now the error of a save that failed in the background (a full disk, a
        bucket's quota). Orbax raises it only at the next save or the end, so a run with
        checkpoint.every=1000 trained up to 1000 more steps it could not keep. A save still
        being written is not waited for; a finished one's wait returns at once."""
        if not self.manager.is_saving_in_progress():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def parse_source(spec: str) -> tuple[str, int | None]:
    """`WORKDIR[:STEP]` (gs:// URLs too) -> (workdir, step or None for the newest)."""
    head, _, tail = spec.rpartition(":")
    return (head, int(tail)) if head and tail.isdigit() else (spec, None)


def stored(
    workdir: str | os.PathLike, step: int | None, what: str = ""
) -> tuple[Checkpointer, int, Config, Any]:
    """(checkpointer, step, config, tokenizer) of a workdir's checkpoint `step` (None: the
    newest); errors start with `what` (e.g. "--init-from W: ")."""
    ckpt = Checkpointer(workdir, CheckpointConfig(async_save=False), create=False)
    steps = ckpt.steps()
    if not steps or (step is not None and step not in steps):
        ckpt.close()
        if not steps:
            missing = "" if ckpt.workdir.exists() else f" ({ckpt.workdir} does not exist)"
            raise ConfigError(f"{what}no checkpoint in {ckpt.root}{missing}")
        raise ConfigError(f"{what}no checkpoint step {step} in {ckpt.root}; steps: {sorted(steps)}")
    step = steps[0] if step is None else step
    cfg, tokenizer = ckpt.restore_meta(step)
    return ckpt, step, cfg, tokenizer


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Move a directory. Object stores (gs://) have no directories and no rename: each object
    is copied, and the originals are deleted only once every copy exists."""
    if not is_remote(str(src)):
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        return
    root = str(src).split("://", 1)[1]
    for folder, _, names in src.walk():  # folders come as "bucket/...", without the scheme
        below = str(folder).split("://")[-1][len(root) :].strip("/")
        for name in names:
            (src / below / name).copy(dst / below / name, overwrite=True)
    src.rmtree()  # through the same filesystem object as Orbax's listings: no stale cache


def check_resume(saved: Config, cfg: Config, where: str) -> None:
    """A resume may change how the run is executed, not what it computes: mesh.*, optim.*,
    checkpoint.*, train.steps and the log / eval cadence are logged; any other change is an
    error naming the keys and both values (nothing is moved or deleted)."""
    old, new = _flat(config_lib.to_dict(saved)), _flat(config_lib.to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    allowed = [k for k in changed if k.startswith(RESUMABLE_PREFIXES) or k in RESUMABLE_KEYS]
    refused = [k for k in changed if k not in allowed]
    for k in allowed:
        log.info("resume: %s changed from %r to %r", k, old.get(k), new.get(k))
    if "train.steps" in allowed:
        log.info(
            "resume: the learning-rate schedule now ends at step %d (it was made for %d): "
            "from here on the rates follow the new schedule",
            new["train.steps"],
            old["train.steps"],
        )
    if refused:
        details = "; ".join(
            f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in refused
        )
        raise ConfigError(
            f"cannot resume {where}: the config changed what the run computes ({details}). "
            "Use the checkpoint's values, or a new --workdir (resumable changes: "
            f"{', '.join(RESUMABLE_PREFIXES + RESUMABLE_KEYS)})"
        )


RESUMABLE_PREFIXES = ("mesh.", "optim.", "checkpoint.")
RESUMABLE_KEYS = (
    # how a step runs, not what it computes: e.g. resume on fewer chips with more remat
    "model.remat",
    "model.scan_layers",
    "model.attention",
    "model.max_segments",
    "model.norm_kernel",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.peak_flops",
    "train.grad_accum",
    "train.loss_chunk",
    # where metrics go and what evaluation scores, not what training computes: e.g. add
    # wandb or a zero-shot set to a running job
    "train.track",
    "train.eval_tasks",
    "clip.zeroshot",
    "clip.zeroshot_images",
    "clip.classes",
    "clip.templates",
    "name",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
