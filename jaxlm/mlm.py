"""Masked language modelling (BERT style): encoder, host-side masking, sparse prediction head.

The corruption happens on the host in the Grain pipeline (seeded per row, so resumable); the
model sees at most `max_predictions` masked positions per sequence and runs its output head on
those alone, a gather before the [D, V] projection instead of a projection of every token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import batching, data, shards
from jaxlm.attention import Mask
from jaxlm.config import Config, ConfigError, MlmConfig, ModelConfig
from jaxlm.layers import Embed, Norm, Transformer, activation, param, stack_flops_per_token
from jaxlm.lm import (  # noqa: F401 (the same hooks as the causal LM)
    UNIT,
    check,
    cross_entropy,
    default_tokenizer,
    extra_eval,
    items_per_example,
)


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.activation = "gelu" if cfg.mlp == "swiglu" else cfg.mlp  # the head's
        self.embed = Embed(cfg, rngs)
        self.transformer = Transformer(cfg, rngs)
        # BERT's prediction transform (dense + activation + norm), then the tied embeddings.
        self.head_dense = param(rngs, (d, d), ("embed", None), cfg.init_std)
        self.head_bias = param(rngs, (d,), ("norm",), "zeros")
        self.head_norm = Norm(cfg, rngs)
        self.out_bias = param(rngs, (cfg.vocab_size,), ("vocab",), "zeros")

    def __call__(self, batch: dict) -> jax.Array:
        """The encoder's output, [B, T, D] (Hugging Face's `last_hidden_state`)."""
        x = self.embed(batch["inputs"], batch["positions"], batch.get("types"))
        mask = Mask(segment_ids=batch["segment_ids"])
        return self.transformer(x, mask, batch["positions"], causal=False)

    def predict(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits [B, P, V] at the given positions [B, P] only."""
        h = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        h = jnp.einsum("BPD,DE->BPE", h, self.head_dense[...].astype(h.dtype))
        h = activation(h + self.head_bias[...].astype(h.dtype), self.activation)
        logits = self.embed.attend(self.head_norm(h))
        return logits + self.out_bias[...].astype(logits.dtype)


def make_model(cfg: Config, rngs: nnx.Rngs) -> Model:
    return Model(cfg.model, rngs)


def max_predictions(cfg: Config) -> int:
    return cfg.mlm.max_predictions or math.ceil(cfg.mlm.mask_rate * cfg.model.seq_len)


class MaskTokens:
    """Packed rows -> corrupted inputs + the positions to predict, row by row.

    Of the maskable tokens (not special, not padding) a share `mask_rate` is chosen (the count
    rounded up or down at random so the expectation is exact), at most `max_predictions`; of
    those, `mask_token_rate` become [MASK], `random_token_rate` a random non-special token, the
    rest stay as they are. With whole-word masking, words are chosen until the count is met.
    """

    def __init__(self, cfg: MlmConfig, max_predictions: int, tokenizer):
        self.cfg, self.max_predictions = cfg, max_predictions
        self.mask_id = tokenizer.piece_id("[MASK]")
        if self.mask_id is None:
            raise ConfigError(
                "objective 'mlm' needs a tokenizer with a [MASK] token; this one has none "
                "(jaxlm-trained tokenizers reserve [CLS], [SEP], [MASK] and [PAD])"
            )
        self.maskable = np.ones(tokenizer.vocab_size, bool)
        self.maskable[tokenizer.special_ids()] = False
        self.random_pool = np.flatnonzero(self.maskable).astype(np.int32)
        self.word_starts = tokenizer.word_starts() if cfg.whole_word else None

    def __call__(self, rows: dict, rngs: list[np.random.Generator]) -> dict:
        """Rows [b, seq_len], each masked with its own random stream."""
        masked = [self.mask({k: v[j] for k, v in rows.items()}, rng) for j, rng in enumerate(rngs)]
        return {k: np.stack([m[k] for m in masked]) for k in masked[0]}

    def mask(self, row: dict, rng: np.random.Generator) -> dict:
        tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
        candidates = np.flatnonzero(self.maskable[tokens] & (seg != 0))
        expected = len(candidates) * self.cfg.mask_rate
        count = min(self.max_predictions, int(expected) + int(rng.random() < expected % 1))
        if self.word_starts is None:
            chosen = np.sort(rng.choice(candidates, count, replace=False))
        else:
            chosen = self._whole_words(tokens, candidates, count, rng)
        action = rng.random(len(chosen))
        to_mask = action < self.cfg.mask_token_rate
        to_random = ~to_mask & (action < self.cfg.mask_token_rate + self.cfg.random_token_rate)
        inputs = tokens.copy()
        inputs[chosen[to_mask]] = self.mask_id
        inputs[chosen[to_random]] = rng.choice(self.random_pool, int(to_random.sum()))
        n, p = len(chosen), self.max_predictions
        return {
            "inputs": inputs.astype(np.int32),
            "segment_ids": seg.astype(np.int32),
            "positions": pos.astype(np.int32),
            "mask_positions": np.pad(chosen, (0, p - n)).astype(np.int32),
            "mask_targets": np.pad(tokens[chosen], (0, p - n)).astype(np.int32),
            "mask_weights": (np.arange(p) < n).astype(np.float32),
        }

    def _whole_words(self, tokens, candidates, count, rng) -> np.ndarray:
        # A word is a maskable start piece and the continuation pieces right after it.
        word_of = np.cumsum(self.word_starts[tokens] | ~self.maskable[tokens])
        words = np.unique(word_of[candidates])
        chosen: list[int] = []
        for w in rng.permutation(words):
            pieces = candidates[word_of[candidates] == w]
            if len(chosen) + len(pieces) > count:
                continue
            chosen.extend(pieces)
            if len(chosen) == count:
                break
        return np.sort(np.asarray(chosen, np.int64))


