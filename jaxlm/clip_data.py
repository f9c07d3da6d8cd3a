"""Image-text batches of the contrastive objective, read from prepared directories by global
index, as the text objectives read theirs.

`clip.source` names prepared image-text directories (`jaxlm data prepare --images`, local or
`gs://`), comma-separated, mixed by `data.weights` (default: by pairs). The small sources
`digits`, `tar:GLOB` and `tfds:NAME[:DATA_DIR]` are prepared into `WORKDIR/prepared/<key>`
at the first start (the key: a hash of the inputs, their sizes and times, and the held-out
share) and reused on every resume. Then, as for text:

- each entry's training pairs permuted by a seeded shuffle that changes every epoch, repeated,
  mixed by weight; global batch s = pairs [s * B, (s + 1) * B); process p takes its
  contiguous share;
- a pair's random crop and (for labelled pairs without a caption) its caption are drawn from
  a stream keyed by its global index, so a batch is the same on any number of processes;
- decoding, cropping and normalising run in Grain's read threads, or in `data.workers`
  worker processes (the batch's global index travels with it).

Start-up reads the manifests only. Evaluation reads the first `train.eval_steps` held-out
global batches of each entry, and the zero-shot set (`clip.zeroshot`) in global batches too:
each process decodes and embeds its share.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np
from etils import epath

from jaxlm import batching, data, images, inputs, markers, sharding
from jaxlm import prepare_images as prep
from jaxlm.config import Config, ConfigError, source_entries
from jaxlm.shards import Records

if TYPE_CHECKING:  # Grain is imported where batches are made
    import grain

log = logging.getLogger("jaxlm")
SMALL = ("digits", "tar:", "tfds:")


def _small_inputs(entry: str, what: str) -> list[str]:
    if entry == "digits":
        return ["digits"]
    if entry.startswith("tfds:"):
        return [entry]
    files = inputs.expand(entry[4:])
    if not files or not all(epath.Path(f).is_file() for f in files):
        raise ConfigError(f"{what} {entry!r} matches no file")
    return files


def resolve(
    entry: str,
    cfg: Config,
    workdir,
    what: str = "clip.source",
    held: float = -1,
    sync: bool = True,
) -> str:
    """A prepared directory as it is; a small source prepared once into a directory named by
    what the preparation depends on (process 0 of a local workdir; every host for a cloud
    one; the others wait, unless not sync). held: the held-out pairs (a count, or a fraction
    below 1); -1: data.eval_fraction; 0: none, and a tfds dataset's test or validation
    split (a zero-shot set)."""
    if not entry.startswith(SMALL):
        manifest = epath.Path(entry) / prep.MANIFEST
        if not manifest.exists():
            raise ConfigError(
                f"{what} {entry!r}: not a prepared image-text directory (no {prep.MANIFEST}), "
                "nor digits, tar:GLOB or tfds:NAME[:DATA_DIR]"
            )
        return entry
    files = _small_inputs(entry, what)
    local = [f for f in files if f != "digits" and not f.startswith("tfds:")]
    held = cfg.data.eval_fraction if held < 0 else held
    settings = {
        "inputs": files,
        "stats": [[epath.Path(f).stat().length, epath.Path(f).stat().mtime] for f in local],
        "eval_count": held,
        "tfds_split": "train" if held else "eval",
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    out, is_local = data.prepared_dir(workdir, key)

    def prepare() -> None:
        if markers.finished(out):
            return
        log.info("preparing %s into %s (once)", entry, out)
        out.mkdir(parents=True, exist_ok=True)
        markers.write_json(out / "settings.json", settings, indent=1)
        split = settings["tfds_split"]
        prep.prepare(files, str(out), eval_count=held, tfds_split=split, progress=False)

    if is_local and sync:
        sharding.on_process_0(f"preparing {what} {entry}", prepare)
    elif jax.process_index() == 0 or not is_local:
        prepare()
    return str(out)


class ImageSource:
    """A prepared image-text directory: its manifest and its records by split."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.manifest = json.loads((self.path / prep.MANIFEST).read_text())
        if self.manifest.get("format") != prep.FORMAT:
            raise ConfigError(
                f"{self.path}: not a prepared image-text directory (format "
                f"{self.manifest.get('format')!r}, expected {prep.FORMAT!r}): prepare it with "
                "`jaxlm data prepare --images`"
            )
        captions = self.manifest["captions"]
        self.names = tuple(self.manifest["class_names"])
        self.templates = tuple(captions["train"])
        self.filler = captions["filler"]
        self.zeroshot_templates = tuple(captions["zeroshot"])

    def records(self, split: str) -> Records | None:
        """train: each shard's pairs after its held-out ones; eval: the held-out ones. None
        where the split has no pairs."""
        shards = []
        for s in self.manifest["shards"]:
            path, held = self.path / s["file"], s["held_out"]
            if split == "train" and s["records"] > held:
                shards.append((path, s["records"] - held, s["size"], held))
            elif split == "eval" and held:
                shards.append((path, held, s["size"], 0))
        return Records(shards, f"{self.path} {split}") if shards else None


