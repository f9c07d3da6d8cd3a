"""Log-likelihoods of continuations under a causal LM checkpoint, several requests per row.

A request is (context ids, continuation ids), tokenized as lm-evaluation-harness does (see
`encode_pair`). As the harness's Hugging Face backend forms it, the model reads the last
`max_length + 1` tokens of context + continuation but the final one, and the continuation's
log-probability is the sum over its tokens' log-probabilities; it is greedy when each of them is
the argmax. Requests go longest first into rows, first fit: a segment id each (attention stays
inside it) and positions from 0, so a request scores as it would alone in a row. A row's width
is a power of two (at least 32, at most max_length), `rows` rows a batch, split over the mesh's
batch axes: every process places its devices' rows, and each reads the scores back whole.

Used by `jaxlm eval --tasks` (jaxlm.harness, the harness's model) and by `train.eval_tasks`
(jaxlm.tasks) alike: one scorer for both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.attention import Mask
from jaxlm.config import ConfigError
from jaxlm.token_loss import token_cross_entropy

MIN_WIDTH = 32
KINDS = {"mlm": "a masked LM", "clip": "a contrastive image-text model"}


def require_causal(objective: str, what: str) -> None:
    if objective != "lm":
        raise ConfigError(
            f"{what} needs a causal LM checkpoint (objective 'lm'); this one's objective is "
            f"{objective!r}: {KINDS.get(objective, 'not a causal LM')}, it predicts no next token"
        )


def tok_encode(tok, text: str) -> list[int]:
    """Ids of text as the harness's `tok_encode` gives them: [bos] first where the tokenizer
    adds it (jaxlm's own tokenizers; an imported one as its source says)."""
    ids = [int(i) for i in tok.encode(text)]
    return [tok.bos_id, *ids] if tok.add_bos else ids


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's TemplateLM makes them: trailing spaces
    of the context move to the continuation, the two are tokenized together and split where
    the context's own tokens end; an empty context is [bos] (the harness's prefix token)."""
    if not context:
        ids = [int(i) for i in tok.encode(continuation)]
        if ids and ids[0] == tok.bos_id:
            return ids[:1], ids[1:]
        return [tok.bos_id], ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok_encode(tok, context + continuation)
    n = len(tok_encode(tok, context))
    return whole[:n], whole[n:]


@dataclasses.dataclass
class Packed:
    """Rows [N, W] of inputs, targets, segment ids and positions; for each request, in the
    order given: (row, end, continuation length): its continuation's targets are
    row[end - length : end]."""

    rows: dict[str, np.ndarray]
    spans: list[tuple[int, int, int]]


def width_for(longest: int, max_length: int) -> int:
    return min(max_length, max(MIN_WIDTH, 1 << math.ceil(math.log2(max(longest, 1)))))


def pack(requests: list[tuple[list[int], list[int]]], max_length: int) -> Packed:
    """Requests -> packed rows (see the module's docstring)."""
    pieces = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a request with an empty continuation has nothing to score")
        whole = (list(context) + list(continuation))[-(max_length + 1) :]
        pieces.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
    width = width_for(max((len(p[0]) for p in pieces), default=1), max_length)
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    free: list[int] = []  # room left in each row
    where: list[tuple[int, int]] = [(0, 0)] * len(pieces)
    for i in order:
        n = len(pieces[i][0])
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            row = len(free)
            free.append(width)
        where[i] = (row, width - free[row])
        free[row] -= n
    shape = (len(free), width)
    rows = {k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids")}
    rows["positions"] = np.zeros(shape, np.int32)
    spans = []
    for i, (inputs, targets, n_cont) in enumerate(pieces):
        row, start = where[i]
        end = start + len(inputs)
        rows["inputs"][row, start:end] = inputs
        rows["targets"][row, start:end] = targets
        rows["segment_ids"][row, start:end] = 1 + int(rows["segment_ids"][row].max())
        rows["positions"][row, start:end] = np.arange(len(inputs))
        spans.append((row, end, n_cont))
    return Packed(rows, spans)


def _token_scores(setup, vocab_size: int, params, batch: dict):
    """(log-probability of each target, whether it is the argmax), [R, W] each."""
    model = setup.model(params)
    x = model.embed(batch["inputs"], batch["positions"])
    mask = Mask(segment_ids=batch["segment_ids"])
    hidden = model.transformer(x, mask, batch["positions"], causal=True)
    logits = model.logits(hidden).astype(jnp.float32)
    # a padded vocabulary's extra ids are no tokens: the harness's models have none
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    logp = -token_cross_entropy(logits, batch["targets"])
    return logp, jnp.argmax(logits, -1) == batch["targets"]


class Scorer:
    """Summed log-probabilities and greediness of requests on a causal LM's parameters."""

    def __init__(self, setup, vocab_size: int, rows: int = 8, max_length: int = 0):
        require_causal(setup.cfg.objective, "log-likelihood scoring")
        self.setup, self.vocab_size = setup, vocab_size
        self.max_length = max_length or setup.cfg.model.seq_len
        dp = sharding.data_parallel_size(setup.mesh)
        self.rows = max(1, math.ceil(rows / dp)) * dp  # a batch splits evenly over the mesh
        replicated = NamedSharding(setup.mesh, PartitionSpec())
        fn = functools.partial(_token_scores, setup, vocab_size)
        self._score = jax.jit(fn, out_shardings=(replicated, replicated))

    def __call__(
        self, params: Any, requests: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        if not requests:
            return []
        packed = pack(requests, self.max_length)
        logp, greedy = self.token_scores(params, packed.rows)
        out = []
        for row, end, n in packed.spans:
            span = slice(end - n, end)
            out.append((float(logp[row, span].sum()), bool(greedy[row, span].all())))
        return out

    def token_scores(
        self, params: Any, rows: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every row's per-token scores, `self.rows` rows at a time (the last batch padded)."""
        n = len(rows["inputs"])
        pad = -n % self.rows
        rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
        logps, greedys = [], []
        mesh = self.setup.mesh
        with jax.set_mesh(mesh):
            for start in range(0, n + pad, self.rows):
                batch = {k: v[start : start + self.rows] for k, v in rows.items()}
                logp, greedy = self._score(params, sharding.from_full(batch, mesh))
                logps.append(np.asarray(logp))
                greedys.append(np.asarray(greedy))
        return np.concatenate(logps)[:n], np.concatenate(greedys)[:n]
