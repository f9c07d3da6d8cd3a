"""lm-evaluation-harness on a jaxlm checkpoint: `jaxlm eval WORKDIR --tasks hellaswag,...`.

`JaxlmLM` is the harness's model (registered as `jaxlm`) over a loaded causal LM, on whatever
mesh it was loaded onto. It follows the harness's Hugging Face backend request by request, so
that the two agree (tests/test_harness.py holds it to golden figures of that backend):
- loglikelihood: the harness's own tokenization (TemplateLM), scored by jaxlm.loglik (several
  requests a row, sharded over the mesh);
- loglikelihood_rolling: a document in the harness's disjoint windows of the model's length,
  every token scored once, the windows packed the same way;
- generate_until: jaxlm.generate's KV-cache decoding, greedy or sampled as the request says,
  cut at the first stop string (the request's `until` and the end-of-text token).
Every process runs the same harness and the same requests; each model call is one SPMD step
over all of them (a model sharded over a pod cannot score requests apart), and process 0
reports. lm-eval is an optional extra: `pip install 'jaxlm[eval]'`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

from jaxlm import loglik
from jaxlm.config import ConfigError

log = logging.getLogger("jaxlm")

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the command says how to get it; importing jaxlm never needs it
    raise ConfigError(
        "jaxlm eval --tasks needs lm-evaluation-harness: pip install 'jaxlm[eval]'"
    ) from e


@register_model("jaxlm")
class JaxlmLM(TemplateLM):
    backend = "causal"

    def __init__(
        self,
        loaded=None,
        workdir: str | None = None,
        batch_size: int = 8,
        max_length: int = 0,
        max_gen_toks: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        if loaded is None:  # `lm_eval --model jaxlm --model_args workdir=...`
            from jaxlm.evaluate import load

            loaded = load(workdir, params_only=True)
        loglik.require_causal(loaded.cfg.objective, "jaxlm eval --tasks")
        self.loaded, self.tok = loaded, loaded.tokenizer
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self._max_length = int(max_length) or loaded.cfg.model.seq_len
        self.scorer = loglik.Scorer(
            loaded.setup, self.tok.vocab_size, int(batch_size), self._max_length
        )
        self.requests = {"loglikelihood": 0, "rolling_windows": 0, "generate_until": 0}

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("device", None)
        return cls(**(args | extra))

    # -- what TemplateLM needs -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # the harness's HF backend: bos where there is one

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        if add_special_tokens is False:
            return [int(i) for i in self.tok.encode(string)]
        return loglik.tok_encode(self.tok, string)

    def tok_decode(self, ids) -> str:
        special = set(int(i) for i in self.tok.special_ids())
        return self.tok.decode([int(i) for i in ids if int(i) not in special])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        self.requests["loglikelihood"] += len(requests)
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self.scorer(self.loaded.params, pairs)

    # -- the other two request types ---------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        self.requests["rolling_windows"] += len(windows)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.scorer(self.loaded.params, windows), strict=True):
            totals[i] += logp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (
            handle_stop_sequences,
            normalize_gen_kwargs,
            postprocess_generated_text,
        )

        from jaxlm.generate import Sampling, generate_ids

        self.requests["generate_until"] += len(requests)
        eos = self.tok.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ConfigError(
                    f"a task asks for {max_new} generated tokens; the model's length is "
                    f"{self.max_length}"
                )
            sampling = Sampling(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            room = self.max_length - max_new
            prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in indices]
            order = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))
            rows = self.scorer.rows
            for start in range(0, len(order), rows):
                chunk = order[start : start + rows]
                tokens = generate_ids(
                    self.loaded,
                    [prompts[j] for j in chunk],
                    max_new,
                    sampling,
                    seed=self.seed + start,
                    rows=rows,
                )
                for j, ids in zip(chunk, tokens, strict=True):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[indices[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[indices[j]].args, text)
        return out


def task_metrics(results: dict) -> list[dict]:
    """One dict per task: its metrics by name (`acc`, `acc_norm`, `word_perplexity`, ...; a
    filter other than the default one appended as `name/filter`), with their standard
    errors as `<name>_stderr`, and the number of documents scored."""
    out = []
    for task, values in results["results"].items():
        row: dict[str, Any] = {"task": task}
        for key, value in values.items():
            if "," not in key:
                continue
            name, filt = key.split(",", 1)
            name = name if filt == "none" else f"{name}/{filt}"
            if isinstance(value, int | float) and not (
                isinstance(value, float) and math.isnan(value)
            ):
                row[name] = value
        row["samples"] = results.get("n-samples", {}).get(task, {}).get("effective")
        out.append(row)
    return out


def _check_tasks(names: list[str], manager) -> None:
    """Each task loads (its config and its data) before any is run: a task that cannot fails
    with one line naming it and, where it must be downloaded, its dataset."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--tasks: no task {name!r} (lm-eval {_version()}; local tasks come with "
                "--include-path DIR)"
            )
        try:
            manager.load([name])
        except Exception as e:  # the datasets library's errors vary by version and cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            dataset = _dataset_of(manager, name)
            where = f" (its dataset: {dataset})" if dataset and dataset not in first else ""
            raise ConfigError(f"--tasks: task {name!r} cannot be loaded{where}: {first}") from e


