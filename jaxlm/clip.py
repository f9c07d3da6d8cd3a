"""Contrastive image-text pretraining (CLIP / SigLIP) with zero-shot evaluation.

Two towers: a ViT over images (vit.py) and the shared stack over caption tokens, each
projected to a joint space and L2-normalised. Losses are written in the global view
(`img @ txt.T` over the whole data-parallel batch): the compiler inserts the gathers.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm import data, images, sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.attention import Mask
from jaxlm.config import Config, ConfigError
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
    loss, logits = contrastive_loss(
        img, txt, model.log_scale[...], model.bias[...], model.loss_kind
    )
    n = img.shape[0]
    accuracy = (jnp.argmax(logits, 1) == jnp.arange(n)).mean()  # image -> its own caption
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": jnp.asarray(n, jnp.float32)}


def make_model(cfg: Config, rngs: nnx.Rngs) -> Model:
    return Model(cfg, rngs)


def check(cfg: Config) -> None:
    if cfg.train.grad_accum > 1:
        raise ConfigError(
            f"train.grad_accum={cfg.train.grad_accum}: the contrastive loss of a micro-batch "
            "would only contrast its own pairs, not the whole batch; use train.grad_accum=1 "
            "(and a mesh with more data-parallel devices, or model.remat, for memory)"
        )


def default_tokenizer(cfg: Config):
    texts = ClipData.texts(images.load_source(cfg))
    return tokenizer_lib.train(texts, cfg.model.vocab_size, sample_lines=cfg.data.tokenizer_sample)


def load_data(cfg: Config, tokenizer, workdir) -> ClipData:
    del workdir  # image-text sources are read where they are
    return ClipData(cfg, tokenizer)


class ClipData:
    """Image-text pairs in a global order: pair g of the stream depends only on the seed and
    g (its crop and caption too, seeded by g), so the global batch at a step is the same for
    any number of processes. An unreadable image is replaced by a later pair of the stream."""

    def __init__(self, cfg: Config, tokenizer):
        source = images.load_source(cfg)
        if any(source.skipped.values()):
            log.warning("image-text source %s: skipped %s", cfg.clip.source, source.skipped)
        sample = source.train[:64]
        if not any(images.decode(_image_of(r)) is not None for r in sample):
            raise ConfigError(
                f"clip.source {cfg.clip.source!r}: none of the first {len(sample)} training "
                "images can be decoded: no readable image-text pairs"
            )
        n = cfg.clip.eval_images or len(source.held_out)
        self.cfg, self.tokenizer, self.train = cfg, tokenizer, source.train
        self.held_out = HeldOut(source.held_out[:n], source.class_names, source.templates)

    @staticmethod
    def texts(source: images.Source) -> list[str]:
        """Captions to train the tokenizer on (every template x class for the digits)."""
        found = [_caption_of(r) for r in source.train[:100_000]]
        if any(c is None for c in found):
            rng = np.random.default_rng(0)
            found = [c for c in found if c]
            found += [images.random_caption(i % 10, rng) for i in range(2000)]
        return found

    def examples(self, training: bool):
        import grain  # here, so that models and benchmarks run where Grain is not installed

        seed = self.cfg.train.seed + (0 if training else 1)
        ds = grain.MapDataset.source(self.train if training else self.held_out)
        ds = (ds.shuffle(seed=seed) if training else ds).repeat(None)
        return Readable(ds, Prepare(self.cfg, self.tokenizer, training), seed)

    def train_batches(
        self, start_step: int, process_index: int | None = None, process_count: int | None = None
    ):
        ds = data.global_batches(
            self.examples(True),
            self.cfg.train.batch_size,
            start_step,
            process_index,
            process_count,
        )
        return iter(ds.to_iter_dataset(data.read_options()))

    def eval_sets(self) -> list[data.EvalSet]:
        """This process's share of the first train.eval_steps held-out global batches."""
        if not self.cfg.train.eval_steps:
            return []
        ds = data.global_batches(self.examples(False), self.cfg.train.batch_size, 0)
        batches = [ds[i] for i in range(self.cfg.train.eval_steps)]
        return [data.EvalSet("held_out", 1.0, batches)]


class Readable:
    """Grain-style random access: pair g -> Prepare(record g, rng seeded by (seed, g)); a
    record whose image does not decode is replaced by record g + k * STRIDE (k = 1, 2...)."""

    STRIDE, TRIES = 7919, 16

    def __init__(self, records, prepare: Prepare, seed: int):
        self.records, self.prepare, self.seed = records, prepare, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, g: int) -> dict:
        for k in range(self.TRIES):
            rng = np.random.default_rng([self.seed, int(g), k])
            out = self.prepare(self.records[int(g) + k * self.STRIDE], rng)
            if out is not None:
                return out
        raise ConfigError(f"clip.source: {self.TRIES} unreadable images in a row near pair {g}")


class HeldOut(list):
    """Held-out records, plus what zero-shot classification needs."""

    def __init__(self, records: list, class_names: tuple, templates: tuple):
        super().__init__(records)
        self.class_names, self.templates = class_names, templates


def _image_of(record):
    return record if isinstance(record, images.TarMember) else record["image"]


def _caption_of(record) -> str | None:
    return record.caption if isinstance(record, images.TarMember) else record["caption"]


class Prepare:
    """Grain random map: record -> {images, text, text_segments}, or None if unreadable."""

    def __init__(self, cfg: Config, tokenizer, training: bool):
        self.size, self.length = cfg.vision.image_size, cfg.model.seq_len
        self.tokenizer, self.random_crop = tokenizer, training and cfg.clip.random_crop
        self.skips = images.SkipCounter()

    def __call__(self, record, rng: np.random.Generator) -> dict | None:
        rgb = images.decode(_image_of(record))
        if rgb is None:
            self.skips.add()
            log.warning(
                "skipped an unreadable image (%d so far): %s", self.skips.count, _where(record)
            )
            return None
        text = _caption_of(record)
        if text is None:  # digits: a fresh caption each epoch
            text = images.random_caption(record["label"], rng)
        tokens, segments = images.text_tokens(self.tokenizer, text, self.length)
        pixels = images.resize_crop(rgb, self.size, rng if self.random_crop else None)
        return {"images": pixels, "text": tokens, "text_segments": segments}


def _where(record) -> str:
    return f"{record.path}@{record.offset}" if isinstance(record, images.TarMember) else "record"


def baselines(dataset: ClipData, tokenizer, eval_batches: list[dict]) -> dict:
    """Chance: top-1 of a random guess over the classes, recall@1 of a random ranking."""
    del eval_batches  # each process holds its share; chance is over the global batch
    return {"eval_batch_chance_accuracy": 1.0 / dataset.cfg.train.batch_size}


@partial(jax.jit, static_argnums=0)
def _embed_images(graphdef, params, pixels):
    return nnx.merge(graphdef, params).embed_images(pixels)


@partial(jax.jit, static_argnums=0)
def _embed_texts(graphdef, params, tokens, segments):
    return nnx.merge(graphdef, params).embed_texts(tokens, segments)


def _batched(fn, arrays: dict, setup, batch: int) -> np.ndarray:
    """Run fn over rows in fixed-size, batch-sharded chunks (padding the last one)."""
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in arrays.items()}
        pad = batch - len(next(iter(chunk.values())))
        chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0)]) for k, v in chunk.items()}
        result = fn(**sharding.from_full(chunk, setup.mesh))
        out.append(np.asarray(multihost_utils.process_allgather(result, tiled=True))[: batch - pad])
    return np.concatenate(out)


def extra_eval(setup, params, dataset: ClipData, tokenizer) -> dict:
    return held_out_metrics(setup, params, dataset.held_out, tokenizer)


def held_out_metrics(setup, params, held_out: HeldOut, tokenizer) -> dict:
    """Zero-shot top-1/top-5 over the class names (prompt embeddings averaged over templates)
    and image<->text recall@1/5 over the held-out pairs (every process runs the same); also
    `jaxlm eval --data` on any labelled image source."""
    cfg, g = setup.cfg, setup.graphdef
    prep = Prepare(cfg, tokenizer, training=False)
    # An image that does not decode drops its whole pair: its caption and label go with it.
    kept = [(r, p) for r in held_out if (p := prep(r, np.random.default_rng(0))) is not None]
    if not kept:
        raise ConfigError("the held-out split has no readable image")
    records, rows = [r for r, _ in kept], [p for _, p in kept]
    batch = cfg.train.batch_size
    img = _batched(
        lambda images, **_: _embed_images(g, params, images),
        {"images": np.stack([r["images"] for r in rows])},
        setup,
        batch,
    )

    def embed_texts(captions: list[str]) -> np.ndarray:
        tok = [images.text_tokens(tokenizer, c, cfg.model.seq_len) for c in captions]
        arrays = {"text": np.stack([t for t, _ in tok]), "segments": np.stack([s for _, s in tok])}
        return _batched(
            lambda text, segments: _embed_texts(g, params, text, segments), arrays, setup, batch
        )

    metrics = {}
    captions = [_caption_of(r) for r in records]
    if all(c is not None for c in captions):
        sim = img @ embed_texts(captions).T
        for name, s in (("i2t", sim), ("t2i", sim.T)):
            rank = (s > np.diag(s)[:, None]).sum(1)  # how many beat the true partner
            metrics |= {
                f"eval_{name}_recall_at_1": float((rank < 1).mean()),
                f"eval_{name}_recall_at_5": float((rank < 5).mean()),
            }
    labels = np.asarray([r["label"] if isinstance(r, dict) else -1 for r in records])
    if held_out.class_names and (labels >= 0).all():
        prompts = [
            t.format(word=name, digit=c)
            for c, name in enumerate(held_out.class_names)
            for t in held_out.templates
        ]
        per_class = (
            embed_texts(prompts)
            .reshape(len(held_out.class_names), len(held_out.templates), -1)
            .mean(1)
        )
        per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
        order = np.argsort(-(img @ per_class.T), axis=1)
        metrics["eval_zeroshot_top1"] = float((order[:, 0] == labels).mean())
        metrics["eval_zeroshot_top5"] = float((order[:, :5] == labels[:, None]).any(1).mean())
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
        "images": rng.standard_normal((batch_size, s, s, cfg.vision.channels), dtype=np.float32),
        "text": rng.integers(1, cfg.model.vocab_size, (batch_size, t), dtype=np.int32),
        "text_segments": np.ones((batch_size, t), np.int32),
    }
