"""Grain pipelines: text files -> documents -> tokens -> packed rows -> examples -> batches.

Each process reads its own slice of the documents (`[process_index::process_count]`) and
builds its share of the global batch; `sharding.to_global` joins the shares into one sharded
array. The Grain iterator's state is saved in every checkpoint, so a resumed run sees exactly
the batches an uninterrupted one would have. What differs between objectives (row length, the
tokens around a document, the row -> example transform) comes in a `DataSpec`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxlm.config import ConfigError, DataConfig

BUILTIN_CORPUS = Path(__file__).parent / "corpus"


def corpus_files(files: tuple[str, ...]) -> list[Path]:
    """`data.files` entries (paths or globs) -> existing files; () means the built-in corpus."""
    if not files:
        return sorted(BUILTIN_CORPUS.glob("*.txt"))
    paths = []
    for entry in files:
        matches = sorted(Path().glob(entry)) if any(c in entry for c in "*?[") else [Path(entry)]
        if not matches or not all(p.is_file() for p in matches):
            raise ConfigError(f"data.files: {entry!r} matches no file")
        paths.extend(matches)
    return paths


def _paragraph_documents(text: str, doc_chars: int) -> list[str]:
    """Consecutive blank-line-separated paragraphs grouped into documents of ~doc_chars."""
    docs, current = [], ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if current and len(current) + len(para) > doc_chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        docs.append(current)
    return docs


def read_documents(paths: list[Path], doc_chars: int) -> list[str]:
    """.jsonl: one document per line's "text"; anything else: grouped paragraphs."""
    docs = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            found = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    found.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(
                        f"{path}:{i}: expected a JSON object with a 'text' field"
                    ) from None
        else:
            found = _paragraph_documents(text, doc_chars)
        if not any(doc.strip() for doc in found):
            raise ConfigError(f"data file {str(path)!r} is empty: no text to train on")
        docs.extend(found)
    return docs


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded train / held-out split of whole items (documents, image-text pairs), with at
    least one item on each side."""
    if len(items) < 2:
        raise ConfigError(f"need at least 2 items for a train/eval split, found {len(items)}")
    held = np.random.default_rng(seed).random(len(items)) < eval_fraction
    held[0], held[-1] = True, False  # never empty on either side
    train = [d for d, h in zip(items, held, strict=True) if not h]
    return train, [d for d, h in zip(items, held, strict=True) if h]


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    return split(read_documents(corpus_files(cfg.files), cfg.doc_chars), cfg.eval_fraction, seed)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    row_length: int  # tokens per packed row
    start_id: int  # put before every document ([bos] or [CLS])
    end_id: int  # and after it ([eos] or [SEP])
    transform: Callable[[dict, np.random.Generator], dict]  # packed row -> example, seeded


class Tokenize:
    """Document -> [start] + tokens + [end]."""

    def __init__(self, tokenizer, start_id: int, end_id: int):
        self.tokenizer, self.start_id, self.end_id = tokenizer, start_id, end_id

    def __call__(self, doc: str) -> dict:
        ids = self.tokenizer.encode(doc)
        return {"tokens": np.concatenate([[self.start_id], ids, [self.end_id]]).astype(np.int32)}


def pipeline(docs: list[str], tokenizer, spec: DataSpec, local_batch: int, seed: int):
    """An endless, seeded stream of this process's batches (a Grain IterDataset). Grain's read
    threads tokenize documents ahead of the trainer, in order (sentencepiece releases the GIL)."""
    # Imported here so that models and benchmarks run where Grain is not installed.
    import grain
    from grain.experimental import ConcatThenSplitIterDataset

    ds = grain.MapDataset.source(docs)[jax.process_index() :: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.map(Tokenize(tokenizer, spec.start_id, spec.end_id)).to_iter_dataset()
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": spec.row_length})
    return ds.random_map(spec.transform, seed=seed).batch(local_batch, drop_remainder=True)


def token_counts(docs: list[str], tokenizer) -> np.ndarray:
    """How often each token id occurs in the documents (float64, [vocab])."""
    counts = np.zeros(tokenizer.vocab_size, np.float64)
    for ids in tokenizer.encode_batch(docs):
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    return counts
