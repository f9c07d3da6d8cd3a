"""The Hugging Face layouts jaxlm reads and writes, one per architecture (BERT, GPT-2,
Llama): which tensor holds each jaxlm parameter and how it is reshaped (`*_tensors`), and the
config.json fields <-> ModelConfig (`*_config`, `*_hf`). jaxlm.hf imports and exports through
these tables, the same table both ways, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from jaxlm.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One jaxlm parameter and its Hugging Face tensor. `{i}` in `name` marks a per-layer
    tensor (jaxlm stacks layers on a leading axis); `load` and `save` convert one layer's
    array; `part` j of 3: GPT-2's fused q/k/v, the j-th third along the last axis."""

    path: str
    name: str
    load: Callable = lambda a: a
    save: Callable = lambda a: a
    part: int | None = None
    optional: bool = False  # may be missing from a source (it starts fresh then)


def transposed(path: str, name: str, **kw) -> Tensor:
    """torch's Linear keeps weight as [out, in]; jaxlm as [in, out]."""
    return Tensor(path, name, lambda w: w.T, lambda a: a.T, **kw)


def heads_in(path: str, name: str, heads: int, k: int) -> Tensor:
    """Linear D -> heads x K, weight [heads * K, D] <-> [D, heads, K]."""
    return Tensor(
        path, name, lambda w: w.T.reshape(-1, heads, k), lambda a: a.reshape(a.shape[0], -1).T
    )


def heads_out(path: str, name: str, heads: int, k: int) -> Tensor:
    """Linear heads x K -> D, weight [D, heads * K] <-> [heads, K, D]."""
    return Tensor(
        path, name, lambda w: w.T.reshape(heads, k, -1), lambda a: a.reshape(-1, a.shape[-1]).T
    )


def split_heads(path: str, name: str, heads: int, k: int, part: int | None = None) -> Tensor:
    """[..., heads * K] <-> [..., heads, K] (GPT-2's Conv1D weights are [in, out] already)."""
    return Tensor(
        path,
        name,
        lambda w: w.reshape(*w.shape[:-1], heads, k),
        lambda a: a.reshape(*a.shape[:-2], -1),
        part,
    )


def norm(path: str, name: str, bias: bool = True) -> list[Tensor]:
    return [Tensor(f"{path}/scale", f"{name}.weight")] + (
        [Tensor(f"{path}/bias", f"{name}.bias")] if bias else []
    )


B = "transformer/blocks"  # the stacked layers


def bert_tensors(m: ModelConfig) -> list[Tensor]:
    h, k = m.num_heads, m.head_size
    layer = "bert.encoder.layer.{i}"
    attn = f"{layer}.attention"
    tensors = [
        Tensor("embed/tokens", "bert.embeddings.word_embeddings.weight"),
        Tensor("embed/positions", "bert.embeddings.position_embeddings.weight"),
        Tensor("embed/types", "bert.embeddings.token_type_embeddings.weight"),
        *norm("embed/norm", "bert.embeddings.LayerNorm"),
        *norm(f"{B}/attn_norm", f"{attn}.output.LayerNorm"),
        *norm(f"{B}/mlp_norm", f"{layer}.output.LayerNorm"),
        transposed(f"{B}/mlp/wi", f"{layer}.intermediate.dense.weight"),
        Tensor(f"{B}/mlp/bi", f"{layer}.intermediate.dense.bias"),
        transposed(f"{B}/mlp/wo", f"{layer}.output.dense.weight"),
        Tensor(f"{B}/mlp/bo", f"{layer}.output.dense.bias"),
        heads_out(f"{B}/attn/wo", f"{attn}.output.dense.weight", h, k),
        Tensor(f"{B}/attn/bo", f"{attn}.output.dense.bias"),
        # the MLM head: sentence-embedding checkpoints (MiniLM) ship none
        transposed("head_dense", "cls.predictions.transform.dense.weight", optional=True),
        Tensor("head_bias", "cls.predictions.transform.dense.bias", optional=True),
        Tensor("out_bias", "cls.predictions.bias", optional=True),
    ]
    for t in norm("head_norm", "cls.predictions.transform.LayerNorm"):
        tensors.append(dataclasses.replace(t, optional=True))
    for x, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
        tensors += [
            heads_in(f"{B}/attn/w{x}", f"{attn}.self.{hf_name}.weight", h, k),
            split_heads(f"{B}/attn/b{x}", f"{attn}.self.{hf_name}.bias", h, k),
        ]
    return tensors


