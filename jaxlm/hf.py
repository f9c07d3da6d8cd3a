"""Hugging Face model directories in and out: BERT, GPT-2 and Llama-family checkpoints.

    jaxlm import hf SRC --out WORKDIR [mesh.fsdp=-1 ...]  # config.json + safetensors -> step 0
    jaxlm export hf WORKDIR --out DIR [--step N]          # float32 safetensors, config, tokenizer

One table per architecture names the Hugging Face tensor of each jaxlm parameter and the
reshape between the two layouts; import and export read the same table, so a round trip is
bit-exact. The model config comes from the source's config.json (a 50257-token GPT-2 stays
50257); whatever jaxlm cannot run the same way (rope_scaling, biases on a Llama, another
model_type) is refused with the field that says so. Exports write what `transformers` loads
with AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import CheckpointConfig, Config, ConfigError, MeshConfig, ModelConfig
from jaxlm.step import build

log = logging.getLogger("jaxlm")


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


BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


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
            "hidden_act": act in BERT_ACTIVATIONS,
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
        mlp=BERT_ACTIVATIONS[act],
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
            "activation_function": act in GPT2_ACTIVATIONS,
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
        mlp=GPT2_ACTIVATIONS[act],
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
    act = "gelu" if m.mlp == "gelu" else "gelu_new"  # swiglu: reported as differing
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
    act = "gelu" if m.mlp == "gelu" else "gelu_new"  # swiglu: reported as differing
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
        "max_position_embeddings": m.seq_len,
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

# Fields a Hugging Face config cannot express, left out when checking that an export is exact.
RUN_FIELDS = ("seq_len", "dtype", "scan_layers", "remat", "attention", "document_mask", "init_std")


def read_config(src: Path) -> tuple[Architecture, dict]:
    file = src / "config.json"
    if not file.is_file():
        raise ConfigError(f"{src} has no config.json: not a Hugging Face model directory")
    hf = json.loads(file.read_text())
    arch = ARCHITECTURES.get(hf.get("model_type"))
    if arch is None:
        raise ConfigError(
            f"{file}: model_type is {hf.get('model_type')!r} (architectures "
            f"{hf.get('architectures')}); jaxlm imports {sorted(ARCHITECTURES)}"
        )
    return arch, hf


def read_tensors(src: Path, arch: Architecture) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, of the shards model.safetensors.index.json names,
    or of pytorch_model.bin (with torch), as float32, under the names the table uses."""
    from safetensors.numpy import load_file

    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        tensors = load_file(str(src / "model.safetensors"))
    elif index.is_file():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (src / shard).is_file():
                raise ConfigError(f"{index} names the shard {shard}, which is not in {src}")
            tensors |= load_file(str(src / shard))
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
        raise ConfigError(
            f"{src} has none of model.safetensors, model.safetensors.index.json, pytorch_model.bin"
        )

    def named(key: str) -> str:
        # old TF-converted BERTs call LayerNorm parameters gamma / beta
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        bare = not key.startswith((arch.prefix, *arch.bare_heads))
        return arch.prefix + key if bare else key

    return {named(k): np.asarray(v, np.float32) for k, v in tensors.items()}


def to_jaxlm(table: list[Tensor], tensors: dict, layers: int, src: Path) -> dict[str, np.ndarray]:
    """Hugging Face tensors -> {jaxlm parameter path: array}, layers stacked."""
    missing = sorted(
        {
            t.name.format(i=i)
            for t in table
            if not t.optional
            for i in range(layers if "{i}" in t.name else 1)
            if t.name.format(i=i) not in tensors
        }
    )
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ConfigError(f"{src}: missing tensors {shown}")

    def one(t: Tensor, name: str) -> np.ndarray:
        a = tensors[name]
        if t.part is not None:
            a = np.split(a, 3, axis=-1)[t.part]
        return t.load(a)

    out = {}
    for t in table:
        if "{i}" in t.name:
            out[t.path] = np.stack([one(t, t.name.format(i=i)) for i in range(layers)])
        elif t.name in tensors:
            out[t.path] = one(t, t.name)
    return out


