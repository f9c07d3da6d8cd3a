"""`jaxlm data prepare --images`: image-text inputs -> ArrayRecord shards of pairs + manifest.

    jaxlm data prepare --images 'gs://bucket/laion/{00000..09999}.tar' --out gs://bucket/laion_p \
        --image-size 256 --workers 32

Inputs, by their kind:
- WebDataset tars as img2dataset writes them (`{key}.jpg|jpeg|png|webp` + `{key}.txt`, an
  optional `{key}.cls` label), local or `gs://`, globs and brace ranges: one work unit each;
- parquet files with image bytes (or Hugging Face's `{bytes, path}` structs) and a caption
  column (`--image-field`, `--text-field`; a `label` column when there is one): one unit per
  row group;
- `tfds:NAME[:DATA_DIR]` (its train split; image + `caption` or `text`, or a `label`
  captioned from the class names): units of 10,000 records;
- `digits`: scikit-learn's 1,797 handwritten digits, shuffled once (the built-in demo).

Each unit becomes `pairs-NNNNN.array_record` (one record per pair: the encoded image, its
caption, label and key) and `shard-NNNNN.json` (its counts, written last: a rerun skips the
units that have one). Every image is decoded once here; one that does not decode, is too
small, or has no caption (and no label) is counted by reason in the manifest, the first few
named, never fatal. With `--image-size S`, an image whose shorter side is above S is resized
to S and re-encoded as JPEG (quality 95), as img2dataset does, so that training decodes small
images; others keep their bytes. The first `--eval-count` pairs in shard order (a count, or a
fraction of all pairs below 1) are held out: training reads the rest of their shards, so
nothing is copied. The manifest, written last, sums it up; training reads nothing else at
start-up.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from etils import epath

from jaxlm import images
from jaxlm.config import ConfigError
from jaxlm.inputs import expand
from jaxlm.prepare import PLAN, _copy, _differences

log = logging.getLogger("jaxlm")

MANIFEST = "manifest.json"
FORMAT = "jaxlm.images/1"
TFDS_UNIT = 10_000
REASONS = ("no_caption", "no_image", "undecodable", "too_small")
NAMED = 20  # skipped members named in each shard's json and the manifest


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work item, one shard: a tar file, a parquet row group, a range of TFDS records."""

    path: str
    kind: str  # tar | parquet | tfds | digits
    start: int = 0
    stop: int = 0
    split: str = "train"  # tfds: the split read


def kind_of(path: str) -> str:
    if path == "digits":
        return "digits"
    if path.startswith("tfds:"):
        return "tfds"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".tar"):
        return "tar"
    raise ConfigError(
        f"image input {path!r}: expected .tar shards, .parquet files, tfds:NAME[:DATA_DIR] "
        "or digits"
    )


def plan_units(inputs: list[str], tfds_split: str = "train") -> tuple[list[Unit], list[str]]:
    """The units of the inputs, and the files that cannot be read at all (an unreadable
    parquet file: named, left out, not fatal). tfds_split "eval": a dataset's test or
    validation split (for a zero-shot set), else its train split."""
    units, unreadable = [], []
    for entry in inputs:
        paths = [entry] if entry == "digits" or entry.startswith("tfds:") else expand(entry)
        if not paths:
            raise ConfigError(f"image input {entry!r} matches no file")
        for path in paths:
            kind = kind_of(path)
            if kind == "digits":
                units.append(Unit(path, kind))
            elif kind == "tfds":
                split = _tfds_split(path, tfds_split)
                n = len(_tfds_source(path, split))
                units += [
                    Unit(path, kind, s, min(s + TFDS_UNIT, n), split)
                    for s in range(0, n, TFDS_UNIT)
                ]
            elif not epath.Path(path).is_file():
                raise ConfigError(f"image input {path!r} not found")
            elif kind == "tar":
                units.append(Unit(path, kind))
            else:
                import pyarrow.parquet as pq

                try:
                    with epath.Path(path).open("rb") as f:
                        n = pq.ParquetFile(f).num_row_groups
                except Exception as e:
                    log.warning("%s: not a readable parquet file (%s): left out", path, e)
                    unreadable.append(f"{path}: {e}")
                    continue
                units += [Unit(path, kind, g, g + 1) for g in range(n)]
    return units, unreadable


