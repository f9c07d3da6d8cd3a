"""Load any checkpoint onto this machine's devices (one CPU is enough) and evaluate it.

from jaxlm.evaluate import load
loaded = load("runs/gpt_tiny")            # newest step, parameters sharded over all devices
model = loaded.setup.model(loaded.params)  # an NNX module: logits = model(batch)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer, workdir_path
from jaxlm.config import CheckpointConfig, Config, ConfigError, MeshConfig
from jaxlm.step import Setup, build, make_eval_step
from jaxlm.tokenizer import Tokenizer


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict:
    """Token-weighted means of eval_step's metrics over host batches (each process passes
    its share of every global batch)."""
    sums: dict = {}
    for b in batches:
        for k, v in eval_step(params, sharding.to_global(b, mesh)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    tokens = max(sums.pop("tokens"), 1.0)
    return {f"eval_{k}": v / tokens for k, v in sums.items()}


@dataclasses.dataclass
class Loaded:
    cfg: Config
    setup: Setup
    params: Any
    tokenizer: Tokenizer
    step: int


def load(
    workdir: str | os.PathLike,
    step: int | None = None,
    overrides: list[str] = (),
    params_only: bool = False,
) -> Loaded:
    """Restore a checkpoint's parameters onto a mesh of this machine's devices. The mesh is
    fsdp over all devices unless overrides (e.g. `mesh.data=2`) say otherwise. params_only:
    the optimizer state is not read at all (a third of the memory)."""
    ckpt = Checkpointer(workdir, CheckpointConfig())
    steps = ckpt.steps()
    if not steps:
        raise ConfigError(f"no checkpoint in {ckpt.root}")
    step = steps[0] if step is None else step
    if step not in steps:
        raise ConfigError(f"no checkpoint step {step} in {ckpt.root}; steps: {sorted(steps)}")
    cfg, tokenizer = ckpt.restore_meta(step)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    cfg = config_lib.override(cfg, list(overrides))
    mesh = sharding.make_mesh(cfg.mesh)
    s = build(cfg, mesh)
    with jax.set_mesh(mesh):
        state = ckpt.restore(step, s.abstract, params_only)
    ckpt.close()
    return Loaded(cfg, s, state["params"], tokenizer, step)


def evaluate_checkpoint(
    workdir: str | os.PathLike, step: int | None = None, overrides: list[str] = ()
) -> dict:
    """Held-out metrics of a checkpoint, on the split its own config defines (the baselines
    from the prepared token counts: nothing re-reads the corpus)."""
    loaded = load(workdir, step, overrides)
    cfg, mesh, objective = loaded.cfg, loaded.setup.mesh, loaded.setup.objective
    sharding.check_batch(cfg.train.batch_size, 1, mesh)
    dataset = objective.load_data(cfg, loaded.tokenizer, workdir_path(workdir))
    batches = dataset.eval_batches()
    with jax.set_mesh(mesh):
        metrics = evaluate(make_eval_step(loaded.setup), loaded.params, batches, mesh)
        metrics |= objective.extra_eval(loaded.setup, loaded.params, dataset, loaded.tokenizer)
    baselines = objective.baselines(dataset, loaded.tokenizer, batches)
    return {"step": loaded.step, **metrics, **baselines}
