"""`jaxlm data prepare --images`: image-text inputs -> ArrayRecord shards of pairs + manifest.

    jaxlm data prepare --images 'gs://bucket/laion/{00000..09999}.tar' --out gs://bucket/laion_p \
        --image-size 256 --workers 32

Inputs (image_inputs.py): WebDataset tars (local or `gs://`, globs and brace ranges: one
work unit each), parquet files (a unit per row group), `tfds:NAME[:DATA_DIR]` (units of
10,000 records) and `digits`.

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
import logging
import os
import tempfile

import numpy as np
from etils import epath

from jaxlm import images, markers
from jaxlm import prepare as prepare_lib
from jaxlm.config import ConfigError
from jaxlm.image_inputs import Unit, class_names, members, plan_units

log = logging.getLogger("jaxlm")

MANIFEST = markers.MANIFEST
FORMAT = "jaxlm.images/1"
REASONS = ("no_caption", "no_image", "undecodable", "too_small")
NAMED = 20  # skipped members named in each shard's json and the manifest


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
        try:  # closed whatever an input raises: an open writer destroyed aborts in C++
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
        finally:
            writer.close()
        stats["size"] = os.path.getsize(os.path.join(tmp, name))
        markers.copy_whole(os.path.join(tmp, name), epath.Path(job.out) / name)
    stats["unit"] = dataclasses.asdict(job.unit)
    markers.write_json(epath.Path(job.out) / f"shard-{job.index:05d}.json", stats)
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
    if eval_count < 0 or (eval_count >= 1 and eval_count != int(eval_count)):
        raise ConfigError(
            f"--eval-count must be a count of pairs (a whole number) or a fraction below 1, "
            f"got {eval_count}"
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
    manifest = markers.begin(out_dir, plan)
    if manifest is not None:
        return manifest
    jobs = [
        Job(u, i, str(out_dir), image_size, min_size, image_field, text_field)
        for i, u in enumerate(units)
        if markers.read_marker(out_dir / f"shard-{i:05d}.json") is None
    ]
    if len(jobs) < len(units):
        log.info(
            "%s: %d of %d shards done, preparing the rest", out, len(units) - len(jobs), len(units)
        )
    bar = Progress(len(units), len(units) - len(jobs), progress)
    prepare_lib.run_jobs(prepare_unit, jobs, workers, bar)
    return write_manifest(out_dir, plan, len(units), unreadable)


def write_manifest(out_dir: epath.Path, plan: dict, n: int, unreadable: list[str]) -> dict:
    shards = [markers.read_marker(out_dir / f"shard-{i:05d}.json") for i in range(n)]
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
    markers.write_json(out_dir / MANIFEST, manifest, indent=1)  # last: the dir is complete
    return manifest


def _sum_skipped(shards: list[dict]) -> dict:
    return {r: sum(s["skipped"][r] for s in shards) for r in REASONS}


class Progress(prepare_lib.Progress):
    """The progress line with pairs and pairs/s."""

    def add(self, stats: dict) -> None:
        self.docs += stats["records"]

    def summary(self) -> str:
        return f"{self.docs:,} pairs | {self.docs / self.elapsed:,.0f} pairs/s"