@dataclasses.dataclass
class Member:
    """One pair as an input holds it; `missing` names what it lacks (a skip reason)."""

    key: str
    image: bytes | np.ndarray | None
    caption: str | None
    label: int | None

    @property
    def missing(self) -> str | None:
        if self.image is None:
            return "no_image"
        if not self.caption and self.label is None:
            return "no_caption"
        return None


def members(unit: Unit, image_field: str, text_field: str) -> Iterator[Member]:
    if unit.kind == "tar":
        yield from _tar_members(unit.path)
    elif unit.kind == "parquet":
        yield from _parquet_members(unit, image_field, text_field)
    elif unit.kind == "tfds":
        source = _tfds_source(unit.path, unit.split)
        for i in range(unit.start, unit.stop):
            x = source[i]
            text = x.get("caption", x.get("text"))
            text = text.decode() if isinstance(text, bytes) else text
            label = int(x["label"]) if "label" in x else None
            yield Member(f"{unit.path}#{i}", x.get("image"), text, label)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8 in 0..16
        for i in np.random.default_rng(0).permutation(len(pixels)):
            yield Member(f"digits#{i}", pixels[i], None, int(d.target[i]))


def _tar_members(path: str) -> Iterator[Member]:
    """Members grouped by key as WebDataset groups them (adjacent files of one basename)."""
    current: Member | None = None
    n = 0
    try:
        with epath.Path(path).open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                n += 1
                if not m.isfile():
                    continue
                name = Path(m.name)
                key, ext = str(name.with_suffix("")), name.suffix.lower()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Member(key, None, None, None)
                data = tar.extractfile(m).read()
                if ext in images.IMAGE_EXTENSIONS:
                    current.image = data
                elif ext == ".txt":
                    current.caption = data.decode("utf-8", errors="replace").strip()
                elif ext == ".cls":
                    current.label = int(data.decode().strip())
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: truncated or damaged tar (after member {n}: {e}); replace the file and "
            "run the same prepare again: the other shards are kept"
        ) from None
    if current is not None:
        yield current