def from_jaxlm(table: list[Tensor], params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{jaxlm parameter path: array} -> Hugging Face tensors (fused parts joined)."""
    parts: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for t in table:
        if t.path not in params:
            continue
        stacked = "{i}" in t.name
        layers = params[t.path] if stacked else [params[t.path]]
        for i, a in enumerate(layers):
            name = t.name.format(i=i)
            if t.part is None:
                out[name] = np.ascontiguousarray(t.save(a))
            else:
                parts.setdefault(name, {})[t.part] = t.save(a)
    for name, pieces in parts.items():
        out[name] = np.concatenate([pieces[j] for j in sorted(pieces)], axis=-1)
    return out


def read_tokenizer(src: Path, arch: Architecture, model: ModelConfig):
    """BERT: WordPiece from vocab.txt. Others: tokenizer.json through `tokenizers`, with
    [bos] prepended only where the source says so (tokenizer_config's add_bos_token, else
    what tokenizer.json's own post-processor adds; SmolLM2 adds none)."""
    settings = src / "tokenizer_config.json"
    settings = json.loads(settings.read_text()) if settings.is_file() else {}
    if arch.model_type == "bert":
        if not (src / "vocab.txt").is_file():
            raise ConfigError(f"{src} has no vocab.txt (the WordPiece vocabulary)")
        vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tok = tokenizer_lib.WordPiece(vocab, settings.get("do_lower_case", True))
    else:
        if not (src / "tokenizer.json").is_file():
            raise ConfigError(
                f"{src} has no tokenizer.json (jaxlm reads Hugging Face fast tokenizers)"
            )
        tok = tokenizer_lib.load(src / "tokenizer.json")
        if "add_bos_token" in settings:
            tok.add_bos = bool(settings["add_bos_token"])
        else:
            from tokenizers import Tokenizer as FastTokenizer

            ids = FastTokenizer.from_str(tok.json).encode("a", add_special_tokens=True).ids
            tok.add_bos = ids[0] == tok.bos_id
    if tok.vocab_size > model.vocab_size:
        raise ConfigError(
            f"{src}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
            f"{model.vocab_size}: the vocabulary does not match the model"
        )
    return tok


def _path(path) -> str:
    return "/".join(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def import_hf(src: str | Path, workdir: str | Path, overrides: list[str] = ()) -> dict:
    """A Hugging Face directory -> a jaxlm checkpoint at step 0 in workdir, laid out on the
    mesh the overrides ask for (fsdp over all devices by default)."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"Hugging Face model directory {str(src)!r} not found")
    arch, hf = read_config(src)
    model = arch.config(hf, src / "config.json")
    tok = read_tokenizer(src, arch, model)
    arrays = to_jaxlm(arch.tensors(model), read_tensors(src, arch), model.num_layers, src)

    cfg = Config(objective=arch.objective, model=model, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    cfg = dataclasses.replace(cfg, name=f"hf-{arch.model_type}:{src.name}")
    cfg = config_lib.override(cfg, list(overrides))
    mesh = sharding.make_mesh(cfg.mesh)
    s = build(cfg, mesh)
    with jax.set_mesh(mesh):
        state = s.init()  # the optimizer state, and any head the source lacks, start fresh

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
        ckpt.save(0, state, cfg, tok)
        ckpt.wait()
        ckpt.close()
    fresh = sorted(
        {_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])} - set(arrays)
    )
    log.info(
        "imported %s (%s, %s parameters) into %s; initialised: %s",
        src,
        arch.model_type,
        f"{s.num_params():,}",
        ckpt.root,
        ", ".join(fresh) or "nothing",
    )
    return {
        "workdir": str(workdir),
        "model_type": arch.model_type,
        "params": s.num_params(),
        "tensors": len(arrays),
        "initialised": fresh,
    }


def architecture_for(cfg: Config) -> Architecture:
    """The Hugging Face architecture that runs this config exactly, or a ConfigError naming
    what differs: the config must survive config -> config.json -> config unchanged."""
    m = cfg.model
    if cfg.objective == "lm":
        arch = ARCHITECTURES["gpt2" if m.position == "learned" else "llama"]
    elif cfg.objective == "mlm":
        arch = ARCHITECTURES["bert"]
    else:
        raise ConfigError(
            f"export hf: a {cfg.objective!r} checkpoint has no Hugging Face counterpart "
            "(BERT, GPT-2 and Llama export)"
        )
    # compared through what they mean: 0 kv heads = as many as heads, and so on
    meaning = {
        "num_kv_heads": "kv_heads",
        "head_dim": "head_size",
        "max_positions": "position_rows",
    }
    fields = [
        meaning.get(f.name, f.name)
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUN_FIELDS
    ]
    if m.position != "learned":
        fields = [f for f in fields if f != "position_rows"]
    try:
        back = arch.config({"model_type": arch.model_type, **arch.hf_config(m)}, Path("export"))
    except ConfigError as e:
        raise ConfigError(
            f"export hf: config {cfg.name!r} has no Hugging Face counterpart ({e})"
        ) from None
    differ = [
        f"model.{f}={getattr(m, f)!r} (a {arch.model_type} has {getattr(back, f)!r})"
        for f in fields
        if getattr(m, f) != getattr(back, f)
    ]
    if differ:
        raise ConfigError(
            f"export hf: config {cfg.name!r} has no Hugging Face counterpart; the nearest, "
            f"{arch.model_type}, differs in {', '.join(differ)}"
        )
    return arch


def export_hf(workdir: str | Path, out: str | Path, step: int | None = None) -> dict:
    """A checkpoint's parameters -> a Hugging Face directory: float32 model.safetensors,
    config.json and the tokenizer (tokenizer.json, or BERT's vocab.txt)."""
    from safetensors.numpy import save_file

    from jaxlm.evaluate import load

    loaded = load(workdir, step, params_only=True)
    arch = architecture_for(loaded.cfg)
    params = {
        _path(p): np.asarray(x, np.float32)
        for p, x in jax.tree_util.tree_leaves_with_path(loaded.params)
    }
    tensors = from_jaxlm(arch.tensors(loaded.cfg.model), params)
    tok = loaded.tokenizer
    hf = {
        "model_type": arch.model_type,
        **arch.hf_config(loaded.cfg.model),
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "torch_dtype": "float32",
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name, text in tokenizer_lib.hf_files(tok).items():
        (out / name).write_text(text, encoding="utf-8")
    log.info("exported step %d of %s as a %s to %s", loaded.step, workdir, arch.model_type, out)
    return {
        "out": str(out),
        "model_type": arch.model_type,
        "step": loaded.step,
        "tensors": len(tensors),
    }
