"""Load any checkpoint onto this machine's devices (one CPU is enough) and evaluate it.

from jaxlm.evaluate import load
loaded = load("runs/gpt_tiny")            # newest step, parameters sharded over all devices
model = loaded.setup.model(loaded.params)  # an NNX module: logits = model(batch)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from jaxlm import batching, data, sharding, shards
from jaxlm import config as config_lib
from jaxlm.checkpoint import stored, workdir_path
from jaxlm.config import Config, ConfigError, MeshConfig
from jaxlm.step import Setup, build, make_eval_step
from jaxlm.tokenizer import Tokenizer

log = logging.getLogger("jaxlm")


def evaluate(eval_step, params, sets: list[data.EvalSet], mesh) -> dict:
    """Token-weighted means of eval_step's metrics over each set's host batches (each process
    passes its share of every global batch); for a mixture, see `combined`."""
    per_set, fallbacks = [], []
    for s in sets:
        sums = _summed(eval_step, params, s.batches, lambda b: sharding.to_global(b, mesh))
        fallbacks.append(_fallbacks(sums))
        tokens = max(sums.pop("tokens"), 1.0)
        per_set.append({f"eval_{k}": v / tokens for k, v in sums.items()})
    return combined(sets, per_set) | {f"eval_{k}": v for k, v in _added(fallbacks).items()}


def _fallbacks(sums: dict) -> dict:
    """With model.max_segments, {max_segments_exceeded: how many batches ran the dense mask},
    taken out of eval_step's sums (a count, not a per-token mean); else {}."""
    n = sums.pop("max_segments_exceeded", None)
    return {} if n is None else {"max_segments_exceeded": int(n)}


def _added(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) for k in (dicts[0] if dicts else {})}


def combined(sets: list[data.EvalSet], per_set: list[dict]) -> dict:
    """One set's metrics as they are; a mixture's as `<metric>/<entry>` for each entry and
    `<metric>` weighted as the mixture is (what a mixture user watches)."""
    if len(sets) <= 1:
        return per_set[0] if per_set else {}
    out = {k: sum(s.weight * m[k] for s, m in zip(sets, per_set, strict=True)) for k in per_set[0]}
    for s, m in zip(sets, per_set, strict=True):
        out |= {f"{k}/{s.name}": v for k, v in m.items()}
    return out


def baselines(objective, dataset, tokenizer, sets: list[data.EvalSet]) -> dict:
    """The objective's baselines on each held-out set, combined as the eval metrics are."""
    return combined(sets, [objective.baselines(dataset, tokenizer, s.batches) for s in sets])


