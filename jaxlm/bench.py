"""`jaxlm bench`: time full training steps on synthetic batches; no data pipeline involved,
so it runs where Grain is not installed (e.g. a bare GPU image). `jaxlm bench --data` times
the data pipeline alone (no model): prepared shards, and on-the-fly tokenization of the same
text files beside it for comparison, and how many documents its rows hold (to choose
model.max_segments for a corpus)."""

from __future__ import annotations

import gzip
import logging
import os
import time
from collections.abc import Iterator

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.profile import HLO_FILE, summarize
from jaxlm.shards import document_starts
from jaxlm.step import build, make_train_step, peak_flops, sync_every

log = logging.getLogger("jaxlm")
# model.max_segments values `bench --data` reports the share of fitting batches for
MAX_SEGMENTS_CANDIDATES = (4, 8, 16, 32, 64)


def bench(cfg: Config, steps: int = 20, warmup: int = 3, profile: str | None = None) -> dict:
    """Time full training steps on one synthetic batch; with profile, a jax.profiler trace of
    3 more steps (after the timing, which it would disturb) is written there, and where their
    device time went is in the result (`profile`: milliseconds per step by part of the model,
    and the host gap; jaxlm/profile.py), from an executable compiled for the trace alone where
    the platform needs other XLA options for it (profile_compiler_options)."""
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    s = build(cfg, mesh)
    log.info("%s: %s parameters, batch %d", cfg.name, f"{s.num_params():,}", cfg.train.batch_size)
    with jax.set_mesh(mesh):
        state = s.init()
        local = cfg.train.batch_size // jax.process_count()
        rng = np.random.default_rng(cfg.train.seed)
        batch = sharding.to_global(s.objective.synthetic_batch(cfg, local, rng), mesh)
        every = sync_every()
        start = time.perf_counter()
        lowered = make_train_step(s).lower(state, batch)
        train_step = lowered.compile()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = train_step(state, batch)
            if every and (i + 1) % every == 0:
                jax.block_until_ready(metrics)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / steps
        if profile:
            options = profile_compiler_options(jax.devices()[0].platform)
            parts = _profile(lowered, train_step, options, state, batch, profile)
    unit, per_example = s.objective.UNIT, s.objective.items_per_example(cfg)
    per_s = cfg.train.batch_size * per_example / step_s
    peak, source = peak_flops(cfg.train.peak_flops)
    result = {
        "config": cfg.name,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "params": s.num_params(),
        "batch": f"{cfg.train.batch_size}x{per_example} {unit}",
        "step_ms": round(step_s * 1e3, 2),
        f"{unit}_per_s": round(per_s),
        "mfu": round(per_s * s.objective.flops_per_item(cfg) / peak, 4),
        "peak_flops": peak,
        "peak_flops_source": source,
        "compile_s": round(compile_s, 1),
        "loss": round(float(metrics["loss"]), 4),
    }
    if "max_segments_exceeded" in metrics:  # with model.max_segments: how many of the timed
        # step's micro-batches ran the dense mask, not cuDNN's packed layout (on a Hopper GPU)
        result["max_segments_exceeded"] = int(metrics["max_segments_exceeded"])
    return result | ({"profile": parts} if profile else {})


def profile_compiler_options(platform: str) -> dict[str, str]:
    """XLA options for the traced steps' executable on `platform`. On a GPU, XLA runs a step
    as CUDA graphs ("command buffers"), and a trace then holds one operation,
    `command_buffer_1`, for the whole step: no part of the model can be told from another
    (seen on an H200, 2026-12-04). The traced steps therefore run without them; the timing
    before keeps XLA's default (BENCHMARKS.md: 29.73 vs 29.91 ms on GPT-2 124M)."""
    return {"xla_gpu_enable_command_buffer": ""} if platform == "gpu" else {}


