"""Muon, Lion and Adafactor beside AdamW: which parameters Muon orthogonalizes (from logical
axes), its update against a direct NumPy Newton-Schulz and against optax.contrib.muon, what
its compiled step moves between devices, exact resumes with each optimizer."""

import collections
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_tiny, losses
from flax import nnx

from jaxlm import config, optim, plan, sharding
from jaxlm.config import ConfigError, OptimConfig
from jaxlm.step import build
from jaxlm.train import train

BLOCK = {  # the shared stack's matrices, [layers, ...]: (reduction axes, output axes)
    "attn.wq": ((1,), (2, 3)),  # [embed, heads, kv]: embed x heads*kv
    "attn.wk": ((1,), (2, 3)),
    "attn.wv": ((1,), (2, 3)),
    "attn.wo": ((1, 2), (3,)),  # [heads, kv, embed]: heads*kv x embed
    "mlp.wi": ((1,), (2,)),
    "mlp.wo": ((1,), (2,)),  # [mlp, embed]
}
MUON = {  # every other parameter goes to AdamW
    "gpt2_124m": {f"transformer.blocks.{k}": v for k, v in BLOCK.items()},
    "llama_160m": {
        **{f"transformer.blocks.{k}": v for k, v in BLOCK.items()},
        "transformer.blocks.mlp.wg": ((1,), (2,)),
    },
    "bert_base": {
        **{f"transformer.blocks.{k}": v for k, v in BLOCK.items()},
        "head_dense": ((0,), (1,)),  # the prediction transform [embed, embed]
    },
    "vit_b16": {
        **{f"image.transformer.blocks.{k}": v for k, v in BLOCK.items()},
        **{f"text.blocks.{k}": v for k, v in BLOCK.items()},
        "image.patch_embed": ((0,), (1,)),  # [pixels, embed]
        "image_proj": ((0,), (1,)),
        "text_proj": ((0,), (1,)),
    },
}
ADAM_EXAMPLES = {  # embeddings, head, norms, biases, the temperature
    "gpt2_124m": ["embed.tokens", "embed.positions", "transformer.final_norm.scale"],
    "llama_160m": ["embed.tokens", "head", "transformer.blocks.attn_norm.scale"],
    "bert_base": ["embed.types", "out_bias", "transformer.blocks.attn.bq"],
    "vit_b16": ["log_scale", "bias", "image.positions", "text_embed.tokens", "image.cls"],
}


def _dims(file: str, name: str) -> dict[str, tuple | None]:
    cfg = config.load(f"configs/{file}.py:{name}", [])
    params = build(cfg, sharding.make_mesh(config.MeshConfig(8, 1, 1))).abstract["params"]
    flat = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    out = {}
    for path, v in flat:
        d = optim.muon_dims(v)
        key = ".".join(str(getattr(p, "key", p)) for p in path)
        out[key] = None if d is None else (tuple(d.reduction_axis), tuple(d.output_axis))
    return out


@pytest.mark.parametrize(
    "file,name",
    [("gpt", "gpt2_124m"), ("gpt", "llama_160m"), ("bert", "bert_base"), ("clip", "vit_b16")],
)
def test_muon_dimension_numbers_of_every_parameter(file, name):
    dims = _dims(file, name)
    assert {k: v for k, v in dims.items() if v is not None} == MUON[name]
    assert all(dims[k] is None for k in ADAM_EXAMPLES[name])