def _parquet_members(unit: Unit, image_field: str, text_field: str) -> Iterator[Member]:
    import pyarrow.parquet as pq

    with epath.Path(unit.path).open("rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        for field, flag in ((image_field, "--image-field"), (text_field, "--text-field")):
            if field not in names:
                raise ConfigError(
                    f"{unit.path}: no column {field!r} (columns: {names}); choose one with {flag}"
                )
        columns = [image_field, text_field] + [c for c in ("label", "key") if c in names]
        table = pf.read_row_group(unit.start, columns).to_pydict()
    for i, image in enumerate(table[image_field]):
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
            image = image.get("bytes")
        label = table["label"][i] if "label" in table else None
        key = table["key"][i] if "key" in table else f"{unit.start}/{i}"
        yield Member(str(key), image, table[text_field][i], label)


def _tfds_builder(spec: str):
    import tensorflow_datasets as tfds

    name, _, data_dir = spec[len("tfds:") :].partition(":")
    try:
        return tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types for a missing or unprepared dataset
        raise ConfigError(f"image input {spec!r}: cannot open the dataset ({e})") from None


def _tfds_split(spec: str, wanted: str) -> str:
    splits = list(_tfds_builder(spec).info.splits)
    if wanted == "eval":
        return next((s for s in ("test", "validation") if s in splits), "train")
    return wanted


def _tfds_source(spec: str, split: str):
    import tensorflow_datasets as tfds

    name, _, data_dir = spec[len("tfds:") :].partition(":")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types for a missing or unprepared dataset
        raise ConfigError(f"image input {spec!r}: cannot open the dataset ({e})") from None


def class_names(inputs: list[str], classes_file: str | None) -> list[str]:
    """--classes FILE (one name per line), else the names a tfds ClassLabel or digits give."""
    if classes_file:
        path = epath.Path(classes_file)
        if not path.is_file():
            raise ConfigError(f"--classes {classes_file}: no such file")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for entry in inputs:
        if entry == "digits":
            return list(images.DIGIT_WORDS)
        if entry.startswith("tfds:"):
            features = _tfds_builder(entry).info.features
            if "label" in features.keys() and hasattr(features["label"], "names"):
                return list(features["label"].names)
    return []


def encode_image(image: bytes | np.ndarray, size: int, min_size: int) -> bytes | str:
    """The bytes to store, or the reason to skip: decoded once to check it; resized to a
    shorter side of `size` and re-encoded as JPEG if larger (size 0: never); arrays (tfds,
    digits) stored as PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, bytes | bytearray):
            im = Image.open(io.BytesIO(image))
            if size and min(im.size) > size and im.format == "JPEG":
                im.draft("RGB", (size, size))  # decode at a reduced scale: much faster
            im.load()
        else:
            pixels = np.asarray(image)
            im = Image.fromarray(
                pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
            )
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError):
        return "undecodable"
    w, h = im.size
    if min(w, h) < max(min_size, 1):
        return "too_small"
    if size and min(w, h) > size:
        scale = size / min(w, h)
        im = im.convert("RGB").resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC
        )
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=95)
        return out.getvalue()
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


@dataclasses.dataclass(frozen=True)
class Job:
    unit: Unit
    index: int
    out: str
    image_size: int
    min_size: int
    image_field: str
    text_field: str


def prepare_unit(job: Job) -> dict:
    """One unit -> pairs-NNNNN.array_record and shard-NNNNN.json (last); returns the stats."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = f"pairs-{job.index:05d}.array_record"
    stats = {"file": name, "records": 0, "bytes": 0, "max_label": -1}
    stats |= {"skipped": dict.fromkeys(REASONS, 0), "named": []}
    with tempfile.TemporaryDirectory() as tmp:
        writer = ArrayRecordWriter(os.path.join(tmp, name), "group_size:1")
        for m in members(job.unit, job.image_field, job.text_field):
            reason = m.missing
            if reason is None:
                encoded = encode_image(m.image, job.image_size, job.min_size)
                reason = encoded if isinstance(encoded, str) else None
            if reason:
                stats["skipped"][reason] += 1
                if len(stats["named"]) < NAMED:
                    stats["named"].append(f"{job.unit.path}: {m.key} ({reason})")
                continue
            writer.write(images.encode_pair(encoded, m.caption or None, m.label, m.key))
            stats["records"] += 1
            stats["bytes"] += len(encoded)
            if m.label is not None:
                stats["max_label"] = max(stats["max_label"], int(m.label))
        writer.close()
        stats["size"] = os.path.getsize(os.path.join(tmp, name))
        _copy(os.path.join(tmp, name), epath.Path(job.out) / name)
    stats["unit"] = dataclasses.asdict(job.unit)
    (epath.Path(job.out) / f"shard-{job.index:05d}.json").write_text(json.dumps(stats))
    return stats


def prepare(
    inputs: list[str],
    out: str,
    image_size: int = 0,
    workers: int = 1,
    eval_count: float = 10_000,
    image_field: str = "image",
    text_field: str = "caption",
    classes_file: str | None = None,
    min_size: int = 0,
    tfds_split: str = "train",
    progress: bool = True,
) -> dict:
    """Prepare (or finish preparing) `out`; returns the manifest."""
    if image_size < 0 or min_size < 0:
        raise ConfigError(f"--image-size and --min-size must be >= 0, got {image_size}, {min_size}")
    if eval_count < 0:
        raise ConfigError(
            f"--eval-count must be >= 0 (a count, or a fraction below 1), got {eval_count}"
        )
    out_dir = epath.Path(out)
    units, unreadable = plan_units(inputs, tfds_split)
    plan = {
        "format": FORMAT,
        "inputs": list(inputs),
        "units": [dataclasses.asdict(u) for u in units],
        "image_size": image_size,
        "min_size": min_size,
        "eval_count": eval_count,
        "image_field": image_field,
        "text_field": text_field,
        "class_names": class_names(inputs, classes_file),
    }
    plan_path = out_dir / PLAN
    if plan_path.exists() and (differ := _differences(json.loads(plan_path.read_text()), plan)):
        done = "prepared" if (out_dir / MANIFEST).exists() else "being prepared"
        raise ConfigError(
            f"--out {out} is already {done} from other inputs or settings ({differ}): "
            "choose another --out, or finish it with the command that started it"
        )
    if (out_dir / MANIFEST).exists():
        log.info("%s is already prepared", out)
        return json.loads((out_dir / MANIFEST).read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1))
    jobs = [
        Job(u, i, str(out_dir), image_size, min_size, image_field, text_field)
        for i, u in enumerate(units)
        if not (out_dir / f"shard-{i:05d}.json").exists()
    ]
    if len(jobs) < len(units):
        log.info(
            "%s: %d of %d shards done, preparing the rest", out, len(units) - len(jobs), len(units)
        )
    bar = Progress(len(units), len(units) - len(jobs), progress)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            bar.update(prepare_unit(job))
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for stats in pool.imap_unordered(prepare_unit, jobs):
                bar.update(stats)
    bar.close()
    return write_manifest(out_dir, plan, len(units), unreadable)


