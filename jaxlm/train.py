"""The training loop: resume, data, the jitted step, evaluation, logging, checkpoints, preemption.

Run as `jaxlm train configs/gpt.py:tiny --workdir runs/gpt_tiny` (or `gs://bucket/run`).
Running it again on the same workdir resumes from the newest readable checkpoint, on whatever
mesh and number of processes the run now has. SIGTERM (preemption on TPU and SLURM) or, in a
single process, Ctrl-C saves a checkpoint at a step all processes agree on and exits 0.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.checkpoint import Checkpointer, check_resume, workdir_path
from jaxlm.config import Config, ConfigError
from jaxlm.evaluate import evaluate
from jaxlm.step import (
    OBJECTIVES,
    Setup,
    build,
    make_eval_step,
    make_train_step,
    peak_flops,
    sync_every,
)

log = logging.getLogger("jaxlm")

PREFETCH = 2  # batches put on the devices ahead of the step that needs them
PROFILE_STEPS = (3, 6)  # --profile traces steps [start + 3, start + 6): compiled and warm


def on_devices(batches, mesh, ahead: int = PREFETCH):
    """Global device batches, each transferred `ahead` steps before it is needed: the copy
    runs while the previous steps compute, so the loop never waits on the host."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(sharding.to_global(batch, mesh))
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


class Profile:
    """--profile DIR: a jax.profiler trace of a few steps (TensorBoard's profile plugin and
    Perfetto open it)."""

    def __init__(self, directory: str | os.PathLike | None, start: int):
        self.directory = None if directory is None else os.fspath(directory)
        self.first = start + PROFILE_STEPS[0]
        self.last, self.running = start + PROFILE_STEPS[1], False

    def before(self, step: int) -> None:
        if self.directory and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.running = True

    def after(self, step: int, metrics) -> None:
        if self.running and (step + 1 == self.last):
            jax.block_until_ready(metrics)
            self.stop()
            log.info("profile of steps %d..%d in %s", self.first + 1, self.last, self.directory)

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only.

    Cloud objects cannot be appended to: for a `gs://` workdir both are written to a local
    directory and copied up at every checkpoint and at the end (`sync`)."""

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        self.remote = "://" in str(workdir)
        self.workdir = workdir
        if not self.enabled:
            return
        self.local = (
            Path(tempfile.mkdtemp(prefix="jaxlm_metrics_")) if self.remote else Path(str(workdir))
        )
        self.local.mkdir(parents=True, exist_ok=True)
        self.path = self.local / "metrics.jsonl"
        if self.remote and (workdir / "metrics.jsonl").exists():
            self.path.write_text((workdir / "metrics.jsonl").read_text())  # continue the file
        self.tb = SummaryWriter(str(self.local / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, float | int):
                self.tb.add_scalar(k, v, step)

    def sync(self) -> None:
        if not self.enabled:
            return
        self.tb.flush()
        if self.remote:
            for f in [self.path, *sorted((self.local / "tensorboard").glob("*"))]:
                target = self.workdir / f.relative_to(self.local)
                target.parent.mkdir(parents=True, exist_ok=True)
                epath.Path(f).copy(target, overwrite=True)

    def close(self) -> None:
        if self.enabled:
            self.sync()
            self.tb.close()
            if self.remote:
                shutil.rmtree(self.local, ignore_errors=True)


def _plain(v):
    return v.item() if hasattr(v, "item") else v


class Preemption:
    """SIGTERM -> a step at which every process stops. Under jax.distributed, JAX's
    preemption service turns a SIGTERM on any host into the same step everywhere; a single
    process handles SIGTERM and SIGINT itself."""

    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.requested: int | None = None
        self._previous = {}
        if not self.distributed:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def reached(self, step: int) -> bool:
        if self.distributed:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fresh_tokenizer(cfg: Config, objective):
    """data.tokenizer; else a prepared entry's; else one trained on a bounded sample."""
    if cfg.data.tokenizer:
        tok = tokenizer_lib.load(cfg.data.tokenizer)
    else:
        tok = objective.default_tokenizer(cfg)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    return tok


def restore_or_init(s: Setup, ckpt: Checkpointer, cfg: Config) -> tuple[dict, int, object]:
    """(state, step, the checkpoint's tokenizer) of the newest readable checkpoint, or a fresh
    state. Every process takes the same decision; an unreadable step is set aside with a
    warning; a config that changed what the run computes is an error and nothing moves."""
    for step in ckpt.steps():
        meta, error = ckpt.agreed(step, lambda step=step: ckpt.restore_meta(step))
        if error is None:
            check_resume(meta[0], cfg, f"{ckpt.root}/{step}")
            state, error = ckpt.agreed(step, lambda step=step: ckpt.restore(step, s.abstract))
        if error is not None:
            ckpt.set_aside(step, error)
            continue
        log.info("resumed from %s/%d", ckpt.root, step)
        return state, step, meta[1]
    return s.init(), 0, None