def gpt2_tensors(m: ModelConfig) -> list[Tensor]:
    h, k = m.num_heads, m.head_size
    layer = "transformer.h.{i}"
    tensors = [
        Tensor("embed/tokens", "transformer.wte.weight"),
        Tensor("embed/positions", "transformer.wpe.weight"),
        *norm(f"{B}/attn_norm", f"{layer}.ln_1"),
        *norm(f"{B}/mlp_norm", f"{layer}.ln_2"),
        *norm("transformer/final_norm", "transformer.ln_f"),
        Tensor(  # c_proj is [heads * K, D]: heads on the first axis
            f"{B}/attn/wo",
            f"{layer}.attn.c_proj.weight",
            lambda w: w.reshape(h, k, -1),
            lambda a: a.reshape(h * k, -1),
        ),
        Tensor(f"{B}/attn/bo", f"{layer}.attn.c_proj.bias"),
        Tensor(f"{B}/mlp/wi", f"{layer}.mlp.c_fc.weight"),
        Tensor(f"{B}/mlp/bi", f"{layer}.mlp.c_fc.bias"),
        Tensor(f"{B}/mlp/wo", f"{layer}.mlp.c_proj.weight"),
        Tensor(f"{B}/mlp/bo", f"{layer}.mlp.c_proj.bias"),
    ]
    for j, x in enumerate("qkv"):
        tensors += [
            split_heads(f"{B}/attn/w{x}", f"{layer}.attn.c_attn.weight", h, k, part=j),
            split_heads(f"{B}/attn/b{x}", f"{layer}.attn.c_attn.bias", h, k, part=j),
        ]
    if not m.tie_embeddings:
        tensors.append(transposed("head", "lm_head.weight"))
    return tensors


def llama_tensors(m: ModelConfig) -> list[Tensor]:
    h, n, k = m.num_heads, m.kv_heads, m.head_size
    layer = "model.layers.{i}"
    tensors = [
        Tensor("embed/tokens", "model.embed_tokens.weight"),
        *norm(f"{B}/attn_norm", f"{layer}.input_layernorm", bias=False),
        *norm(f"{B}/mlp_norm", f"{layer}.post_attention_layernorm", bias=False),
        *norm("transformer/final_norm", "model.norm", bias=False),
        heads_in(f"{B}/attn/wq", f"{layer}.self_attn.q_proj.weight", h, k),
        heads_in(f"{B}/attn/wk", f"{layer}.self_attn.k_proj.weight", n, k),
        heads_in(f"{B}/attn/wv", f"{layer}.self_attn.v_proj.weight", n, k),
        heads_out(f"{B}/attn/wo", f"{layer}.self_attn.o_proj.weight", h, k),
        transposed(f"{B}/mlp/wg", f"{layer}.mlp.gate_proj.weight"),  # silu(x wg) * (x wi)
        transposed(f"{B}/mlp/wi", f"{layer}.mlp.up_proj.weight"),
        transposed(f"{B}/mlp/wo", f"{layer}.mlp.down_proj.weight"),
    ]
    if not m.tie_embeddings:
        tensors.append(transposed("head", "lm_head.weight"))
    return tensors


# Hugging Face's activation names (BERT's hidden_act, GPT-2's activation_function) -> model.mlp,
# and back
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "quick_gelu": "quick_gelu"}


def _refuse(file: Path, hf: dict, checks: dict[str, bool]) -> None:
    bad = [f"{key}={hf.get(key)!r}" for key, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{file}: jaxlm cannot run this model the same way: {', '.join(bad)}")


def bert_config(hf: dict, file: Path) -> ModelConfig:
    act = hf.get("hidden_act", "gelu")
    _refuse(
        file,
        hf,
        {
            "hidden_act": act in ACTIVATIONS,
            "position_embedding_type": hf.get("position_embedding_type", "absolute") == "absolute",
        },
    )
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
        mlp=ACTIVATIONS[act],
        position="learned",
        type_vocab_size=hf.get("type_vocab_size", 2),
        embed_norm=True,
        tie_embeddings=True,
        use_bias=True,
        init_std=hf.get("initializer_range", 0.02),
        dtype="float32",
    )


