"""Sample from a causal LM checkpoint with a KV cache: `jaxlm generate WORKDIR --prompt TEXT`.

from jaxlm.evaluate import load
from jaxlm.generate import generate
out = generate(load("runs/gpt_tiny"), ["ROMEO:"], max_new_tokens=40)  # greedy by default

Prompts of different lengths go in one batch, right-padded. One prefill runs the prompts
through the model and fills the cache (every layer's keys and values, laid out by logical axes:
rows over the batch axes, kv heads over `tensor`); then a compiled `lax.while_loop` decodes one
token per row per step, until every row has written [eos] or reached its budget. Nothing is
traced again per token. A row's position is its own: the cache slots past it (a shorter
prompt's padding) are never attended to and are overwritten as it goes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ConfigError
from jaxlm.loglik import require_causal

log = logging.getLogger("jaxlm")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy. top_k 0 and top_p 1: no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, rng: jax.Array, s: Sampling) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]."""
    if s.temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1:
        ordered = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(ordered, -1)
        # the smallest logit still inside the nucleus (the first one always is)
        keep = jnp.sum(jnp.cumsum(probs, -1) - probs < s.top_p, -1, keepdims=True)
        cutoff = jnp.take_along_axis(ordered, keep - 1, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def decode_ids(
    model,
    prompts: np.ndarray,
    lengths: np.ndarray,
    max_new: int,
    cache_length: int,
    eos_id: int,
    sampling: Sampling,
    rng: jax.Array,
    keep_logits: bool = False,
    vocab_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(tokens [B, max_new], count [B], logits [B, max_new, V] where keep_logits) for
    right-padded prompts [B, P] of `lengths` tokens. A row stops after writing [eos] (not
    counted in `count`) or at its cache's end; what follows is eos_id. Only ids below
    vocab_size (the tokenizer's) are sampled: a model's vocabulary may be padded beyond it."""
    b, p = prompts.shape
    cache = model.transformer.init_cache(b, cache_length)
    rows = jnp.arange(b)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    hidden, cache = model.decode(prompts, positions, cache)
    last = hidden[rows, lengths - 1][:, None]  # [B, 1, D]: each prompt's final position
    first_logits = model.logits(last)[:, 0].astype(jnp.float32)

    out = jnp.full((b, max_new), eos_id, jnp.int32)
    kept = (max_new if keep_logits else 0, first_logits.shape[-1])
    all_logits = jnp.zeros((b, *kept), jnp.float32)
    count = jnp.zeros(b, jnp.int32)
    done = jnp.zeros(b, bool)
    ids = jnp.arange(first_logits.shape[-1])

    def body(state):
        step, logits, position, cache, out, all_logits, count, done, rng = state
        rng, key = jax.random.split(rng)
        known = logits if vocab_size is None else jnp.where(ids < vocab_size, logits, -jnp.inf)
        token = jnp.where(done, eos_id, sample(known, key, sampling))
        out = out.at[:, step].set(token)
        if keep_logits:
            all_logits = all_logits.at[:, step].set(logits)
        finished = done | (token == eos_id)
        count = count + (~finished).astype(jnp.int32)
        done = finished | (position + 1 >= cache_length)
        at = jnp.minimum(position, cache_length - 1)[:, None]  # a finished row's stays put
        hidden, cache = model.decode(token[:, None], at, cache)
        logits = model.logits(hidden)[:, 0].astype(jnp.float32)
        return step + 1, logits, position + 1, cache, out, all_logits, count, done, rng

    def more(state):
        step, done = state[0], state[7]
        return (step < max_new) & ~jnp.all(done)

    state = (0, first_logits, lengths, cache, out, all_logits, count, done, rng)
    state = jax.lax.while_loop(more, body, state)
    return state[4], state[6], state[5] if keep_logits else None


def generate(
    loaded,
    prompts: list[str],
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> list[dict]:
    """One {prompt, completion, tokens} per prompt (tokens: the completion's ids, without the
    stop token) from a `jaxlm.evaluate.load`ed causal LM."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    require_causal(cfg.objective, "generate")
    if not prompts:
        raise ConfigError("generate: no prompt given (--prompt TEXT or --prompts-file FILE)")
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    context = cfg.model.seq_len
    encoded = []
    for text in prompts:
        ids = list(tok.encode(text))
        ids = [tok.bos_id] + ids if tok.add_bos else ids
        if not ids:
            raise ConfigError(f"prompt {text!r} is empty after tokenization (and adds no [bos])")
        if len(ids) >= context:
            raise ConfigError(
                f"prompt {text[:40]!r}... is {len(ids)} tokens: it leaves no room in the "
                f"model's context of {context} (model.seq_len)"
            )
        encoded.append(ids)
    room = context - max(len(ids) for ids in encoded)
    if max_new_tokens > room:
        log.warning(
            "--max-new-tokens=%d: the longest prompt leaves room for %d in the model's context "
            "of %d (model.seq_len); completions stop there",
            max_new_tokens,
            room,
            context,
        )
    tokens = generate_ids(loaded, encoded, max_new_tokens, sampling, seed)
    results = []
    for text, ids in zip(prompts, tokens, strict=True):
        results.append({"prompt": text, "completion": tok.decode(ids), "tokens": ids})
    return results


@dataclasses.dataclass
class _Decoder:
    run: Any  # jit(decode_ids) for one model and one set of decoding settings
    shapes: set = dataclasses.field(default_factory=set)  # prompt shapes compiled so far


@functools.lru_cache(maxsize=16)
def _decoder(graphdef, mesh, max_new_tokens, cache_length, eos, sampling, vocab_size) -> _Decoder:
    """The jitted decoding of one model and one set of decoding settings, kept so that the
    batches of an evaluation reuse it (each new prompt shape compiles once). Its outputs are
    whole on every process: under jax.distributed each reads them back."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, out_shardings=replicated)
    def run(params, prompts, lengths, rng):
        return decode_ids(
            nnx.merge(graphdef, params),
            prompts,
            lengths,
            max_new_tokens,
            cache_length,
            eos,
            sampling,
            rng,
            vocab_size=vocab_size,
        )

    return _Decoder(run)


def generate_ids(
    loaded,
    encoded: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    rows: int | None = None,
) -> list[list[int]]:
    """The completions' ids (without the stop token) of prompts given as ids, in one batch.
    With `rows`, the batch is padded to that many prompts and their width to a power of two:
    a few shapes compile once for many batches."""
    cfg, tok, s = loaded.cfg, loaded.tokenizer, loaded.setup
    n = len(encoded)
    lengths = np.asarray([len(ids) for ids in encoded] + [1] * ((rows or n) - n), np.int32)
    width = int(lengths.max())
    if rows:
        width = max(width, min(1 << (width - 1).bit_length(), cfg.model.seq_len - max_new_tokens))
    padded = np.zeros((len(lengths), width), np.int32)
    for i, ids in enumerate(encoded):
        padded[i, : len(ids)] = ids
    cache_length = min(cfg.model.seq_len, width + max_new_tokens)
    decoder = _decoder(
        s.graphdef, s.mesh, max_new_tokens, cache_length, tok.eos_id, sampling, tok.vocab_size
    )
    compiling = padded.shape not in decoder.shapes
    decoder.shapes.add(padded.shape)
    with jax.set_mesh(s.mesh):
        start = time.perf_counter()
        tokens, counts, _ = decoder.run(loaded.params, padded, lengths, jax.random.key(seed))
        tokens, counts = np.asarray(tokens)[:n], np.asarray(counts)[:n]
    seconds = time.perf_counter() - start
    log.info(
        "%d prompts: %d tokens in %.2f s, %.1f tokens/s%s",
        n,
        int(counts.sum()),
        seconds,
        counts.sum() / seconds,
        f" (compiling for {padded.shape} included)" if compiling else "",
    )
    return [[int(i) for i in row[:c]] for row, c in zip(tokens, counts, strict=True)]
