"""The `jaxlm` command: train, bench, plan, eval, generate, plot, data prepare, import hf,
export hf, tokenizer train."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from jaxlm import cli_args, failures
from jaxlm.config import ConfigError

if TYPE_CHECKING:
    from jaxlm.tokenizer import AnyTokenizer


def _prepare(args: argparse.Namespace) -> None:
    """`jaxlm data prepare`: text inputs with a tokenizer, or --images."""
    from jaxlm.checks import output_directory

    output_directory(args.out, "--out")
    if args.workers < 1:
        raise ConfigError(
            f"--workers must be at least 1 (1: no worker processes), got {args.workers}"
        )
    if args.images:
        from jaxlm import prepare_images

        if args.inputs:
            raise ConfigError(f"give either text inputs or --images, not both ({args.inputs})")
        manifest = prepare_images.prepare(
            args.images,
            args.out,
            image_size=args.image_size,
            workers=args.workers,
            eval_count=args.eval_count,
            image_field=args.image_field,
            text_field=args.text_field or "caption",
            classes_file=args.classes,
            min_size=args.min_size,
        )
        summary = {k: manifest[k] for k in ("pairs", "bytes", "held_out", "skipped")}
        print(json.dumps({"out": args.out, **summary, "shards": len(manifest["shards"])}))
        return
    from jaxlm import prepare

    if not args.inputs or not args.tokenizer:
        raise ConfigError("jaxlm data prepare: text inputs need --tokenizer (or give --images)")
    tok = load_tokenizer(args.tokenizer)
    manifest = prepare.prepare(
        args.inputs,
        tok,
        args.out,
        args.seq_len,
        workers=args.workers,
        eval_fraction=args.eval_fraction,
        text_field=args.text_field or "text",
    )
    summary = {k: manifest[k] for k in ("documents", "tokens", "bytes", "row_length")}
    print(json.dumps({"out": args.out, **summary, "shards": len(manifest["shards"])}))


def load_tokenizer(spec: str) -> AnyTokenizer:
    """--tokenizer: a sentencepiece .model, a Hugging Face tokenizer.json, a prepared
    directory or a jaxlm workdir (its newest checkpoint's tokenizer)."""
    from etils import epath

    from jaxlm import tokenizer

    path = epath.Path(spec)
    if path.is_dir():
        if (path / tokenizer.JAXLM_TOKENIZER).is_file():
            return tokenizer.load(path / tokenizer.JAXLM_TOKENIZER)
        if (path / "tokenizer.json").is_file():
            return tokenizer.load(path / "tokenizer.json")
        from jaxlm.checkpoint import Checkpointer
        from jaxlm.config import CheckpointConfig

        ckpt = Checkpointer(spec, CheckpointConfig(async_save=False), create=False)
        steps = ckpt.steps()
        if not steps:
            raise ConfigError(
                f"--tokenizer {spec!r}: a directory with no checkpoint and no tokenizer"
            )
        return ckpt.restore_meta(steps[0])[1]
    return tokenizer.load(spec)


def _generate(args: argparse.Namespace) -> None:
    """Completions to stdout (or JSON lines); the rate goes to the log, on stderr."""
    from jaxlm.evaluate import load
    from jaxlm.generate import Sampling, generate

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path}: no such file")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    loaded = load(args.workdir, args.step, args.overrides, params_only=True)
    for r in generate(loaded, prompts, args.max_new_tokens, sampling, args.seed):
        print(json.dumps(r) if args.json else r["prompt"] + r["completion"], flush=True)


def _classes(given: str | None) -> list[str] | None:
    """--classes: a file with one name per line, or names separated by commas."""
    if not given:
        return None
    path = Path(given)
    names = path.read_text().splitlines() if path.is_file() else given.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"--classes {given!r}: no class names")
    return names


def _train_config(args: argparse.Namespace):
    """(config, workdir) of `jaxlm train`: CONFIG is a config file, or a workdir whose newest
    checkpoint's config is the base (the --init-from source's by default); overrides on top.
    A run from --init-from needs a --workdir of its own."""
    from jaxlm import config
    from jaxlm.checkpoint import parse_source, stored, workdir_path

    if args.config and "=" in args.config:  # an override, CONFIG left out
        args.overrides, args.config = [args.config, *args.overrides], None
    spec = args.config or (args.init_from and parse_source(args.init_from)[0])
    if not spec:
        raise ConfigError("train: give a CONFIG (configs/gpt.py:tiny) or --init-from WORKDIR")
    if args.init_from and not args.workdir:
        raise ConfigError("--init-from needs a --workdir for the new run")
    source = args.init_from and workdir_path(parse_source(args.init_from)[0])
    if source and workdir_path(args.workdir) == source:
        raise ConfigError(f"--workdir {args.workdir} is the --init-from source: use a new one")
    if ".py" in spec or not (Path(spec).is_dir() or "://" in spec):
        cfg = config.load(spec, args.overrides)
    else:
        ckpt, _, cfg, _ = stored(*parse_source(spec), f"train {spec}: ")
        ckpt.close()
        cfg = config.override(cfg, list(args.overrides))
    return cfg, args.workdir or str(_default_workdir(spec))


def _default_workdir(spec: str) -> Path:
    path, _, variant = spec.partition(":")
    return Path("runs") / f"{Path(path).stem}_{variant or 'default'}"


