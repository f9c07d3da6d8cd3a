"""Causal language modelling (GPT / Llama style): model, host-side batch transform, loss.

Every objective module exports the same surface, which train.py uses and nothing more:
`make_model(cfg, rngs)`; `check(cfg)` (config errors of this objective);
`default_tokenizer(cfg)` (when neither a checkpoint nor data.tokenizer gives one);
`load_data(cfg, tokenizer, workdir)` -> an object with `train_batches(step)` (this process's
share of the global batches from `step` on) and `eval_sets()`; `loss_fn(model, batch, rng)
-> (loss, metrics)`; `baselines(data, tokenizer, eval_batches)` (what a model without context
would score) and `extra_eval(setup, params, data, tokenizer)` (metrics beyond the loss);
`UNIT`, `items_per_example(cfg)` and `flops_per_item(cfg)` for throughput and MFU, and
`synthetic_batch(cfg, batch_size, rng)` for benchmarks.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import batching, choices, data, shards
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.attention import Mask
from jaxlm.config import Config, ModelConfig
from jaxlm.layers import Embed, Transformer, param, stack_flops_per_token
from jaxlm.token_loss import token_cross_entropy

log = logging.getLogger("jaxlm")
UNIT = "tokens"  # what throughput is counted in: tokens_per_s


class Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, loss_chunk: int = 0):
        self.loss_chunk = loss_chunk  # positions per chunk of the loss (train.loss_chunk)
        self.document_mask = cfg.document_mask
        self.embed = Embed(cfg, rngs)
        self.transformer = Transformer(cfg, rngs)
        shape, untied = (cfg.d_model, cfg.vocab_size), not cfg.tie_embeddings
        self.head = nnx.data(
            param(rngs, shape, ("embed", "vocab"), cfg.init_std) if untied else None
        )

    def __call__(self, batch: dict) -> jax.Array:
        """Logits [B, T, V] (for inspection and generation; the loss never forms them whole)."""
        return self.logits(self.hidden(batch))

    def hidden(self, batch: dict) -> jax.Array:
        """The last layer's output, [B, T, D]."""
        x = self.embed(batch["inputs"], batch["positions"])
        mask = self.attention_mask(batch["segment_ids"])
        return self.transformer(x, mask, batch["positions"], causal=True)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: dict) -> tuple:
        """(last layer's output [B, T, D], cache): causal decoding with a KV cache (see
        jaxlm.generate); logits of the positions that matter come from `logits`."""
        return self.transformer.decode(self.embed(tokens, positions), positions, cache)

    def attention_mask(self, segment_ids: jax.Array) -> Mask:
        """Packed documents see only themselves; without model.document_mask a row is one
        causal sequence (as GPT-2 and nanoGPT train), which cuDNN runs without a bias."""
        return Mask(segment_ids=segment_ids) if self.document_mask else Mask()

    def logits(self, x: jax.Array) -> jax.Array:
        if self.head is None:
            return self.embed.attend(x)
        return jnp.einsum("...D,DV->...V", x, self.head[...].astype(x.dtype))


def make_model(cfg: Config, rngs: nnx.Rngs) -> Model:
    return Model(cfg.model, rngs, cfg.train.loss_chunk)


def check(cfg: Config) -> None:
    del cfg  # nothing beyond checks.validate


def default_tokenizer(
    cfg: Config, workdir: str | os.PathLike | None = None
) -> tokenizer_lib.AnyTokenizer:
    """A prepared entry's tokenizer, else one trained on a bounded sample of the text files."""
    found = data.prepared_tokenizer(cfg.data)
    if found is not None:
        return found
    start = time.perf_counter()
    tok = tokenizer_lib.train(
        data.sample_texts(cfg.data), cfg.model.vocab_size, sample_lines=cfg.data.tokenizer_sample
    )
    log.info(
        "trained a %d-token sentencepiece model in %.1fs",
        tok.vocab_size,
        time.perf_counter() - start,
    )
    return tok


def load_data(cfg: Config, tokenizer, workdir) -> data.TextData:
    dataset = data.TextData(cfg, data_spec(cfg, tokenizer), tokenizer, workdir)
    tasks = cfg.train.eval_tasks
    dataset.eval_tasks = choices.EvalTasks(tasks, tokenizer) if tasks else None
    return dataset


def extra_eval(setup, params, dataset, tokenizer) -> dict:
    """Multiple-choice accuracy on train.eval_tasks (beside the held-out loss)."""
    tasks = getattr(dataset, "eval_tasks", None)
    return tasks.metrics(setup, params) if tasks else {}


