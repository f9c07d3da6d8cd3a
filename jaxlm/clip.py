"""Contrastive image-text pretraining (CLIP / SigLIP) with zero-shot evaluation.

Two towers: a ViT over images (vit.py) and the shared stack over caption tokens, each
projected to a joint space and L2-normalised. Losses are written in the global view
(`img @ txt.T` over the whole data-parallel batch): the compiler inserts the gathers.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm import clip_data, images, sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.attention import Mask
from jaxlm.config import Config, ConfigError, source_entries
from jaxlm.layers import Embed, Transformer, param, stack_flops_per_token
from jaxlm.vit import ImageTower, tower_config

log = logging.getLogger("jaxlm")
UNIT = "pairs"
MAX_LOG_SCALE = math.log(100.0)  # CLIP clamps the logit scale at 100


class Model(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        c, m, v = cfg.clip, cfg.model, cfg.vision
        self.text_pool, self.loss_kind = c.text_pool, c.loss  # static: part of the graph
        self.image = ImageTower(cfg, rngs)
        self.text_embed = Embed(m, rngs)
        self.text = Transformer(m, rngs)
        self.image_proj = param(rngs, (v.d_model, c.embed_dim), ("embed", None), v.d_model**-0.5)
        self.text_proj = param(rngs, (m.d_model, c.embed_dim), ("embed", None), m.d_model**-0.5)
        siglip = c.loss == "siglip"
        scale = math.log(10.0) if siglip else math.log(1 / 0.07)  # the papers' initial values
        self.log_scale = nnx.Param(jnp.asarray(scale, jnp.float32), axes=(), eager_sharding=False)
        bias = -10.0 if siglip else 0.0
        self.bias = nnx.Param(jnp.asarray(bias, jnp.float32), axes=(), eager_sharding=False)

    def embed_images(self, pixels: jax.Array) -> jax.Array:
        x = self.image(pixels)
        return _normalize(jnp.einsum("BD,DE->BE", x, self.image_proj[...].astype(x.dtype)))

    def embed_texts(self, tokens: jax.Array, segments: jax.Array) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.text_embed(tokens, positions)
        causal = self.text_pool == "last"
        lengths = segments.sum(-1)  # one right-padded caption per row
        h = self.text(x, Mask(lengths=lengths), positions, causal=causal)
        if causal:  # the [eos] token, last of the caption, has seen all of it
            last = jnp.maximum(lengths - 1, 0)
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        else:
            w = segments[..., None].astype(h.dtype)
            pooled = (h * w).sum(1) / jnp.maximum(w.sum(1), 1)
        return _normalize(jnp.einsum("BD,DE->BE", pooled, self.text_proj[...].astype(h.dtype)))


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt((x * x).sum(-1, keepdims=True) + 1e-12)


def contrastive_loss(img, txt, log_scale, bias, kind: str) -> tuple[jax.Array, jax.Array]:
    """(loss, logits) of a batch of matching pairs: row i of img goes with row i of txt."""
    n = img.shape[0]
    if kind == "clip":
        logits = img @ txt.T * jnp.exp(jnp.minimum(log_scale, MAX_LOG_SCALE))
        labels = jnp.arange(n)
        i2t = -jnp.take_along_axis(jax.nn.log_softmax(logits, 1), labels[:, None], 1).mean()
        t2i = -jnp.take_along_axis(jax.nn.log_softmax(logits, 0), labels[None, :], 0).mean()
        return (i2t + t2i) / 2, logits
    logits = img @ txt.T * jnp.exp(log_scale) + bias
    signs = 2 * jnp.eye(n) - 1  # +1 for the matching pair, -1 for every other
    return -jax.nn.log_sigmoid(signs * logits).sum() / n, logits


def loss_fn(model: Model, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    del rng
    img = model.embed_images(batch["images"])
    txt = model.embed_texts(batch["text"], batch["text_segments"])
    with jax.named_scope("loss"):
        loss, logits = contrastive_loss(
            img, txt, model.log_scale[...], model.bias[...], model.loss_kind
        )
    n = img.shape[0]
    accuracy = (jnp.argmax(logits, 1) == jnp.arange(n)).mean()  # image -> its own caption
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": jnp.asarray(n, jnp.float32)}


def make_model(cfg: Config, rngs: nnx.Rngs) -> Model:
    return Model(cfg, rngs)


def accumulated_grads(model_of, params, micro: dict, accum: int) -> tuple[dict, dict]:
    """Gradient caching (OpenCLIP's --accum-freq): the contrastive loss of the whole batch,
    with the towers run on one micro-batch at a time. Every micro-batch is embedded without
    gradients; the loss over all the embeddings gives their gradients (and the temperature's
    and bias's); then each micro-batch's towers run again under `jax.vjp`, fed its slice of
    the cached embedding gradients, and the parameter gradients add up. The towers' memory
    follows the micro-batch; the result equals the one-big-batch gradient.

    micro: the batch as [accum, rows / accum, ...] (micro-batch a = micro[a])."""

    def embed(p, mb):
        m = model_of(p)
        return m.embed_images(mb["images"]), m.embed_texts(mb["text"], mb["text_segments"])

    img, txt = jax.lax.map(lambda mb: embed(params, mb), micro)  # [accum, b, E] each

    def whole_loss(p, img, txt):
        m = model_of(p)
        flat = (img.reshape(-1, img.shape[-1]), txt.reshape(-1, txt.shape[-1]))
        loss, logits = contrastive_loss(*flat, m.log_scale[...], m.bias[...], m.loss_kind)
        return loss, logits

    (loss, logits), (head_grads, g_img, g_txt) = jax.value_and_grad(
        whole_loss, argnums=(0, 1, 2), has_aux=True
    )(params, img, txt)

    def body(total, a):
        mb = jax.tree.map(lambda x: x[a], micro)
        _, vjp = jax.vjp(lambda p: embed(p, mb), params)
        (grads,) = vjp((g_img[a], g_txt[a]))
        return jax.tree.map(jnp.add, total, grads), None

    grads, _ = jax.lax.scan(body, head_grads, jnp.arange(accum))
    n = logits.shape[0]
    accuracy = (jnp.argmax(logits, 1) == jnp.arange(n)).mean()
    return grads, {"loss": loss, "accuracy": accuracy, "tokens": jnp.asarray(n, jnp.float32)}


def check(cfg: Config) -> None:
    if cfg.data.files:
        raise ConfigError(
            "data.files is for the text objectives; a contrastive run reads clip.source "
            f"(got data.files={','.join(cfg.data.files)})"
        )


def default_tokenizer(cfg: Config, workdir: str | os.PathLike) -> tokenizer_lib.AnyTokenizer:
    """Trained on the captions of the first sources' first pairs (and, for labelled pairs
    without one, captions drawn from their templates)."""
    texts, rng = [], np.random.default_rng(0)
    budget = min(cfg.data.tokenizer_sample, 20_000)
    for entry in source_entries(cfg.clip.source):
        source = clip_data.ImageSource(clip_data.resolve(entry, cfg, workdir, sync=False))
        records = source.records("train")
        for _, _, record in records.get(np.arange(min(len(records), budget - len(texts)))):
            pair = images.decode_pair(record)
            texts.append(
                pair["caption"]
                or images.random_caption(
                    pair["label"], rng, source.names, source.templates, source.filler
                )
            )
        if len(texts) >= budget:
            break
    return tokenizer_lib.train(texts, cfg.model.vocab_size, sample_lines=cfg.data.tokenizer_sample)


def load_data(cfg: Config, tokenizer, workdir) -> clip_data.ClipData:
    return clip_data.ClipData(cfg, tokenizer, workdir)


def baselines(dataset: clip_data.ClipData, tokenizer, eval_batches: list[dict]) -> dict:
    """Chance: top-1 of a random guess over the global batch."""
    del eval_batches  # each process holds its share; chance is over the global batch
    return {"eval_batch_chance_accuracy": 1.0 / dataset.cfg.train.batch_size}


@partial(jax.jit, static_argnums=0)
def _embed_images(graphdef, params, pixels):
    return nnx.merge(graphdef, params).embed_images(pixels)


@partial(jax.jit, static_argnums=0)
def _embed_texts(graphdef, params, tokens, segments):
    return nnx.merge(graphdef, params).embed_texts(tokens, segments)


def _gathered(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_batches(setup, params, batches: list[dict], texts: bool = True) -> dict:
    """This process's share of global batches -> the global batches' image (and caption)
    embeddings, labels and indices, in global order: each process embeds its own rows."""
    g, out = setup.graphdef, {"images": [], "text": [], "labels": [], "index": []}
    for batch in batches:
        x = sharding.to_global(
            {k: batch[k] for k in ("images", "text", "text_segments")}, setup.mesh
        )
        out["images"].append(_gathered(_embed_images(g, params, x["images"])))
        if texts:
            out["text"].append(_gathered(_embed_texts(g, params, x["text"], x["text_segments"])))
        for k in ("labels", "index"):  # zero-shot sets; process-local numpy, concatenated
            if k in batch:
                out[k].append(_gathered(batch[k]))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def embed_prompts(setup, params, tokenizer, prompts: list[str]) -> np.ndarray:
    """Prompts (the same on every process) -> their embeddings, in batches over the mesh."""
    cfg, batch = setup.cfg, setup.cfg.train.batch_size
    tok = [images.text_tokens(tokenizer, p, cfg.model.seq_len) for p in prompts]
    text, segments = np.stack([t for t, _ in tok]), np.stack([s for _, s in tok])
    out = []
    for start in range(0, len(prompts), batch):
        chunk = {"text": text[start : start + batch], "segments": segments[start : start + batch]}
        pad = batch - len(chunk["text"])
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in chunk.items()}
        x = sharding.from_full(chunk, setup.mesh)
        out.append(
            _gathered(_embed_texts(setup.graphdef, params, x["text"], x["segments"]))[: batch - pad]
        )
    return np.concatenate(out)


def recall(img: np.ndarray, txt: np.ndarray) -> dict:
    """Image<->text recall@1/5 of matching rows. Ties with the true partner (equal embeddings:
    the same caption twice, or a collapsed tower) are broken at random, in expectation: a
    text tower that maps every caption to one point scores 1/N at 1, as an argsort-based
    recall (OpenCLIP's) would on average, not the 1.0 that counting ties as hits gave."""
    sim, metrics = img @ txt.T, {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        true = np.diag(s)[:, None]
        above, tied = (s > true).sum(1), (s == true).sum(1)  # tied: the partner included
        for k in (1, 5):  # P(the partner lands in the first k) with ties in random order
            metrics[f"eval_{name}_recall_at_{k}"] = float(np.clip((k - above) / tied, 0, 1).mean())
    return metrics


def zeroshot(setup, params, tokenizer, embedded: dict, names, templates) -> dict:
    """Zero-shot top-1/top-5 over the class names (prompts averaged over the templates)."""
    prompts = [images.caption(t, c, names) for c in range(len(names)) for t in templates]
    per_class = embed_prompts(setup, params, tokenizer, prompts)
    per_class = per_class.reshape(len(names), len(templates), -1).mean(1)
    per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
    order = np.argsort(-(embedded["images"] @ per_class.T), axis=1)
    labels = embedded["labels"]
    return {
        "eval_zeroshot_top1": float((order[:, 0] == labels).mean()),
        "eval_zeroshot_top5": float((order[:, :5] == labels[:, None]).any(1).mean()),
    }


def zeroshot_metrics(
    setup, params, z: clip_data.ZeroShot, batches: list[dict], tokenizer, recalls: bool = False
) -> dict:
    """Zero-shot top-1/top-5 on a set (and image<->text recall over its pairs if recalls):
    each process embeds its share of the batches."""
    embedded = embed_batches(setup, params, batches, texts=recalls)
    keep = embedded["index"] < z.n  # the last batch wraps round
    embedded = {k: v[keep] for k, v in embedded.items()}
    metrics = recall(embedded["images"], embedded["text"]) if recalls else {}
    return metrics | zeroshot(setup, params, tokenizer, embedded, z.names, z.templates)


def extra_eval(setup, params, dataset: clip_data.ClipData, tokenizer) -> dict:
    """Recall over the first held-out set's distinct pairs (at most train.eval_steps global
    batches), and zero-shot on the zero-shot set."""
    metrics = {}
    first = dataset.eval_sets()[0] if dataset.cfg.train.eval_steps else None
    if first is not None:
        embedded = embed_batches(setup, params, first.batches)
        n = min(len(embedded["images"]), dataset.held_out_pairs(first.name))
        metrics |= recall(embedded["images"][:n], embedded["text"][:n])
    if dataset.zeroshot is not None:
        batches = dataset.zeroshot_batches()
        metrics |= zeroshot_metrics(setup, params, dataset.zeroshot, batches, tokenizer)
    return metrics


def items_per_example(cfg: Config) -> int:
    return 1


def flops_per_item(cfg: Config) -> float:
    """Training FLOPs per image-text pair: 6 x matmul parameters x tokens + attention, for
    each tower, plus the projections."""

    def tower(m) -> float:
        return stack_flops_per_token(m) * m.seq_len

    v, tc = cfg.vision, tower_config(cfg)
    patch = 6.0 * v.patch_size**2 * v.channels * v.d_model * (tc.seq_len - (v.pool == "cls"))
    proj = 6.0 * (v.d_model + cfg.model.d_model) * cfg.clip.embed_dim
    return tower(tc) + tower(cfg.model) + patch + proj


def synthetic_batch(cfg: Config, batch_size: int, rng: np.random.Generator) -> dict:
    s, t = cfg.vision.image_size, cfg.model.seq_len
    return {
        "images": rng.integers(0, 256, (batch_size, s, s, cfg.vision.channels), dtype=np.uint8),
        "text": rng.integers(1, cfg.model.vocab_size, (batch_size, t), dtype=np.int32),
        "text_segments": np.ones((batch_size, t), np.int32),
    }
