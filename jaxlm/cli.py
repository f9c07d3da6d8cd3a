"""The `jaxlm` command: train, bench, eval, import hf-bert, tokenizer train."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from jaxlm.config import ConfigError

DISTRIBUTED_HELP = (
    "one process per host (jax.distributed): found automatically on TPU pods and under SLURM; "
    "elsewhere set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
)


def init_distributed() -> None:
    """Join JAX's multi-controller runtime before any device is touched."""
    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()  # TPU pod, SLURM, Open MPI: detected from the environment


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train or resume: jaxlm train configs/gpt.py:tiny")
    t.add_argument("config", help="CONFIG_FILE[:VARIANT]")
    t.add_argument("--workdir", help="checkpoints and metrics (default runs/<config>_<variant>)")
    t.add_argument("overrides", nargs="*", help="key.path=value")
    t.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)

    b = sub.add_parser("bench", help="time training steps on synthetic data, print one JSON line")
    b.add_argument("config")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("overrides", nargs="*")
    b.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)

    e = sub.add_parser("eval", help="held-out metrics of a checkpoint, on this machine's devices")
    e.add_argument("workdir")
    e.add_argument("--step", type=int, help="default: the newest checkpoint")
    e.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=-1 mesh.data=1")
    e.add_argument("--distributed", action="store_true", help=DISTRIBUTED_HELP)

    i = sub.add_parser("import", help="import foreign weights as a jaxlm checkpoint")
    isub = i.add_subparsers(dest="import_format", required=True)
    ib = isub.add_parser("hf-bert", help="a Hugging Face BERT directory -> mlm checkpoint")
    ib.add_argument("src", help="directory with config.json, model.safetensors, vocab.txt")
    ib.add_argument("--out", required=True, help="workdir to write the step-0 checkpoint to")
    ib.add_argument("overrides", nargs="*", help="e.g. mesh.data=2 mesh.fsdp=4")

    k = sub.add_parser("tokenizer", help="tokenizer tools")
    ksub = k.add_subparsers(dest="tokenizer_command", required=True)
    kt = ksub.add_parser("train", help="train a sentencepiece model")
    kt.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    kt.add_argument("--vocab-size", type=int, required=True)
    kt.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    kt.add_argument("--out", required=True, help="path of the .model file to write")
    return p


def _default_workdir(spec: str) -> Path:
    path, _, variant = spec.partition(":")
    return Path("runs") / f"{Path(path).stem}_{variant or 'default'}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`train CFG --workdir W a=1`); argparse
    # leaves the ones after an option unparsed, so collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = args.overrides + extra
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    for noisy in ("absl", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(
            f"jaxlm: error: out of device memory ({str(e).splitlines()[0][:200]}). Try "
            "model.remat=full with model.scan_layers=true, a smaller train.batch_size with "
            "train.grad_accum, or spread the parameters with mesh.fsdp",
            file=sys.stderr,
        )
        return 1


def _run(args: argparse.Namespace) -> int:
    from jaxlm import config

    if getattr(args, "distributed", False):
        init_distributed()

    if args.command == "train":
        from jaxlm.train import train

        cfg = config.load(args.config, args.overrides)
        workdir = Path(args.workdir) if args.workdir else _default_workdir(args.config)
        result = train(cfg, workdir)
        print(json.dumps({k: round(v, 4) for k, v in result.items() if isinstance(v, float)}))
    elif args.command == "bench":
        from jaxlm.bench import bench

        cfg = config.load(args.config, args.overrides)
        print(json.dumps(bench(cfg, args.steps)))
    elif args.command == "eval":
        from jaxlm.evaluate import evaluate_checkpoint

        print(json.dumps(evaluate_checkpoint(args.workdir, args.step, args.overrides)))
    elif args.command == "import":
        from jaxlm.hf import import_bert

        print(json.dumps(import_bert(args.src, args.out, args.overrides)))
    elif args.command == "tokenizer":
        from jaxlm import data, tokenizer

        docs = data.read_documents(
            data.corpus_files(tuple(args.input)), config.DataConfig().doc_chars
        )
        tok = tokenizer.train(docs, args.vocab_size, args.model_type)
        tok.save(args.out)
        print(f"wrote {args.out}: {tok.vocab_size} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
