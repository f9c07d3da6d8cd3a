"""`jaxlm bench`: time full training steps on synthetic batches; no data pipeline involved,
so it runs where Grain is not installed (e.g. a bare GPU image)."""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.step import build, make_train_step, peak_flops

SYNC_EVERY = 8
log = logging.getLogger("jaxlm")


def bench(cfg: Config, steps: int = 20, warmup: int = 3) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    s = build(cfg, mesh)
    log.info("%s: %s parameters, batch %d", cfg.name, f"{s.num_params():,}", cfg.train.batch_size)
    with jax.set_mesh(mesh):
        state = s.init()
        local = cfg.train.batch_size // jax.process_count()
        rng = np.random.default_rng(cfg.train.seed)
        batch = sharding.to_global(s.objective.synthetic_batch(cfg, local, rng), mesh)
        train_step = make_train_step(s)
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = train_step(state, batch)
            if (i + 1) % SYNC_EVERY == 0:
                jax.block_until_ready(metrics)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - start) / steps
    unit, per_example = s.objective.UNIT, s.objective.items_per_example(cfg)
    per_s = cfg.train.batch_size * per_example / step_s
    peak, source = peak_flops(cfg.train.peak_flops)
    return {
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