def _newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Muon's quintic Newton-Schulz (Keller Jordan's coefficients), in float64."""
    a, b, c = 3.4445, -4.775, 2.0315
    x = g / (np.linalg.norm(g) + 1e-8)
    flip = x.shape[0] > x.shape[1]
    x = x.T if flip else x
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if flip else x


def test_muon_update_equals_numpy_newton_schulz():
    """One step on a q projection [embed, heads, kv], an output projection [heads, kv, embed]
    and a stack of 3 MLP matrices [layers, embed, mlp]: each (each layer) flattened to its
    matrix as the axes say, orthogonalized, scaled by sqrt(max(1, fan_out / fan_in)), times
    -lr. A norm scale beside them takes (Nesterov) AdamW's first step, a multiple of -lr *
    sign(g)."""
    rng = np.random.default_rng(0)
    shapes = {
        "wq": ((6, 2, 5), ("embed", "heads", "kv")),
        "wo": ((2, 5, 6), ("heads", "kv", "embed")),
        "wi": ((3, 6, 4), ("layers", "embed", "mlp")),
        "scale": ((6,), ("norm",)),
    }
    params = nnx.State({k: nnx.Param(jnp.zeros(s), axes=a) for k, (s, a) in shapes.items()})
    grads = nnx.State(
        {
            k: nnx.Param(jnp.asarray(rng.standard_normal(s), jnp.float32), axes=a)
            for k, (s, a) in shapes.items()
        }
    )
    lr = 0.1
    cfg = OptimConfig(name="muon", lr=lr, warmup_steps=0, schedule="constant", clip_norm=1e9)
    tx = optim.make(cfg, 10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g = {k: np.asarray(v[...], np.float64) for k, v in grads.items()}
    got = {k: np.asarray(v[...]) for k, v in updates.items()}

    want_q = _newton_schulz(g["wq"].reshape(6, 10)).reshape(6, 2, 5) * np.sqrt(10 / 6)
    np.testing.assert_allclose(got["wq"], -lr * want_q, rtol=2e-3, atol=2e-5)
    want_o = _newton_schulz(g["wo"].reshape(10, 6)).reshape(2, 5, 6)
    np.testing.assert_allclose(got["wo"], -lr * want_o, rtol=2e-3, atol=2e-5)
    want_i = np.stack([_newton_schulz(m) for m in g["wi"]])  # 6 x 4: fan_out < fan_in
    np.testing.assert_allclose(got["wi"], -lr * want_i, rtol=2e-3, atol=2e-5)
    nesterov = 1 + 0.9 / 1.9  # Muon's AdamW part is Nesterov's (as optax.contrib.muon's)
    np.testing.assert_allclose(got["scale"], -lr * nesterov * np.sign(g["scale"]), rtol=1e-5)


def test_clip_norm_zero_means_no_clipping():
    """optim.clip_norm=0 leaves the gradients as they are (optax's clip to norm 0 would zero
    every update: a run that trains nothing), and keeps the optimizer state's form, so a
    resume may switch clipping on or off."""
    params = nnx.State({"w": nnx.Param(jnp.zeros((4, 3)), axes=("embed", "mlp"))})
    grads = nnx.State({"w": nnx.Param(jnp.full((4, 3), 50.0), axes=("embed", "mlp"))})
    base = {"lr": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
    got = {}
    for clip in (0.0, 1e9):
        tx = optim.make(OptimConfig(**base, clip_norm=clip), 10)
        got[clip] = np.asarray(tx.update(grads, tx.init(params), params)[0]["w"][...])
        state = jax.tree.structure(tx.init(params))
        assert state == jax.tree.structure(optim.make(OptimConfig(**base), 10).init(params))
    np.testing.assert_allclose(got[0.0], got[1e9])
    np.testing.assert_allclose(got[0.0], -0.1, rtol=1e-5)  # Adam's first step: -lr * sign(g)


def test_muon_equals_optax_contrib_muon_over_steps():
    """Three steps of jaxlm's Muon (its own Newton-Schulz, no mesh) against optax.contrib.muon
    with the same dimension numbers: momentum, Nesterov, bias correction, shape scaling and
    the AdamW part agree."""
    rng = np.random.default_rng(1)
    shapes = {
        "wq": ((8, 2, 3), ("embed", "heads", "kv")),
        "wo": ((2, 3, 8), ("heads", "kv", "embed")),
        "wi": ((2, 8, 12), ("layers", "embed", "mlp")),
        "bias": ((2, 3), ("heads", "kv")),
    }
    params = nnx.State(
        {
            k: nnx.Param(jnp.asarray(rng.standard_normal(s), jnp.float32), axes=a)
            for k, (s, a) in shapes.items()
        }
    )
    cfg = OptimConfig(name="muon", lr=0.05, warmup_steps=0, schedule="constant", clip_norm=1e9)
    ours = optim.make(cfg, 10)
    theirs = optax.contrib.muon(
        0.05,
        beta=cfg.muon_beta,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        adam_b1=cfg.b1,
        adam_b2=cfg.b2,
        muon_weight_dimension_numbers=lambda p: jax.tree.map(
            optim.muon_dims, p, is_leaf=lambda x: isinstance(x, nnx.Variable)
        ),
    )
    states = [ours.init(params), theirs.init(params)]
    for step in range(3):
        grads = jax.tree.map(
            lambda x: x * 0 + rng.standard_normal(x.shape).astype(np.float32), params
        )
        u1, states[0] = jax.jit(ours.update)(grads, states[0], params)
        u2, states[1] = jax.jit(theirs.update)(grads, states[1], params)
        for k in shapes:
            np.testing.assert_allclose(
                u1[k][...], u2[k][...], rtol=1e-4, atol=1e-7, err_msg=f"{k} {step}"
            )


def test_muon_keeps_sharded_matrices_sharded():
    """The compiled train step on a 2 x 2 x 2 (data, fsdp, tensor) mesh: Muon's step has no
    all-gather beyond AdamW's (the per-layer weight gathers of the forward pass); what it adds
    are all-reduces of the Gram matrices X X^T (m x m, m the short side, a layer at a time)
    and of norms, and layout moves of at most one shard of a matrix. optax.contrib.muon's own
    iteration (the compiler's layout) all-gathers parts of the matrices instead."""
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    hlo = {
        name: plan.collective_shapes(
            plan.compile_train_step(load_tiny(**mesh, **{"optim.name": name}), jax.devices())[
                1
            ].as_text()
        )
        for name in ("adamw", "muon")
    }
    added = hlo["muon"] - hlo["adamw"]
    assert added, "Muon's step moves nothing AdamW's does not: no Newton-Schulz?"
    assert not [k for k in added if k[0] in ("all-gather", "reduce-scatter")], added
    added = {(op, shape): n for (op, _, shape), n in added.items()}

    s = build(
        load_tiny(**mesh, **{"optim.name": "muon"}), sharding.make_mesh(config.MeshConfig(2, 2, 2))
    )
    grams, shard = set(), 0
    for v in jax.tree.leaves(s.abstract["params"], is_leaf=lambda x: isinstance(x, nnx.Variable)):
        d = optim.muon_dims(v)
        if d is None:
            continue
        x = v.get_value()
        sides = [math.prod(x.shape[i] for i in ax) for ax in (d.reduction_axis, d.output_axis)]
        grams.add((min(sides), min(sides)))  # one layer of a stack at a time
        shard = max(shard, math.prod(x.sharding.shard_shape(x.shape)))
    reduces = {shape for (op, shape) in added if op == "all-reduce"}
    assert reduces & grams, (reduces, grams)
    assert all(s in grams or len(s) <= 1 for s in reduces), (reduces, grams)
    moves = [shape for (op, shape) in added if op in ("collective-permute", "all-to-all")]
    assert all(math.prod(s) <= shard for s in moves), (moves, shard)

    # optim.muon_dtype=bfloat16: the step asks for the same Gram all-reduces in bfloat16 (half
    # the bytes). The lowered program is read: XLA's CPU compiler runs bfloat16 collectives in
    # float32 (its float normalisation), where TPUs and GPUs (NCCL) run them as asked.
    f32_grams = {
        shape: n
        for (op, dtype, shape), n in (hlo["muon"] - hlo["adamw"]).items()
        if op == "all-reduce" and shape in grams and dtype == "f32"
    }
    overrides = {**mesh, "optim.name": "muon", "optim.muon_dtype": "bfloat16"}
    lowered = plan.lower_step(plan.setup(load_tiny(**overrides), jax.devices())).as_text()
    asked = collections.Counter(
        re.findall(r"stablehlo.all_reduce.*?\) : \(tensor<(\w+)xbf16>", lowered, re.S)
    )
    bf16_grams = {tuple(int(d) for d in dims.split("x")): n for dims, n in asked.items()}
    assert f32_grams and bf16_grams == f32_grams, (bf16_grams, f32_grams)


def test_bfloat16_newton_schulz_stays_close_to_float32():
    """optim.muon_dtype=bfloat16 runs the iteration in bfloat16 (as modded-nanogpt does): the
    result is as orthogonal as the float32 iteration's (Newton-Schulz's quintic leaves the
    singular values in about [0.68, 1.13] either way) and points the same way, in x's dtype;
    the float32 setting is the float32 iteration itself."""
    from jaxlm import muon

    d = optax.contrib.MuonDimensionNumbers((1,), (2,))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 64, 96)), jnp.float32)
    f32 = muon.orthogonalize(x, d, 5, 1e-7)
    bf16 = muon.orthogonalize(x, d, 5, 1e-7, dtype="bfloat16")
    assert bf16.dtype == jnp.float32
    for values in (np.linalg.svd(np.asarray(y), compute_uv=False) for y in (f32, bf16)):
        assert 0.6 < values.min() and values.max() < 1.25, (values.min(), values.max())
    cosine = float(jnp.sum(bf16 * f32) / jnp.linalg.norm(bf16) / jnp.linalg.norm(f32))
    relative = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
    assert cosine > 0.99 and relative > 1e-3, (cosine, relative)  # bfloat16's rounding
    np.testing.assert_array_equal(muon.orthogonalize(x, d, 5, 1e-7, dtype="float32"), f32)


