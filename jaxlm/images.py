"""Image-text pairs for the contrastive objective: sources and the Grain preprocessing.

Pairs are stored by `jaxlm data prepare --images` (prepare_images.py) as records of
`encode_pair`; captions for pairs that only have a label (the digits, a labelled tfds
dataset) are drawn from templates at training time, seeded by the pair's global index.
Decoding (pillow), cropping and normalisation run in the Grain pipeline (clip_data.py).
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # decoding imports PIL when first used
    import PIL.Image

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
SCALE, OFFSET = 1.0 / (255.0 * STD), -MEAN / STD  # (x / 255 - MEAN) / STD in one pass
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


PHOTO_TEMPLATES = ("a photo of a {word}.", "an image of a {word}.")


def caption(template: str, label: int, names: Sequence[str] = DIGIT_WORDS) -> str:
    """The one way a template names a class: {word} its name, {digit} its index (training
    captions, zero-shot prompts and the check of clip.templates all fill them in here)."""
    return template.format(word=names[label], digit=label)


def random_caption(
    label: int,
    rng: np.random.Generator,
    names: tuple[str, ...] = DIGIT_WORDS,
    templates: tuple[str, ...] = TRAIN_TEMPLATES,
    filler: bool = True,
) -> str:
    """A training caption for a pair that has a label but no caption: a random template, with
    up to four filler words inserted anywhere (the digits)."""
    words = caption(templates[rng.integers(len(templates))], label, names).split()
    for word in rng.choice(FILLER_WORDS, rng.integers(0, 5)) if filler else ():
        words.insert(rng.integers(len(words) + 1), str(word))
    return " ".join(words)


def caption_templates(inputs: list[str]) -> dict:
    """How captions are made from labels (training) and prompts (zero-shot) for a prepared
    directory's inputs: the digits' own, or photo prompts."""
    if inputs == ["digits"]:
        return {"train": TRAIN_TEMPLATES, "filler": True, "zeroshot": EVAL_TEMPLATES}
    return {"train": PHOTO_TEMPLATES[:1], "filler": False, "zeroshot": PHOTO_TEMPLATES}


def encode_pair(image: bytes, caption: str | None, label: int | None, key: str) -> bytes:
    """A prepared record: a 4-byte length, a JSON header, then the encoded image."""
    head = json.dumps({"caption": caption, "label": label, "key": key}).encode()
    return struct.pack("<I", len(head)) + head + image


def decode_pair(record: bytes) -> dict:
    """A prepared record -> {image (encoded bytes), caption, label, key}."""
    (n,) = struct.unpack_from("<I", record)
    return json.loads(record[4 : 4 + n]) | {"image": record[4 + n :]}


def decode(image: bytes) -> PIL.Image.Image | None:
    """Encoded bytes -> a PIL RGB image, decoded; None if unreadable. (Kept as PIL: the crop
    and resize that follow then copy nothing through NumPy.)"""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def resize_crop(im, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A PIL image -> centre crop (rng None) or random-resized crop (scale 0.5-1, aspect
    3/4-4/3) to size^2, resized in one bicubic pass from the crop box: uint8 [size, size,
    3] (the image tower normalises on the device)."""
    from PIL import Image

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
    return np.asarray(im.resize((size, size), Image.BICUBIC, box=box))


def text_tokens(tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[bos] tokens [eos], cut or padded to length -> (tokens, segment ids: 1 text, 0 pad)."""
    ids = np.concatenate(
        [[tokenizer.bos_id], tokenizer.encode(text)[: length - 2], [tokenizer.eos_id]]
    )
    tokens = np.zeros(length, np.int32)
    tokens[: len(ids)] = ids
    return tokens, (np.arange(length) < len(ids)).astype(np.int32)
