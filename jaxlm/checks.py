"""The checks a whole Config must pass before anything runs (config.override calls
`validate` on every load and override): choices, numeric ranges and the rules between keys,
so that a mistake is named by its key instead of surfacing deep inside a jitted function.
Mesh and data checks happen where the devices and the files are known."""

from __future__ import annotations

import os
import typing
from typing import Any, Literal

from jaxlm.config import Config, ConfigError, leaf_keys, source_entries


def validate(cfg: Config) -> None:
    """Raise a ConfigError naming the first key that breaks a rule."""
    for key, t in leaf_keys(Config).items():
        value, allowed = _get(cfg, key), _choices(t)
        several = isinstance(value, tuple)
        if allowed and not set(value if several else [value]) <= set(allowed):
            expected = "expected each to be one of" if several else "expected one of"
            raise ConfigError(f"config key {key!r} is {value!r}; {expected} {allowed}")
    m, t = cfg.model, cfg.train
    for key, interval in RANGES.items():
        if not _within(value := _get(cfg, key), interval):
            raise ConfigError(f"config key {key!r} must be {_said(interval)}, got {value}")
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}"
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.kv_heads}"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if m.max_positions and m.max_positions < m.seq_len:
        raise ConfigError(
            f"model.max_positions={m.max_positions} is shorter than model.seq_len={m.seq_len}"
        )
    if m.position == "rope" and m.head_size % 2:
        raise ConfigError(f"rope needs an even head size, got {m.head_size}")
    if not m.document_mask and cfg.objective != "lm":
        raise ConfigError(
            f"model.document_mask=false is for the causal LM only: a {cfg.objective} model "
            "would see across padding and documents"
        )
    if not 0 <= m.max_segments <= m.seq_len:
        raise ConfigError(
            f"model.max_segments must be in [0, model.seq_len={m.seq_len}] (0: the dense mask), "
            f"got {m.max_segments}"
        )
    if m.norm_kernel == "pallas":  # a row of d positions is one block of the kernels
        from jaxlm.fused_norm import MAX_D

        widths = {"model.d_model": m.d_model}
        widths |= {"vision.d_model": cfg.vision.d_model} if cfg.objective == "clip" else {}
        for key, d in widths.items():
            if d > MAX_D:
                raise ConfigError(
                    f"{key}={d} is over {MAX_D}, the widest row model.norm_kernel=pallas "
                    "normalises; use model.norm_kernel=xla"
                )
    if cfg.mlm.max_predictions > m.seq_len:
        raise ConfigError(
            f"mlm.max_predictions={cfg.mlm.max_predictions} is more than model.seq_len="
            f"{m.seq_len} (at most one prediction per position; 0: mask_rate * seq_len)"
        )
    if t.eval_tasks and cfg.objective != "lm":
        raise ConfigError(
            f"train.eval_tasks scores next tokens, for the causal LM only; this config's "
            f"objective is {cfg.objective!r}"
        )
    mlm = cfg.mlm
    if (
        not (0 <= mlm.mask_token_rate and 0 <= mlm.random_token_rate)
        or mlm.mask_token_rate + mlm.random_token_rate > 1
    ):
        raise ConfigError(
            "mlm.mask_token_rate and mlm.random_token_rate must be >= 0 and sum to at most 1, "
            f"got {mlm.mask_token_rate} and {mlm.random_token_rate}"
        )
    # before any entry is read or prepared: a mistake here should not wait for a corpus
    w = cfg.data.weights
    count = (
        len(source_entries(cfg.clip.source))
        if cfg.objective == "clip"
        else len(cfg.data.files) or 1
    )
    if w and (len(w) != count or min(w) < 0 or sum(w) <= 0):
        raise ConfigError(
            f"data.weights={','.join(map(str, w))}: expected {count} non-negative weights, one "
            "per data.files entry (clip.source's for CLIP), not all zero"
        )
    v = cfg.vision
    if cfg.objective == "clip" and v.image_size % v.patch_size:
        raise ConfigError(
            f"vision.image_size={v.image_size} is not divisible by vision.patch_size={v.patch_size}"
        )
    if cfg.objective == "clip" and v.d_model % v.num_heads:
        raise ConfigError(
            f"vision.d_model={v.d_model} is not divisible by vision.num_heads={v.num_heads}"
        )
    if cfg.data.workers < 0 or (cfg.data.workers and cfg.objective != "clip"):
        raise ConfigError(
            f"data.workers={cfg.data.workers}: worker processes decode images (objective clip, "
            "workers >= 0); text rows are read by threads"
        )


# Numbers with a range, as intervals: a bracket includes its bound, a parenthesis does not.
# (An lr < 0 would climb the loss; b2 = 1 divides by zero in Adam's bias correction.)
POSITIVE = """model.vocab_size model.seq_len model.num_layers model.d_model model.num_heads
    model.mlp_dim model.norm_eps model.rope_theta model.init_std train.steps train.batch_size
    train.grad_accum train.log_every train.eval_every optim.eps optim.muon_ns_steps
    checkpoint.every checkpoint.keep vision.image_size vision.patch_size vision.channels
    vision.num_layers vision.d_model vision.num_heads vision.mlp_dim clip.embed_dim
    clip.zeroshot_images data.tokenizer_sample""".split()
AT_LEAST_ZERO = """model.num_kv_heads model.head_dim model.type_vocab_size train.seed
    train.eval_steps train.peak_flops train.loss_chunk mlm.max_predictions optim.lr
    optim.warmup_steps optim.weight_decay optim.clip_norm optim.muon_adam_lr
    checkpoint.every_minutes""".split()
RANGES = {
    **dict.fromkeys(POSITIVE, "(0, inf)"),
    **dict.fromkeys(AT_LEAST_ZERO, "[0, inf)"),
    **dict.fromkeys(("optim.b1", "optim.b2", "optim.muon_beta", "optim.lion_b2"), "[0, 1)"),
    "optim.min_lr_ratio": "[0, 1]",
    "optim.decay_fraction": "(0, 1]",
    "mlm.mask_rate": "(0, 1)",
    "data.eval_fraction": "(0, 1)",
}


def output_directory(path: str | os.PathLike, flag: str) -> None:
    """An output directory (local or gs://) must not be a file: said before any work, not as
    a FileExistsError or NotADirectoryError after it."""
    from etils import epath

    if epath.Path(path).exists() and not epath.Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: a file, not a directory")


def _choices(t: Any) -> tuple:
    """The values a Literal field (or each item of a tuple of them) may take; (): any value."""
    if typing.get_origin(t) is tuple:
        t = typing.get_args(t)[0]
    return typing.get_args(t) if typing.get_origin(t) is Literal else ()


def _within(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = low <= value if interval[0] == "[" else low < value
    return above and (value <= high if interval[-1] == "]" else value < high)


def _said(interval: str) -> str:
    return {"(0, inf)": "positive", "[0, inf)": ">= 0"}.get(interval, f"in {interval}")


def _get(cfg: Config, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