@pytest.mark.parametrize(
    "shape,dims,spec",
    [  # q [layers, embed, heads, kv]: the short side's fsdp moves to heads * kv
        ((2, 8, 4, 6), ((1,), (2, 3)), ("layers", "fsdp", "tensor", None)),
        ((4, 6, 8), ((0, 1), (2,)), ("tensor", None, "fsdp")),  # o: heads*kv x embed, flipped
        ((8, 10), ((0,), (1,)), ("fsdp", "tensor")),  # 5 columns a shard: fsdp gathers rows
    ],
)
def test_sharded_newton_schulz_equals_the_whole_matrix(shape, dims, spec):
    """jaxlm.muon.orthogonalize on a 2 x 2 x 2 mesh, run (not only compiled), equals the same
    on one whole array: the all-to-all moves, the gather where a shard does not divide, the
    flipped (tall) matrix."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxlm import muon

    mesh = sharding.make_mesh(config.MeshConfig(2, 2, 2))
    spec = PartitionSpec(*[None if a == "layers" else a for a in spec])
    d = optax.contrib.MuonDimensionNumbers(*dims)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    want = muon.orthogonalize(jnp.asarray(x), d, 5, 1e-7)
    placed = jax.device_put(x, NamedSharding(mesh, spec))
    got = jax.jit(lambda y: muon.orthogonalize(y, d, 5, 1e-7, mesh, spec))(placed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["muon", "lion", "adafactor"])
def test_each_optimizer_resumes_exactly(tmp_path, name):
    """Killed after its step-2 checkpoint (the step-4 one removed), the rerun's steps 3-4 are
    bit for bit the uninterrupted run's; and the optimizer is not AdamW in disguise. Muon's on
    a 2 x 2 x 2 mesh: its sharded Newton-Schulz inside the training loop."""
    opts = {"optim.name": name, "checkpoint.every": 2}
    if name == "muon":
        opts |= {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    train(load_tiny(**opts), tmp_path / "run")
    straight = losses(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    train(load_tiny(**opts), tmp_path / "run")
    assert losses(tmp_path / "run") == straight
    train(load_tiny(**{"checkpoint.every": 2}), tmp_path / "adamw")
    assert losses(tmp_path / "adamw")[4] != straight[4]
    if name == "lion":  # another optimizer's state is refused by name, nothing read or moved
        run = tmp_path / "run"
        with pytest.raises(ConfigError, match=r"optim.name: 'lion' in the checkpoint, 'adamw' now"):
            train(load_tiny(**{**opts, "optim.name": "adamw", "train.steps": 5}), run)
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
        # a change that keeps the state's form resumes
        train(load_tiny(**{**opts, "optim.lr": 1e-3, "train.steps": 5}), run)
        assert sorted(losses(run)) == [1, 2, 3, 4, 5]
