"""Masked LM: masking statistics, the sparse head, bidirectional attention, bad tokenizers."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from conftest import load_tiny
from flax import nnx

from jaxlm import data, mlm, sharding, tokenizer
from jaxlm.attention import Mask
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.lm import cross_entropy
from jaxlm.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = load_tiny("bert")
    docs = list(data.sample_texts(cfg.data))
    return docs, tokenizer.train(docs, cfg.model.vocab_size), tmp_path_factory.mktemp("mlm")


def rows(cfg, corpus, n_batches: int) -> list[dict]:
    """Training batches of 64 rows, as the trainer reads them (prepared once per seq_len)."""
    _, tok, workdir = corpus
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=64, seed=1))
    it = mlm.load_data(cfg, tok, workdir / f"seq{cfg.model.seq_len}").train_batches(0)
    return [next(it) for _ in range(n_batches)]


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_masking_statistics_match_the_configured_rates(corpus, rate):
    _, tok, _ = corpus
    cfg = load_tiny(
        "bert", **{"mlm.mask_rate": rate, "model.seq_len": 128, "mlm.max_predictions": 64}
    )
    batches = rows(cfg, corpus, 40)  # 40 x 64 rows x 128 tokens = 327,680 tokens
    special = np.zeros(tok.vocab_size, bool)
    special[tok.special_ids()] = True
    mask_id = tok.piece_id("[MASK]")
    chosen = maskable = masked = randomised = kept = 0
    for b in batches:
        original = b["inputs"].copy()
        for r in range(len(original)):
            w = b["mask_weights"][r] > 0
            pos, targets = b["mask_positions"][r][w], b["mask_targets"][r][w]
            original[r, pos] = targets
            assert not special[targets].any()  # specials are never chosen
            got = b["inputs"][r, pos]
            masked += int((got == mask_id).sum())
            kept += int((got == targets).sum())
            randomised += int(((got != mask_id) & (got != targets)).sum())
            chosen += len(pos)
        maskable += int((~special[original]).sum())
        unchosen = np.ones_like(original, bool)
        for r in range(len(original)):
            unchosen[r, b["mask_positions"][r][b["mask_weights"][r] > 0]] = False
        # Positions not chosen are untouched: inputs equal the original tokens there.
        assert (b["inputs"][unchosen] == original[unchosen]).all()
    assert abs(chosen / maskable - rate) < 0.01 * rate, chosen / maskable
    assert abs(masked / chosen - 0.8) < 0.01 * 0.8, masked / chosen
    # A random replacement equals the original with probability 1/vocab: counted as kept.
    assert abs(randomised / chosen - 0.1) < 0.01, randomised / chosen
    assert abs(kept / chosen - 0.1) < 0.01, kept / chosen


def test_whole_word_masking_masks_every_piece_of_a_chosen_word(corpus):
    _, tok, _ = corpus
    cfg = load_tiny(
        "bert", **{"mlm.whole_word": True, "mlm.mask_token_rate": 1.0, "mlm.random_token_rate": 0.0}
    )
    continuation = ~tok.word_starts()
    special = np.zeros(tok.vocab_size, bool)
    special[tok.special_ids()] = True
    mask_id = tok.piece_id("[MASK]")
    words_checked = 0
    for b in rows(cfg, corpus, 4):
        for r in range(len(b["inputs"])):
            is_mask = b["inputs"][r] == mask_id
            original = b["inputs"][r].copy()
            w = b["mask_weights"][r] > 0
            original[b["mask_positions"][r][w]] = b["mask_targets"][r][w]
            for t in range(1, len(original)):
                # A continuation piece shares its word's fate (after a special token such as
                # a newline, a piece begins a word whatever its spelling; <unk> is never masked).
                if continuation[original[t]] and not special[original[t - 1 : t + 1]].any():
                    assert is_mask[t] == is_mask[t - 1], (r, t)
                    words_checked += 1
    assert words_checked > 100


def _model_and_batch(cfg, seed=0):
    model = mlm.Model(cfg.model, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    batch = {k: jnp.asarray(v) for k, v in mlm.synthetic_batch(cfg, 8, rng).items()}
    batch["mask_weights"] = batch["mask_weights"].at[:, -3:].set(0.0)  # padded prediction slots
    return model, batch


def test_sparse_head_equals_a_dense_head_with_the_same_weights():
    cfg = load_tiny("bert")
    model, batch = _model_and_batch(cfg)
    t = cfg.model.seq_len
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):

        @jax.jit
        def both(batch):
            sparse, _ = mlm.loss_fn(model, batch, None)
            hidden = model(batch)
            logits = model.predict(hidden, jnp.tile(jnp.arange(t), (8, 1)))  # every position
            rows = jnp.arange(8)[:, None]
            targets = (
                jnp.zeros((8, t), jnp.int32)
                .at[rows, batch["mask_positions"]]
                .set(batch["mask_targets"])
            )
            weights = jnp.zeros((8, t)).at[rows, batch["mask_positions"]].add(batch["mask_weights"])
            dense, _ = cross_entropy(logits, targets, weights)
            return sparse, dense

        sparse, dense = both(batch)
        np.testing.assert_allclose(sparse, dense, rtol=1e-5)
        # Unmasked (zero-weight) slots carry no loss: their targets may be anything.
        other = dict(batch, mask_targets=batch["mask_targets"].at[:, -3:].set(7))
        np.testing.assert_array_equal(both(other)[0], sparse)
        changed = dict(batch, mask_targets=batch["mask_targets"].at[:, 0].set(7))
        assert both(changed)[0] != sparse


def test_a_later_token_changes_an_earlier_output_but_not_across_documents():
    cfg = load_tiny("bert")
    model, batch = _model_and_batch(cfg)
    seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 8, axis=0))
    batch = dict(batch, segment_ids=seg)
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=8))):

        @jax.jit
        def grads(position):
            def out(x):
                h = model.transformer(x, Mask(segment_ids=seg), batch["positions"], causal=False)
                # a readout of the output, not its sum: a post-LN output sums to a constant
                return h[0, position] @ jnp.linspace(0.0, 1.0, h.shape[-1])

            x = model.embed(batch["inputs"], batch["positions"])
            return jnp.abs(jax.grad(out)(x)[0]).sum(-1)

        g = np.asarray(grads(3))
        assert (g[4:20] > 0).all()  # later tokens of the same document matter
        assert (g[20:] == 0).all()  # the next packed document does not
        g = np.asarray(grads(25))
        assert (g[:20] == 0).all() and (g[20:] > 0).all()


def test_tokenizer_without_mask_fails_before_training(tmp_path, corpus):
    docs, _, _ = corpus
    out = io.BytesIO()
    lines = (line for d in docs for line in d.split("\n") if line.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=out, vocab_size=500, minloglevel=2
    )
    path = tmp_path / "plain.model"
    path.write_bytes(out.getvalue())
    with pytest.raises(ConfigError, match=r"needs a tokenizer with a \[MASK\] token"):
        train(load_tiny("bert", **{"data.tokenizer": str(path)}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
