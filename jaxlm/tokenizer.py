"""Sentencepiece tokenizers: trained in memory by jaxlm, stored inside every checkpoint.

Fixed special ids: 0 pad, 1 unk, 2 bos, 3 eos. Newlines are a token of their own and no
whitespace is normalised away, so decoding gives back the text (verse keeps its lines).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from jaxlm.config import ConfigError

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """A sentencepiece model that pickles as its proto (for Grain worker processes)."""

    def __init__(self, proto: bytes):
        self.proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    def __getstate__(self) -> bytes:
        return self.proto

    def __setstate__(self, proto: bytes) -> None:
        self.__init__(proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.proto)


def train(texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> Tokenizer:
    """Train on an iterable of documents (split into lines for sentencepiece)."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD,
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=0.9995,
            num_threads=1,  # deterministic: every process trains the same model
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(
            f"sentencepiece training with vocab_size={vocab_size} failed: {e}"
        ) from None
    return Tokenizer(out.getvalue())


def load(path: str | Path) -> Tokenizer:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"tokenizer file {str(path)!r} not found (expected a sentencepiece .model)"
        )
    try:
        return Tokenizer(file.read_bytes())
    except RuntimeError:
        raise ConfigError(f"tokenizer file {str(path)!r} is not a sentencepiece model") from None
