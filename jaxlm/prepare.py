"""`jaxlm data prepare`: text -> tokenized, packed ArrayRecord shards + `manifest.json`.

    jaxlm data prepare corpus/*.jsonl.zst --tokenizer tok.model --out gs://bucket/corpus_1024 \
        --seq-len 1024 --workers 32

The inputs are cut into work units (byte ranges of .txt / .jsonl files, one compressed file,
parquet row groups, TFDS index ranges); a pool of worker processes turns each unit into one
shard pair: `train-NNNNN.array_record` and `eval-NNNNN.array_record` (documents held out with
probability `--eval-fraction`, seeded per unit), then `shard-NNNNN.json` with its counts. A
rerun after an interruption skips the units whose json exists. The manifest, written last,
sums them up; training reads nothing else at start-up.

A record is one packed row of `row_length = seq_len + 1` tokens: documents as
`[start] tokens [end]` laid end to end (a document may continue into the next row), stored
as int32 tokens followed by uint16 segment ids (1, 2, ... per document within the row, 0 for
the padding of a shard's last row). Rows are read by random access, so any row of any shard
can be the next one a training step needs, whatever the number of hosts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from etils import epath

from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import ConfigError
from jaxlm.inputs import Unit, documents, plan_units
from jaxlm.markers import MANIFEST, begin, copy_whole, read_marker, write_json

log = logging.getLogger("jaxlm")

COUNTS = "token_counts.npy"  # train-split occurrences of each token id, for the baselines
FORMAT = "jaxlm.prepared/1"


class Packer:
    """Documents laid end to end, cut into rows of `row_length` tokens with segment ids."""

    def __init__(self, row_length: int):
        self.row_length = row_length
        self.tokens = np.zeros(0, np.int32)
        self.docs = np.zeros(0, np.int64)  # a running document number per token
        self.next_doc = 0

    def add(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Append documents; returns the complete rows [n, 2, row_length] (tokens, segments)."""
        if not seqs:
            return np.zeros((0, 2, self.row_length), np.int32)
        lengths = [len(s) for s in seqs]
        docs = np.repeat(np.arange(self.next_doc, self.next_doc + len(seqs)), lengths)
        self.next_doc += len(seqs)
        self.tokens = np.concatenate([self.tokens, *seqs])
        self.docs = np.concatenate([self.docs, docs])
        n = len(self.tokens) // self.row_length
        return self._rows(n)

    def flush(self) -> np.ndarray:
        """The last, partial row, padded with token 0 / segment 0."""
        if not len(self.tokens):
            return np.zeros((0, 2, self.row_length), np.int32)
        pad = self.row_length - len(self.tokens)
        rows = self._rows(1, pad)
        self.tokens, self.docs = self.tokens[:0], self.docs[:0]
        return rows

    def _rows(self, n: int, pad: int = 0) -> np.ndarray:
        cut = n * self.row_length - pad
        tokens = np.pad(self.tokens[:cut], (0, pad)).reshape(n, self.row_length)
        docs = self.docs[:cut]
        segments = np.pad(
            docs - np.repeat(docs[:: self.row_length], self.row_length)[:cut] + 1, (0, pad)
        ).reshape(n, self.row_length)
        self.tokens, self.docs = self.tokens[cut:], self.docs[cut:]
        return np.stack([tokens, segments], axis=1).astype(np.int32)


def encode_row(row: np.ndarray) -> bytes:
    """[2, R] (tokens, segment ids) -> int32 tokens then uint16 segment ids."""
    return row[0].astype(np.int32).tobytes() + row[1].astype(np.uint16).tobytes()