def to_example(rows: dict, document_mask: bool = True) -> dict:
    """Packed rows [..., seq_len + 1] -> next-token inputs, targets and loss weights.

    With the document mask, a target counts only when it continues the same document: the
    first token of the next packed document is never predicted from the previous one, and
    positions restart at each document. Without it (model.document_mask=false, as GPT-2 and
    nanoGPT train) a row is one causal sequence: positions run 0..T-1 across it and every next
    token is a target, the padding of a shard's last row excepted.
    """
    tokens, seg, pos = rows["tokens"], rows["tokens_segment_ids"], rows["tokens_positions"]
    if document_mask:
        weights = (seg[..., :-1] == seg[..., 1:]) & (seg[..., :-1] != 0)
    else:
        weights = (seg[..., :-1] != 0) & (seg[..., 1:] != 0)
        pos = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    return {
        "inputs": tokens[..., :-1].astype(np.int32),
        "targets": tokens[..., 1:].astype(np.int32),
        "weights": weights.astype(np.float32),
        "segment_ids": seg[..., :-1].astype(np.int32),
        "positions": pos[..., :-1].astype(np.int32),
    }


def data_spec(cfg: Config, tokenizer) -> data.DataSpec:
    """Documents as [bos] tokens [eos]; rows of seq_len + 1 tokens so that inputs are the
    first seq_len and targets the last seq_len."""
    transform = functools.partial(to_example, document_mask=cfg.model.document_mask)
    return data.DataSpec(
        cfg.model.seq_len + 1, tokenizer.bos_id, tokenizer.eos_id, transform, random=False
    )


def _summed_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    return (token_cross_entropy(logits, targets) * weights).sum()


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted mean next-token cross-entropy, computed in float32; also returns the weight."""
    total = jnp.maximum(weights.sum(), 1.0)
    return _summed_cross_entropy(logits, targets, weights) / total, total


def chunked_cross_entropy(
    hidden: jax.Array, logits_fn, targets: jax.Array, weights: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """cross_entropy(logits_fn(hidden), ...) without ever holding [B, T, V] logits: a scan
    over chunks of `chunk` positions, each chunk's logits recomputed in the backward pass
    (jax.checkpoint), so only [B, chunk, V] lives at a time. T is padded to a multiple of
    chunk with zero-weight positions."""
    b, t = hidden.shape[:2]
    if not chunk or t <= chunk:
        return cross_entropy(logits_fn(hidden), targets, weights)
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, weights))

    def chunks(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [T / chunk, B, chunk, ...]
        return jnp.moveaxis(a.reshape(b, -1, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(summed, xs):
        h, tg, w = xs
        return summed + _summed_cross_entropy(logits_fn(h), tg, w), None

    start = jnp.zeros((), jnp.float32)
    summed, _ = jax.lax.scan(one, start, (chunks(hidden), chunks(targets), chunks(weights)))
    total = jnp.maximum(weights.sum(), 1.0)
    return summed / total, total


def loss_fn(model: Model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng  # no dropout
    hidden = model.hidden(batch)
    with jax.named_scope("loss"):  # the head's projection and the cross-entropy
        loss, tokens = chunked_cross_entropy(
            hidden, model.logits, batch["targets"], batch["weights"], model.loss_chunk
        )
    return loss, {"loss": loss, "tokens": tokens}


def items_per_example(cfg: Config) -> int:
    return cfg.model.seq_len


def flops_per_item(cfg: Config) -> float:
    """Training FLOPs per token: the stack's, plus the output projection onto the vocabulary."""
    return stack_flops_per_token(cfg.model) + 6.0 * cfg.model.d_model * cfg.model.vocab_size


def baselines(dataset: data.TextData, tokenizer, eval_batches: list[dict]) -> dict:
    """Held-out loss of the best context-free model: add-one smoothed frequencies of the
    training targets (tokens and [eos], from the prepared counts), on exactly the targets
    eval_loss is measured on."""
    counts = dataset.counts().copy()
    if tokenizer.bos_id != tokenizer.eos_id and dataset.cfg.model.document_mask:
        counts[tokenizer.bos_id] = 0  # a document's first token is never a target
    log_probs = np.log((counts + 1.0) / (counts.sum() + tokenizer.vocab_size))
    total = sum(-float((log_probs[b["targets"]] * b["weights"]).sum()) for b in eval_batches)
    weight = sum(float(b["weights"].sum()) for b in eval_batches)
    total, weight = batching.global_sum([total, weight])  # each process holds its share
    tasks = getattr(dataset, "eval_tasks", None)
    chance = tasks.chance() if tasks else {}
    return {"eval_unigram_loss": total / max(weight, 1.0), **chance}


def synthetic_batch(cfg: Config, batch_size: int, rng: np.random.Generator) -> dict:
    """Random tokens in packed documents (shards.synthetic_segments)."""
    t = cfg.model.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (batch_size, t + 1), dtype=np.int32)
    rows = shards.row_example(tokens, shards.synthetic_segments(batch_size, t + 1, rng))
    return to_example(rows, cfg.model.document_mask)
