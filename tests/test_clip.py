"""Contrastive objective: losses against NumPy, permutation invariance, sharding invariance,
image-text sources that are damaged or empty."""

import dataclasses
import io
import json
import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_tiny
from PIL import Image
from test_images import write_tar

from jaxlm import clip, clip_data, sharding
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.step import build, make_train_step
from jaxlm.train import train


def numpy_clip(img, txt, log_scale):
    logits = img @ txt.T * np.exp(min(log_scale, np.log(100)))

    def xent(z):  # rows are predictions, the diagonal is the answer
        z = z - z.max(1, keepdims=True)
        return -(np.diag(z) - np.log(np.exp(z).sum(1))).mean()

    return (xent(logits) + xent(logits.T)) / 2


def numpy_siglip(img, txt, log_scale, bias):
    z = img @ txt.T * np.exp(log_scale) + bias
    signs = 2 * np.eye(len(img)) - 1
    return np.log1p(np.exp(-signs * z)).sum() / len(img)


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_losses_equal_a_numpy_reference_and_ignore_pair_order(kind):
    rng = np.random.default_rng(0)
    img, txt = unit_rows(rng, 12, 16), unit_rows(rng, 12, 16)
    log_scale, bias = np.float32(np.log(10.0)), np.float32(-3.0)
    loss, _ = clip.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), log_scale, bias, kind)
    want = (
        numpy_clip(img, txt, log_scale)
        if kind == "clip"
        else numpy_siglip(img, txt, log_scale, bias)
    )
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    perm = rng.permutation(12)
    shuffled, _ = clip.contrastive_loss(
        jnp.asarray(img[perm]), jnp.asarray(txt[perm]), log_scale, bias, kind
    )
    np.testing.assert_allclose(float(shuffled), float(loss), rtol=1e-6)
    broken, _ = clip.contrastive_loss(
        jnp.asarray(img), jnp.asarray(txt[perm]), log_scale, bias, kind
    )
    assert float(broken) > float(loss)  # unpairing does matter


def png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_tar_shards_with_a_corrupt_image_and_a_missing_caption_train_on(tmp_path, caplog):
    """A tar glob is prepared into the workdir at the first start (once: a resume reuses
    it); what it skipped is logged by reason."""
    members = {}
    for i in range(40):
        members[f"{i:05d}.png"] = png(i * 6)
        members[f"{i:05d}.txt"] = f"a grey square number {i % 10}".encode()
    members["00040.jpg"] = b"\xff\xd8 this is not a jpeg"  # corrupt image, with a caption
    members["00040.txt"] = b"a broken picture"
    members["00041.png"] = png(200)  # an image without a caption
    write_tar(tmp_path / "shard-0.tar", members)
    source = f"tar:{tmp_path}/*.tar"
    opts = {"clip.source": source, "train.steps": 2, "data.eval_fraction": 0.1}
    opts["train.eval_steps"] = 0  # evaluation is tested apart
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        result = train(load_tiny("clip", **opts), tmp_path / "run")
    assert np.isfinite(result["loss"])
    assert "'no_caption': 1" in caplog.text and "'undecodable': 1" in caplog.text
    (prepared,) = (tmp_path / "run" / "prepared").iterdir()
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["pairs"] == 40 and manifest["held_out"]["pairs"] == 4
    caplog.clear()  # what a resume reads: the prepared directory, not the tars again
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        data = clip_data.ClipData(load_tiny("clip", **opts), None, tmp_path / "run")
    assert "preparing" not in caplog.text and data.sources[0].path == prepared


def test_source_without_readable_pairs_fails_naming_it(tmp_path):
    write_tar(tmp_path / "captions-only.tar", {"a.txt": b"hello", "b.txt": b"world"})
    with pytest.raises(ConfigError, match=r"0 readable pairs.*'no_image': 2"):
        train(load_tiny("clip", **{"clip.source": f"tar:{tmp_path}/*.tar"}), tmp_path / "run")
    bad = {"a.jpg": b"garbage", "a.txt": b"hello", "b.png": b"\x89PNG junk", "b.txt": b"world"}
    write_tar(tmp_path / "bad-images.tar", bad)
    with pytest.raises(ConfigError, match=r"0 readable pairs.*'undecodable': 2"):
        train(load_tiny("clip", **{"clip.source": f"tar:{tmp_path}/bad-*.tar"}), tmp_path / "run2")
    with pytest.raises(ConfigError, match=r"matches no file"):
        train(load_tiny("clip", **{"clip.source": f"tar:{tmp_path}/none-*.tar"}), tmp_path / "run3")


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(
        ConfigError, match=r"vision.image_size=30 is not divisible by vision.patch_size=8"
    ):
        load_tiny("clip", **{"vision.image_size": 30})


