"""BERT's WordPiece tokenizer, for checkpoints imported from Hugging Face (jaxlm trains
sentencepiece); stored in checkpoints through jaxlm.tokenizer like the others."""

from __future__ import annotations

import unicodedata

import numpy as np


class WordPiece:
    """BERT's WordPiece (lower-casing, accent stripping, punctuation split, greedy longest
    match with ## continuations), enough to use an imported BERT checkpoint end to end."""

    def __init__(self, vocab: list[str], lowercase: bool = True):
        self.vocab, self.lowercase = list(vocab), lowercase
        self._ids = {p: i for i, p in enumerate(self.vocab)}
        self._unk = self._ids.get("[UNK]", 0)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def bos_id(self) -> int:
        return self._ids["[CLS]"]

    @property
    def eos_id(self) -> int:
        return self._ids["[SEP]"]

    def piece_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def special_ids(self) -> np.ndarray:
        return np.asarray(
            [i for i, p in enumerate(self.vocab) if p.startswith("[") and p.endswith("]")], np.int32
        )

    def word_starts(self) -> np.ndarray:
        return np.asarray([not p.startswith("##") for p in self.vocab])

    def _words(self, text: str) -> list[str]:
        if self.lowercase:
            text = "".join(
                c
                for c in unicodedata.normalize("NFD", text.lower())
                if unicodedata.category(c) != "Mn"
            )
        words = []
        for chunk in text.split():
            current = ""
            for c in chunk:
                if _is_punctuation(c) or _is_cjk(c):
                    words += [current, c] if current else [c]
                    current = ""
                elif unicodedata.category(c)[0] != "C":
                    current += c
            if current:
                words.append(current)
        return words

    def encode(self, text: str) -> np.ndarray:
        ids = []
        for word in self._words(text):
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self._ids:
                        break
                    end -= 1
                if end == start:
                    pieces = [self._unk]
                    break
                pieces.append(self._ids[piece])
                start = end
            ids += pieces if len(word) <= 100 else [self._unk]
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        text = " ".join(self.vocab[int(i)] for i in ids)
        return text.replace(" ##", "")

    def to_dict(self) -> dict:
        return {"wordpiece": self.vocab, "lowercase": self.lowercase}


def _is_punctuation(c: str) -> bool:
    o = ord(c)
    if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF
