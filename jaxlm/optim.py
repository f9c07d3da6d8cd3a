"""AdamW with linear warmup, cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from jaxlm.config import OptimConfig
from jaxlm.layers import EMBED, LAYERS


def schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params: nnx.State) -> nnx.State:
    """Decay the weight matrices only, not biases, norm scales or the CLIP temperature (as
    GPT-2 and Llama). A matrix maps to or from the model width: it has an `embed` axis and at
    least one other besides `layers`. Neither ndim nor the axis count alone tells: stacked
    layers make every bias 2-D, and a q/k/v bias is [heads, kv]."""

    def decays(v: nnx.Variable) -> nnx.Variable:
        axes = [a for a in v.get_metadata()["axes"] if a != LAYERS]
        return v.replace(EMBED in axes and len(axes) >= 2)

    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            schedule(cfg, steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