class Collate:
    """(entry, pair) x b, global pairs first, first + 1, ... -> {images, text,
    text_segments} (+ labels and index for evaluation). Picklable: Grain's worker processes
    get a copy and open their own readers."""

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        sources: list[ImageSource],
        split: str,
        seed: int,
        labelled: bool = False,
    ):
        self.records = [s.records(split) for s in sources]
        self.captions = [(s.names, s.templates, s.filler) for s in sources]
        self.size, self.length, self.seed = cfg.vision.image_size, cfg.model.seq_len, seed
        self.random_crop = split == "train" and cfg.clip.random_crop
        self.tokenizer, self.labelled = tokenizer, labelled

    def __call__(self, first: int, items: list[tuple[int, int]]) -> dict:
        rngs = batching.row_rngs(self.seed, first + np.arange(len(items)))
        pixels, tokens, segments, labels = [], [], [], []
        for (k, row), rng in zip(items, rngs, strict=True):
            ((shard, position, record),) = self.records[k].get([row])
            pair = images.decode_pair(record)
            rgb = images.decode(pair["image"])
            if rgb is None:
                raise ConfigError(
                    f"prepared shard {self.records[k].paths[shard]}: record {position} "
                    f"({pair['key']}) does not decode: the shard is damaged; prepare it again"
                )
            text = pair["caption"]
            if not text:  # a labelled pair: a caption from templates, fresh each epoch
                text = images.random_caption(pair["label"], rng, *self.captions[k])
            t, s = images.text_tokens(self.tokenizer, text, self.length)
            pixels.append(images.resize_crop(rgb, self.size, rng if self.random_crop else None))
            tokens.append(t)
            segments.append(s)
            labels.append(-1 if pair["label"] is None else pair["label"])
        batch = {
            "images": np.stack(pixels),
            "text": np.stack(tokens),
            "text_segments": np.stack(segments),
        }
        if self.labelled:
            batch |= {
                "labels": np.asarray(labels, np.int32),
                "index": first + np.arange(len(items)),
            }
        return batch


