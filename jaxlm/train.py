"""The training loop: resume, data, the jitted step, evaluation, logging, checkpoints, preemption.

Run as `jaxlm train configs/gpt.py:tiny --workdir runs/gpt_tiny` (or `gs://bucket/run`).
Running it again on the same workdir resumes from the newest readable checkpoint, on whatever
mesh and number of processes the run now has. SIGTERM (preemption on TPU and SLURM) or, in a
single process, Ctrl-C saves a checkpoint at a step all processes agree on and exits 0.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import checks, sharding, track
from jaxlm import evaluate as evaluate_lib
from jaxlm import start as start_lib
from jaxlm.checkpoint import Checkpointer, workdir_path
from jaxlm.config import Config
from jaxlm.failures import Diverged
from jaxlm.step import (
    OBJECTIVES,
    build,
    make_eval_step,
    make_train_step,
    peak_flops,
    sync_every,
)

log = logging.getLogger("jaxlm")

PREFETCH = 2  # batches put on the devices ahead of the step that needs them
PROFILE_STEPS = (3, 6)  # --profile traces steps [start + 3, start + 6): compiled and warm


def diverged(loss: float, step: int, cfg: Config, ckpt: Checkpointer) -> None:
    """Raise Diverged if `loss` is not finite, saying where a rerun would start and what to
    change (a rerun alone computes the same steps again)."""
    if math.isfinite(loss):
        return
    steps = ckpt.steps()
    newest = f"step {steps[0]}" if steps else "none yet (a rerun starts over)"
    o = cfg.optim
    clip = ", or clip the gradients: optim.clip_norm=1 (now 0)" if not o.clip_norm else ""
    raise Diverged(
        f"the loss is {loss} at step {step} (checked every train.log_every={cfg.train.log_every} "
        f"steps and before each save); the newest checkpoint: {newest}. A rerun as it is "
        f"diverges again: lower optim.lr (now {o.lr:g}) or raise optim.warmup_steps (now "
        f"{o.warmup_steps}){clip}; a resume accepts optim.* changes"
    )


def on_devices(
    batches: Iterator[dict], mesh: jax.sharding.Mesh, ahead: int = PREFETCH
) -> Iterator[dict]:
    """Global device batches, each transferred `ahead` steps before it is needed: the copy
    runs while the previous steps compute, so the loop never waits on the host. Closing it
    closes `batches` (Grain's worker processes and their shared memory with it)."""
    queue: collections.deque = collections.deque()
    try:
        for batch in batches:
            queue.append(sharding.to_global(batch, mesh))
            if len(queue) > ahead:
                yield queue.popleft()
        yield from queue
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


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


class TimedSaves:
    """checkpoint.every_minutes: a save once that long has passed since the last save (or the
    start). Decided at logging steps, where the loop reads the metrics anyway, by process 0's
    clock, broadcast: every process saves at the same step."""

    def __init__(self, minutes: float):
        self.seconds, self.last = 60.0 * minutes, time.monotonic()

    def due(self) -> bool:
        if not self.seconds:
            return False
        late = time.monotonic() - self.last >= self.seconds
        if jax.process_count() > 1:
            late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
        return late

    def saved(self) -> None:
        self.last = time.monotonic()


class Fallbacks:
    """With model.max_segments, how many micro-batches ran the dense mask because a row held
    more documents (on a Hopper GPU; elsewhere the dense mask is all there is): summed on the
    device every step (the metric `max_segments_exceeded`), read where the loop logs."""

    def __init__(self, cfg: Config):
        self.max_segments, self.accum = cfg.model.max_segments, cfg.train.grad_accum
        self.pending, self.total, self.counted = None, 0, 0

    def add(self, metrics: dict) -> None:
        n = metrics.pop("max_segments_exceeded", None)
        if n is not None:
            self.pending = n if self.pending is None else self.pending + n
            self.counted += self.accum

    def since_last_log(self) -> dict:
        if self.pending is None:
            return {}
        n, self.pending = int(self.pending), None
        self.total += n
        return {"max_segments_exceeded": n}

    def report(self) -> None:
        if self.counted:
            self.since_last_log()
            log.info(
                "model.max_segments=%d: %d of %d micro-batches held a row of more documents "
                "(the dense mask ran for them on a Hopper GPU)",
                self.max_segments,
                self.total,
                self.counted,
            )


def _joined(metrics: dict) -> str:
    """`k v | k v` for a log line: means to 4 decimals, counts (ints) as they are."""
    return " | ".join(
        f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items()
    )


def train(
    cfg: Config,
    workdir: str | os.PathLike,
    profile: str | os.PathLike | None = None,
    init: str | None = None,
) -> dict:
    """Train (or resume) to cfg.train.steps; returns the last logged metrics. With profile,
    a jax.profiler trace of a few steps is written there. With init (`WORKDIR[:STEP]`), a
    fresh run starts from that checkpoint's parameters; once the run has checkpoints of its
    own, it resumes from them as any run does."""
    workdir = workdir_path(workdir)
    checks.output_directory(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    objective = OBJECTIVES[cfg.objective]
    objective.check(cfg)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    s = build(cfg, mesh)
    unit, per_example = objective.UNIT, objective.items_per_example(cfg)

    with jax.set_mesh(mesh):
        if init and not ckpt.steps() and not ckpt.set_aside_steps():
            (state, tokenizer), start = start_lib.init_from(s, init), 0
        else:
            state, start, tokenizer = start_lib.restore_or_init(s, ckpt, cfg)
            if init:
                log.info("--init-from %s: not used, the run resumes from its own checkpoints", init)
        tokenizer = tokenizer or start_lib.fresh_tokenizer(cfg, objective, workdir)
        dataset = objective.load_data(cfg, tokenizer, workdir)
        batches = on_devices(dataset.train_batches(start), mesh)
        eval_sets = dataset.eval_sets()
        train_step, eval_step = make_train_step(s), make_eval_step(s)
        flops_per_item = objective.flops_per_item(cfg)
        peak, peak_source = peak_flops(cfg.train.peak_flops)
        tracker = functools.partial(track.Wandb, workdir, cfg, s.num_params())
        writer = track.MetricsWriter(workdir, start, cfg.train.track, tracker)
        baselines = evaluate_lib.baselines(objective, dataset, tokenizer, eval_sets)
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
        if start >= cfg.train.steps:  # a finished run rerun (a requeued job), or steps lowered
            log.warning(
                "nothing to train: the checkpoint is at step %d and train.steps=%d (raise "
                "train.steps to train on)",
                start,
                cfg.train.steps,
            )
        log.info(
            "peak %.3g FLOP/s (%s); %s",
            peak,
            peak_source,
            _joined(baselines),
        )
        writer.write(start, {**baselines, "peak_flops": peak, "peak_flops_source": peak_source})

        preemption, profiler = Preemption(), Profile(profile, start)
        timed = TimedSaves(cfg.checkpoint.every_minutes)
        every = sync_every()
        last: dict = {}
        timer, timed_steps = time.perf_counter(), 0
        fallbacks = Fallbacks(cfg)
        preempted, ended = False, "failed"  # what the trackers are told if anything raises
        try:
            for step in range(start, cfg.train.steps):
                profiler.before(step)
                state, metrics = train_step(state, next(batches))
                profiler.after(step, metrics)
                fallbacks.add(metrics)
                done, timed_steps = step + 1, timed_steps + 1
                final = done == cfg.train.steps
                late = False
                if done % cfg.train.log_every == 0 or final or done == start + 1:
                    late = timed.due()
                    metrics = {k: float(v) for k, v in metrics.items() if k != "tokens"}
                    metrics |= fallbacks.since_last_log()
                    elapsed = time.perf_counter() - timer
                    per_s = timed_steps * cfg.train.batch_size * per_example / elapsed
                    metrics |= {f"{unit}_per_s": per_s, "mfu": per_s * flops_per_item / peak}
                    diverged(metrics["loss"], done, cfg, ckpt)
                    log.info(
                        "step %d/%d | loss %.4f | grad_norm %.3f | lr %.3g | %s %s/s | mfu "
                        "%.2f%%%s",
                        done,
                        cfg.train.steps,
                        metrics["loss"],
                        metrics["grad_norm"],
                        metrics["lr"],
                        f"{per_s:,.0f}",
                        unit,
                        100 * metrics["mfu"],
                        # logged alone so that the next interval's speed is the steps' own
                        " (compile included)" if done == start + 1 else "",
                    )
                    writer.write(done, metrics)
                    last |= metrics
                    ckpt.check()
                    timer, timed_steps = time.perf_counter(), 0
                elif every and done % every == 0:
                    jax.block_until_ready(metrics)
                if eval_sets and (done % cfg.train.eval_every == 0 or final):
                    ev = evaluate_lib.evaluate(eval_step, state["params"], eval_sets, mesh)
                    ev |= objective.extra_eval(s, state["params"], dataset, tokenizer)
                    log.info("step %d | %s", done, _joined(ev))
                    writer.write(done, ev)
                    last |= ev
                    timer, timed_steps = time.perf_counter(), 0
                preempted = preemption.reached(done)
                if done % cfg.checkpoint.every == 0 or final or preempted or late:
                    diverged(float(metrics["loss"]), done, cfg, ckpt)  # never saved
                    if late:
                        minutes = (time.monotonic() - timed.last) / 60
                        log.info(
                            "checkpoint at step %d: %.1f minutes since the last", done, minutes
                        )
                    writer.sync()  # metrics up to here are stored by the time the step is
                    ckpt.save(done, state, cfg, tokenizer)
                    timed.saved()
                    # as after an evaluation: the next interval's speed is the steps' own,
                    # without the save's blocking part (its device-to-host copy)
                    timer, timed_steps = time.perf_counter(), 0
                if preempted:
                    ckpt.wait()
                    log.info(
                        "preempted at step %d: checkpoint saved in %s/%d", done, ckpt.root, done
                    )
                    break
            ckpt.wait()
            fallbacks.report()
            ended = "preempted" if preempted else "finished"
        finally:
            batches.close()
            profiler.stop()
            preemption.close()
            ckpt.close()
            writer.close(ended)
    log.info("checkpoints in %s; metrics in %s", ckpt.root, workdir / "metrics.jsonl")
    return {**baselines, **last}
