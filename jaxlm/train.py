"""The training loop: data, resume, the jitted step, evaluation, logging, checkpoints.

Run as `jaxlm train configs/gpt.py:tiny --workdir runs/gpt_tiny`. Running it again on the same
workdir resumes from the newest readable checkpoint, on whatever mesh the config now asks for.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.step import OBJECTIVES, Setup, build, make_eval_step, make_train_step, peak_flops

log = logging.getLogger("jaxlm")

SYNC_EVERY = 8  # steps; CPU collectives deadlock when too many steps are queued unsynced


class MetricsWriter:
    """metrics.jsonl (one JSON object per line) and TensorBoard events, from process 0 only."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self.path = workdir / "metrics.jsonl"
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, float | int):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def get_tokenizer(cfg: Config, ckpt: Checkpointer, texts: list[str]):
    """The checkpoint's tokenizer when resuming; else data.tokenizer; else train one."""
    for step in ckpt.steps():
        try:
            return ckpt.restore_meta(step)[1]
        except Exception as e:  # an unreadable step is handled by the state restore below
            log.warning("checkpoint step %d: tokenizer unreadable (%s)", step, e)
    if cfg.data.tokenizer:
        tok = tokenizer_lib.load(cfg.data.tokenizer)
    else:
        start = time.perf_counter()
        tok = tokenizer_lib.train(texts, cfg.model.vocab_size)
        log.info(
            "trained a %d-token sentencepiece model in %.1fs",
            tok.vocab_size,
            time.perf_counter() - start,
        )
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    return tok


def restore_or_init(s: Setup, ckpt: Checkpointer, train_ds) -> tuple[dict, object, int]:
    """Newest readable checkpoint (state + iterator), else a fresh state. Unreadable steps are
    set aside with a warning, never loaded as garbage and never deleted."""
    for step in ckpt.steps():
        it = iter(train_ds)
        try:
            state = ckpt.restore(step, s.abstract, it)
        except Exception as e:
            ckpt.set_aside(step, e)
            continue
        log.info("resumed from %s/%d", ckpt.root, step)
        return state, it, step
    return s.init(), iter(train_ds), 0


def held_out_batches(cfg: Config, held_out, tokenizer, objective) -> list[dict]:
    """The same train.eval_steps host batches of the held-out split at every evaluation."""
    local_batch = cfg.train.batch_size // jax.process_count()
    seed = cfg.train.seed + 1
    it = iter(objective.pipeline(cfg, held_out, tokenizer, local_batch, seed, training=False))
    return [next(it) for _ in range(cfg.train.eval_steps)]


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict:
    sums: dict = {}
    for b in batches:
        for k, v in eval_step(params, sharding.to_global(b, mesh)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    tokens = max(sums.pop("tokens"), 1.0)
    return {f"eval_{k}": v / tokens for k, v in sums.items()}


def train(cfg: Config, workdir: str | Path) -> dict:
    """Train (or resume) to cfg.train.steps; returns the last logged metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    objective = OBJECTIVES[cfg.objective]
    train_items, held_out = objective.load_splits(cfg)
    ckpt = Checkpointer(workdir, cfg.checkpoint)
    tokenizer = get_tokenizer(cfg, ckpt, objective.texts(train_items))

    s = build(cfg, mesh)
    unit, per_example = objective.UNIT, objective.items_per_example(cfg)
    local_batch = cfg.train.batch_size // jax.process_count()
    # Building the pipeline checks that the tokenizer suits the objective, before any step.
    train_ds = objective.pipeline(cfg, train_items, tokenizer, local_batch, cfg.train.seed)

    with jax.set_mesh(mesh):
        state, it, start = restore_or_init(s, ckpt, train_ds)
        eval_batches = held_out_batches(cfg, held_out, tokenizer, objective)
        train_step, eval_step = make_train_step(s), make_eval_step(s)
        flops_per_item = objective.flops_per_item(cfg)
        peak, peak_source = peak_flops(cfg.train.peak_flops)
        writer = MetricsWriter(workdir)
        baselines = objective.baselines(train_items, tokenizer, eval_batches)
        log.info(
            "%s: %s parameters, mesh %s, %d steps of %d x %d %s, workdir %s",
            cfg.name,
            f"{s.num_params():,}",
            dict(mesh.shape),
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

        last: dict = {}
        timer, timed_steps = time.perf_counter(), 0
        for step in range(start, cfg.train.steps):
            state, metrics = train_step(state, sharding.to_global(next(it), mesh))
            done, timed_steps = step + 1, timed_steps + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or done == start + 1:
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
            elif done % SYNC_EVERY == 0:
                jax.block_until_ready(metrics)
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                ev = evaluate(eval_step, state["params"], eval_batches, mesh)
                ev |= objective.extra_eval(s, state["params"], held_out, tokenizer)
                log.info("step %d | %s", done, " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                writer.write(done, ev)
                last |= ev
                timer, timed_steps = time.perf_counter(), 0
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                ckpt.save(done, state, it, cfg, tokenizer)
        ckpt.wait()
        ckpt.close()
        writer.close()
    log.info("checkpoints in %s; metrics in %s", ckpt.root, workdir / "metrics.jsonl")
    return {**baselines, **last}
