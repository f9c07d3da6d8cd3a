"""Generation with a KV cache against full recomputation, and sampling."""

import json

import jax
import numpy as np
import pytest
from conftest import load_tiny

from jaxlm import sharding
from jaxlm.config import MeshConfig
from jaxlm.generate import Sampling, decode_ids, sample
from jaxlm.step import build

LLAMA = {
    "model.position": "rope",
    "model.num_kv_heads": 2,
    "model.mlp": "swiglu",
    "model.norm": "rmsnorm",
    "model.use_bias": False,
}
PROMPTS = np.array([[5, 9, 14, 3, 8, 21, 30], [7, 2, 0, 0, 0, 0, 0], [11, 4, 6, 19, 0, 0, 0]])
LENGTHS = np.array([7, 2, 4], np.int32)
NEW = 9


def _setup(shape: dict, scan: bool, mesh: tuple):
    cfg = load_tiny(**shape, **{"model.scan_layers": scan, "model.dtype": "float32"})
    m = sharding.make_mesh(MeshConfig(*mesh))
    s = build(cfg, m)
    with jax.set_mesh(m):
        params = s.init()["params"]
    return s, params


@pytest.mark.parametrize(
    "shape, scan, mesh",
    [
        ({}, True, (8, 1, 1)),
        (LLAMA, False, (8, 1, 1)),
        ({}, False, (1, 2, 4)),
        (LLAMA, True, (1, 2, 4)),
    ],
    ids=["gpt2-scanned", "llama-unrolled", "gpt2-unrolled-mesh124", "llama-scanned-mesh124"],
)
def test_kv_cache_logits_equal_full_recomputation(shape, scan, mesh):
    s, params = _setup(shape, scan, mesh)
    with jax.set_mesh(s.mesh):

        @jax.jit
        def run(params):
            model = s.model(params)
            return decode_ids(
                model, PROMPTS, LENGTHS, NEW, 7 + NEW, -1, Sampling(), jax.random.key(0), True
            )

        tokens, counts, logits = (np.asarray(x) for x in run(params))
        assert list(counts) == [NEW] * 3  # no [eos] (-1): every row runs its budget
        # the whole sequence, prompt and completion, through the model at once
        full = np.zeros((3, 7 + NEW), np.int32)
        for i, n in enumerate(LENGTHS):
            full[i, :n], full[i, n : n + NEW] = PROMPTS[i, :n], tokens[i]
        positions = np.broadcast_to(np.arange(full.shape[1]), full.shape)
        batch = {"inputs": full, "positions": positions, "segment_ids": np.ones_like(full)}
        recomputed = np.asarray(jax.jit(lambda p: s.model(p)(batch))(params))
    for i, n in enumerate(LENGTHS):
        want = recomputed[i, n - 1 : n - 1 + NEW]  # the logits that chose each new token
        np.testing.assert_allclose(logits[i], want, atol=2e-4, rtol=1e-4)
        top2 = np.sort(want, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        assert clear.sum() >= NEW - 2, clear
        np.testing.assert_array_equal(tokens[i][clear], want.argmax(-1)[clear])


def test_sampling_rules():
    logits = jax.random.normal(jax.random.key(1), (4, 50)) * 3
    greedy = sample(logits, jax.random.key(0), Sampling())
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    top1 = sample(logits, jax.random.key(5), Sampling(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy
    a = sample(logits, jax.random.key(7), Sampling(temperature=1.0))
    b = sample(logits, jax.random.key(7), Sampling(temperature=1.0))
    np.testing.assert_array_equal(a, b)  # the same seed, the same samples
    draws = np.stack(
        [
            sample(logits, k, Sampling(1.0, top_k=3))
            for k in jax.random.split(jax.random.key(2), 200)
        ]
    )
    allowed = np.argsort(np.asarray(logits), -1)[:, -3:]
    assert all(np.isin(draws[:, r], allowed[r]).all() for r in range(4))
    assert len(np.unique(draws[:, 0])) > 1  # it does sample
    # top-p: a nucleus of the tokens holding p of the mass, the first always in
    probs = jax.nn.softmax(logits, -1)
    nucleus = np.stack(
        [
            sample(logits, k, Sampling(1.0, top_p=0.5))
            for k in jax.random.split(jax.random.key(3), 200)
        ]
    )
    for r in range(4):
        order = np.argsort(-np.asarray(probs[r]))
        mass = np.cumsum(np.asarray(probs[r])[order])
        inside = order[: int(np.searchsorted(mass, 0.5)) + 1]
        assert np.isin(nucleus[:, r], inside).all(), r
    tiny_p = sample(logits, jax.random.key(4), Sampling(1.0, top_p=1e-6))
    np.testing.assert_array_equal(tiny_p, greedy)


def test_generate_command_on_a_trained_checkpoint(tiny_lm, tmp_path, capsys):
    """`jaxlm generate` restores the parameters alone and prints one JSON line per prompt;
    greedy output is the same as through the Python API on a fully restored checkpoint."""
    from jaxlm import cli
    from jaxlm.evaluate import load
    from jaxlm.generate import generate

    (tmp_path / "prompts.txt").write_text("KING HENRY:\n\nTo be\n")
    argv = ["generate", str(tiny_lm), "--prompt", "ROMEO:", "--prompts-file"]
    assert cli.main([*argv, str(tmp_path / "prompts.txt"), "--max-new-tokens", "6", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["ROMEO:", "KING HENRY:", "To be"]
    loaded = load(tiny_lm)
    want = generate(loaded, ["ROMEO:", "KING HENRY:", "To be"], max_new_tokens=6)
    assert lines == want
    # the same prompts again reuse the jitted decoder: nothing is traced and lowered anew
    lowered = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: lowered.append(event) if "jaxpr_to_mlir" in event else None
    )
    assert generate(loaded, ["ROMEO:", "KING HENRY:", "To be"], max_new_tokens=6) == want
    assert not lowered, lowered
    for r in lines:
        assert len(r["tokens"]) <= 6 and loaded.tokenizer.eos_id not in r["tokens"]
        assert r["completion"] == loaded.tokenizer.decode(r["tokens"])

    # parameters only: the optimizer state is left unread (Orbax's placeholder)
    import orbax.checkpoint as ocp

    from jaxlm.checkpoint import Checkpointer
    from jaxlm.config import CheckpointConfig

    ckpt = Checkpointer(tiny_lm, CheckpointConfig())
    with jax.set_mesh(loaded.setup.mesh):
        state = ckpt.restore(2, loaded.setup.abstract, params_only=True)
    ckpt.close()
    others = [x for k, v in state.items() if k != "params" for x in jax.tree.leaves(v)]
    assert others and all(x is ocp.PLACEHOLDER for x in others)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state["params"]))

    long_prompt = "word " * 200
    assert cli.main(["generate", str(tiny_lm), "--prompt", long_prompt]) != 0
    assert "leaves no room in the model's context of" in capsys.readouterr().err


def test_more_new_tokens_than_the_context_holds_says_where_completions_stop(tiny_lm, caplog):
    from jaxlm.evaluate import load
    from jaxlm.generate import generate

    loaded = load(tiny_lm)
    context, prompt = loaded.cfg.model.seq_len, [loaded.tokenizer.bos_id]
    prompt += list(loaded.tokenizer.encode("ROMEO:"))
    with caplog.at_level("WARNING", logger="jaxlm"):
        out = generate(loaded, ["ROMEO:"], max_new_tokens=10_000, sampling=Sampling(5.0))
    room = context - len(prompt)
    assert f"--max-new-tokens=10000: the longest prompt leaves room for {room}" in caplog.text
    assert len(out[0]["tokens"]) <= room
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxlm"):
        generate(loaded, ["ROMEO:"], max_new_tokens=room)
    assert "max-new-tokens" not in caplog.text  # it fits: nothing to say


class FewerPieces:
    """A tokenizer that knows only the first `size` ids of the model's vocabulary (as a
    model padded to 50304 has more rows than GPT-2's 50257 pieces)."""

    def __init__(self, tok, size: int):
        self._tok, self.vocab_size = tok, size

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_generate_never_samples_an_id_the_tokenizer_lacks(tiny_lm):
    import dataclasses

    from jaxlm.evaluate import load
    from jaxlm.generate import generate

    loaded = load(tiny_lm)
    assert loaded.cfg.model.vocab_size == 512
    fewer = dataclasses.replace(loaded, tokenizer=FewerPieces(loaded.tokenizer, 60))
    prompts = ["ROMEO:", "KING HENRY:", "To be"]
    hot = Sampling(temperature=5.0)  # nearly uniform over whatever ids are allowed
    out = generate(fewer, prompts, max_new_tokens=24, sampling=hot, seed=1)
    ids = np.concatenate([r["tokens"] for r in out])
    assert len(ids) > 30 and ids.max() < 60, ids
    # the same sampling over the whole vocabulary does reach the ids above
    everything = generate(loaded, prompts, max_new_tokens=24, sampling=hot, seed=1)
    assert np.concatenate([r["tokens"] for r in everything]).max() >= 60


def test_rows_stop_on_their_own_at_eos_and_at_the_context_end():
    """One row writing [eos] stops while the others go on; a row whose prompt and output
    fill the context stops there, each row at its own length."""
    s, params = _setup({}, True, (8, 1, 1))
    sampled = Sampling(temperature=1.0)  # seeded: varied tokens, the same in every run

    def run(eos: int, cache_length: int):
        with jax.set_mesh(s.mesh):
            out = jax.jit(
                lambda p: decode_ids(
                    s.model(p),
                    PROMPTS,
                    LENGTHS,
                    NEW,
                    cache_length,
                    eos,
                    sampled,
                    jax.random.key(0),
                )[:2]
            )(params)
        return (np.asarray(x) for x in out)

    free, counts = run(-1, 7 + NEW)
    assert list(counts) == [NEW] * 3
    k = next(
        k for k in range(1, NEW) if free[0, k] not in free[0, :k] and free[0, k] not in free[1:]
    )
    eos = int(free[0, k])
    tokens, counts = run(eos, 7 + NEW)
    assert counts[0] == k and (tokens[0, k:] == eos).all()
    np.testing.assert_array_equal(tokens[0, :k], free[0, :k])
    assert list(counts[1:]) == [NEW, NEW]  # the other rows went on
    np.testing.assert_array_equal(tokens[1:], free[1:])

    tokens, counts = run(-1, 10)  # a context of 10 positions: prompt + output <= 10
    assert list(counts) == [10 - n for n in LENGTHS]  # 3, 8 and 6 of a budget of 9
    for row, n in enumerate(counts):
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert (tokens[row, n:] == -1).all()