def decode_rows(records: list[bytes], row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of encode_row -> tokens and segment ids, [n, row_length] int32 each."""
    width = 6 * row_length
    flat = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), width)
    tokens = np.ascontiguousarray(flat[:, : 4 * row_length]).view(np.int32)
    segments = np.ascontiguousarray(flat[:, 4 * row_length :]).view(np.uint16)
    return tokens, segments.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Job:
    unit: Unit
    index: int
    tokenizer: dict
    row_length: int
    start_id: int
    end_id: int
    eval_fraction: float
    seed: int
    text_field: str
    out: str


_TOKENIZERS: dict = {}  # per worker process: the tokenizer, built once


def prepare_unit(job: Job) -> dict:
    """One unit -> its train / eval shards and shard json; returns the shard's stats."""
    key = json.dumps(job.tokenizer, sort_keys=True)
    tok = _TOKENIZERS.get(key) or _TOKENIZERS.setdefault(
        key, tokenizer_lib.from_dict(job.tokenizer)
    )
    rng = np.random.default_rng([job.seed, job.index])
    name = f"{job.index:05d}"
    stats = {
        split: {
            "documents": 0,
            "tokens": 0,
            "bytes": 0,
            "rows": 0,
            "file": f"{split}-{name}.array_record",
        }
        for split in ("train", "eval")
    }
    counts = np.zeros(tok.vocab_size, np.int64)
    out = epath.Path(job.out)
    with tempfile.TemporaryDirectory() as tmp:
        writers = {s: _Writer(os.path.join(tmp, stats[s]["file"])) for s in stats}
        packers = {s: Packer(job.row_length) for s in stats}
        for texts in _chunks(documents(job.unit, job.text_field), 256):
            held = rng.random(len(texts)) < job.eval_fraction
            seqs = {"train": [], "eval": []}
            for text, ids, h in zip(texts, tok.encode_batch(texts), held, strict=True):
                split = "eval" if h else "train"
                seqs[split].append(np.concatenate([[job.start_id], ids, [job.end_id]]))
                stats[split]["documents"] += 1
                stats[split]["bytes"] += len(text.encode("utf-8"))
            for split, docs in seqs.items():
                for d in docs:
                    stats[split]["tokens"] += len(d)
                if split == "train" and docs:
                    counts += np.bincount(np.concatenate(docs), minlength=tok.vocab_size)
                writers[split].write(packers[split].add(docs))
        for split in stats:
            writers[split].write(packers[split].flush())
            stats[split]["rows"] = writers[split].close()
            stats[split]["size"] = os.path.getsize(writers[split].path)
            copy_whole(writers[split].path, out / stats[split]["file"])
        np.save(os.path.join(tmp, "counts.npy"), counts)
        copy_whole(os.path.join(tmp, "counts.npy"), out / f"counts-{name}.npy")
    stats["unit"] = dataclasses.asdict(job.unit)
    write_json(out / f"shard-{name}.json", stats)  # last: the unit is done
    return stats


def _chunks(items, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Writer:
    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path, self.rows = path, 0
        # group_size 1: random access reads single records; zstd: 4x faster reads than the
        # default brotli, about the same size on tokens.
        self._w = ArrayRecordWriter(path, "group_size:1,zstd:1")

    def write(self, rows: np.ndarray) -> None:
        for row in rows:
            self._w.write(encode_row(row))
        self.rows += len(rows)

    def close(self) -> int:
        self._w.close()
        return self.rows


def prepare(
    inputs: list[str],
    tokenizer,
    out: str,
    seq_len: int,
    workers: int = 1,
    eval_fraction: float = 0.01,
    text_field: str = "text",
    seed: int = 0,
    start_id: int | None = None,
    end_id: int | None = None,
    progress: bool = True,
) -> dict:
    """Prepare (or finish preparing) `out`; returns the manifest."""
    if seq_len <= 0:
        raise ConfigError(f"--seq-len must be positive, got {seq_len}")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    out_dir = epath.Path(out)
    units = plan_units(inputs)
    tok_dict = tokenizer.to_dict()
    start_id = tokenizer.bos_id if start_id is None else start_id
    end_id = tokenizer.eos_id if end_id is None else end_id
    plan = {
        "format": FORMAT,
        "inputs": list(inputs),
        "units": [dataclasses.asdict(u) for u in units],
        "tokenizer_fingerprint": tokenizer_lib.fingerprint(tokenizer),
        "row_length": seq_len + 1,
        "start_id": int(start_id),
        "end_id": int(end_id),
        "eval_fraction": eval_fraction,
        "text_field": text_field,
        "seed": seed,
    }
    manifest = begin(out_dir, plan)
    if manifest is not None:
        return manifest
    write_json(out_dir / tokenizer_lib.JAXLM_TOKENIZER, tok_dict)
    jobs = [
        Job(
            u,
            i,
            tok_dict,
            seq_len + 1,
            int(start_id),
            int(end_id),
            eval_fraction,
            seed,
            text_field,
            str(out_dir),
        )
        for i, u in enumerate(units)
        if read_marker(out_dir / f"shard-{i:05d}.json") is None
    ]
    if len(jobs) < len(units):
        rest = "preparing the rest" if jobs else "writing the manifest"
        log.info(
            "%s: %d of %d shards already done, %s", out, len(units) - len(jobs), len(units), rest
        )
    bar = Progress(len(units), len(units) - len(jobs), progress)
    run_jobs(prepare_unit, jobs, workers, bar)
    return _write_manifest(out_dir, plan, len(units), tokenizer.vocab_size)


def run_jobs(fn, jobs: list, workers: int, bar: Progress) -> None:
    """Each job through fn (a module-level function: workers are spawned), in a pool of
    `workers` processes when there are several, the bar updated as each finishes (and its
    line ended however the jobs end, so an error or an interruption starts a line)."""
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(fn(job))
            return
        # Ctrl-C reaches the whole process group: the workers leave it to this process,
        # whose `with` ends them, instead of each printing its own KeyboardInterrupt
        pool = multiprocessing.get_context("spawn").Pool(
            min(workers, len(jobs)),
            initializer=signal.signal,
            initargs=(signal.SIGINT, signal.SIG_IGN),
        )
        with pool:
            for stats in pool.imap_unordered(fn, jobs):
                bar.update(stats)
    finally:
        bar.close()


def _write_manifest(out_dir: epath.Path, plan: dict, n: int, vocab_size: int) -> dict:
    shards = [read_marker(out_dir / f"shard-{i:05d}.json") for i in range(n)]
    counts = np.zeros(vocab_size, np.int64)
    for i in range(n):
        with (out_dir / f"counts-{i:05d}.npy").open("rb") as f:
            counts += np.load(f)
    totals = {
        split: {
            k: sum(s[split][k] for s in shards) for k in ("documents", "tokens", "bytes", "rows")
        }
        for split in ("train", "eval")
    }
    manifest = {
        **{
            k: plan[k]
            for k in ("format", "tokenizer_fingerprint", "row_length", "start_id", "end_id")
        },
        "vocab_size": vocab_size,
        "documents": totals["train"]["documents"] + totals["eval"]["documents"],
        "tokens": totals["train"]["tokens"] + totals["eval"]["tokens"],
        "bytes": totals["train"]["bytes"] + totals["eval"]["bytes"],
        "train": totals["train"],
        "held_out": totals["eval"] | {"fraction": plan["eval_fraction"]},
        "shards": [
            {
                split: {k: s[split][k] for k in ("file", "rows", "size")}
                for split in ("train", "eval")
            }
            for s in shards
        ],
        "inputs": plan["inputs"],
        "text_field": plan["text_field"],
        "counts": COUNTS,
    }
    with (out_dir / COUNTS).open("wb") as f:
        np.save(f, counts)
    write_json(out_dir / MANIFEST, manifest, indent=1)  # last: the dir is complete
    return manifest


class Progress:
    """One stderr line, rewritten as shards finish: a bar, shards done, and `summary()` (for
    text: documents, MB and MB/s)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.bytes = self.docs = 0
        self.start = time.perf_counter()

    def add(self, stats: dict) -> None:
        self.bytes += stats["train"]["bytes"] + stats["eval"]["bytes"]
        self.docs += stats["train"]["documents"] + stats["eval"]["documents"]

    def summary(self) -> str:
        mb = self.bytes / 1e6
        return f"{self.docs:,} docs | {mb:,.1f} MB | {mb / self.elapsed:.1f} MB/s"

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def update(self, stats: dict) -> None:
        self.done += 1
        self.add(stats)
        if self.enabled:
            filled = int(30 * self.done / max(self.total, 1))
            print(
                f"\rprepare [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"shards | {self.summary()}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.enabled and self.total:
            print(file=sys.stderr)
