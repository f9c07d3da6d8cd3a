"""Import a Hugging Face BERT directory (config.json + safetensors or .bin + vocab.txt) as a
jaxlm masked-LM checkpoint at step 0, laid out on whatever mesh the overrides ask for:

    jaxlm import hf-bert path/to/bert --out runs/bert_imported [mesh.fsdp=-1 ...]

Encoder tensors must all be present; the MLM head (`cls.predictions.*`) is taken when there is
one and freshly initialised otherwise (sentence-embedding checkpoints such as MiniLM ship none).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import CheckpointConfig, Config, ConfigError, MeshConfig, ModelConfig
from jaxlm.step import build
from jaxlm.tokenizer import WordPiece

log = logging.getLogger("jaxlm")

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def read_config(src: Path) -> dict:
    file = src / "config.json"
    if not file.is_file():
        raise ConfigError(f"{src} has no config.json: not a Hugging Face model directory")
    hf = json.loads(file.read_text())
    if hf.get("model_type") != "bert":
        raise ConfigError(
            f"{file}: model_type is {hf.get('model_type')!r} (architectures "
            f"{hf.get('architectures')}); jaxlm imports BERT encoders (model_type 'bert') only"
        )
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise ConfigError(
            f"{file}: hidden_act {hf['hidden_act']!r} is not one of {list(ACTIVATIONS)}"
        )
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{file}: position_embedding_type must be 'absolute'")
    return hf


def model_config(hf: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        seq_len=min(128, hf["max_position_embeddings"]),
        max_positions=hf["max_position_embeddings"],
        num_layers=hf["num_hidden_layers"],
        d_model=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_position="post",
        mlp=ACTIVATIONS[hf.get("hidden_act", "gelu")],
        position="learned",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embed_norm=True,
        tie_embeddings=True,
        use_bias=True,
        init_std=hf.get("initializer_range", 0.02),
        dtype="float32",
    )


def read_tensors(src: Path) -> dict[str, np.ndarray]:
    if (src / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        tensors = load_file(str(src / "model.safetensors"))
    elif (src / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"{src} holds pytorch_model.bin only: reading it needs torch (or convert it to "
                "model.safetensors)"
            ) from None
        state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise ConfigError(f"{src} has neither model.safetensors nor pytorch_model.bin")
    # BertForMaskedLM / BertForPreTraining prefix the encoder with "bert."
    return {k.removeprefix("bert."): np.asarray(v, np.float32) for k, v in tensors.items()}


EMBEDDING_TENSORS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)
LAYER_TENSORS = tuple(
    f"{module}.{kind}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for kind in ("weight", "bias")
)


def _find(tensors: dict, name: str) -> np.ndarray | None:
    # Old TF-converted checkpoints call LayerNorm parameters gamma / beta.
    old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"
    )
    return tensors.get(name, tensors.get(old))


def convert(hf: dict, tensors: dict[str, np.ndarray], src: Path) -> dict[str, np.ndarray]:
    """Hugging Face names -> jaxlm parameter paths ("embed/tokens", ...), layers stacked."""
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    k, layers = d // h, hf["num_hidden_layers"]
    required = [*EMBEDDING_TENSORS] + [
        f"encoder.layer.{i}.{name}" for i in range(layers) for name in LAYER_TENSORS
    ]
    missing = [name for name in required if _find(tensors, name) is None]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ConfigError(f"{src}: missing BERT tensors {shown}")

    def get(name: str) -> np.ndarray:
        return _find(tensors, name)

    def stacked(name: str, fn=lambda a: a) -> np.ndarray:
        return np.stack([fn(get(f"encoder.layer.{i}.{name}")) for i in range(layers)])

    def norm(prefix: str, hf_prefix: str, per_layer: bool) -> dict:
        read = stacked if per_layer else get
        return {
            f"{prefix}/scale": read(f"{hf_prefix}.weight"),
            f"{prefix}/bias": read(f"{hf_prefix}.bias"),
        }

    blocks = "transformer/blocks"
    out = {
        "embed/tokens": get("embeddings.word_embeddings.weight"),
        "embed/positions": get("embeddings.position_embeddings.weight"),
        "embed/types": get("embeddings.token_type_embeddings.weight"),
        **norm("embed/norm", "embeddings.LayerNorm", per_layer=False),
        # torch Linear keeps weight as [out, in]: transpose, then split heads.
        f"{blocks}/attn/wq": stacked("attention.self.query.weight", lambda w: w.T.reshape(d, h, k)),
        f"{blocks}/attn/wk": stacked("attention.self.key.weight", lambda w: w.T.reshape(d, h, k)),
        f"{blocks}/attn/wv": stacked("attention.self.value.weight", lambda w: w.T.reshape(d, h, k)),
        f"{blocks}/attn/bq": stacked("attention.self.query.bias", lambda b: b.reshape(h, k)),
        f"{blocks}/attn/bk": stacked("attention.self.key.bias", lambda b: b.reshape(h, k)),
        f"{blocks}/attn/bv": stacked("attention.self.value.bias", lambda b: b.reshape(h, k)),
        f"{blocks}/attn/wo": stacked(
            "attention.output.dense.weight", lambda w: w.T.reshape(h, k, d)
        ),
        f"{blocks}/attn/bo": stacked("attention.output.dense.bias"),
        **norm(f"{blocks}/attn_norm", "attention.output.LayerNorm", per_layer=True),
        f"{blocks}/mlp/wi": stacked("intermediate.dense.weight", lambda w: w.T),
        f"{blocks}/mlp/bi": stacked("intermediate.dense.bias"),
        f"{blocks}/mlp/wo": stacked("output.dense.weight", lambda w: w.T),
        f"{blocks}/mlp/bo": stacked("output.dense.bias"),
        **norm(f"{blocks}/mlp_norm", "output.LayerNorm", per_layer=True),
    }
    if "cls.predictions.transform.dense.weight" in tensors:
        out |= {
            "head_dense": get("cls.predictions.transform.dense.weight").T,
            "head_bias": get("cls.predictions.transform.dense.bias"),
            **norm("head_norm", "cls.predictions.transform.LayerNorm", per_layer=False),
            "out_bias": get("cls.predictions.bias"),
        }
    return out


def _path(path) -> str:
    return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def import_bert(src: str | Path, workdir: str | Path, overrides: list[str] = ()) -> dict:
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"Hugging Face model directory {str(src)!r} not found")
    hf = read_config(src)
    if not (src / "vocab.txt").is_file():
        raise ConfigError(f"{src} has no vocab.txt (the WordPiece vocabulary)")
    vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tok_cfg = src / "tokenizer_config.json"
    lowercase = (
        json.loads(tok_cfg.read_text()).get("do_lower_case", True) if tok_cfg.is_file() else True
    )
    arrays = convert(hf, read_tensors(src), src)

    cfg = Config(
        objective="mlm", model=model_config(hf), mesh=MeshConfig(data=1, fsdp=-1, tensor=1)
    )
    cfg = config_lib.override(dataclasses.replace(cfg, name=f"hf-bert:{src.name}"), list(overrides))
    mesh = sharding.make_mesh(cfg.mesh)
    s = build(cfg, mesh)
    with jax.set_mesh(mesh):
        state = s.init()  # optimizer state and any head the source lacks start fresh

        def take(path, x):
            name = _path(path)
            if name not in arrays:
                return x
            if arrays[name].shape != x.shape:
                raise ConfigError(
                    f"{src}: {name} has shape {arrays[name].shape}, expected {x.shape}"
                )
            return jax.device_put(arrays[name], x.sharding)

        state["params"] = jax.tree_util.tree_map_with_path(take, state["params"])
        ckpt = Checkpointer(workdir, CheckpointConfig(keep=1))
        ckpt.save(0, state, cfg, WordPiece(vocab, lowercase))
        ckpt.wait()
        ckpt.close()
    head = "imported" if "head_dense" in arrays else "initialised (the source has no MLM head)"
    log.info(
        "imported %s (%s parameters) into %s; MLM head %s",
        src,
        f"{s.num_params():,}",
        ckpt.root,
        head,
    )
    return {
        "workdir": str(workdir),
        "params": s.num_params(),
        "tensors": len(arrays),
        "mlm_head": head,
    }
