"""Typed, frozen experiment configs: `load("configs/gpt.py:tiny", ["train.steps=10"])`.

A config file is plain Python with `get_config(variant) -> Config`. Overrides are dotted
`key.path=value` strings, parsed by the field's declared type, so a typo or a wrong type fails
here with the key's name instead of deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in a config, an override or a command-line value; printed without a trace."""


def error_chain(error: BaseException, most: int = 9) -> list[BaseException]:
    """error and what raised it (its __cause__, else its __context__), each once, at most
    `most`: where a library's own error lies under the one that reached us (orbax's under
    a restore, gcsfs's under asyncio's)."""
    chain = [error]
    while len(chain) < most:
        below = chain[-1].__cause__ or chain[-1].__context__
        if below is None or any(below is seen for seen in chain):
            break
        chain.append(below)
    return chain


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    seq_len: int = 128
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: as many as num_heads (multi-head); fewer: grouped-query
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 512
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # xla | pallas: the norms as two fused Pallas Triton kernels on a GPU (jaxlm/fused_norm.py;
    # Pallas interpret mode on a CPU, slow; XLA's on a TPU)
    norm_kernel: Literal["xla", "pallas"] = "xla"
    # GPT-2 | exact erf, BERT | Llama | x * sigmoid(1.702 x), OpenAI's CLIP
    mlp: Literal["gelu_tanh", "gelu", "swiglu", "quick_gelu"] = "gelu_tanh"
    norm_position: Literal["pre", "post"] = "pre"  # post: original BERT's, after the residual
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings, BERT: 2
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    position: Literal["learned", "rope"] = "learned"
    # rows of the learned position table; 0: seq_len (BERT: 512). RoPE: the context a
    # Hugging Face source states (max_position_embeddings), kept for its export
    max_positions: int = 0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = True
    init_std: float = 0.02
    # compute dtype; parameters and optimizer state stay float32
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    scan_layers: bool = True  # lax.scan compiles faster; unrolled runs faster on GPU
    remat: Literal["none", "full", "dots"] = "none"  # dots: keep matmul outputs, recompute the rest
    attention: Literal["auto", "xla", "cudnn", "splash"] = "auto"  # auto: jaxlm.attention's pick
    # packed documents see only themselves (a dense mask); false (causal LM only): each row
    # is one causal sequence, as GPT-2 and nanoGPT train, and cuDNN runs without a bias
    document_mask: bool = True
    # GPU (Hopper on): cuDNN's packed layout for rows of up to this many documents instead of
    # the dense mask's bias; a batch with a fuller row runs the dense mask (0: always it)
    max_segments: int = 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def position_rows(self) -> int:
        return self.max_positions or self.seq_len

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclass(frozen=True)
class DataConfig:
    # Prepared directories (`jaxlm data prepare`) or text files / globs (.txt, .jsonl,
    # .txt.gz, .txt.zst, .jsonl.gz, .jsonl.zst, .parquet; prepared into WORKDIR/prepared once);
    # () = built-in.
    files: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # mixture weights, one per files entry; () = by tokens
    tokenizer: str = ""  # .model / tokenizer.json; "" = a prepared entry's, or train one
    # lines sentencepiece samples (shuffled) when jaxlm trains the tokenizer (process 0 only)
    tokenizer_sample: int = 2_000_000
    eval_fraction: float = 0.02  # text files: documents held out for evaluation
    text_field: str = "text"  # text files: the field of a .jsonl line / parquet column
    # worker processes that decode and crop images (Grain multiprocessing); 0: read threads
    # of the training process
    workers: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in sequences, summed over all devices and accumulation steps
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_steps: int = 8
    peak_flops: float = 0.0  # per device, for MFU; 0: look up the device (or measure a CPU)
    # causal LM: the output projection and cross-entropy run over chunks of this many positions
    # of each sequence, so [batch, seq, vocab] float32 logits never exist (0: all at once)
    loss_chunk: int = 256
    # causal LM: multiple-choice sets (jsonl files, or a shipped set's name: plays_next_line)
    # scored at every evaluation: eval_<name>_acc and eval_<name>_acc_norm (jaxlm.choices)
    eval_tasks: tuple[str, ...] = ()
    # where metrics go: jsonl (metrics.jsonl), tensorboard, wandb (jaxlm.track; optional extra)
    track: tuple[Literal["tensorboard", "jsonl", "wandb"], ...] = ("tensorboard", "jsonl")


