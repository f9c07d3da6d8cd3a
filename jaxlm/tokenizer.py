"""Tokenizers, stored inside every checkpoint.

- `Tokenizer`: sentencepiece, trained in memory by jaxlm. Fixed ids: 0 [PAD], 1 unk, 2 bos,
  3 eos; then the newline (a token of its own: no whitespace is normalised away, so decoding
  gives back the text) and [CLS], [SEP], [MASK] for the encoder objective.
- `WordPiece` (jaxlm/wordpiece.py): BERT's WordPiece, for checkpoints imported from Hugging Face.
- `HFTokenizer`: a Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. to prepare
  shards for a model imported from Hugging Face.

All offer encode / decode / vocab_size / piece_id / word_starts and serialise to a dict;
`fingerprint` (sha256 of that dict) ties prepared token shards to the tokenizer that made them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
from etils import epath

from jaxlm.config import ConfigError
from jaxlm.wordpiece import WordPiece

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("\n", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """A sentencepiece model that pickles as its proto (for Grain worker processes)."""

    add_bos = True  # jaxlm trains on [bos] tokens [eos]: a prompt starts with [bos] too

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

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_id(self, piece: str) -> int | None:
        """The id of a piece, or None where the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

    def special_ids(self) -> np.ndarray:
        """Control and user-defined pieces: never masked, never a random replacement."""
        sp = self._sp
        return np.asarray(
            [
                i
                for i in range(self.vocab_size)
                if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in SPECIALS
            ],
            np.int32,
        )

    def word_starts(self) -> np.ndarray:
        """[vocab] bool: the piece begins a word (sentencepiece marks those with U+2581)."""
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        return np.asarray([p.startswith("\u2581") or p in SPECIALS for p in pieces])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(texts)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.proto)

    def to_dict(self) -> dict:
        return {"sentencepiece": base64.b64encode(self.proto).decode()}

    def hf_json(self) -> str:
        """This model as a Hugging Face `tokenizer.json` giving the same ids: sentencepiece's
        pieces and scores (merges recovered from them for BPE), its dummy-prefix `\u2581`, the
        user-defined pieces matched whole (after normalising, as sentencepiece matches them),
        and [bos] prepended as jaxlm does."""
        from sentencepiece import sentencepiece_model_pb2 as pb
        from tokenizers import AddedToken, Regex, decoders, models, normalizers
        from tokenizers import Tokenizer as FastTokenizer

        proto = pb.ModelProto.FromString(self.proto)
        kinds = pb.ModelProto.SentencePiece
        pieces = [(p.piece, p.score) for p in proto.pieces]
        unk = next(i for i, p in enumerate(proto.pieces) if p.type == kinds.UNKNOWN)
        if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
            # Hugging Face's unigram differs from sentencepiece's on rare words and unknown
            # characters (8 of 5,620 Shakespeare texts): no tokenizer that almost matches.
            raise ConfigError(
                "only a BPE sentencepiece model converts to a tokenizer.json that gives the "
                "same ids; this one is unigram"
            )
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces), unk_token=pieces[unk][0], fuse_unk=True)
        fast = FastTokenizer(model)
        user = [p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED]
        rules = [normalizers.Replace(" ", "\u2581")]
        if proto.normalizer_spec.add_dummy_prefix:
            # One U+2581 before the text. A user-defined piece is normalised like the text
            # before it is matched, so the prefix must spare it ("\n" stays "\n"); left
            # unmatched: a text that starts with one, where sentencepiece puts a lone U+2581.
            spared = "|".join(re.escape(piece) for piece in user)
            start = Regex(rf"\A(?!{spared})" if spared else r"\A")
            rules.insert(0, normalizers.Replace(start, "\u2581"))
        fast.normalizer = normalizers.Sequence(rules)
        fast.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        special = (kinds.CONTROL, kinds.UNKNOWN)
        fast.add_special_tokens(
            [AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type in special]
        )
        fast.add_tokens([AddedToken(piece, normalized=True, special=False) for piece in user])
        fast.post_processor = _bos_first(self.piece(self.bos_id), self.bos_id)
        return fast.to_str()