def _summed(eval_step, params, batches, place) -> dict:
    """eval_step's metrics (sums over tokens, and `tokens`) added up over batches, each put
    on the devices by place(batch)."""
    sums: dict = {}
    for b in batches:
        for k, v in eval_step(params, place(b)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return sums


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
    ckpt, step, cfg, tokenizer = stored(workdir, step)
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
    sets = dataset.eval_sets()
    if not sets:
        raise ConfigError("train.eval_steps=0: nothing to evaluate (set train.eval_steps=N)")
    with jax.set_mesh(mesh):
        metrics = evaluate(make_eval_step(loaded.setup), loaded.params, sets, mesh)
        metrics |= objective.extra_eval(loaded.setup, loaded.params, dataset, loaded.tokenizer)
    return {"step": loaded.step, **metrics, **baselines(objective, dataset, loaded.tokenizer, sets)}


def text_rows(docs: list[np.ndarray], width: int, bos: int, eos: int, overlap: bool) -> dict:
    """Token ids of documents -> packed rows {tokens, tokens_segment_ids, tokens_positions}
    [R, width], as training packs them: [bos] tokens [eos], a segment id per document.

    A document that fits a row is never split, so (with the document mask) it is scored
    exactly as on its own; a longer one is cut into pieces of `width` tokens, which overlap by
    one where the targets are the next tokens (the causal LM), so every target is scored once.
    Pieces go into rows whole, first come first placed."""
    step = width - 1 if overlap else width
    pieces = []
    for d in docs:
        stream = np.concatenate([[bos], d, [eos]]).astype(np.int32)
        pieces += [stream[i : i + width] for i in range(0, len(stream) - overlap, step)]
    tokens, segments, used = [], [], width
    for piece in pieces:
        if used + len(piece) > width:
            tokens.append(np.zeros(width, np.int32))
            segments.append(np.zeros(width, np.int32))
            used = 0
        segment = segments[-1][used - 1] + 1 if used else 1
        tokens[-1][used : used + len(piece)] = piece
        segments[-1][used : used + len(piece)] = segment
        used += len(piece)
    return shards.row_example(np.stack(tokens), np.stack(segments))


def evaluate_text(
    loaded: Loaded, inputs: list[str], batch_size: int | None = None, seed: int = 0
) -> list[dict]:
    """The held-out metrics of a text checkpoint on each input (text files, jsonl, parquet,
    tfds:NAME, prepared directories) and on all of them: one dict per input, then the total.
    A prepared directory is scored as prepared: its rows as packed, both splits.

    Causal LM: loss, perplexity and bits per byte over every next token ([eos] included).
    Masked LM: loss, perplexity and accuracy over the tokens masked as in training, with
    row-seeded masking (`seed`), so the figures repeat on any mesh and batch size."""

    cfg, s, tok = loaded.cfg, loaded.setup, loaded.tokenizer
    if cfg.objective not in ("lm", "mlm"):
        raise ConfigError(
            f"eval --data takes text checkpoints (lm, mlm); this one is {cfg.objective!r}"
        )
    spec = s.objective.data_spec(cfg, tok)
    batch_size = batch_size or cfg.train.batch_size
    sharding.check_batch(batch_size, 1, s.mesh)
    eval_step, causal = make_eval_step(s), cfg.objective == "lm"
    results, sums, fallbacks = [], [], []
    for entry in inputs:
        start = time.perf_counter()
        if data.is_prepared(entry):
            rows, summed = _prepared_rows(entry, tok, spec, cfg.model.seq_len, batch_size)
        else:
            rows, summed = _text_rows(entry, cfg, tok, spec, causal, batch_size)

        def batches(rows=rows):
            for r in rows:  # seeded by global row index: the same masks for any batch size
                index = r.pop("index")
                rngs = (batching.row_rngs(seed, index),) if spec.random else ()
                yield spec.transform(r, *rngs)

        with jax.set_mesh(s.mesh):
            place = functools.partial(sharding.from_full, mesh=s.mesh)
            summed |= _summed(eval_step, loaded.params, batches(), place)
        targets = summed.pop("targets", None)
        if causal and targets is not None and cfg.model.document_mask:
            # text: every target once, no padding counted (without the document mask, a
            # document's [bos] is a target too)
            assert summed["tokens"] == targets, summed
        fallbacks.append(_fallbacks(summed))
        sums.append(summed)
        results.append({"data": entry, **_text_metrics(summed, causal), **fallbacks[-1]})
        seconds = time.perf_counter() - start
        rate = summed["tokens"] / seconds
        log.info("%s: %d tokens in %.1f s, %.0f tokens/s", entry, summed["tokens"], seconds, rate)
    total = _added(sums)
    results.append({"data": "total", **_text_metrics(total, causal), **_added(fallbacks)})
    return results


def _text_rows(entry: str, cfg: Config, tok, spec, causal: bool, batch_size: int):
    """(batches of packed rows with their global `index`, {bytes, targets: how many next
    tokens the documents have}) of a text input."""
    from jaxlm import inputs as inputs_lib

    texts = [
        t
        for unit in inputs_lib.plan_units([entry])
        for t in inputs_lib.documents(unit, cfg.data.text_field)
        if t
    ]
    if not texts:
        raise ConfigError(f"--data {entry}: no documents")
    docs = tok.encode_batch(texts)
    rows = text_rows(docs, spec.row_length, spec.start_id, spec.end_id, overlap=causal)
    pad = -len(rows["tokens"]) % batch_size
    rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
    rows["index"] = np.arange(len(rows["tokens"]))
    batches = [
        {k: v[start : start + batch_size] for k, v in rows.items()}
        for start in range(0, len(rows["index"]), batch_size)
    ]
    targets = float(sum(len(d) + 1 for d in docs))
    return batches, {"bytes": sum(len(t.encode()) for t in texts), "targets": targets}


def _prepared_rows(entry: str, tok, spec, seq_len: int, batch_size: int):
    """(batches of rows with their global `index`, {bytes}) of a prepared directory's
    shards, train and eval splits, read batch by batch (a corpus of any size): the rows as
    prepared, their start / end tokens mapped to the objective's as training does."""
    prepared = shards.Prepared(entry)
    prepared.check(tok, seq_len + 1)
    table = shards.Shards(
        prepared.shards("train") + prepared.shards("eval"), prepared.row_length, entry
    )
    remap = data.Remap.to_spec([prepared], spec)

    def rows():
        for start in range(0, len(table), batch_size):
            index = np.arange(start, start + batch_size)
            tokens, segments = table.read(np.minimum(index, len(table) - 1))
            segments[index >= len(table)] = 0  # the last batch's padding scores nothing
            tokens[index >= len(table)] = 0
            yield remap(shards.row_example(tokens, segments)) | {"index": index}

    return rows(), {"bytes": prepared.manifest["bytes"]}


def evaluate_images(
    loaded: Loaded,
    inputs: list[str],
    classes: list[str] | None = None,
    batch_size: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> list[dict]:
    """Zero-shot top-1 / top-5 of a contrastive checkpoint on each labelled image source (a
    prepared directory, `digits`, `tar:GLOB`, `tfds:NAME[:DATA_DIR]`): its held-out pairs
    (as training split them, prepared into WORKDIR/prepared), or all of them if it holds none
    out (a tfds dataset's test or validation split); class names from `classes` or the
    source. Each process embeds its share."""
    from jaxlm import clip, clip_data

    cfg, s = loaded.cfg, loaded.setup
    if batch_size:
        sharding.check_batch(batch_size, 1, s.mesh)
        train = dataclasses.replace(cfg.train, batch_size=batch_size)
        cfg = dataclasses.replace(cfg, train=train)
        s = dataclasses.replace(s, cfg=cfg)
    where = workdir_path(workdir) if workdir else data.CACHE
    results = []
    for entry in inputs:
        held = 0 if entry.startswith("tfds:") else -1
        z = clip_data.zeroshot_set(cfg, entry, where, "--data", held, tuple(classes or ()))
        start = time.perf_counter()
        with jax.set_mesh(s.mesh):
            batches = z.batches(cfg, loaded.tokenizer)
            metrics = clip.zeroshot_metrics(s, loaded.params, z, batches, loaded.tokenizer, True)
        log.info("%s: %d images in %.1f s", entry, z.n, time.perf_counter() - start)
        metrics = {k.removeprefix("eval_"): v for k, v in metrics.items()}
        results.append({"data": entry, **metrics, "images": z.n, "classes": len(z.names)})
    return results


def _text_metrics(summed: dict, causal: bool) -> dict:
    """Token-weighted means from eval_step's sums; tokens are the scored targets."""
    tokens = summed["tokens"]
    out = {k: v / tokens for k, v in summed.items() if k not in ("tokens", "bytes")}
    out["perplexity"] = math.exp(out["loss"])
    if causal:
        out["bits_per_byte"] = summed["loss"] / math.log(2) / summed["bytes"]
    return out | {"tokens": int(tokens), "bytes": summed["bytes"]}