def test_tfds_source_trains_and_evaluates_zero_shot(tmp_path):
    from tfds_digits import JaxlmTinyDigits

    builder = JaxlmTinyDigits(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record")
    source = f"tfds:jaxlm_tiny_digits:{tmp_path / 'tfds'}"
    overrides = {"clip.source": source, "train.steps": 4, "train.eval_every": 4}
    result = train(load_tiny("clip", **overrides), tmp_path / "run")
    assert np.isfinite(result["loss"])
    assert 0.0 <= result["eval_zeroshot_top1"] <= 1.0  # class names came from the ClassLabel
    assert "eval_i2t_recall_at_1" in result


def test_eval_data_gives_zero_shot_on_a_labelled_source(tmp_path, capsys):
    """`jaxlm eval --data SOURCE` on a contrastive checkpoint: on its own source's held-out
    images it equals what training measured; a tfds source brings its own class names."""
    from tfds_digits import JaxlmTinyDigits

    from jaxlm import cli
    from jaxlm.images import DIGIT_WORDS

    workdir = tmp_path / "run"
    overrides = {"train.steps": 4, "train.eval_every": 4}
    result = train(load_tiny("clip", **overrides), workdir)

    def evaluate(*argv: str) -> dict:
        assert cli.main(["eval", str(workdir), *argv]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])

    own = evaluate("--data", "digits")
    assert own["zeroshot_top1"] == pytest.approx(result["eval_zeroshot_top1"], abs=1e-6)
    assert own["zeroshot_top5"] == pytest.approx(result["eval_zeroshot_top5"], abs=1e-6)
    assert own["classes"] == 10 and own["images"] == 359  # all of the 20% held out
    named = tmp_path / "classes.txt"
    named.write_text("\n".join(DIGIT_WORDS) + "\n")
    assert evaluate("--data", "digits", "--classes", str(named)) == own

    builder = JaxlmTinyDigits(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record")
    capsys.readouterr()  # tfds's own messages
    tfds = evaluate("--data", f"tfds:jaxlm_tiny_digits:{tmp_path / 'tfds'}", "--batch-size", "8")
    assert tfds["images"] == 60  # its test split
    assert tfds["classes"] == 10 and 0 <= tfds["zeroshot_top1"] <= tfds["zeroshot_top5"] <= 1

    assert cli.main(["eval", str(workdir), "--data", "digits", "--classes", "a,b"]) == 2
    assert "labels go up to 9, but 2 class names were given (a, b)" in capsys.readouterr().err
    # a template that does not name the class would give every class the same prompt
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {word}.\na photo of a thing.\n")
    assert cli.main(["eval", str(workdir), f"clip.templates={bad}", "--data", "digits"]) == 2
    assert "'a photo of a thing.' does not name the class" in capsys.readouterr().err
    bad.write_text("a {style} photo of a {word}.\n")  # a placeholder the prompts do not fill
    assert cli.main(["eval", str(workdir), f"clip.templates={bad}", "--data", "digits"]) == 2
    assert "photo of a {word}.' (KeyError: 'style') does not name" in capsys.readouterr().err


def test_recall_breaks_ties_at_random_in_expectation():
    """A partner tied with others (the same caption twice, a collapsed tower) counts as an
    argsort would land it on average; recall over distinct embeddings is plain recall."""
    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 4))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    assert clip.recall(img, img)["eval_i2t_recall_at_1"] == 1.0  # each its own best match
    collapsed = clip.recall(img, np.ones((8, 4)))  # every caption the same point
    assert collapsed["eval_i2t_recall_at_1"] == pytest.approx(1 / 8)
    assert collapsed["eval_i2t_recall_at_5"] == pytest.approx(5 / 8)
    img[1] = img[0]  # the same pair twice: images 0 and 1 each find 2 equal best texts
    assert clip.recall(img, img)["eval_i2t_recall_at_1"] == pytest.approx(7 / 8)


