"""Image-text pairs for the contrastive objective: sources and the Grain preprocessing.

A source is a list of records `{"image": uint8 array or encoded bytes, "caption": str | None,
"label": int | None}` held in memory or read lazily, split into train and held-out parts:

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, captioned from templates,
- `tar:GLOB`: WebDataset shards as img2dataset writes them ({key}.jpg|png|webp + {key}.txt),
- `tfds:NAME[:DATA_DIR]`: a tensorflow-datasets dataset read through `tfds.data_source`.

Decoding (pillow), resizing, cropping and normalisation run in the Grain pipeline; a member
that does not decode is skipped and counted (`SkipCounter`), never fatal.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxlm.config import Config, ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions of training pairs; zero-shot evaluation uses EVAL_TEMPLATES, none of which is here.
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit} written by hand",
    "a scan of a handwritten {word}",
    "handwritten number {word}",
    "the number {digit}",
    "a {word} written in ink",
)
# Context words sprinkled around training captions, so that the text tower learns to look
# for the digit and not at the wording (none of them is in EVAL_TEMPLATES).
FILLER_WORDS = tuple(
    "small large old new clean dark light messy neat simple black white grey tiny bold thin "
    "faded sharp single paper ink pen drawn shown here this that sample example quick careful "
    "school form postal code scanned centred wide narrow rough smooth upright slanted".split()
)
EVAL_TEMPLATES = (
    "a photo of the number {word}",
    "an image of a {digit}",
    "a blurry picture of the digit {word}",
)
MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIP's
STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclasses.dataclass
class Source:
    train: list  # records, or lazy TarMember records
    held_out: list
    class_names: tuple[str, ...] = ()  # for zero-shot classification; () = none
    templates: tuple[str, ...] = ()  # zero-shot prompts, "{word}" / "{digit}" filled in
    skipped: dict = dataclasses.field(default_factory=dict)  # found while indexing


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded train / held-out split of whole items, with at least one on each side."""
    if len(items) < 2:
        raise ConfigError(f"need at least 2 items for a train/eval split, found {len(items)}")
    held = np.random.default_rng(seed).random(len(items)) < eval_fraction
    held[0], held[-1] = True, False  # never empty on either side
    train = [d for d, h in zip(items, held, strict=True) if not h]
    return train, [d for d, h in zip(items, held, strict=True) if h]


def caption(template: str, label: int) -> str:
    return template.format(word=DIGIT_WORDS[label], digit=label)


def random_caption(label: int, rng: np.random.Generator) -> str:
    """A training caption: a random template with up to four filler words inserted anywhere."""
    words = caption(TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))], label).split()
    for word in rng.choice(FILLER_WORDS, rng.integers(0, 5)):
        words.insert(rng.integers(len(words) + 1), str(word))
    return " ".join(words)


def digits(eval_fraction: float, seed: int) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 8x8 in 0..16
    records = [
        {"image": im, "caption": None, "label": int(y)}
        for im, y in zip(images, d.target, strict=True)
    ]
    train, held_out = split(records, eval_fraction, seed)
    for i, r in enumerate(held_out):  # fixed captions for held-out retrieval
        r["caption"] = caption(TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)], r["label"])
    return Source(train, held_out, DIGIT_WORDS, EVAL_TEMPLATES)


@dataclasses.dataclass(frozen=True)
class TarMember:
    """A lazily read image of a tar shard, with its caption already read."""

    path: str
    offset: int
    size: int
    caption: str

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def tar_shards(pattern: str, eval_fraction: float, seed: int) -> Source:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise ConfigError(f"clip.source 'tar:{pattern}' matches no file")
    records, skipped = [], {"no_caption": 0, "no_image": 0}
    for path in paths:
        members: dict[str, dict] = {}
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if ext == ".txt":
                        text = tar.extractfile(m).read().decode("utf-8", errors="replace").strip()
                        members.setdefault(key, {})["caption"] = text
                    elif ext in IMAGE_EXTENSIONS:
                        members.setdefault(key, {})["image"] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            raise ConfigError(f"{path}: not a readable tar file ({e})") from None
        for pair in members.values():
            if "image" not in pair:
                skipped["no_image"] += 1
            elif not pair.get("caption"):
                skipped["no_caption"] += 1
            else:
                records.append(TarMember(path, *pair["image"], pair["caption"]))
    if not records:
        raise ConfigError(
            f"clip.source 'tar:{pattern}': no readable image-text pairs in {len(paths)} shards "
            f"(skipped {skipped})"
        )
    if len(records) < 2:
        raise ConfigError(
            f"clip.source 'tar:{pattern}': one image-text pair; need at least two (one to hold out)"
        )
    return Source(*split(records, eval_fraction, seed), skipped=skipped)