def main(argv: list[str] | None = None) -> int:
    parser = cli_args.parser(__doc__)
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
    failures.quiet_libraries()
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and returns)
        print("jaxlm: interrupted", file=sys.stderr)
        if getattr(args, "distributed", False):
            _leave_now(130)
        return 130  # the shell's status for SIGINT
    except Exception as e:
        rc = failures.said(e, sys.argv[1:] if argv is None else argv)
        if not getattr(args, "distributed", False):
            if rc is None:
                raise
            return rc
        if rc is None:
            traceback.print_exc()
        from jaxlm.sharding import raised_together

        if raised_together(e):  # every process leaves now, through the shutdown barrier
            return rc or 1
        _leave_now(rc or 1)


def _leave_now(rc: int) -> NoReturn:
    """End a process of a multi-process job at once, skipping jax.distributed's shutdown.
    A normal exit waits in the shutdown barrier for the other processes, which wait in the
    step's collectives for this one: all stay alive until the barrier's 5-minute timeout,
    then abort. Gone, this process stops its heartbeats, and JAX's coordination service ends
    the others with an error naming it (after --heartbeat-timeout seconds; at once when this
    is process 0, which hosts the service). A checkpoint being written is left incomplete,
    which a restore skips."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def _run(args: argparse.Namespace) -> int:
    from jaxlm import config

    if getattr(args, "distributed", False):
        from jaxlm import distributed

        distributed.init(getattr(args, "heartbeat_timeout", 100))

    if getattr(args, "profile", None):  # jax.profiler would raise at the trace's end
        from jaxlm.checks import output_directory

        output_directory(args.profile, "--profile")

    if args.command == "train":
        from jaxlm.train import train

        cfg, workdir = _train_config(args)
        result = train(cfg, workdir, args.profile, args.init_from)
        # five significant digits, not decimals: a decayed lr (3e-05) must not print as 0.0
        print(json.dumps({k: float(f"{v:.5g}") for k, v in result.items() if isinstance(v, float)}))
    elif args.command == "bench":
        from jaxlm.bench import bench, bench_data

        if args.steps <= 0:
            raise ConfigError(f"bench: --steps must be a positive number, got {args.steps}")
        cfg = config.load(args.config, args.overrides)
        if args.data and cfg.objective == "clip":
            from jaxlm.bench_images import bench_image_data

            for line in bench_image_data(cfg, args.steps, args.workdir, args.pairs):
                print(json.dumps(line), flush=True)
        elif args.data:
            print(json.dumps(bench_data(cfg, args.steps, args.workdir)))
        else:
            print(json.dumps(bench(cfg, args.steps, profile=args.profile)))
    elif args.command == "plan":
        from jaxlm import plan

        if args.device not in plan.TPU_KINDS or not plan.libtpu_installed():
            plan.use_fake_cpus(args.devices)  # before JAX touches a device
        cfg = config.load(args.config, args.overrides)
        print(json.dumps(plan.plan(cfg, args.devices, args.device)))
    elif args.command == "eval":
        _eval(args)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "plot":
        from jaxlm.plot import plot

        drawn = plot(args.workdirs, args.out)
        print(json.dumps({"out": str(args.out), "lines": sum(len(v) for v in drawn.values())}))
    elif args.command == "import":
        from jaxlm.hf import import_hf

        print(json.dumps(import_hf(args.src, args.out, args.overrides)))
    elif args.command == "export":
        from jaxlm.hf import export_hf

        print(json.dumps(export_hf(args.workdir, args.out, args.step)))
    elif args.command == "tokenizer":
        from jaxlm import data, tokenizer

        if Path(args.out).exists():  # before the minutes of training, and never over a file
            raise ConfigError(f"tokenizer train --out {args.out}: exists; choose a new path")
        texts = data.sample_texts(config.DataConfig(files=tuple(args.input)), "--input")
        tok = tokenizer.train(texts, args.vocab_size, args.model_type, key="--vocab-size")
        tok.save(args.out)
        print(f"wrote {args.out}: {tok.vocab_size} tokens")
    elif args.command == "data":
        _prepare(args)
    return 0


def _eval(args: argparse.Namespace) -> None:
    from jaxlm.evaluate import evaluate_checkpoint, evaluate_images, evaluate_text, load

    if args.tasks and args.data:
        raise ConfigError("eval: --tasks or --data, not both")
    if not args.tasks and any(
        v is not None for v in (args.num_fewshot, args.limit, args.include_path, args.output)
    ):
        raise ConfigError("--num-fewshot, --limit, --include-path and --output go with --tasks")
    if args.tasks:
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit must be a positive number of documents, got {args.limit}")
        from etils import epath

        if args.output and epath.Path(args.output).is_dir():  # found before the tasks run
            raise ConfigError(f"--output {args.output}: a directory; name the JSON file to write")
        from jaxlm import harness  # lm-eval is an optional extra: a clear error before loading

        loaded = load(args.workdir, args.step, args.overrides, params_only=True)
        lines = harness.evaluate_tasks(
            loaded,
            [t.strip() for t in args.tasks.split(",") if t.strip()],
            args.num_fewshot,
            args.limit,
            args.batch_size or 8,
            args.include_path,
            args.output,
        )
    elif args.data:
        loaded = load(args.workdir, args.step, args.overrides, params_only=True)
        if loaded.cfg.objective == "clip":
            classes = _classes(args.classes)
            lines = evaluate_images(loaded, args.data, classes, args.batch_size, args.workdir)
        elif args.classes:
            raise ConfigError("--classes is for contrastive checkpoints (zero-shot)")
        else:
            lines = evaluate_text(loaded, args.data, args.batch_size)
    else:
        lines = [evaluate_checkpoint(args.workdir, args.step, args.overrides)]
    import jax

    if jax.process_index() == 0:
        for line in lines:
            print(json.dumps(line))


if __name__ == "__main__":
    sys.exit(main())
