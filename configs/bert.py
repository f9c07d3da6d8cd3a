"""BERT-style masked language models (encoders).

    jaxlm train configs/bert.py:tiny                # this 2-core CPU: ~4 min, see README
    jaxlm bench configs/bert.py:bert_base           # one GPU: tokens/s and MFU
    jaxlm import hf path/to/bert-dir --out runs/bert_imported

Variants:
- tiny: 4 layers, d 128, BERT's architecture (post-LayerNorm, exact GELU, learned positions and
  token types, a LayerNorm on the embeddings), 2k BPE vocab trained on the built-in
  Shakespeare, 500 steps of 64 x 64 tokens; 30% masking (at most 20 predictions per row)
  because 15% leaves a CPU-sized run on the unigram plateau for most of 5 minutes; float32 on
  CPU. Measured on a 2-core CPU (2026-12-03): eval_accuracy 0.1333 against
  eval_majority_accuracy 0.0442 (6 min 21 s beside other work; 3 min 54 s alone on 11-29).
- bert_base: BERT-base as published (12 layers, d 768, 12 heads, MLP 3072, post-LN, GELU, 512
  learned positions, 2 token types), phase-1 sequence length 128 with 20 predictions per
  sequence, batch 256, lr 1e-4, 1M steps. Vocab 30528: BERT's 30522 WordPiece padded to a
  multiple of 64, as NVIDIA's BERT does and GPT-2's 50304 here (6 rows no token uses). With
  30522 a [B, P, V] row is 61,044 bytes, which no 16-byte-aligned GPU load or cuBLAS call
  takes: XLA pads the logits' gradient (312 MB) before each cuBLAS call, and the Triton GEMM
  an H200 picked instead ran the head's input gradient at 0.87 ms, a third of the card's
  rate (BENCHMARKS.md, 2026-12-04). A Hugging Face BERT imported with `jaxlm import hf`
  keeps its config.json's 30522.
- bert_base_512: the same model at sequence length 512, 80 predictions per sequence (BERT's
  phase 2; resume it from a bert_base workdir).
- modern_base: the MosaicBERT / cramming recipe on the same shapes: pre-norm, gated (SwiGLU)
  MLP, no biases, 30% masking.
"""

import dataclasses

from jaxlm.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    MlmConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    variant_error,
)

BERT_ARCHITECTURE = dict(
    norm="layernorm",
    norm_position="post",
    mlp="gelu",
    position="learned",
    type_vocab_size=2,
    embed_norm=True,
    tie_embeddings=True,
    use_bias=True,
)


def get_config(variant: str = "tiny") -> Config:
    variants = {
        "tiny": tiny,
        "bert_base": bert_base,
        "bert_base_512": bert_base_512,
        "modern_base": modern_base,
    }
    if variant not in variants:
        raise variant_error(__file__, variant, variants)
    return variants[variant]()


def tiny() -> Config:
    return Config(
        objective="mlm",
        model=ModelConfig(
            vocab_size=2048,
            seq_len=64,
            num_layers=4,
            d_model=128,
            num_heads=4,
            mlp_dim=512,
            dtype="float32",
            **BERT_ARCHITECTURE,
        ),
        mlm=MlmConfig(mask_rate=0.3, max_predictions=20),
        data=DataConfig(eval_fraction=0.05),
        train=TrainConfig(steps=500, batch_size=64, log_every=25, eval_every=100, eval_steps=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=40, weight_decay=0.01, b2=0.98),
        checkpoint=CheckpointConfig(every=200, keep=2),
    )


def bert_base() -> Config:
    return Config(
        objective="mlm",
        model=ModelConfig(
            vocab_size=30528,  # 30522 padded to a multiple of 64 (docstring)
            seq_len=128,
            max_positions=512,
            num_layers=12,
            d_model=768,
            num_heads=12,
            mlp_dim=3072,
            norm_eps=1e-12,
            scan_layers=False,
            **BERT_ARCHITECTURE,
        ),
        mlm=MlmConfig(mask_rate=0.15, max_predictions=20),
        train=TrainConfig(
            steps=1_000_000, batch_size=256, log_every=100, eval_every=5000, eval_steps=20
        ),
        optim=OptimConfig(
            lr=1e-4, warmup_steps=10_000, min_lr_ratio=0.0, weight_decay=0.01, b2=0.999, eps=1e-6
        ),
        checkpoint=CheckpointConfig(every=10_000, keep=3),
    )


def bert_base_512() -> Config:
    cfg = bert_base()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, seq_len=512),
        mlm=dataclasses.replace(cfg.mlm, max_predictions=80),
        train=dataclasses.replace(cfg.train, batch_size=64),
    )


def modern_base() -> Config:
    cfg = bert_base()
    model = dataclasses.replace(
        cfg.model, norm_position="pre", mlp="swiglu", mlp_dim=2048, use_bias=False, norm_eps=1e-5
    )
    mlm = MlmConfig(mask_rate=0.3, max_predictions=40)
    return dataclasses.replace(
        cfg, model=model, mlm=mlm, optim=dataclasses.replace(cfg.optim, lr=5e-4)
    )
