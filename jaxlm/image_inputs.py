"""Image-text inputs of `jaxlm data prepare --images`: which files an input names, how they
are cut into work units, and the pairs (`Member`s) of a unit.

Kinds: WebDataset tars (`{key}.jpg|jpeg|png|webp` + `{key}.txt`, an optional `{key}.cls`),
grouped by key as WebDataset groups them (adjacent members of one basename); parquet files
(an image column of bytes or Hugging Face `{bytes, path}` structs, a caption column, an
optional `label` and `key`); `tfds:NAME[:DATA_DIR]` through `tfds.data_source` (no
TensorFlow); and `digits`, scikit-learn's handwritten digits. Paths go through etils.epath,
so `gs://` tars read like local ones.
"""

from __future__ import annotations

import dataclasses
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from etils import epath

from jaxlm import images
from jaxlm.config import ConfigError
from jaxlm.inputs import expand

log = logging.getLogger("jaxlm")

TFDS_UNIT = 10_000


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
            where = f"{unit.path}: record {i}"
            text = _caption(x.get("caption", x.get("text")), where, "caption")
            label = _label(x["label"], where) if "label" in x else None
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
                    current.label = _class_number(data, path, m.name)
    except ConfigError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: truncated or damaged tar (after member {n}: {e}); replace the file and "
            "run the same prepare again: the other shards are kept"
        ) from None
    if current is not None:
        yield current


def _class_number(data: bytes, path: str, member: str) -> int:
    """A WebDataset `.cls` member: the class as a number (a damaged tar was said otherwise)."""
    text = data.decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"{path}: {member} holds {text[:40]!r}, not a class number (a .cls member is the "
            "class's index, as img2dataset and WebDataset write it)"
        ) from None


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
        where = f"{unit.path}: row {i} of row group {unit.start}"
        label = _label(table["label"][i], where) if "label" in table else None
        key = table["key"][i] if "key" in table else f"{unit.start}/{i}"
        yield Member(str(key), image, _caption(table[text_field][i], where, text_field), label)


def _caption(text, where: str, text_field: str) -> str | None:
    """A caption as text (bytes decoded, as a tar's .txt members are), or None where there is
    none; a number or a list there is an error naming the record: kept, it was trained on as
    its digits, and a 0 was taken for a missing caption."""
    if text is None or isinstance(text, str):
        return text
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    shown = f"{repr(text)[:40]} ({type(text).__name__})"
    raise ConfigError(f"{where}: its {text_field!r} field is {shown}, not a caption")


def _label(value, where: str) -> int | None:
    """A class label: a whole number (the class's index), or None."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return None if value is None else int(value)
    shown = f"{repr(value)[:40]} ({type(value).__name__})"
    raise ConfigError(f"{where}: its 'label' field is {shown}, not a class number")


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
