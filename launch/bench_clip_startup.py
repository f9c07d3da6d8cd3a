"""Start-up of a contrastive run against the size of its data: WebDataset tars of 2k and 100k
digit pairs (8 x 8 PNGs, as issue 16 measured the old tar path with), each prepared with
`jaxlm data prepare --images`, then a 1-step CLIP tiny run on each, timed from the command
to its first step with its peak memory (launch/bench_startup.py). One JSON line each.

    python launch/bench_clip_startup.py /tmp/clip_startup
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

HERE = Path(__file__).parent


def write_tars(folder: Path, pairs: int, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    per = -(-pairs // shards)
    for k in range(shards):
        with tarfile.open(folder / f"digits-{k:05d}.tar", "w") as tar:
            for i in range(k * per, min(pairs, (k + 1) * per)):
                out = io.BytesIO()
                Image.fromarray(pixels[i % len(pixels)]).save(out, format="PNG")
                text = f"a handwritten {d.target[i % len(pixels)]}, sample {i}".encode()
                for name, data in ((f"{i:08d}.png", out.getvalue()), (f"{i:08d}.txt", text)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    root = Path(sys.argv[1])
    for pairs, shards in ((2_000, 1), (100_000, 20)):
        tars, prepared = root / f"tars_{pairs}", root / f"prepared_{pairs}"
        if not tars.exists():
            write_tars(tars, pairs, shards)
        subprocess.run(
            ["jaxlm", "data", "prepare", "--images", f"{tars}/*.tar", "--out", str(prepared)]
            + ["--eval-count", "1000"],
            check=True,
            capture_output=True,
        )
        run = subprocess.run(
            [
                sys.executable,
                str(HERE / "bench_startup.py"),
                "--",
                "jaxlm",
                "train",
                "configs/clip.py:tiny",
                "--workdir",
                str(root / f"run_{pairs}"),
                f"clip.source={prepared}",
                "train.steps=1",
                "train.eval_steps=0",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        print(json.dumps({"pairs": pairs, **json.loads(run.stdout.splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