def _profile(
    lowered, train_step, options: dict, state: dict, batch: dict, trace_dir: str, steps: int = 3
) -> dict:
    """Trace `steps` more steps into trace_dir and say where their device time went
    (jaxlm/profile.py); with options (profile_compiler_options), from `lowered` compiled
    again with them, named in the result. A trace that cannot be taken or read (no CUPTI, a
    trace format this reader does not know, options this XLA refuses) costs the profile,
    `{"error": ...}`, never the timing before it."""
    try:
        if options:  # the same program, compiled again for the trace alone
            train_step = lowered.compile(compiler_options=options)
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                state, metrics = train_step(state, batch)
            jax.block_until_ready(metrics)
        hlo = train_step.as_text()
        with gzip.open(os.path.join(trace_dir, HLO_FILE), "wt") as f:
            f.write(hlo)  # the trace names kernels by these HLO ops: read both after the run
        log.info("profile of %d steps in %s (with the program, %s)", steps, trace_dir, HLO_FILE)
        parts = summarize(trace_dir, hlo, steps, "train_step")
    except Exception as error:  # noqa: BLE001 (whatever the profiler raises)
        log.error("no profile from %s: %s", trace_dir, error)
        return {"error": f"{type(error).__name__}: {error}"}
    log.info(
        "device time per step (ms): %s; host gap %.1f%%",
        parts["ms_per_step"],
        100 * parts["host_gap"],
    )
    return parts | ({"compiler_options": options} if options else {})


def bench_data(cfg: Config, steps: int, workdir: str) -> dict:
    """Tokens per second this process's training batches arrive at, without a model."""
    from jaxlm import data
    from jaxlm import tokenizer as tokenizer_lib
    from jaxlm.step import OBJECTIVES

    objective = OBJECTIVES[cfg.objective]
    tok = (
        tokenizer_lib.load(cfg.data.tokenizer)
        if cfg.data.tokenizer
        else objective.default_tokenizer(cfg, workdir)
    )
    per_batch = cfg.train.batch_size // jax.process_count() * cfg.model.seq_len
    dataset = objective.load_data(cfg, tok, workdir)
    result = {
        "config": cfg.name,
        "seq_len": cfg.model.seq_len,
        "local_batch": cfg.train.batch_size // jax.process_count(),
        "prepared_tokens_per_s": round(_rate(dataset.train_batches(0), steps, per_batch)),
    }
    result |= documents_per_row(dataset.train_batches(0), steps, cfg.model.max_segments)
    raw = [e for e in data.entries(cfg.data) if not data.is_prepared(e)]
    if raw:
        it = _tokenize_on_the_fly(raw, tok, cfg)
        result["on_the_fly_tokens_per_s"] = round(_rate(it, steps, per_batch))
    return result


def documents_per_row(batches: Iterator[dict], steps: int, max_segments: int = 0) -> dict:
    """How many documents the rows of `steps` batches hold, and the share of batches whose
    every row holds at most M: those run cuDNN's packed layout with model.max_segments=M (on
    a Hopper GPU), the others the dense mask. This process's rows: with several processes a
    step needs every process's rows to fit, so the share is an upper bound."""
    counts = np.stack([document_starts(next(batches)["segment_ids"]).sum(-1) for _ in range(steps)])
    most = counts.max(axis=1)  # per batch
    candidates = sorted({*MAX_SEGMENTS_CANDIDATES, max_segments} - {0})
    return {
        "documents_per_row": {"mean": round(float(counts.mean()), 2), "max": int(most.max())},
        "batches_within_max_segments": {
            str(m): round(float((most <= m).mean()), 4) for m in candidates
        },
    }


def _rate(batches, steps: int, tokens_per_batch: int) -> float:
    for _ in range(3):  # let the read threads fill their buffers
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * tokens_per_batch / (time.perf_counter() - start)


def _tokenize_on_the_fly(entries: list[str], tok, cfg: Config):
    """The pipeline jaxlm had before prepared shards: documents read whole into memory and
    tokenized by Grain's read threads, then concatenated and split into rows."""
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    from jaxlm import data, inputs

    docs = [
        d
        for e in entries
        for u in inputs.plan_units(data.raw_files(e))
        for d in inputs.documents(u, cfg.data.text_field)
    ]

    def tokenize(doc: str) -> dict:
        ids = tok.encode(doc)
        return {"tokens": np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)}

    ds = grain.MapDataset.source(docs).shuffle(seed=0).repeat(None).map(tokenize)
    ds = ConcatThenSplitIterDataset(
        ds.to_iter_dataset(), length_struct={"tokens": cfg.model.seq_len + 1}
    )
    return iter(ds.batch(cfg.train.batch_size // jax.process_count(), drop_remainder=True))