def train(
    cfg: Config, workdir: str | os.PathLike, profile: str | os.PathLike | None = None
) -> dict:
    """Train (or resume) to cfg.train.steps; returns the last logged metrics. With profile,
    a jax.profiler trace of a few steps is written there."""
    workdir = workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    objective = OBJECTIVES[cfg.objective]
    objective.check(cfg)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    s = build(cfg, mesh)
    unit, per_example = objective.UNIT, objective.items_per_example(cfg)

    with jax.set_mesh(mesh):
        state, start, tokenizer = restore_or_init(s, ckpt, cfg)
        tokenizer = tokenizer or fresh_tokenizer(cfg, objective)
        dataset = objective.load_data(cfg, tokenizer, workdir)
        batches = on_devices(dataset.train_batches(start), mesh)
        eval_batches = dataset.eval_batches()
        train_step, eval_step = make_train_step(s), make_eval_step(s)
        flops_per_item = objective.flops_per_item(cfg)
        peak, peak_source = peak_flops(cfg.train.peak_flops)
        writer = MetricsWriter(workdir)
        baselines = objective.baselines(dataset, tokenizer, eval_batches)
        log.info(
            "%s: %s parameters, mesh %s, %d processes, steps %d..%d of %d x %d %s, workdir %s",
            cfg.name,
            f"{s.num_params():,}",
            dict(mesh.shape),
            jax.process_count(),
            start,
            cfg.train.steps,
            cfg.train.batch_size,
            per_example,
            unit,
            workdir,
        )
        log.info(
            "peak %.3g FLOP/s (%s); %s",
            peak,
            peak_source,
            " | ".join(f"{k} {v:.4f}" for k, v in baselines.items()),
        )
        writer.write(start, {**baselines, "peak_flops": peak, "peak_flops_source": peak_source})

        preemption, profiler = Preemption(), Profile(profile, start)
        every = sync_every()
        last: dict = {}
        timer, timed_steps = time.perf_counter(), 0
        try:
            for step in range(start, cfg.train.steps):
                profiler.before(step)
                state, metrics = train_step(state, next(batches))
                profiler.after(step, metrics)
                done, timed_steps = step + 1, timed_steps + 1
                final = done == cfg.train.steps
                if done % cfg.train.log_every == 0 or final or done == start + 1:
                    metrics = {k: float(v) for k, v in metrics.items() if k != "tokens"}
                    elapsed = time.perf_counter() - timer
                    per_s = timed_steps * cfg.train.batch_size * per_example / elapsed
                    metrics |= {f"{unit}_per_s": per_s, "mfu": per_s * flops_per_item / peak}
                    if not math.isfinite(metrics["loss"]):
                        raise FloatingPointError(f"loss is {metrics['loss']} at step {done}")
                    log.info(
                        "step %d/%d | loss %.4f | grad_norm %.3f | lr %.3g | %s %s/s | mfu %.2f%%",
                        done,
                        cfg.train.steps,
                        metrics["loss"],
                        metrics["grad_norm"],
                        metrics["lr"],
                        f"{per_s:,.0f}",
                        unit,
                        100 * metrics["mfu"],
                    )
                    writer.write(done, metrics)
                    last |= metrics
                    timer, timed_steps = time.perf_counter(), 0
                elif every and done % every == 0:
                    jax.block_until_ready(metrics)
                if done % cfg.train.eval_every == 0 or final:
                    ev = evaluate(eval_step, state["params"], eval_batches, mesh)
                    ev |= objective.extra_eval(s, state["params"], dataset, tokenizer)
                    log.info(
                        "step %d | %s", done, " | ".join(f"{k} {v:.4f}" for k, v in ev.items())
                    )
                    writer.write(done, ev)
                    last |= ev
                    timer, timed_steps = time.perf_counter(), 0
                preempted = preemption.reached(done)
                if done % cfg.checkpoint.every == 0 or final or preempted:
                    writer.sync()  # metrics up to here are stored by the time the step is
                    ckpt.save(done, state, cfg, tokenizer)
                if preempted:
                    ckpt.wait()
                    log.info(
                        "preempted at step %d: checkpoint saved in %s/%d", done, ckpt.root, done
                    )
                    break
            ckpt.wait()
        finally:
            profiler.stop()
            preemption.close()
            ckpt.close()
            writer.close()
    log.info("checkpoints in %s; metrics in %s", ckpt.root, workdir / "metrics.jsonl")
    return {**baselines, **last}