def load_data(cfg: Config, tokenizer, workdir) -> data.TextData:
    return data.TextData(cfg, data_spec(cfg, tokenizer), tokenizer, workdir)


def data_spec(cfg: Config, tokenizer) -> data.DataSpec:
    """Documents as [CLS] tokens [SEP] (prepared [bos] / [eos] mapped to them), rows of
    seq_len (the first seq_len of a prepared row), then masked."""
    cls_id, sep_id = tokenizer.piece_id("[CLS]"), tokenizer.piece_id("[SEP]")
    transform = MaskTokens(cfg.mlm, max_predictions(cfg), tokenizer)
    if cls_id is None or sep_id is None:
        raise ConfigError("objective 'mlm' needs a tokenizer with [CLS] and [SEP] tokens")
    return data.DataSpec(cfg.model.seq_len, cls_id, sep_id, transform)


def loss_fn(model: Model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # the masking is drawn on the host
    hidden = model(batch)
    with jax.named_scope("loss"):  # the prediction head and the cross-entropy
        logits = model.predict(hidden, batch["mask_positions"])
        targets, weights = batch["mask_targets"], batch["mask_weights"]
        loss, tokens = cross_entropy(logits, targets, weights)
        correct = (jnp.argmax(logits, -1) == targets) * weights
    return loss, {"loss": loss, "accuracy": correct.sum() / tokens, "tokens": tokens}


def flops_per_item(cfg: Config) -> float:
    """Encoder 6N + attention, plus the head's FLOPs on the masked positions actually run."""
    m = cfg.model
    head = 6.0 * (m.d_model**2 + m.d_model * m.vocab_size) * max_predictions(cfg) / m.seq_len
    return stack_flops_per_token(m) + head


def baselines(dataset: data.TextData, tokenizer, eval_batches: list[dict]) -> dict:
    """Accuracy of always predicting the training split's most frequent maskable token."""
    counts = dataset.counts().copy()
    counts[tokenizer.special_ids()] = 0
    majority = int(np.argmax(counts))
    hits = sum(
        float(((b["mask_targets"] == majority) * b["mask_weights"]).sum()) for b in eval_batches
    )
    total = sum(float(b["mask_weights"].sum()) for b in eval_batches)
    hits, total = batching.global_sum([hits, total])  # each process holds its share
    return {"eval_majority_accuracy": hits / max(total, 1.0)}


def synthetic_batch(cfg: Config, batch_size: int, rng: np.random.Generator) -> dict:
    """Random tokens in packed documents (shards.synthetic_segments), max_predictions
    distinct positions per row."""
    t, p = cfg.model.seq_len, max_predictions(cfg)
    tokens = rng.integers(0, cfg.model.vocab_size, (batch_size, t), dtype=np.int32)
    rows = shards.row_example(tokens, shards.synthetic_segments(batch_size, t, rng))
    where = np.sort(np.argsort(rng.random((batch_size, t)), axis=1)[:, :p], axis=1)
    return {
        "inputs": tokens,
        "segment_ids": rows["tokens_segment_ids"],
        "positions": rows["tokens_positions"],
        "mask_positions": where.astype(np.int32),
        "mask_targets": np.take_along_axis(tokens, where, axis=1),
        "mask_weights": np.ones((batch_size, p), np.float32),
    }