def _split_key(name: str) -> tuple[str, str]:
    base = Path(name)
    return str(base.with_suffix("")), base.suffix.lower()


def tfds_source(spec: str, eval_fraction: float, seed: int) -> Source:
    """`NAME[:DATA_DIR]`; records need an `image` and a `caption` (or `text`) or `label`."""
    import tensorflow_datasets as tfds

    name, _, data_dir = spec.partition(":")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
        splits = list(builder.info.splits)
        train = tfds.data_source(name, split="train", data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types for a missing or unprepared dataset
        raise ConfigError(f"clip.source 'tfds:{spec}': cannot open the dataset ({e})") from None
    held_split = next((s for s in ("test", "validation") if s in splits), None)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    names = tuple(label.names) if hasattr(label, "names") else ()
    if not len(train):
        raise ConfigError(f"clip.source 'tfds:{spec}': no readable image-text pairs")
    if held_split:
        held = tfds.data_source(name, split=held_split, data_dir=data_dir or None)
        records = TfdsRecords(train, range(len(train)), names)
        held_out = list(TfdsRecords(held, range(len(held)), names))
    else:
        train_idx, held_idx = split(list(range(len(train))), eval_fraction, seed)
        records = TfdsRecords(train, train_idx, names)
        held_out = list(TfdsRecords(train, held_idx, names))
    return Source(records, held_out, names, ("a photo of a {word}.", "an image of a {word}."))


class TfdsRecords(Sequence):
    """Records of a TFDS data source, read when indexed (the dataset is never all in memory)."""

    def __init__(self, source, indices, names: tuple[str, ...]):
        self.source, self.indices, self.names = source, list(indices), names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return _tfds_record(self.source[self.indices[i]], self.names)


def _tfds_record(x: dict, names: tuple[str, ...]) -> dict:
    text = x.get("caption", x.get("text"))
    text = text.decode() if isinstance(text, bytes) else text
    label = int(x["label"]) if "label" in x else None
    if text is None and label is not None and names:
        text = f"a photo of a {names[label]}"
    return {"image": x["image"], "caption": text, "label": label}


def load_source(cfg: Config) -> Source:
    src = cfg.clip.source
    if src == "digits":
        return digits(cfg.data.eval_fraction, cfg.train.seed)
    if src.startswith("tar:"):
        return tar_shards(src[4:], cfg.data.eval_fraction, cfg.train.seed)
    if src.startswith("tfds:"):
        return tfds_source(src[5:], cfg.data.eval_fraction, cfg.train.seed)
    raise ConfigError(f"clip.source {src!r}: expected digits, tar:GLOB or tfds:NAME[:DATA_DIR]")


class SkipCounter:
    """Unreadable images seen by this process's pipeline (thread-safe)."""

    def __init__(self):
        self.count, self._lock = 0, threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


def decode(image) -> np.ndarray | None:
    """uint8 [H, W(, C)] array or encoded bytes -> uint8 RGB [H, W, 3]; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, TarMember):
        image = image.read()
    if isinstance(image, bytes | bytearray):
        try:
            with Image.open(io.BytesIO(image)) as im:
                return np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError):
            return None
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def resize_crop(rgb: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Centre crop (rng None) or random-resized crop (scale 0.5-1, aspect 3/4-4/3) to size^2,
    then CLIP's normalisation: float32 [size, size, 3]."""
    from PIL import Image

    im = Image.fromarray(rgb)
    w, h = im.size
    if rng is None:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    else:
        area = w * h * rng.uniform(0.5, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        box = (x, y, x + cw, y + ch)
    im = im.resize((size, size), Image.BICUBIC, box=box)
    return (np.asarray(im, np.float32) / 255.0 - MEAN) / STD


def text_tokens(tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[bos] tokens [eos], cut or padded to length -> (tokens, segment ids: 1 text, 0 pad)."""
    ids = np.concatenate(
        [[tokenizer.bos_id], tokenizer.encode(text)[: length - 2], [tokenizer.eos_id]]
    )
    tokens = np.zeros(length, np.int32)
    tokens[: len(ids)] = ids
    return tokens, (np.arange(length) < len(ids)).astype(np.int32)
