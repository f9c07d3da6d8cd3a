"""The `jaxlm` command's arguments: one parser, kept apart from what runs them (cli.py)."""

from __future__ import annotations

import argparse
import os

DISTRIBUTED_HELP = (
    "join the processes of a job (jax.distributed): found automatically on TPU pods, under "
    "SLURM and under Open MPI's mpirun (each process drives the GPUs its launcher gave it); "
    "elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
)


def parser(description: str) -> argparse.ArgumentParser:
    """Every subcommand, its arguments and their help; `jaxlm/cli.py` runs what it parses."""
    p = argparse.ArgumentParser(prog="jaxlm", description=description)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume: jaxlm train configs/gpt.py:tiny")
    t.add_argument(
        "config",
        nargs="?",
        help="CONFIG_FILE[:VARIANT], or a workdir (its newest checkpoint's config); "
        "default with --init-from: the source's config",
    )
    t.add_argument(
        "--init-from",
        metavar="WORKDIR[:STEP]",
        help="start a new run from this checkpoint's parameters (continued pretraining): "
        "a fresh optimizer at step 0, this run's data and schedule",
    )
    t.add_argument("--workdir", help="checkpoints and metrics (default runs/<config>_<variant>)")
    t.add_argument("overrides", nargs="*", help="key.path=value")
    t.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)
    t.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of a few steps")
    t.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        help="seconds without a heartbeat after which a process counts as dead (--distributed)",
    )

    b = sub.add_parser("bench", help="time training steps on synthetic data, print one JSON line")
    b.add_argument("config")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--data", action="store_true", help="time the data pipeline alone")
    b.add_argument("--workdir", default="runs/bench_data", help="--data: where data is prepared")
    b.add_argument(
        "--pairs", type=int, default=20_000, help="contrastive --data: photo variants to make"
    )
    b.add_argument("overrides", nargs="*")
    b.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)
    b.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of 3 steps")

    pl = sub.add_parser(
        "plan", help="compile the train step ahead of time: memory per device, FLOPs, fits?"
    )
    pl.add_argument("config")
    pl.add_argument("--devices", type=int, required=True, help="chips / GPUs to compile for")
    pl.add_argument(
        "--device",
        help="v4 | v5e | v5p | v6e (a TPU compile where libtpu is installed) | a100 | h100 | "
        "h200: the memory to fit in",
    )
    pl.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=64 train.batch_size=256")

    e = sub.add_parser("eval", help="held-out metrics of a checkpoint, on this machine's devices")
    e.add_argument("workdir")
    e.add_argument("--step", type=int, help="default: the newest checkpoint")
    e.add_argument(
        "--data",
        nargs="+",
        help="what to evaluate instead of the held-out split: text checkpoints: .txt .jsonl "
        ".parquet files, globs, prepared directories, tfds:NAME[:DATA_DIR]; contrastive "
        "checkpoints: labelled image sources (digits, tar:GLOB, tfds:NAME[:DATA_DIR]), zero-shot",
    )
    e.add_argument(
        "--classes",
        help="contrastive --data: class names, comma-separated or a file with one per line "
        "(default: the source's)",
    )
    e.add_argument(
        "--tasks",
        help="lm-evaluation-harness tasks, comma-separated (hellaswag,arc_easy,...): causal LM "
        "checkpoints; needs pip install 'jaxlm[eval]'",
    )
    e.add_argument("--num-fewshot", type=int, help="--tasks: examples in each prompt")
    e.add_argument("--limit", type=int, help="--tasks: at most this many documents per task")
    e.add_argument("--include-path", help="--tasks: a directory of local task YAML files")
    e.add_argument("--output", help="--tasks: where to write the harness's full results (JSON)")
    e.add_argument(
        "--batch-size", type=int, help="--data: rows per batch (default train's); --tasks: 8"
    )
    e.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=-1 mesh.data=1")
    e.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)

    g = sub.add_parser("generate", help="sample from a causal LM checkpoint (KV cache)")
    g.add_argument("workdir")
    g.add_argument("--step", type=int, help="default: the newest checkpoint")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="a text file, one prompt per line")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    g.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="one JSON line per prompt")
    g.add_argument("overrides", nargs="*", help="e.g. mesh.tensor=2")

    pt = sub.add_parser("plot", help="training curves of one or more runs -> a PNG")
    pt.add_argument("workdirs", nargs="+", help="jaxlm train workdirs (their metrics.jsonl)")
    pt.add_argument("--out", default="runs.png", help="the PNG to write")

    i = sub.add_parser("import", help="import foreign weights as a jaxlm checkpoint")
    isub = i.add_subparsers(dest="import_format", required=True)
    ib = isub.add_parser(
        "hf",
        aliases=["hf-bert"],
        help="a Hugging Face BERT, GPT-2 or Llama directory -> a step-0 checkpoint",
    )
    ib.add_argument(
        "src", help="directory with config.json, safetensors, tokenizer.json (BERT: vocab.txt)"
    )
    ib.add_argument("--out", required=True, help="workdir to write the step-0 checkpoint to")
    ib.add_argument("overrides", nargs="*", help="e.g. mesh.data=2 mesh.fsdp=4")

    x = sub.add_parser("export", help="export a checkpoint for another framework")
    xsub = x.add_subparsers(dest="export_format", required=True)
    xh = xsub.add_parser("hf", help="a BERT, GPT-2 or Llama checkpoint -> a Hugging Face directory")
    xh.add_argument("workdir")
    xh.add_argument("--out", required=True, help="directory to write")
    xh.add_argument("--step", type=int, default=None, help="default: the newest")

    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tokenizer_command", required=True)
    kt = ksub.add_parser("train", help="train a sentencepiece model")
    kt.add_argument("--input", nargs="+", required=True, help="text files or globs")
    kt.add_argument("--vocab-size", type=int, required=True)
    kt.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    kt.add_argument("--out", required=True, help="path of the .model file to write")

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser(
        "prepare",
        help="text -> tokenized ArrayRecord shards + manifest.json; --images: image-text pairs",
    )
    dp.add_argument(
        "inputs",
        nargs="*",
        help=".txt(.gz/.zst) .jsonl(.gz/.zst) .parquet files, "
        "globs or URLs, or tfds:NAME[:DATA_DIR]",
    )
    dp.add_argument(
        "--images",
        nargs="+",
        metavar="INPUT",
        help="image-text inputs instead: WebDataset .tar shards (globs, {00000..00099} ranges, "
        "gs://), .parquet files, tfds:NAME[:DATA_DIR] or digits",
    )
    dp.add_argument(
        "--tokenizer",
        help="text: sentencepiece .model, Hugging Face "
        "tokenizer.json, a prepared directory or a jaxlm workdir",
    )
    dp.add_argument("--out", required=True, help="output directory (local or gs://...)")
    dp.add_argument(
        "--seq-len",
        type=int,
        default=1024,
        help="text: the model's seq_len (rows hold seq_len + 1 tokens)",
    )
    dp.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes")
    dp.add_argument("--eval-fraction", type=float, default=0.01, help="text: documents held out")
    dp.add_argument(
        "--text-field",
        help="jsonl field / parquet column / tfds key (default: text; --images: caption)",
    )
    dp.add_argument(
        "--eval-count",
        type=float,
        default=10_000,
        help="--images: pairs held out (the first ones), or a fraction of them below 1",
    )
    dp.add_argument(
        "--image-size",
        type=int,
        default=0,
        help="--images: resize images whose shorter side is larger to this and re-encode as "
        "JPEG (0: keep every image as it is)",
    )
    dp.add_argument("--min-size", type=int, default=0, help="--images: skip smaller images")
    dp.add_argument("--image-field", default="image", help="--images: parquet image column")
    dp.add_argument("--classes", help="--images: a file of class names, one per line")
    return p
