"""Hugging Face model directories in and out: BERT, GPT-2 and Llama-family checkpoints.

    jaxlm import hf SRC --out WORKDIR [mesh.fsdp=-1 ...]  # config.json + safetensors -> step 0
    jaxlm export hf WORKDIR --out DIR [--step N]          # float32 safetensors, config, tokenizer

jaxlm/hf_layouts.py holds one table per architecture: the Hugging Face tensor of each
jaxlm parameter and the reshape between the two layouts. Import and export read the same
table, so a round trip is bit-exact. The model config comes from the source's config.json
(a 50257-token GPT-2 stays 50257); whatever jaxlm cannot run the same way (rope_scaling,
biases on a Llama, another model_type) is refused, naming the field. Exports write what
`transformers` loads with AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np

from jaxlm import checks, sharding
from jaxlm import config as config_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import CheckpointConfig, Config, ConfigError, MeshConfig, ModelConfig
from jaxlm.hf_layouts import ARCHITECTURES, Architecture, Tensor
from jaxlm.step import build

log = logging.getLogger("jaxlm")


# Fields a Hugging Face config cannot express, left out when checking that an export is exact.
RUN_FIELDS = ("seq_len", "dtype", "scan_layers", "remat", "attention", "document_mask", "init_std")


def read_config(src: Path) -> tuple[Architecture, dict]:
    file = src / "config.json"
    if not file.is_file():
        raise ConfigError(f"{src} has no config.json: not a Hugging Face model directory")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: a JSON {type(hf).__name__}, expected an object")
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


def read_tokenizer(src: Path, arch: Architecture, model: ModelConfig) -> tokenizer_lib.AnyTokenizer:
    """BERT: WordPiece from vocab.txt. Others: tokenizer.json through `tokenizers`, with
    [bos] prepended only where the source says so (`tokenizer.load`'s rule)."""
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
        tok = tokenizer_lib.load(src / "tokenizer.json")  # add_bos as the source says
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
    checks.output_directory(workdir, "import hf --out")
    existing = Checkpointer(workdir, CheckpointConfig(async_save=False), create=False)
    steps = existing.steps()
    existing.close()
    if steps:  # a step 0 among another run's steps would be neither run's start
        raise ConfigError(
            f"import hf --out {workdir}: that workdir already holds checkpoints (steps "
            f"{', '.join(map(str, sorted(steps)))} in {existing.root}); import into a new one"
        )
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

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        held = "is a file" if not out.is_dir() else "is not empty"
        raise ConfigError(
            f"export hf --out {out}: {held}; export into a new or empty directory (export "
            "writes config.json, model.safetensors and tokenizer files, and overwrites nothing)"
        )
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