def _cached(s, params, batch, accum: int):
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch
    )
    grads, metrics = clip.accumulated_grads(s.model, params, micro, accum)
    return metrics["loss"], grads


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_and_gradients_equal_on_two_meshes_and_with_gradient_caching(kind):
    """The same loss and gradients on an 8 x 1 x 1 and a 2 x 2 x 2 mesh; and on the latter
    with train.grad_accum's gradient caching (micro-batches embedded without gradients, the
    loss and its embedding gradients over the whole batch, then each micro-batch's towers
    again with the cached gradients) at accumulation 4 (CLIP) and 2 (SigLIP), as the
    one-big-batch step; and the CLIP train step at train.grad_accum=4."""
    results = []
    for mesh_cfg in (MeshConfig(8, 1, 1), MeshConfig(2, 2, 2)):
        overrides = {"mesh.data": mesh_cfg.data, "mesh.fsdp": mesh_cfg.fsdp}
        cfg = load_tiny("clip", **{"clip.loss": kind, "mesh.tensor": mesh_cfg.tensor, **overrides})
        mesh = sharding.make_mesh(cfg.mesh)
        s = build(cfg, mesh)
        batch = clip.synthetic_batch(cfg, 16, np.random.default_rng(1))
        with jax.set_mesh(mesh):
            params = s.init()["params"]
            placed = sharding.to_global(batch, mesh)

            @jax.jit
            def value_and_grad(params, batch, s=s):
                return jax.value_and_grad(lambda p: clip.loss_fn(s.model(p), batch, None)[0])(
                    params
                )

            loss, grads = value_and_grad(params, placed)
            results.append((float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]))
            if mesh_cfg.tensor == 1:
                continue
            want = results[-1][1]
            # entries that are rounding noise in both (a parameter whose gradient is ~0)
            # cannot agree to 1e-5 relative, nor sums that cancel (float32 sums in another
            # order): an absolute floor of 1e-6 of the largest gradient
            floor = 1e-6 * max(np.abs(g).max() for g in want)
            cached = jax.jit(partial(_cached, s), static_argnums=2)
            # the same code for both losses: CLIP at 4 micro-batches, SigLIP at 2
            for accum in (4,) if kind == "clip" else (2,):
                got_loss, got = cached(params, placed, accum)
                np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-5)
                for a, b in zip(jax.tree.leaves(got), want, strict=True):
                    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=floor)
            if kind == "clip":  # and the train step takes this path for train.grad_accum > 1
                four = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=4))
                s4 = build(four, mesh)
                _, metrics = make_train_step(s4)(s4.init(), placed)
                np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
                norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in want))
                np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    (loss_a, grads_a), (loss_b, grads_b) = results
    np.testing.assert_allclose(loss_a, loss_b, atol=1e-4)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_positions_gradient_is_the_plain_sums():
    """vit.add_positions, whose table gradient is a matmul with ones (for XLA's GPU layouts:
    tests/test_plan.py), equals x + table and its gradients in value, in float32 and in
    bfloat16 activations with a float32 table."""
    from jaxlm.vit import add_positions

    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(5, 7, 6)), dtype)
        table = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
        probe = jnp.asarray(rng.normal(size=(5, 7, 6)), jnp.float32)

        def loss(add, x, table, probe=probe):
            return (add(x, table).astype(jnp.float32) * probe).sum()

        got = jax.grad(partial(loss, add_positions), argnums=(0, 1))(x, table)
        want = jax.grad(partial(loss, lambda x, t: x + t.astype(x.dtype)), argnums=(0, 1))(x, table)
        assert add_positions(x, table).dtype == dtype
        np.testing.assert_array_equal(add_positions(x, table), x + table.astype(dtype))
        assert got[1].dtype == jnp.float32
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=1e-2, atol=1e-2)


def test_vision_mlp_sets_the_image_towers_activation():
    """`vision.mlp` reaches the image tower (vit_b16: QuickGELU in both towers, as OpenAI's
    CLIP and the Hugging Face model the GPU benchmark compares with; siglip_b16 keeps GELU)."""
    from conftest import ROOT
    from flax import nnx

    from jaxlm import config, vit

    b16 = config.load(str(ROOT / "configs/clip.py:vit_b16"))
    assert vit.tower_config(b16).mlp == "quick_gelu" and b16.model.mlp == "quick_gelu"
    siglip = config.load(str(ROOT / "configs/clip.py:siglip_b16"))
    assert (vit.tower_config(siglip).mlp, siglip.model.mlp) == ("gelu", "gelu_tanh")
    features = {}
    for kind in ("gelu", "quick_gelu"):
        cfg = load_tiny("clip", **{"vision.mlp": kind})
        size = (2, cfg.vision.image_size, cfg.vision.image_size, 3)
        images = jax.random.randint(jax.random.key(0), size, 0, 256).astype(jnp.uint8)
        with jax.set_mesh(sharding.make_mesh(MeshConfig(), jax.devices()[:1])):
            tower = vit.ImageTower(cfg, nnx.Rngs(0))
            features[kind] = jax.jit(lambda x, tower=tower: tower(x))(images)
    assert not np.allclose(features["gelu"], features["quick_gelu"], atol=1e-4)
