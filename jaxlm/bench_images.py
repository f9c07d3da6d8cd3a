"""`jaxlm bench configs/clip.py:vit_b16 --data`: pairs/s of the image-text pipeline alone (no
model), on real photographs, beside a bare loop over the same images.

The corpus: scikit-learn's two sample photos and, when scikit-image is installed, the
photographs in its `data/` folder, turned into `--pairs` distinct pairs by random crops,
flips and colour jitter, re-encoded as JPEG at the sample photos' 640 x 427 and written as
WebDataset tars (once, into WORKDIR/photos). They are prepared twice: as they are, and with
`--image-size 256` (shorter side 256, re-encoded). The pipeline is timed from each with 0
(read threads of this process), 1 and 2 worker processes; the bare loop (PIL decode, centre
crop, resize, normalise; nothing else) runs on one core over the same images.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from jaxlm import images
from jaxlm.config import Config

log = logging.getLogger("jaxlm")
SIDE = (640, 427)  # scikit-learn's sample photos


def photographs() -> list[tuple[str, np.ndarray]]:
    """(name, RGB uint8) of the real photographs that install with the test tools."""
    from sklearn.datasets import load_sample_images

    found = list(zip(("china", "flower"), load_sample_images().images, strict=True))
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        log.info("scikit-image is not installed: the corpus comes from 2 photographs")
        return found
    folder = Path(skimage.data.__file__).parent
    for path in sorted(folder.glob("*.[jp][pn]g")):
        try:
            with Image.open(path) as im:
                if min(im.size) >= 256:
                    found.append((path.stem, np.asarray(im.convert("RGB"))))
        except OSError:
            continue
    return found


def variant(photo: np.ndarray, rng: np.random.Generator) -> bytes:
    """A distinct JPEG of 640 x 427 from a photo: a random crop (60-100% of each side), a
    horizontal flip half the time, and brightness / colour jitter of up to 20%."""
    from PIL import Image

    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[y : y + ch, x : x + cw].astype(np.float32)
    crop *= rng.uniform(0.8, 1.2, 3)  # per-channel gain: colour and brightness
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(SIDE, Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_corpus(folder: Path, pairs: int, per_shard: int = 1000) -> str:
    """WebDataset tars of `pairs` photo variants (written once); returns their glob."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text())["pairs"] == pairs:
        return str(folder / "*.tar")
    photos = photographs()
    start = time.perf_counter()
    for shard in range(-(-pairs // per_shard)):
        with tarfile.open(folder / f"photos-{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(pairs, (shard + 1) * per_shard)):
                name, photo = photos[i % len(photos)]
                rng = np.random.default_rng(i)
                members = {
                    "jpg": variant(photo, rng),
                    "txt": f"a photo of {name}, take {i}".encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    log.info(
        "%d photo variants from %d photographs in %.0f s",
        pairs,
        len(photos),
        time.perf_counter() - start,
    )
    done.write_text(json.dumps({"pairs": pairs, "photographs": len(photos)}))
    return str(folder / "*.tar")


def bare_loop(encoded: list[bytes], size: int) -> float:
    """Pairs/s of PIL decode, centre crop, resize and normalise on one core."""
    from PIL import Image

    start = time.perf_counter()
    for data in encoded:
        im = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = im.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        im = im.resize((size, size), Image.BICUBIC, box=box)
        _ = (np.asarray(im, np.float32) / 255.0 - images.MEAN) / images.STD
    return len(encoded) / (time.perf_counter() - start)


def _cpu_seconds() -> float:
    """CPU time of this process and its children (Grain's workers) so far."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def bench_image_data(cfg: Config, steps: int, workdir: str, pairs: int = 20_000) -> list[dict]:
    """One result per prepared set x workers, the bare loop per set, and the preparation."""
    from jaxlm import clip_data, tokenizer
    from jaxlm import prepare_images as prep

    root = Path(workdir)
    tars = make_corpus(root / "photos", pairs)
    results, cores = [], os.cpu_count() or 1
    sets = {}
    for size in (0, 256):
        out = root / f"prepared_{size or 'full'}"
        start = time.perf_counter()
        manifest = prep.prepare([tars], str(out), image_size=size, workers=cores, eval_count=256)
        seconds = time.perf_counter() - start
        sets[size] = str(out)
        results.append(
            {
                "prepare": str(out),
                "image_size": size,
                "pairs": manifest["pairs"],
                "seconds": round(seconds, 1),
                "bytes": manifest["bytes"],
            }
        )
    captions = [f"a photo of {n}, take {i}" for i, (n, _) in enumerate(photographs())]
    tok = tokenizer.train(captions * 20, 256)
    for path in sets.values():
        source = clip_data.ImageSource(path)
        records = source.records("train")
        sample = [
            images.decode_pair(r)["image"]
            for _, _, r in records.get(np.arange(min(1000, len(records))))
        ]
        rate = bare_loop(sample, cfg.vision.image_size)
        results.append(
            {
                "bare_loop": path,
                "pairs_per_s_per_core": round(rate, 1),
                "image_size": cfg.vision.image_size,
            }
        )
        for workers in (0, 1, 2):
            c = dataclasses.replace(
                cfg,
                clip=dataclasses.replace(cfg.clip, source=path, zeroshot=""),
                data=dataclasses.replace(cfg.data, workers=workers),
                train=dataclasses.replace(cfg.train, eval_steps=0),
            )
            data = clip_data.ClipData(c, tok, root / "run")
            batches = data.train_batches(0)
            for _ in range(2):  # start the workers and fill the buffers
                next(batches)
            cpu, start = _cpu_seconds(), time.perf_counter()
            for _ in range(steps):
                next(batches)
            per_s = steps * cfg.train.batch_size / (time.perf_counter() - start)
            used = (_cpu_seconds() - cpu) / (time.perf_counter() - start)  # cores busy
            results.append(
                {
                    "pipeline": path,
                    "workers": workers,
                    "cores_busy": round(used, 2),
                    "pairs_per_s": round(per_s, 1),
                    "pairs_per_s_per_core": round(per_s / used, 1),
                    "of_bare_loop": round(per_s / used / rate, 3),
                    "random_crop": cfg.clip.random_crop,
                }
            )
            del batches
    return results
