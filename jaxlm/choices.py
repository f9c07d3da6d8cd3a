"""Multiple-choice accuracy during training: `train.eval_tasks=FILE[,FILE...]`.

A set is a jsonl file in HellaSwag's layout (`ctx`, `endings`, `label`) or a generic one
(`context`, `choices`, `answer`); a bare name (`plays_next_line`) is one of the sets shipped in
jaxlm/tasks/. At every evaluation each choice is scored as lm-evaluation-harness scores a
multiple-choice request, by the same code as `jaxlm eval --tasks` (jaxlm.loglik): the choice
follows the context after a space (the harness's target delimiter), or directly where the
context ends in whitespace (as the shipped tasks' YAML says). `eval_<name>_acc`: the choice
of highest log-likelihood is the answer; `eval_<name>_acc_norm`: the highest per character
of the choice, the harness's acc_norm. No harness is needed in the training loop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from etils import epath

from jaxlm import loglik
from jaxlm.config import ConfigError

SHIPPED = Path(__file__).resolve().parent / "tasks"


@dataclasses.dataclass
class ChoiceSet:
    name: str
    contexts: list[str]
    choices: list[list[str]]
    labels: list[int]


def resolve(entry: str) -> str:
    """A file as given, else a set shipped with jaxlm by its name."""
    if epath.Path(entry).exists():
        return entry
    shipped = SHIPPED / f"{entry}.jsonl"
    if "/" not in entry and shipped.exists():
        return str(shipped)
    names = sorted(p.stem for p in SHIPPED.glob("*.jsonl"))
    raise ConfigError(f"train.eval_tasks: no file {entry!r} (shipped sets: {', '.join(names)})")


def read_set(entry: str) -> ChoiceSet:
    path = resolve(entry)
    out = ChoiceSet(Path(path).name.removesuffix(".jsonl"), [], [], [])
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"train.eval_tasks: {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from None
        if {"ctx", "endings", "label"} <= row.keys():
            context, choices, label = row["ctx"], row["endings"], row["label"]
        elif {"context", "choices", "answer"} <= row.keys():
            context, choices, label = row["context"], row["choices"], row["answer"]
        else:
            raise ConfigError(
                f"{where}: expected keys ctx, endings, label (HellaSwag) or context, choices, "
                f"answer; got {sorted(row)}"
            )
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{where}: needs a list of at least 2 choices, got {choices!r}")
        label = int(label)
        if not 0 <= label < len(choices):
            raise ConfigError(
                f"{where}: answer {label} is not an index of its {len(choices)} choices"
            )
        out.contexts.append(str(context))
        out.choices.append([str(c) for c in choices])
        out.labels.append(label)
    if not out.labels:
        raise ConfigError(f"train.eval_tasks: {path} holds no question")
    return out


def requests(tok, s: ChoiceSet) -> list[tuple[list[int], list[int]]]:
    """Every choice of every question as a (context ids, continuation ids) request."""
    out = []
    for context, choices in zip(s.contexts, s.choices, strict=True):
        delimiter = "" if context[-1:].isspace() else " "
        out += [loglik.encode_pair(tok, context, delimiter + c) for c in choices]
    return out


def accuracy(s: ChoiceSet, lls: list[float]) -> dict[str, float]:
    """acc and acc_norm (per character of the choice, as the harness) of one set's scores."""
    acc, norm, i = [], [], 0
    for choices, label in zip(s.choices, s.labels, strict=True):
        ll = np.asarray(lls[i : i + len(choices)])
        i += len(choices)
        acc.append(int(np.argmax(ll)) == label)
        norm.append(int(np.argmax(ll / np.asarray([len(c) for c in choices]))) == label)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm))}


class EvalTasks:
    """The sets of train.eval_tasks, tokenized once, scored at each evaluation."""

    def __init__(self, entries: tuple[str, ...] | list[str], tok, rows: int = 8):
        self.sets = [read_set(e) for e in entries]
        self.requests = [requests(tok, s) for s in self.sets]
        self.vocab_size, self.rows = tok.vocab_size, rows
        self._scorer: loglik.Scorer | None = None

    def chance(self) -> dict[str, float]:
        """What guessing scores on each set: the mean of 1 / its number of choices."""
        return {
            f"eval_{s.name}_chance": float(np.mean([1 / len(c) for c in s.choices]))
            for s in self.sets
        }

    def metrics(self, setup, params) -> dict[str, float]:
        if self._scorer is None:
            self._scorer = loglik.Scorer(setup, self.vocab_size, self.rows)
        out = {}
        for s, reqs in zip(self.sets, self.requests, strict=True):
            lls = [ll for ll, _ in self._scorer(params, reqs)]
            out |= {f"eval_{s.name}_{k}": v for k, v in accuracy(s, lls).items()}
        return out