@dataclass(frozen=True)
class OptimConfig:
    # adamw; muon (jaxlm/muon.py: weight matrices by Newton-Schulz, the rest by AdamW);
    # lion; adafactor. All with the same clipping, schedule and weight-decay mask.
    name: Literal["adamw", "muon", "lion", "adafactor"] = "adamw"
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio at train.steps
    # cosine: warmup, then cosine decay over the rest; wsd: warmup, stable at lr, then decay
    # over the last decay_fraction of the steps (decay_shape linear or 1-sqrt); constant
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping of the gradients (0: none)
    muon_beta: float = 0.95  # Muon's momentum (Nesterov)
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    # Newton-Schulz's matmuls and Gram all-reduces in this dtype (bfloat16, as modded-nanogpt
    # runs it: half the traffic on a pod); the momentum and the update stay float32
    muon_dtype: Literal["float32", "bfloat16"] = "float32"
    muon_adam_lr: float = 0.0  # peak rate of Muon's AdamW part (0: optim.lr)
    lion_b2: float = 0.99  # Lion's second interpolation factor (its b1 is optim.b1)


@dataclass(frozen=True)
class MlmConfig:
    """Masked-LM corruption, applied on the host in the Grain pipeline."""

    mask_rate: float = 0.15  # share of maskable tokens chosen for prediction (0.30 also good)
    mask_token_rate: float = 0.8  # of those: replaced by [MASK]
    random_token_rate: float = 0.1  # replaced by a random token; the rest stay unchanged
    max_predictions: int = 0  # per sequence, static for the sparse head; 0: ceil(rate * seq)
    whole_word: bool = False  # mask all pieces of a word together


@dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower of the contrastive objective (blocks from the shared stack)."""

    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    mlp: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"  # the image tower's activation
    pool: Literal["cls", "mean"] = "cls"


@dataclass(frozen=True)
class ClipConfig:
    """Contrastive image-text training; the text tower is `model`, the image tower `vision`."""

    loss: Literal["clip", "siglip"] = "clip"  # softmax over the global batch | pairwise sigmoid
    embed_dim: int = 128
    text_pool: Literal["last", "mean"] = "last"  # causal text tower (CLIP) | bidirectional
    # prepared image-text directories (`jaxlm data prepare --images`, local or gs://), or
    # digits (scikit-learn, built in) | tar:GLOB | tfds:NAME[:DATA_DIR], prepared into
    # WORKDIR/prepared at the first start; several, comma-separated, mix by data.weights
    source: str = "digits"
    random_crop: bool = False  # random-resized crop for training images, else centre crop
    # a labelled set for zero-shot top-1/5 at every evaluation (a source as above; its
    # held-out pairs, or all if none is held out); "": the first source's held-out pairs,
    # if they have labels and class names
    zeroshot: str = ""
    zeroshot_images: int = 10_000  # at most this many zero-shot images
    classes: str = ""  # a file of class names, one per line; "": the zero-shot source's
    templates: str = ""  # a file of prompt templates ("a photo of a {word}."); "": built in


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    # also save when this many minutes have passed since the last save (0: steps only), as
    # Levanter's 15-minute default; decided at logging steps by process 0's clock
    every_minutes: float = 0.0
    # the newest `keep` saves at multiples of `every` stay, and the newest save of any kind
    # (by the clock, a preemption, the end) until a newer one exists: checkpoint.retention
    keep: int = 3
    async_save: bool = True
    # Orbax's OCDBT layout: few large files per step, Orbax's default and the one to use on
    # GCS. False: one zarr array per parameter (what a local GCS emulator can serve).
    ocdbt: bool = True


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class Config:
    objective: Literal["lm", "mlm", "clip"] = "lm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    name: str = ""  # "gpt:tiny"; set by load()


def leaf_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of a config dataclass -> its declared type."""
    hints = typing.get_type_hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.update(leaf_keys(t, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = t
    return keys


def _parse(key: str, text: str, t: Any) -> Any:
    def fail() -> ConfigError:
        name = getattr(t, "__name__", str(t))
        return ConfigError(f"config key {key!r} expects {name}, got {text!r}")

    if t is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise fail()
    if t is int:
        try:
            return int(text)
        except ValueError:
            raise fail() from None
    if t is float:
        try:
            return float(text)
        except ValueError:
            raise fail() from None
    if t is str:
        return text
    if typing.get_origin(t) is Literal:  # the choice is checked by validate
        return text
    if typing.get_origin(t) is tuple:
        item = typing.get_args(t)[0]
        return tuple(_parse(key, s, item) for s in text.split(",") if s)
    raise fail()


def _replace(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    child = _replace(getattr(obj, path[0]), path[1:], value)
    return dataclasses.replace(obj, **{path[0]: child})


def override(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key.path=value` strings; unknown keys and unparsable values raise ConfigError."""
    keys = leaf_keys(Config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, text = item.split("=", 1)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        cfg = _replace(cfg, key.split("."), _parse(key, text, keys[key]))
    from jaxlm.checks import validate  # checks imports this module's dataclasses

    validate(cfg)
    return cfg


def source_entries(spec: str) -> list[str]:
    """`clip.source` -> its entries: split at commas outside braces (`{a,b}` stays whole)."""
    out, depth, current = [], 0, ""
    for c in spec:
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += c
    out.append(current)
    entries = [e.strip() for e in out if e.strip()]
    if not entries:
        raise ConfigError("clip.source is empty: name a prepared image-text directory or digits")
    return entries


def load(spec: str, overrides: list[str] = ()) -> Config:
    """`configs/gpt.py:tiny` -> Config, with overrides applied and validated."""
    path, _, variant = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} not found (expected e.g. configs/gpt.py:tiny)")
    module_spec = importlib.util.spec_from_file_location(f"jaxlm_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path!r} has no get_config(variant) function")
        cfg = module.get_config(variant) if variant else module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(_config_file_error(path, file, e)) from None
    if not isinstance(cfg, Config):
        raise ConfigError(
            f"config file {path!r}: get_config({variant!r}) returned {type(cfg).__name__}, "
            "not a jaxlm.config.Config"
        )
    cfg = dataclasses.replace(cfg, name=f"{file.stem}:{variant or 'default'}")
    return override(cfg, list(overrides))


def _config_file_error(path: str, file: Path, error: Exception) -> str:
    """What went wrong in the user's config file, at its own lines: the frames of jaxlm's
    loader above them say nothing to the user."""
    if isinstance(error, SyntaxError):
        where = "".join(traceback.format_exception_only(error)).rstrip()
        return f"config file {path!r} is not valid Python:\n{where}"
    resolved = str(file.resolve())
    frames = traceback.extract_tb(error.__traceback__)
    frames = [f for f in frames if str(Path(f.filename).resolve()) == resolved]
    lines = "".join(f"\n  line {f.lineno}, in {f.name}: {f.line}" for f in frames)
    return f"config file {path!r} raised {type(error).__name__}: {error}{lines}"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Inverse of to_dict (e.g. the config stored in a checkpoint)."""

    def build(cls: type, values: dict) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            t, v = hints[f.name], values[f.name]
            if dataclasses.is_dataclass(t):
                v = build(t, v)
            elif typing.get_origin(t) is tuple:
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(Config, d)


def variant_error(module: types.ModuleType | str, variant: str, variants: dict) -> ConfigError:
    return ConfigError(f"unknown variant {variant!r} in {module}; choose one of {sorted(variants)}")
