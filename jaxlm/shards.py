"""Prepared directories (`jaxlm data prepare`) and the rows in their ArrayRecord shards.

`Prepared` reads a directory's manifest and token counts and checks it against the run's
tokenizer and row length; `Shards` reads rows by global index across a split's shards, one
range read per row (array_record's `read([rows])` costs time in proportion to the shard, and
Grain's data source starts a thread per call); `row_example` gives each token its position in
its document piece.
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


class Shards:
    """A split's ArrayRecord shards as one row-indexed table, told each shard's rows and size
    by the manifest (no file is opened or stat-ed at start-up, which over gcsfuse costs a
    round trip per shard; each is checked and opened on first read).

    A row is read with `ArrayRecordReader.read(row, row + 1)`: about 19 us for a 1,025-token
    row here, whatever the shard's size. (Its `read([rows])`, which Grain's
    ArrayRecordDataSource uses, costs about 4 ns per record *in the file* per call: 0.75 ms
    per call on a 193k-row shard; and the data source starts a Python thread per shard per
    batch.) A damaged shard is named in the error."""

    def __init__(self, shards: list[tuple[epath.Path, int, int]], row_length: int, what: str):
        if not shards:
            raise ConfigError(f"{what}: no rows")
        self.paths = [str(p) for p, _, _ in shards]
        self.sizes = [size for _, _, size in shards]  # checked when a shard is first opened
        self.ends = np.cumsum([n for _, n, _ in shards])
        self.starts = self.ends - [n for _, n, _ in shards]
        self.row_length = row_length
        self._readers: list = [None] * len(shards)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.ends[-1])

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows [n] -> tokens and segment ids, [n, row_length] int32 each."""
        rows = np.asarray(rows, np.int64)
        width = 6 * self.row_length  # int32 tokens, then uint16 segment ids
        shard = np.searchsorted(self.ends, rows, side="right")
        records: list[bytes] = []
        for r, k in zip(rows, shard, strict=True):
            position = int(r - self.starts[k])
            try:
                (record,) = self._reader(k).read(position, position + 1)
            except Exception as e:
                raise ConfigError(f"prepared shard {self.paths[k]} is damaged: {e}") from None
            if len(record) != width:
                raise ConfigError(
                    f"prepared shard {self.paths[k]} is damaged (row {position}: a record of "
                    f"{len(record)} bytes; rows of {self.row_length} tokens take {width})"
                )
            records.append(record)
        return prepare_lib.decode_rows(records, self.row_length)

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


def row_example(tokens: np.ndarray, segments: np.ndarray) -> dict:
    """Packed rows [..., R] with each token's position within its document piece."""
    index = np.arange(tokens.shape[-1], dtype=np.int32)
    starts = np.ones(tokens.shape, bool)
    starts[..., 1:] = segments[..., 1:] != segments[..., :-1]
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return {"tokens": tokens, "tokens_segment_ids": segments, "tokens_positions": positions}
