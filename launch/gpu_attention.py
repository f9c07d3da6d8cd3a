"""One attention layer on the GPU, GPT-2 124M's shape (12 x 1024 tokens, 12 heads of 64,
bfloat16), rows of packed documents as `jaxlm bench` makes them: every way jaxlm can run the
document mask, checked against float32 XLA (outputs and gradients) and timed forward +
backward. Prints one JSON line per way; needs no Grain. Run by hand on a lent GPU
(`PYTHONPATH=. python3 launch/gpu_attention.py`; measured 2026-12-04, BENCHMARKS.md).

    python3 launch/gpu_attention.py [LENGTH ITERATIONS]   (a short dry run on a CPU: 128 2)
"""

from __future__ import annotations

import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import attention, shards

B, T, H, K = 12, 1024, 12, 64
# documents a row: `jaxlm bench`'s rows (about 5), and short documents (about 22 at 1024
# tokens, as the plays cut into speeches: BENCHMARKS.md, "Documents per row")
ROWS = {"bench": 4.0, "short": 21.0}  # row length / mean document length
WAYS = {  # name: (model.attention, model.max_segments, document mask, rows)
    "xla_dense": ("xla", 0, True, "bench"),
    "cudnn_dense": ("cudnn", 0, True, "bench"),
    "cudnn_packed_16": ("cudnn", 16, True, "bench"),
    "cudnn_packed_64": ("cudnn", 64, True, "bench"),
    "cudnn_packed_4": ("cudnn", 4, True, "bench"),  # rows hold more: the dense branch
    "cudnn_packed_64_short": ("cudnn", 64, True, "short"),
    "cudnn_causal_only": ("cudnn", 0, False, "bench"),  # nanoGPT's attention: no documents
}


def main(t: int = T, iterations: int = 50) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)
    segments = {
        rows: jnp.asarray(shards.synthetic_segments(B, t, rng, per_row))
        for rows, per_row in ROWS.items()
    }
    for rows, ids in segments.items():  # (the count does not depend on `most`)
        counts = np.asarray(attention.segment_runs(ids, 1)[2]).tolist()
        print(json.dumps({"rows": rows, "documents_per_row": counts}))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (B, t, H, K), jnp.bfloat16) for key in keys)

    def run(setting: str, most: int, documents: bool, rows: str):
        mask = attention.Mask(segment_ids=segments[rows]) if documents else attention.Mask()

        def forward(q, k, v):
            return attention.attend(q, k, v, mask, True, setting, most)

        @jax.jit
        def step(q, k, v, g):
            out, vjp = jax.vjp(forward, q, k, v)
            return out, vjp(g)

        return step

    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    masks = {(documents, rows) for _, _, documents, rows in WAYS.values()}
    reference = {mask: run("xla", 0, *mask)(*f32) for mask in masks}
    for name, (setting, most, documents, rows) in WAYS.items():
        step = run(setting, most, documents, rows)
        try:  # a kernel refused when compiled, not traced: say so, go on with the rest
            out, grads = step(q, k, v, g)
            jax.block_until_ready(grads)
        except Exception as error:  # noqa: BLE001
            print(json.dumps({"way": name, "error": str(error)[:600]}), flush=True)
            continue
        want_out, want_grads = reference[documents, rows]
        errors = [
            float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
            for got, want in zip((out, *grads), (want_out, *want_grads), strict=True)
        ]
        start = time.perf_counter()
        for _ in range(iterations):
            out, grads = step(q, k, v, g)
        jax.block_until_ready(grads)
        ms = (time.perf_counter() - start) / iterations * 1e3
        result = {"way": name, "fwd_bwd_ms": round(ms, 3)}
        result |= dict(zip(("err_out", "err_dq", "err_dk", "err_dv"), errors, strict=True))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
