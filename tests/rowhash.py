"""Every contrastive training pair as the trainer reads it: (step, global row) -> a hash of its
pixels and tokens. Imported both by the multi-process test's launched processes and in-process
(no conftest here: the launched processes set their own device counts)."""

import hashlib
from collections.abc import Callable

import jax
import numpy as np

from jaxlm import clip_data


def install(emit: Callable[[int, int, str], None]) -> Callable[[], None]:
    """Wraps ClipData.train_batches so that emit(step, global row, hash) sees every row read;
    returns the function that undoes it."""
    read = clip_data.ClipData.train_batches

    def hashed(self, start_step, *args):
        p = jax.process_index()
        for s, batch in enumerate(read(self, start_step, *args), start_step):
            b = len(batch["images"])
            for r in range(b):
                row = b"".join(np.ascontiguousarray(batch[k][r]).tobytes() for k in sorted(batch))
                emit(s, p * b + r, hashlib.sha1(row).hexdigest()[:16])
            yield batch

    clip_data.ClipData.train_batches = hashed
    return lambda: setattr(clip_data.ClipData, "train_batches", read)


def printed(step: int, row: int, digest: str) -> None:
    print("row", step, row, digest, flush=True)
