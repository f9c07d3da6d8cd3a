"""Prepared directories (`jaxlm data prepare`) and the rows in their ArrayRecord shards.

`Prepared` reads a directory's manifest and token counts and checks it against the run's
tokenizer and row length; `Shards` reads rows by global index across a split's shards, one
range read per record (`Records`, which the image-text shards use too); `row_example` gives
each token its position in its document piece.
"""

from __future__ import annotations

import json
import threading

import numpy as np
from etils import epath

from jaxlm import prepare as prepare_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import ConfigError
from jaxlm.inputs import is_remote


class Prepared:
    """A prepared directory: its manifest, token counts and shards."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        manifest = self.path / prepare_lib.MANIFEST
        if not manifest.exists():
            raise ConfigError(
                f"{self.path}: no {prepare_lib.MANIFEST}; not a prepared directory, or its "
                "preparation did not finish (run the same `jaxlm data prepare` again)"
            )
        self.manifest = json.loads(manifest.read_text())
        self.manifest_path = manifest

    @property
    def row_length(self) -> int:
        return self.manifest["row_length"]

    @property
    def tokens(self) -> int:
        return self.manifest["train"]["tokens"]

    def counts(self) -> np.ndarray:
        with (self.path / self.manifest["counts"]).open("rb") as f:
            return np.load(f).astype(np.float64)

    def check(self, tokenizer, row_length: int) -> None:
        want = tokenizer_lib.fingerprint(tokenizer)
        if self.manifest["tokenizer_fingerprint"] != want:
            raise ConfigError(
                f"{self.manifest_path}: prepared with another tokenizer (fingerprint "
                f"{self.manifest['tokenizer_fingerprint'][:12]}..., this run's is {want[:12]}...)"
            )
        if self.row_length != row_length:
            raise ConfigError(
                f"{self.manifest_path}: rows of {self.row_length} tokens (prepared with --seq-len "
                f"{self.row_length - 1}), but model.seq_len={row_length - 1} needs "
                f"{row_length}: prepare again with --seq-len {row_length - 1}"
            )

    def shards(self, split: str) -> list[tuple[epath.Path, int, int]]:
        """(path, rows, bytes) of the split's non-empty shards: split is train or eval."""
        return [
            (self.path / s[split]["file"], s[split]["rows"], s[split]["size"])
            for s in self.manifest["shards"]
            if s[split]["rows"]
        ]


class Records:
    """Records of ArrayRecord shards as one table indexed from 0, each shard given as (path,
    records, bytes, first): its records [first, first + records) are the table's. Told each
    shard's records and size by a manifest, it opens or stats no file at start-up (over
    gcsfuse a round trip per shard); each is checked and opened on first read.

    A record is read with `ArrayRecordReader.read(i, i + 1)`: about 19 us for a 1,025-token
    row here, whatever the shard's size. (Its `read([rows])`, which Grain's
    ArrayRecordDataSource uses, costs about 4 ns per record *in the file* per call: 0.75 ms
    per call on a 193k-row shard; and the data source starts a Python thread per shard per
    batch.) A damaged shard is named in the error. Pickled without its open readers, so a
    Grain worker process opens its own."""

    def __init__(self, shards: list[tuple], what: str):
        if not shards:
            raise ConfigError(f"{what}: no rows")
        self.paths = [str(s[0]) for s in shards]
        self.sizes = [s[2] for s in shards]  # checked when a shard is first opened
        self.firsts = [s[3] if len(s) > 3 else 0 for s in shards]
        self.ends = np.cumsum([s[1] for s in shards])
        self.starts = self.ends - [s[1] for s in shards]
        self._readers: list = [None] * len(shards)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_readers": [None] * len(self.paths), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def get(self, rows: np.ndarray) -> list[tuple[int, int, bytes]]:
        """Rows [n] -> (shard, position in the shard, record) each."""
        rows = np.asarray(rows, np.int64)
        shard = np.searchsorted(self.ends, rows, side="right")
        out = []
        for r, k in zip(rows, shard, strict=True):
            position = int(r - self.starts[k]) + self.firsts[k]
            try:
                (record,) = self._reader(k).read(position, position + 1)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"prepared shard {self.paths[k]} is damaged: {e}") from None
            out.append((int(k), position, record))
        return out

    def _reader(self, k: int):
        from array_record.python.array_record_module import ArrayRecordReader

        with self._lock:
            if self._readers[k] is None:
                path = epath.Path(self.paths[k])
                if not is_remote(self.paths[k]):
                    found = path.stat().length if path.exists() else None
                    if found != self.sizes[k]:
                        raise ConfigError(
                            f"prepared shard {path} is damaged or missing: {found} bytes, the "
                            f"manifest says {self.sizes[k]}; prepare the directory again"
                        )
                try:
                    self._readers[k] = ArrayRecordReader(
                        self.paths[k], "readahead_buffer_size:0", file_reader_buffer_size=32768
                    )
                except Exception as e:
                    raise ConfigError(
                        f"prepared shard {self.paths[k]} cannot be read: {e}"
                    ) from None
            return self._readers[k]


class Shards(Records):
    """A text split's shards: rows of `row_length` tokens and their segment ids."""

    def __init__(self, shards: list[tuple], row_length: int, what: str):
        super().__init__(shards, what)
        self.row_length = row_length

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows [n] -> tokens and segment ids, [n, row_length] int32 each."""
        width = 6 * self.row_length  # int32 tokens, then uint16 segment ids
        records = []
        for k, position, record in self.get(rows):
            if len(record) != width:
                raise ConfigError(
                    f"prepared shard {self.paths[k]} is damaged (row {position}: a record of "
                    f"{len(record)} bytes; rows of {self.row_length} tokens take {width})"
                )
            records.append(record)
        return prepare_lib.decode_rows(records, self.row_length)


def document_starts(segments: np.ndarray) -> np.ndarray:
    """Where each document piece of packed rows [..., R] begins (a run of equal segment ids,
    padding's included: what attention's packed layout counts too)."""
    starts = np.ones(segments.shape, bool)
    starts[..., 1:] = segments[..., 1:] != segments[..., :-1]
    return starts


def row_example(tokens: np.ndarray, segments: np.ndarray) -> dict:
    """Packed rows [..., R] with each token's position within its document piece."""
    index = np.arange(tokens.shape[-1], dtype=np.int32)
    starts = document_starts(segments)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return {"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions}


def synthetic_segments(
    rows: int, length: int, rng: np.random.Generator, per_row: float = 4.0
) -> np.ndarray:
    """Segment ids [rows, length] of documents packed as `jaxlm data prepare` packs them (one
    after another, the last cut at the row's end), of geometric lengths with mean length /
    per_row: benchmark batches, since what attention costs with the document mask can depend
    on how many documents a row holds (cuDNN's packed layout)."""
    lengths = rng.geometric(per_row / length, (rows, length))  # more than a row can hold
    new = np.zeros((rows, length), bool)
    ends = np.cumsum(lengths, axis=1)
    for row, row_ends in zip(new, ends, strict=True):
        row[row_ends[row_ends < length]] = True
    return (1 + np.cumsum(new, axis=1)).astype(np.int32)
