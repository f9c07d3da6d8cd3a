"""GPT-style causal language models.

    jaxlm train configs/gpt.py:tiny                 # this 2-core CPU: ~2 min, see README
    jaxlm bench configs/gpt.py:gpt2_124m            # one GPU: tokens/s and MFU
    jaxlm train configs/gpt.py:llama_160m mesh.fsdp=8 data.files=/data/corpus_1024  # prepared

Variants:
- tiny: 4 layers, d 128, 2k BPE vocab trained on the built-in Shakespeare; float32 because
  bfloat16 matmuls are emulated (slower) on CPUs. 300 steps of 16 x 128 tokens. Measured on a
  2-core CPU (2026-12-03, 2 min 34 s alone): eval_loss 4.52
  against an eval_unigram_loss of 5.98 (the context-free baseline).
- gpt2_124m: GPT-2 small (12 layers, d 768, 12 heads, seq 1024, vocab 50304, tied embeddings,
  learned positions, LayerNorm, tanh-approximated GELU): 124M parameters. Batch 12 x 1024 per
  step, as nanoGPT's benchmark; layers unrolled (1.36x faster than lax.scan on an H200) and
  the loss over whole logits (train.loss_chunk=0: 1.15x faster there).
- llama_160m: Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention 12 heads / 4 kv heads,
  untied output head, no biases).
- llama_1b, llama_7b, llama_70b: the shapes of Llama-3.2-1B (1.24B parameters: 16 layers,
  d 2048, 32 / 8 heads, 128k vocabulary, tied), Llama-2-7B (6.74B) and Llama-2-70B (69.0B:
  64 / 8 heads), seq 4096, global batch 256 sequences (1M tokens), scanned layers with full
  rematerialisation. Sized for pods: `jaxlm plan configs/gpt.py:llama_7b --devices 64
  --device v5p mesh.fsdp=64` says whether a mesh fits before one is booked.
"""

import dataclasses
import functools

from jaxlm.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    variant_error,
)


def get_config(variant: str = "tiny") -> Config:
    variants = {
        "tiny": tiny,
        "gpt2_124m": gpt2_124m,
        "llama_160m": llama_160m,
        **{name: functools.partial(_llama, **shape) for name, shape in LLAMA.items()},
    }
    if variant not in variants:
        raise variant_error(__file__, variant, variants)
    return variants[variant]()


def tiny() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=2048,
            seq_len=128,
            num_layers=4,
            d_model=128,
            num_heads=4,
            mlp_dim=512,
            dtype="float32",
        ),
        data=DataConfig(eval_fraction=0.05),
        train=TrainConfig(
            steps=300,
            batch_size=16,
            log_every=25,
            eval_every=100,
            eval_steps=8,
            eval_tasks=("plays_next_line",),  # which line comes next: accuracy vs chance
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=100, keep=2),
    )


def _pretraining(model: ModelConfig, steps: int, batch_size: int) -> Config:
    """Shared schedule of the full-size variants (nanoGPT's GPT-2 recipe)."""
    return Config(
        model=model,
        train=TrainConfig(
            steps=steps, batch_size=batch_size, log_every=100, eval_every=2000, eval_steps=50
        ),
        optim=OptimConfig(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1),
        checkpoint=CheckpointConfig(every=5000, keep=3),
    )


def gpt2_124m() -> Config:
    cfg = _pretraining(
        ModelConfig(
            vocab_size=50304,
            seq_len=1024,
            num_layers=12,
            d_model=768,
            num_heads=12,
            mlp_dim=3072,
            scan_layers=False,
        ),
        steps=600_000,
        batch_size=12,
    )
    # whole [B, T, V] logits (2.5 GB in float32 here): the chunked loss's recomputation cost
    # 13% of the step on an H200 (31.60 vs 27.48 ms, BENCHMARKS.md)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=0))


def llama_160m() -> Config:
    return _pretraining(
        ModelConfig(
            vocab_size=32000,
            seq_len=1024,
            num_layers=12,
            d_model=768,
            num_heads=12,
            num_kv_heads=4,
            mlp_dim=3328,
            norm="rmsnorm",
            norm_eps=1e-6,
            mlp="swiglu",
            position="rope",
            tie_embeddings=False,
            use_bias=False,
            scan_layers=False,
        ),
        steps=100_000,
        batch_size=32,
    )


def _llama(**shape) -> Config:
    """Llama-family shapes for pods: bfloat16 compute, scanned layers (an 80-layer model
    compiles once), every layer rematerialised (activations of seq 4096 would not fit)."""
    model = ModelConfig(
        seq_len=4096,
        norm="rmsnorm",
        mlp="swiglu",
        position="rope",
        use_bias=False,
        dtype="bfloat16",
        scan_layers=True,
        remat="full",
        **shape,
    )
    cfg = _pretraining(model, steps=250_000, batch_size=256)
    return dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, lr=3e-4, warmup_steps=2000, b2=0.95)
    )


# Published shapes: Llama-3.2-1B, Llama-2-7B, Llama-2-70B.
LLAMA = {
    "llama_1b": dict(vocab_size=128256, num_layers=16, d_model=2048, num_heads=32,
                     num_kv_heads=8, mlp_dim=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama_7b": dict(vocab_size=32000, num_layers=32, d_model=4096, num_heads=32,
                     mlp_dim=11008, tie_embeddings=False),
    "llama_70b": dict(vocab_size=32000, num_layers=80, d_model=8192, num_heads=64,
                      num_kv_heads=8, mlp_dim=28672, tie_embeddings=False),
}  # fmt: skip
