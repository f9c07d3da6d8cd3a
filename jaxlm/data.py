"""Grain pipelines: text files -> documents -> tokens -> packed rows -> per-process batches.

Each process reads its own slice of the documents (`[process_index::process_count]`) and
builds its share of the global batch; `sharding.to_global` joins the shares into one sharded array.
The Grain iterator's state is saved in every checkpoint, so a resumed run sees exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from jaxlm.config import ConfigError, DataConfig
from jaxlm.tokenizer import Tokenizer

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


def split(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded, document-level train / held-out split (at least one document each)."""
    if len(docs) < 2:
        raise ConfigError(f"need at least 2 documents for a train/eval split, found {len(docs)}")
    held = np.random.default_rng(seed).random(len(docs)) < eval_fraction
    held[0], held[-1] = True, False  # never empty on either side
    train = [d for d, h in zip(docs, held, strict=True) if not h]
    return train, [d for d, h in zip(docs, held, strict=True) if h]


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    return split(read_documents(corpus_files(cfg.files), cfg.doc_chars), cfg.eval_fraction, seed)


class Tokenize(grain.transforms.Map):
    """Document -> [bos] + tokens + [eos]."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, doc: str) -> dict:
        ids = self.tokenizer.encode(doc)
        tok = self.tokenizer
        return {"tokens": np.concatenate([[tok.bos_id], ids, [tok.eos_id]]).astype(np.int32)}


def pipeline(
    docs: list[str],
    tokenizer: Tokenizer,
    seq_len: int,
    local_batch: int,
    seed: int,
    to_example: Callable[[dict], dict],
) -> grain.IterDataset:
    """An endless, seeded stream of this process's batches of packed rows. Grain's read
    threads tokenize documents ahead of the trainer, in order (sentencepiece releases the GIL)."""
    ds = grain.MapDataset.source(docs)[jax.process_index() :: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat(None).map(Tokenize(tokenizer)).to_iter_dataset()
    # seq_len + 1 tokens per row: inputs are the first seq_len, targets the last seq_len.
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    ds = ds.map(to_example).batch(local_batch, drop_remainder=True)
    return ds


def unigram_log_probs(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Log-probabilities of the best context-free model of the training targets (add-one
    smoothed token frequencies), the baseline any trained model must beat."""
    counts = np.zeros(tokenizer.vocab_size, np.float64)
    for ids in tokenizer.encode_batch(docs):
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    counts[tokenizer.eos_id] += len(docs)
    return np.log((counts + 1.0) / (counts.sum() + tokenizer.vocab_size))


def unigram_loss(log_probs: np.ndarray, batches: list[dict]) -> float:
    """Weighted cross-entropy of the unigram model on the same targets as eval_loss."""
    total = weight = 0.0
    for b in batches:
        total -= float((log_probs[b["targets"]] * b["weights"]).sum())
        weight += float(b["weights"].sum())
    return total / max(weight, 1.0)