def _task_manager(tasks: list[str], paths: list[str]):
    """lm-eval's index of the tasks, checked. Indexing all of lm-eval's own (14,686 names)
    takes 25-40 s here, so the shipped tasks and --include-path's are indexed first, alone,
    and lm-eval's own only when a task is not among them (or needs one of them: a local group
    of lm-eval's tasks)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=paths, include_defaults=False)
    if set(tasks) <= set(local.all_tasks):
        try:
            _check_tasks(tasks, local)
            return local
        except ConfigError as e:
            log.info("%s; indexing lm-eval's own tasks too", e)
    manager = TaskManager(include_path=paths)
    _check_tasks(tasks, manager)
    return manager


def _dataset_of(manager, name: str) -> str | None:
    """The `dataset_path` of a task's YAML, for the error that names it."""
    entry = manager.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if not path or not os.path.isfile(path):
        return None
    found = re.search(r"^dataset_path:\s*(\S+)", open(path).read(), re.MULTILINE)
    return found.group(1) if found else None


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def evaluate_tasks(
    loaded,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    output: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Run lm_eval.simple_evaluate with JaxlmLM on `loaded`; returns task_metrics of it and
    writes the harness's full results (JSON) to `output` (process 0)."""
    import lm_eval

    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of documents per task, got {limit}")
    if not tasks:
        raise ConfigError("--tasks: no task named")
    if include_path and not os.path.isdir(include_path):
        raise ConfigError(f"--include-path {include_path}: not a directory of task YAML files")
    from jaxlm.choices import SHIPPED

    logging.getLogger("lm_eval.api.task").addFilter(_quiet)
    model = JaxlmLM(loaded, batch_size=batch_size, seed=seed)  # a wrong checkpoint fails first
    manager = _task_manager(tasks, [str(SHIPPED)] + ([include_path] if include_path else []))
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=None,
        fewshot_random_seed=seed,
        log_samples=output is not None,
    )
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{v} {k}" for k, v in model.requests.items() if v)
    log.info("harness: %s in %.1f s", counts or "no requests", seconds)
    if output and jax.process_index() == 0:
        from etils import epath

        path = epath.Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=_plain))
    return task_metrics(results)


def _quiet(record: logging.LogRecord) -> bool:
    """Drops the harness's advice on custom_dataset kwargs (the shipped tasks' loader takes
    none), printed for each task at each load."""
    return "Custom kwargs can be passed" not in record.getMessage()


def _plain(x: Any) -> Any:
    """What json cannot write by itself in the harness's results."""
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    return str(x)