@dataclasses.dataclass
class ZeroShot:
    """A labelled set's first `n` pairs of a split, its class names and prompt templates."""

    source: ImageSource
    split: str
    n: int
    names: tuple[str, ...]
    templates: tuple[str, ...]

    def batches(self, cfg: Config, tokenizer) -> list[dict]:
        """This process's share of the set's global batches (the last one wraps round)."""
        ds = ordered_batches(cfg, tokenizer, self.source, self.split, self.n, labelled=True)
        return [ds[i] for i in range(-(-self.n // cfg.train.batch_size))]


def zeroshot_set(
    cfg: Config, entry: str, workdir, what: str, held: float, classes: tuple[str, ...] = ()
) -> ZeroShot:
    """A labelled source as a zero-shot set: its held-out pairs, or all of them if none is
    held out; class names from `classes`, clip.classes or the source."""
    source = ImageSource(resolve(entry, cfg, workdir, what, held))
    split = "eval" if source.records("eval") else "train"
    pairs = source.manifest["held_out" if split == "eval" else "train"]["pairs"]
    c = cfg.clip
    names = classes or (tuple(_lines(c.classes, "clip.classes")) if c.classes else source.names)
    templates = tuple(_lines(c.templates, "clip.templates")) if c.templates else ()
    for t in templates:
        try:  # filled in as clip.zeroshot does, for two classes
            same, why = images.caption(t, 0, ("x", "y")) == images.caption(t, 1, ("x", "y")), ""
        except (KeyError, IndexError, ValueError) as e:
            same, why = True, f" ({type(e).__name__}: {e})"
        if same:
            raise ConfigError(
                f"clip.templates={c.templates}: {t!r}{why} does not name the class: each line "
                "needs {word} where the class name goes (and no other {...})"
            )
    if not source.manifest["labels"]:
        raise ConfigError(f"{what} {entry!r}: its pairs carry no labels; zero-shot needs labels")
    if not names:
        raise ConfigError(f"{what} {entry!r}: the source names no classes: give class names")
    max_label = max((s.get("max_label", -1) for s in source.manifest["shards"]), default=-1)
    if max_label >= len(names):
        raise ConfigError(
            f"{what} {entry!r}: labels go up to {max_label}, but {len(names)} class names "
            f"were given ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    n = min(pairs, c.zeroshot_images)
    return ZeroShot(source, split, n, names, templates or source.zeroshot_templates)


def ordered_batches(
    cfg: Config, tokenizer, source: ImageSource, split: str, n: int, labelled: bool = False
) -> grain.MapDataset:
    """Global batches of pairs 0, 1, ..., n - 1, 0, 1, ... of a split (centre crops), with
    labels and global indices if labelled: this process's share, as a MapDataset."""
    import grain

    rows = grain.MapDataset.range(n).repeat(None).map(functools.partial(batching.tagged, 0))
    collate = Collate(cfg, tokenizer, [source], split, cfg.train.seed + 1, labelled)
    return batching.global_batches(rows, cfg.train.batch_size, 0, collate=collate)


class ClipData:
    """Batches of the contrastive objective: `train_batches(step)`, `eval_sets()`,
    `zeroshot`."""

    def __init__(self, cfg: Config, tokenizer, workdir):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.entries = source_entries(cfg.clip.source)
        self.sources = [ImageSource(resolve(e, cfg, workdir)) for e in self.entries]
        for entry, s in zip(self.entries, self.sources, strict=True):
            if s.manifest["skipped"] and any(s.manifest["skipped"].values()):
                log.warning(
                    "clip.source %s: skipped when prepared: %s", entry, s.manifest["skipped"]
                )
            if not s.manifest["train"]["pairs"]:
                raise ConfigError(f"clip.source {entry!r}: no training pairs")
        sizes = [s.manifest["train"]["pairs"] for s in self.sources]
        self.weights = batching.mixture_weights(cfg.data.weights, sizes, self.entries)
        for entry, weight, pairs in zip(self.entries, self.weights, sizes, strict=True):
            if weight * cfg.train.batch_size > pairs:  # each pair a negative of itself
                log.warning(
                    "clip.source %s: %d training pairs, but a batch takes about %d of them "
                    "(train.batch_size=%d, weight %.3g): a pair will meet its own copy in a "
                    "batch, as a negative",
                    entry,
                    pairs,
                    round(weight * cfg.train.batch_size),
                    cfg.train.batch_size,
                    weight,
                )
        self.zeroshot = self._zeroshot(workdir)
        self._sets, self._held, self._zeroshot_batches = None, {}, None

    def _zeroshot(self, workdir) -> ZeroShot | None:
        if self.cfg.clip.zeroshot:
            return zeroshot_set(self.cfg, self.cfg.clip.zeroshot, workdir, "clip.zeroshot", 0)
        first = self.sources[0]
        if first.names and first.manifest["labels"] and first.records("eval"):
            return zeroshot_set(self.cfg, self.entries[0], workdir, "clip.source", -1)
        return None

    def train_batches(
        self, start_step: int, process_index: int | None = None, process_count: int | None = None
    ) -> Iterator[dict]:
        """This process's share of global batches start_step, start_step + 1, ..."""
        lengths = [s.manifest["train"]["pairs"] for s in self.sources]
        rows = batching.mixed_rows(lengths, self.weights, self.cfg.train.seed)
        collate = Collate(self.cfg, self.tokenizer, self.sources, "train", self.cfg.train.seed)
        ds = batching.global_batches(
            rows, self.cfg.train.batch_size, start_step, process_index, process_count, collate
        )
        return iter(_iterate(ds, self.cfg.data.workers))

    def eval_sets(self) -> list[data.EvalSet]:
        """Each entry's first train.eval_steps held-out global batches (this process's share);
        an entry with fewer held-out pairs repeats them."""
        steps = self.cfg.train.eval_steps
        if not steps:
            return []
        if self._sets is not None:
            return self._sets
        sets = []
        held = [k for k, s in enumerate(self.sources) if s.records("eval")]
        if not held:
            raise ConfigError(
                f"train.eval_steps={steps}, but clip.source {self.cfg.clip.source!r} holds no "
                "held-out pairs (prepared with --eval-count 0): prepare with --eval-count above "
                "0, or set train.eval_steps=0"
            )
        total = sum(self.weights[k] for k in held)
        for k in held:
            n = self.sources[k].manifest["held_out"]["pairs"]
            ds = ordered_batches(self.cfg, self.tokenizer, self.sources[k], "eval", n)
            name = data.entry_name(self.entries[k]) if len(held) > 1 else "held_out"
            weight = self.weights[k] / total if total else 1 / len(held)
            sets.append(data.EvalSet(name, weight, [ds[i] for i in range(steps)]))
            self._held[name] = self.sources[k].manifest["held_out"]["pairs"]
        self._sets = sets
        return sets

    def held_out_pairs(self, name: str) -> int:
        """Distinct pairs of an eval set (its batches repeat them when there are fewer)."""
        return self._held[name]

    def zeroshot_batches(self) -> list[dict]:
        """This process's share of the zero-shot set's global batches (read once)."""
        if self._zeroshot_batches is None:
            self._zeroshot_batches = self.zeroshot.batches(self.cfg, self.tokenizer)
        return self._zeroshot_batches


def _lines(path: str, key: str) -> list[str]:
    p = epath.Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def _iterate(ds, workers: int):
    """Batches through Grain's read threads, or through `workers` worker processes."""
    import grain

    it = ds.to_iter_dataset(batching.read_options())
    if workers > 0:
        from absl import flags

        flags.FLAGS.mark_as_parsed()  # Grain reads its flags; jaxlm does not run absl.app
        options = grain.MultiprocessingOptions(num_workers=workers)
        it = it.mp_prefetch(options, worker_init_fn=_leave_ctrl_c_to_the_trainer)
    return it


def _leave_ctrl_c_to_the_trainer(worker: int, workers: int) -> None:
    """In each Grain worker: Ctrl-C reaches the terminal's whole process group, and the
    trainer answers it with a checkpoint, then closes the workers; each printed its own
    KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