def write_manifest(out_dir: epath.Path, plan: dict, n: int, unreadable: list[str]) -> dict:
    shards = [json.loads((out_dir / f"shard-{i:05d}.json").read_text()) for i in range(n)]
    pairs = sum(s["records"] for s in shards)
    count = plan["eval_count"]
    held = int(round(count * pairs)) if count < 1 else int(count)
    if pairs - held < 1:
        raise ConfigError(
            f"{out_dir}: {pairs} readable pairs, and --eval-count {count} would hold out "
            f"{held}: nothing left to train on (skipped: {_sum_skipped(shards)}); give a "
            "smaller --eval-count, or a fraction such as 0.05"
        )
    left = held
    for s in shards:  # the first `held` pairs in shard order
        s["held_out"] = min(left, s["records"])
        left -= s["held_out"]
    max_label = max(s["max_label"] for s in shards)
    names = plan["class_names"]
    if names and max_label >= len(names):
        raise ConfigError(
            f"labels go up to {max_label}, but {len(names)} class names were given "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
        )
    manifest = {
        "format": FORMAT,
        "pairs": pairs,
        "bytes": sum(s["bytes"] for s in shards),
        "train": {"pairs": pairs - held},
        "held_out": {"pairs": held, "eval_count": count},
        "labels": max_label >= 0,
        "class_names": names,
        "captions": images.caption_templates(plan["inputs"]),
        "image_size": plan["image_size"],
        "skipped": _sum_skipped(shards),
        "skipped_named": [m for s in shards for m in s["named"]][:NAMED],
        "unreadable_files": unreadable,
        "shards": [
            {k: s[k] for k in ("file", "records", "size", "held_out", "max_label")} for s in shards
        ],
        "inputs": plan["inputs"],
    }
    if any(manifest["skipped"].values()) or unreadable:
        log.warning(
            "%s: skipped %s%s",
            out_dir,
            manifest["skipped"],
            f"; unreadable files: {unreadable}" if unreadable else "",
        )
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: the dir is complete
    return manifest


def _sum_skipped(shards: list[dict]) -> dict:
    return {r: sum(s["skipped"][r] for s in shards) for r in REASONS}


class Progress:
    """One stderr line: shards done, pairs, pairs/s."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.pairs = 0
        self.start = time.perf_counter()

    def update(self, stats: dict) -> None:
        self.done += 1
        self.pairs += stats["records"]
        if self.enabled:
            rate = self.pairs / max(time.perf_counter() - self.start, 1e-9)
            filled = int(30 * self.done / max(self.total, 1))
            print(
                f"\rprepare [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"shards | {self.pairs:,} pairs | {rate:,.0f} pairs/s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.enabled and self.total:
            print(file=sys.stderr)