def _bos_first(bos: str, bos_id: int):
    """A tokenizer.json post-processor that starts every text with [bos], as jaxlm does."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def _bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """Sentencepiece BPE keeps pieces, not merges: it joins the adjacent pair whose joined
    piece scores highest. Every split of a piece into two known pieces is a merge, ranked by
    the joined piece's score."""
    ids = {piece: i for i, (piece, _) in enumerate(pieces)}
    ranked = []
    for piece, score in pieces:
        for j in range(1, len(piece)):
            left, right = piece[:j], piece[j:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`); start/end tokens come from the
    `tokenizer_config.json` beside it, else from the usual special-token names. add_bos: a
    prompt starts with [bos] (as jaxlm trains; an imported model says for itself)."""

    START_NAMES = ("<|begin_of_text|>", "<s>", "[CLS]", "<|endoftext|>", "<|im_start|>")
    END_NAMES = ("<|end_of_text|>", "</s>", "[SEP]", "<|endoftext|>", "<|im_end|>")

    def __init__(
        self,
        tokenizer_json: str,
        bos: str | None = None,
        eos: str | None = None,
        add_bos: bool = True,
    ):
        from tokenizers import Tokenizer as FastTokenizer

        self.json, self.add_bos = tokenizer_json, add_bos
        self._tok = FastTokenizer.from_str(tokenizer_json)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.bos = bos or next((n for n in self.START_NAMES if n in vocab), None)
        self.eos = eos or next((n for n in self.END_NAMES if n in vocab), None)
        if self.bos is None or self.eos is None:
            raise ConfigError(
                "Hugging Face tokenizer: no start / end-of-text token found (looked for "
                f"{self.START_NAMES} and {self.END_NAMES}; give tokenizer_config.json beside it)"
            )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._tok.token_to_id(self.bos)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(self.eos)

    def piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def special_ids(self) -> np.ndarray:
        added = self._tok.get_added_tokens_decoder()
        return np.asarray(sorted(i for i, t in added.items() if t.special), np.int32)

    def word_starts(self) -> np.ndarray:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        starts = np.zeros(self.vocab_size, bool)
        for piece, i in vocab.items():
            starts[i] = not piece.startswith("##")
        return starts

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        out = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in out]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {
            "hf_tokenizer": self.json,
            "bos": self.bos,
            "eos": self.eos,
            "add_bos": self.add_bos,
        }

    def post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's own post-processor starts a text with [bos] (Llama's does,
        GPT-2's and SmolLM2's do not)."""
        return self._tok.encode("a", add_special_tokens=True).ids[0] == self.bos_id

    def hf_json(self) -> str:
        """tokenizer.json whose post-processor prepends [bos] where add_bos says so."""
        if not self.add_bos:
            return self.json
        from tokenizers import Tokenizer as FastTokenizer

        fast = FastTokenizer.from_str(self.json)
        fast.post_processor = _bos_first(self.bos, self.bos_id)
        return fast.to_str()


# what every loader returns: encode/decode, the special ids, to_dict
AnyTokenizer = Tokenizer | HFTokenizer | WordPiece


def from_dict(d: dict) -> AnyTokenizer:
    if "sentencepiece" in d:
        return Tokenizer(base64.b64decode(d["sentencepiece"]))
    if "hf_tokenizer" in d:
        return HFTokenizer(d["hf_tokenizer"], d["bos"], d["eos"], d.get("add_bos", True))
    return WordPiece(d["wordpiece"], d.get("lowercase", True))


def hf_files(tokenizer: AnyTokenizer) -> dict[str, str]:
    """The files a Hugging Face directory holds for this tokenizer (name -> text), which
    `AutoTokenizer` loads to give jaxlm's ids: tokenizer.json, or BERT's vocab.txt."""
    if isinstance(tokenizer, WordPiece):
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase}
        files = {"vocab.txt": "\n".join(tokenizer.vocab) + "\n"}
    else:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id),
            "add_bos_token": tokenizer.add_bos,
        }
        files = {"tokenizer.json": tokenizer.hf_json()}
    files["tokenizer_config.json"] = json.dumps(config, indent=2)
    return files


def fingerprint(tokenizer) -> str:
    """sha256 of the serialised tokenizer: equal fingerprints, equal token ids."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()


MAX_TRAINING_SENTENCES = 2_000_000  # sentencepiece samples this many lines, shuffled


def train(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    sample_lines: int = MAX_TRAINING_SENTENCES,
    key: str = "model.vocab_size",
) -> Tokenizer:
    """Train on an iterable of documents (split into lines for sentencepiece). Sentencepiece
    keeps a shuffled sample of at most `sample_lines` lines: memory stays bounded whatever the
    corpus size. The sample is random once there are more lines than that: two trainings on
    the same text may differ, so a multi-process run trains on process 0 only. `key` names
    the setting that gave vocab_size, for the error a corpus too small for it raises."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=PAD,
            pad_piece="[PAD]",
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            user_defined_symbols=list(SPECIALS),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=0.9995,
            hard_vocab_limit=False,  # a small corpus (captions) may hold fewer pieces
            num_threads=1,
            input_sentence_size=sample_lines,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(
            f"{key}={vocab_size}: training a sentencepiece model of that size failed: {e}"
        ) from None
    return Tokenizer(out.getvalue())


def load(path: str | Path) -> AnyTokenizer:
    """A sentencepiece `.model`, a Hugging Face `tokenizer.json`, or a tokenizer jaxlm wrote
    (`jaxlm_tokenizer.json`, e.g. in a prepared directory); local or a URL (`gs://...`)."""
    file = epath.Path(path)
    if not file.is_file():
        raise ConfigError(
            f"tokenizer file {str(path)!r} not found (expected a sentencepiece .model or a "
            "Hugging Face tokenizer.json)"
        )
    if file.name == JAXLM_TOKENIZER:
        return from_dict(json.loads(file.read_text()))
    if file.suffix == ".json":
        config = file.parent / "tokenizer_config.json"
        special = json.loads(config.read_text()) if config.is_file() else {}
        names = [special.get(k) for k in ("bos_token", "eos_token")]
        names = [n.get("content") if isinstance(n, dict) else n for n in names]
        try:
            tok = HFTokenizer(file.read_text(), *names)
            # [bos] first only where the source says so: tokenizer_config's add_bos_token,
            # else what tokenizer.json's own post-processor adds (SmolLM2 adds none)
            if "add_bos_token" in special:
                tok.add_bos = bool(special["add_bos_token"])
            else:
                tok.add_bos = tok.post_processor_adds_bos()
            return tok
        except Exception as e:
            if isinstance(e, ConfigError):
                raise ConfigError(f"tokenizer file {str(path)!r}: {e}") from None
            raise ConfigError(
                f"tokenizer file {str(path)!r} is not a Hugging Face tokenizer.json ({e})"
            ) from None
    try:
        return Tokenizer(file.read_bytes())
    except RuntimeError:
        raise ConfigError(f"tokenizer file {str(path)!r} is not a sentencepiece model") from None


JAXLM_TOKENIZER = "jaxlm_tokenizer.json"  # to_dict() as JSON, beside prepared shards
