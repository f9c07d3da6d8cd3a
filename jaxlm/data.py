"""Training data for the text objectives: prepared token shards read by global row index.

Every `data.files` entry is either a prepared directory (`jaxlm data prepare`, known by its
`manifest.json`) or text files (paths or globs, `.txt` / `.jsonl[.gz|.zst]` / `.parquet`),
which are prepared once into `WORKDIR/prepared/<key>` at the first start (the key: a hash of
the files, their sizes and times, the tokenizer and the preparation settings) and reused on
every resume. Reading is the same for both, in the order of jaxlm/batching.py (shared with
the image-text pipeline):

- each entry's training rows, permuted by a seeded shuffle that changes every epoch, repeated;
- entries mixed by `data.weights` (default: proportional to their tokens) with Grain's `mix`;
- global batch s = examples [s * B, (s + 1) * B); process p takes its contiguous share;
- a share's rows read together (here), then the objective's transform over the batch (random
  streams keyed by each example's global index, so masking does not depend on p either).

So the global batch at step s depends only on the data, the seed, the batch size and s: a run
resumes from nothing but its step, on any number of processes, and sees the same batches.
Start-up reads the manifests and token counts, never the corpus.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from jaxlm import batching, inputs, markers, sharding
from jaxlm import prepare as prepare_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import Config, ConfigError, DataConfig
from jaxlm.shards import Prepared, Shards, row_example

if TYPE_CHECKING:  # Grain is imported where batches are made (bench runs without it)
    import grain

log = logging.getLogger("jaxlm")

BUILTIN_CORPUS = Path(__file__).parent / "corpus"
# Text files of a run whose workdir is in the cloud are prepared here, on each host.
CACHE = epath.Path(os.environ.get("JAXLM_CACHE", "~/.cache/jaxlm")).expanduser() / "prepared"


def prepared_dir(workdir, key: str) -> tuple[epath.Path, bool]:
    """Where data prepared at a run's start goes, and whether that is the workdir's one copy
    (made by process 0) rather than each host's own: WORKDIR/prepared/<key>; for a cloud
    workdir (whose shards array_record would read over the network), or a local one that is
    read-only and lacks it (a checkpoint evaluated from a read-only share: it raised EROFS),
    CACHE/<key>/process_<i> on each host."""
    out = epath.Path(workdir) / "prepared" / key
    if not inputs.is_remote(str(workdir)):
        read_only = os.path.isdir(workdir) and not os.access(workdir, os.W_OK)
        if not read_only or markers.finished(out):
            return out, True
        log.info("%s is read-only: data is prepared into %s instead", workdir, CACHE)
    return CACHE / key / f"process_{jax.process_index()}", False


@dataclasses.dataclass(frozen=True)
class DataSpec:
    row_length: int  # tokens per packed row the objective needs
    start_id: int  # put before every document ([bos] or [CLS])
    end_id: int  # and after it ([eos] or [SEP])
    # packed rows {tokens, tokens_segment_ids, tokens_positions: [b, row_length]} (, one
    # np.random.Generator per row) -> the objective's batch
    transform: Callable[..., dict]
    random: bool = True  # the transform takes a random stream per row, keyed by its index


def entries(cfg: DataConfig) -> list[str]:
    """`data.files` entries; () is the built-in corpus."""
    return list(cfg.files) or [str(BUILTIN_CORPUS / "*.txt")]


def is_prepared(entry: str) -> bool:
    return not any(c in entry for c in "*?[") and (epath.Path(entry) / markers.MANIFEST).exists()


def _none_held_out(entry: str, path, manifest: dict) -> str:
    """Why a data.files entry (prepared at `path`) has no held-out rows: each document goes to
    held-out with probability fraction, so a fraction of 0, or a few documents at a small one,
    gives none."""
    name = entry if entry == str(path) else f"{entry} (prepared in {path})"
    fraction = manifest.get("held_out", {}).get("fraction")
    documents = manifest.get("documents")
    if fraction is None or documents is None:  # a manifest written before both were recorded
        return f"{name}: none held out"
    return f"{name}: 0 of {documents:,} documents held out at fraction {fraction:g}"


def entry_files(entry: str, key: str = "data.files") -> list[str]:
    """The files of a text entry (a glob, a path or a URL), each checked to exist: a listing
    and a stat, nothing read. `key` names where the entry came from, for the error."""
    files = inputs.expand(entry)
    if not files or not all(epath.Path(f).is_file() for f in files):
        raise ConfigError(f"{key}: {entry!r} matches no file (nor a prepared directory)")
    return files


def raw_files(entry: str, text_field: str = "text", key: str = "data.files") -> list[str]:
    """The files of a text entry, each checked to hold some text (reading up to its first
    document only)."""
    files = entry_files(entry, key)
    for f in files:
        docs = (d for u in inputs.plan_units([f]) for d in inputs.documents(u, text_field))
        if not any(d.strip() for d in docs):
            raise ConfigError(f"data file {f!r} is empty: no text to train on")
    return files


def sample_texts(cfg: DataConfig, key: str = "data.files") -> Iterator[str]:
    """The documents of the text entries, streamed (for training a tokenizer, which keeps a
    bounded sample); prepared entries carry their tokenizer and are skipped."""
    for entry in entries(cfg):
        if is_prepared(entry):
            continue
        for unit in inputs.plan_units(raw_files(entry, cfg.text_field, key)):
            yield from inputs.documents(unit, cfg.text_field)


def prepared_tokenizer(cfg: DataConfig) -> tokenizer_lib.AnyTokenizer | None:
    """The tokenizer of the first prepared entry, or None."""
    for entry in entries(cfg):
        if is_prepared(entry):
            return tokenizer_lib.load(epath.Path(entry) / tokenizer_lib.JAXLM_TOKENIZER)
    return None


class Remap:
    """The prepared start / end tokens -> the objective's (e.g. [bos] -> [CLS] for BERT), and
    the first `length` tokens of each row."""

    def __init__(self, table: dict[int, int], length: int):
        self.table, self.length = table, length

    @classmethod
    def to_spec(cls, sources: list[Prepared], spec: DataSpec) -> Remap:
        """From the start / end tokens the prepared sources were made with to the spec's."""
        starts = {p.manifest["start_id"] for p in sources}
        ends = {p.manifest["end_id"] for p in sources}
        table = {a: spec.start_id for a in starts if a != spec.start_id}
        table |= {a: spec.end_id for a in ends if a != spec.end_id}
        return cls(table, spec.row_length)

    def __call__(self, rows: dict) -> dict:
        rows = {k: v[..., : self.length] for k, v in rows.items()}
        if self.table:
            tokens = rows["tokens"].copy()
            for a, b in self.table.items():
                tokens[rows["tokens"] == a] = b
            rows["tokens"] = tokens
        return rows


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Held-out batches (this process's share of each global batch) of one data.files entry,
    named by its directory or file, and its weight in the mixture's eval metrics."""

    name: str
    weight: float
    batches: list[dict]


def entry_name(entry: str) -> str:
    """What a data.files entry is called in metrics (`eval_loss/<name>`): a prepared
    directory's name, a text file's stem, a glob's directory."""
    path = epath.Path(entry.rstrip("/"))
    if any(c in entry for c in "*?["):
        return path.parent.name
    return path.name if is_prepared(entry) else path.name.split(".")[0]


class TextData:
    """Batches of one text objective: `train_batches(step)`, `eval_sets()`, `counts()`."""

    def __init__(self, cfg: Config, spec: DataSpec, tokenizer, workdir: str | epath.Path):
        self.cfg, self.spec = cfg, spec
        self.sources = [
            self._resolve(entry, k, tokenizer, workdir) for k, entry in enumerate(entries(cfg.data))
        ]
        for s in self.sources:  # rows of seq_len + 1; an objective needing seq_len cuts one
            s.check(tokenizer, cfg.model.seq_len + 1)
        self.weights = batching.mixture_weights(
            cfg.data.weights, [s.tokens for s in self.sources], entries(cfg.data)
        )
        self.remap = Remap.to_spec(self.sources, spec)
        self._shards: dict[str, list[Shards]] = {}

    def _resolve(self, entry: str, k: int, tokenizer, workdir) -> Prepared:
        """A prepared entry as it is; text files prepared once into a directory named by
        what the preparation depends on (the files, their sizes and modification times, the
        tokenizer, seq_len, eval_fraction, text_field and the seed), so a restart with other
        files or settings never reads rows prepared from the old ones. Local workdirs:
        WORKDIR/prepared/<key>, by process 0; a cloud workdir (whose shards array_record
        would read over the network): a local cache on every host. Reusing one reads the
        manifest only, never the corpus."""
        if is_prepared(entry):
            return Prepared(entry)
        files = entry_files(entry)
        stats = [epath.Path(f).stat() for f in files]
        settings = {
            "files": [[f, st.length, st.mtime] for f, st in zip(files, stats, strict=True)],
            "tokenizer": tokenizer_lib.fingerprint(tokenizer),
            "seq_len": self.cfg.model.seq_len,
            "eval_fraction": self.cfg.data.eval_fraction,
            "text_field": self.cfg.data.text_field,
            "seed": self.cfg.train.seed,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        out, local = prepared_dir(workdir, key)

        def prepare() -> None:
            if markers.finished(out):
                return
            raw_files(entry, self.cfg.data.text_field)  # each file holds some text
            log.info("preparing %d text files of %r into %s (once)", len(files), entry, out)
            out.mkdir(parents=True, exist_ok=True)
            markers.write_json(out / "settings.json", settings, indent=1)
            prepare_lib.prepare(
                files,
                tokenizer,
                str(out),
                self.cfg.model.seq_len,
                eval_fraction=self.cfg.data.eval_fraction,
                text_field=self.cfg.data.text_field,
                seed=self.cfg.train.seed,
                progress=False,
            )

        if local:  # one copy in the workdir, prepared by process 0
            sharding.on_process_0(f"preparing data.files entry {k} ({entry})", prepare)
        else:  # each process its own copy on its own disk
            prepare()
        return Prepared(str(out))

    def counts(self) -> np.ndarray:
        """Training-split token counts; for a mixture, the entries' frequencies mixed by the
        weights and scaled to the total count (for the baselines). One entry per token id of
        the run's tokenizer: every source was prepared with it (checked at start-up)."""
        counts = [s.counts() for s in self.sources]
        if len(counts) == 1:
            return counts[0]
        total = sum(c.sum() for c in counts)
        mixed = sum(c / max(c.sum(), 1.0) * w for c, w in zip(counts, self.weights, strict=True))
        return mixed * total

    def rows(self, split: str = "train", entry: int = 0) -> grain.MapDataset:
        """The endless, seeded order of examples as a Grain MapDataset of (shards, row):
        example i reads row `row` of `self.shards(split)[shards]`."""
        import grain

        if split == "train":
            lengths = [len(s) for s in self.shards("train")]
            return batching.mixed_rows(lengths, self.weights, self.cfg.train.seed)
        # entry k's held-out rows in order: the same ones at every evaluation
        return (
            grain.MapDataset.range(len(self.shards("eval")[entry]))
            .repeat(None)
            .map(functools.partial(batching.tagged, entry))
        )

    def shards(self, split: str) -> list[Shards | None]:
        """One Shards per entry (None where an entry has no rows of the split: held-out rows
        of a directory prepared with --eval-fraction 0)."""
        if split not in self._shards:
            length = self.cfg.model.seq_len + 1
            self._shards[split] = [
                Shards(s.shards(split), length, f"{s.manifest_path} {split}")
                if s.shards(split) or split == "train"
                else None
                for s in self.sources
            ]
        return self._shards[split]

    def batches(
        self,
        split: str,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        entry: int = 0,
    ) -> grain.MapDataset:
        """This process's share of the global batches from start_step on (a MapDataset): of
        the training mixture, or of entry `entry`'s held-out rows."""
        seed = self.cfg.train.seed + (0 if split == "train" else 1)
        collate = functools.partial(self._collate, self.shards(split), seed)
        return batching.global_batches(
            self.rows(split, entry),
            self.cfg.train.batch_size,
            start_step,
            process_index,
            process_count,
            collate,
        )

    def _collate(self, shards: list[Shards], seed: int, first: int, items: list[tuple]) -> dict:
        """(shards, row) x b, examples first, first + 1, ... -> the objective's batch: rows
        read, positions and remapping vectorised, then the transform."""
        which, row = (np.array(c) for c in zip(*items, strict=True))
        index = first + np.arange(len(items))
        length = self.cfg.model.seq_len + 1
        tokens = np.empty((len(items), length), np.int32)
        segments = np.empty((len(items), length), np.int32)
        for k in np.unique(which):
            tokens[which == k], segments[which == k] = shards[k].read(row[which == k])
        rows = self.remap(row_example(tokens, segments))
        if self.spec.random:
            return self.spec.transform(rows, batching.row_rngs(seed, index))
        return self.spec.transform(rows)

    def train_batches(
        self, start_step: int, process_index: int | None = None, process_count: int | None = None
    ) -> Iterator[dict]:
        """This process's share of global batches start_step, start_step + 1, ..."""
        ds = self.batches("train", start_step, process_index, process_count)
        return iter(ds.to_iter_dataset(batching.read_options()))

    def eval_sets(self) -> list[EvalSet]:
        """Each entry's first train.eval_steps held-out global batches (this process's share),
        weighted as the mixture is. Entries without held-out rows are left out (logged); none
        at all is an error naming the directories, unless train.eval_steps=0."""
        steps = self.cfg.train.eval_steps
        if not steps:
            return []
        held = [k for k, shards in enumerate(self.shards("eval")) if shards is not None]
        for k in sorted(set(range(len(self.sources))) - set(held)):
            log.info("%s has no held-out rows: not evaluated", self.sources[k].path)
        if not held:
            each = "; ".join(
                _none_held_out(entry, s.path, s.manifest)
                for entry, s in zip(entries(self.cfg.data), self.sources, strict=True)
            )
            raise ConfigError(
                f"train.eval_steps={steps}, but no data.files entry has held-out rows ({each}): "
                "hold more out (data.eval_fraction for text files, `jaxlm data prepare "
                "--eval-fraction` for prepared ones), or set train.eval_steps=0"
            )
        names = [entry_name(e) for e in entries(self.cfg.data)]
        names = [n if names.count(n) == 1 else f"{n}_{k}" for k, n in enumerate(names)]
        total = sum(self.weights[k] for k in held)
        sets = []
        for k in held:
            ds = self.batches("eval", 0, entry=k)
            weight = self.weights[k] / total if total else 1 / len(held)
            sets.append(EvalSet(names[k], weight, [ds[i] for i in range(steps)]))
        return sets