def gpt2_config(hf: dict, file: Path) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(
        file,
        hf,
        {
            "activation_function": act in ACTIVATIONS,
            "scale_attn_weights": hf.get("scale_attn_weights", True),
            "scale_attn_by_inverse_layer_idx": not hf.get("scale_attn_by_inverse_layer_idx"),
        },
    )
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        seq_len=hf["n_positions"],
        max_positions=hf["n_positions"],
        num_layers=hf["n_layer"],
        d_model=d,
        num_heads=hf["n_head"],
        mlp_dim=hf.get("n_inner") or 4 * d,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=ACTIVATIONS[act],
        position="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True),
        use_bias=True,
        init_std=hf.get("initializer_range", 0.02),
        dtype="float32",
    )


LLAMA_CONTEXT = 2048  # model.seq_len of an imported Llama (RoPE itself has no limit)


def llama_config(hf: dict, file: Path) -> ModelConfig:
    # transformers 5 writes rope_parameters; older files rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or {}
    _refuse(
        file,
        hf,
        {
            "hidden_act": hf.get("hidden_act", "silu") == "silu",
            "rope_scaling": not hf.get("rope_scaling"),
            "rope_parameters": rope.get("rope_type", "default") == "default",
            "attention_bias": not hf.get("attention_bias"),
            "mlp_bias": not hf.get("mlp_bias"),
        },
    )
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        seq_len=min(LLAMA_CONTEXT, hf.get("max_position_embeddings", LLAMA_CONTEXT)),
        max_positions=hf.get("max_position_embeddings", 0),  # kept for export only
        num_layers=hf["num_hidden_layers"],
        d_model=d,
        num_heads=h,
        num_kv_heads=hf.get("num_key_value_heads") or h,
        head_dim=hf.get("head_dim") or d // h,
        mlp_dim=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        position="rope",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        use_bias=False,
        init_std=hf.get("initializer_range", 0.02),
        dtype="float32",
    )


def bert_hf(m: ModelConfig) -> dict:
    act = HF_ACTIVATIONS.get(m.mlp, "gelu_new")  # swiglu: reported as differing
    return {
        "architectures": ["BertForMaskedLM"],
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.position_rows,
        "num_hidden_layers": m.num_layers,
        "hidden_size": m.d_model,
        "num_attention_heads": m.num_heads,
        "intermediate_size": m.mlp_dim,
        "layer_norm_eps": m.norm_eps,
        "hidden_act": act,
        "type_vocab_size": m.type_vocab_size,
        "initializer_range": m.init_std,
        "position_embedding_type": "absolute",
    }


def gpt2_hf(m: ModelConfig) -> dict:
    act = HF_ACTIVATIONS.get(m.mlp, "gelu_new")  # swiglu: reported as differing
    return {
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": m.vocab_size,
        "n_positions": m.position_rows,
        "n_embd": m.d_model,
        "n_layer": m.num_layers,
        "n_head": m.num_heads,
        "n_inner": m.mlp_dim,
        "activation_function": act,
        "layer_norm_epsilon": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
    }


def llama_hf(m: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.position_rows,
        "num_hidden_layers": m.num_layers,
        "hidden_size": m.d_model,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "intermediate_size": m.mlp_dim,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": m.init_std,
    }


@dataclasses.dataclass(frozen=True)
class Architecture:
    model_type: str
    objective: str
    config: Callable  # (hf config.json dict, its path) -> ModelConfig
    hf_config: Callable  # ModelConfig -> config.json fields
    tensors: Callable  # ModelConfig -> [Tensor]
    prefix: str  # a bare encoder / decoder checkpoint's names lack it
    bare_heads: tuple[str, ...] = ()  # names that never take the prefix


ARCHITECTURES = {
    "bert": Architecture("bert", "mlm", bert_config, bert_hf, bert_tensors, "bert.", ("cls.",)),
    "gpt2": Architecture(
        "gpt2", "lm", gpt2_config, gpt2_hf, gpt2_tensors, "transformer.", ("lm_head.",)
    ),
    "llama": Architecture("llama", "lm", llama_config, llama_hf, llama_tensors, ""),
}
