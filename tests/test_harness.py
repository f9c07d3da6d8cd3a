"""lm-evaluation-harness on jaxlm checkpoints (`jaxlm eval --tasks`), the packed log-likelihood
scorer under it, and the multiple-choice accuracy of `train.eval_tasks` (the same scorer)."""

import json
import logging

import jax
import numpy as np
import pytest
from conftest import ROOT, load_tiny, read_metrics, xla_flags

from jaxlm import choices, cli, loglik, sharding
from jaxlm.evaluate import load
from jaxlm.plot import plot
from jaxlm.train import train

TASKS = str(ROOT / "jaxlm" / "tasks")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """As on this machine: nothing can be downloaded (the datasets library fails fast)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _requests(tok, n: int = 24) -> list[tuple[list[int], list[int]]]:
    """Requests of 2 to 14 tokens (the tiny model's rows are 32): the multiple-choice set's,
    cut, and one with an empty context."""
    s = choices.read_set("plays_next_line")
    reqs = [
        (c[-(1 + i % 7) :], x[: 1 + i % 6]) for i, (c, x) in enumerate(choices.requests(tok, s))
    ]
    return reqs[:n] + [loglik.encode_pair(tok, "", "No context.")]


def test_packed_scores_equal_one_request_per_row_and_the_model_itself(tiny_lm, monkeypatch):
    """Several requests a row (segment ids, positions from 0) score as each alone in a row,
    and as the model's own log-softmax over that request; the rows of a batch are split over
    the 8 devices."""
    loaded = load(tiny_lm, params_only=True)
    tok, params = loaded.tokenizer, loaded.params
    reqs = _requests(tok)
    packed = loglik.pack(reqs, loaded.cfg.model.seq_len)
    assert len(packed.rows["inputs"]) < len(reqs) / 2  # packed indeed
    scorer = loglik.Scorer(loaded.setup, tok.vocab_size, rows=8)
    placed = []
    from_full = sharding.from_full
    monkeypatch.setattr(
        loglik.sharding,
        "from_full",
        lambda b, mesh: placed.append(from_full(b, mesh)) or placed[-1],
    )
    together = scorer(params, reqs)
    alone = [scorer(params, [r])[0] for r in reqs]
    np.testing.assert_allclose([a for a, _ in together], [a for a, _ in alone], rtol=1e-5)
    assert [g for _, g in together] == [g for _, g in alone]
    shards = placed[0]["inputs"].addressable_shards
    assert scorer.rows == 8 and len({s.device for s in shards}) == 8
    assert len({s.index[0].start for s in shards}) == 8  # one row each, not copies

    # the model itself, one request unpacked: full logits, log-softmax, the continuation's sum
    model = loaded.setup.model(params)
    for (context, continuation), (got, greedy) in list(zip(reqs, together, strict=True))[:4]:
        whole = np.asarray(context + continuation)
        batch = {  # 8 copies: the batch axis is split over the 8 devices
            "inputs": np.repeat(whole[None, :-1], 8, 0),
            "positions": np.repeat(np.arange(len(whole) - 1)[None], 8, 0),
            "segment_ids": np.ones((8, len(whole) - 1), np.int32),
        }
        with jax.set_mesh(loaded.setup.mesh):
            logits = np.asarray(model(batch), np.float64)[0, -len(continuation) :]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        want = logp[np.arange(len(continuation)), continuation].sum()
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert greedy == bool((logits.argmax(-1) == continuation).all())


def test_shipped_tasks_through_the_harness(tiny_lm, capsys, tmp_path):
    """The three request types on the tiny model: one JSON line per task with its metrics and
    their standard errors; the harness's full results in --output (its directory made). An
    --output that is a directory is refused before the tasks run."""
    tasks = ["eval", str(tiny_lm), "--tasks", "plays_next_line,plays_passages,plays_complete_line"]
    argv = [*tasks, "--include-path", TASKS, "--limit", "6", "--output", str(tmp_path)]
    assert cli.main(argv) == 2
    assert f"--output {tmp_path}: a directory; name the JSON file" in capsys.readouterr().err
    out = tmp_path / "eval" / "results.json"
    argv[-1] = str(out)
    assert cli.main(argv) == 0
    lines = {r["task"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    mc, rolling, gen = (
        lines[t] for t in ("plays_next_line", "plays_passages", "plays_complete_line")
    )
    assert 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1 and "acc_stderr" in mc
    assert mc["samples"] == 6
    assert rolling["word_perplexity"] > 1 and rolling["byte_perplexity"] > 1
    assert rolling["bits_per_byte"] == pytest.approx(np.log2(rolling["byte_perplexity"]))
    assert 0 <= gen["exact_match"] <= 1
    full = json.loads(out.read_text())
    assert set(full["results"]) == set(lines) and len(full["samples"]["plays_next_line"]) == 6


def test_in_training_accuracy_equals_the_harness(tmp_path, capsys, caplog):
    """train.eval_tasks=plays_next_line logs eval_plays_next_line_acc / _acc_norm at each
    evaluation; the harness's multiple-choice task over the same file gives the same figures
    on the same checkpoint."""
    opts = {"train.steps": 2, "train.eval_every": 2, "train.eval_tasks": "plays_next_line"}
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**opts), tmp_path / "run")
    (record,) = [r for r in read_metrics(tmp_path / "run") if "eval_plays_next_line_acc" in r]
    assert record["step"] == 2 and "eval_plays_next_line_acc" in caplog.text
    assert read_metrics(tmp_path / "run")[0]["eval_plays_next_line_chance"] == 0.25
    drawn = plot([str(tmp_path / "run")], tmp_path / "plot.png")["accuracy"]
    assert "run eval_plays_next_line_acc" in drawn and "run eval_plays_next_line_acc_norm" in drawn
    assert "run eval_plays_next_line_chance (baseline)" in drawn
    argv = ["eval", str(tmp_path / "run"), "--tasks", "plays_next_line", "--include-path", TASKS]
    assert cli.main(argv) == 0
    harness = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert harness["samples"] == len(choices.read_set("plays_next_line").labels)
    assert harness["acc"] == pytest.approx(record["eval_plays_next_line_acc"], abs=1e-9)
    assert harness["acc_norm"] == pytest.approx(record["eval_plays_next_line_acc_norm"], abs=1e-9)


def test_what_cannot_be_evaluated_says_so_in_one_line(tiny_lm, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert cli.main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "--limit must be a positive number" in error(
        str(tiny_lm), "--tasks", "x", "--limit", "0"
    )
    assert "no task 'no_such_task'" in error(str(tiny_lm), "--tasks", "no_such_task")
    err = error(str(tiny_lm), "--tasks", "hellaswag")
    assert "task 'hellaswag' cannot be loaded" in err and "Rowan/hellaswag" in err
    bert = tmp_path / "bert"
    train(load_tiny("bert", **{"train.steps": 1}), bert)
    err = error(str(bert), "--tasks", "plays_next_line", "--include-path", TASKS)
    assert "needs a causal LM checkpoint" in err and "'mlm'" in err
    with pytest.raises(Exception, match="train.eval_tasks scores next tokens"):
        load_tiny("bert", **{"train.eval_tasks": "plays_next_line"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n')
    with pytest.raises(Exception, match=r"bad.jsonl line 1: answer 2 is not an index"):
        choices.read_set(str(bad))


def test_lm_evals_own_tasks_are_indexed_only_when_a_task_needs_them(tiny_lm, tmp_path, monkeypatch):
    """Indexing lm-eval's 14,686 tasks takes 25-40 s: the shipped tasks run on an index of
    their own; a local group of a shipped task and one of lm-eval's (arc_easy) falls back to
    the whole index, whose error names arc_easy's dataset (offline here)."""
    from lm_eval import tasks as lm_eval_tasks

    from jaxlm import harness
    from jaxlm.config import ConfigError

    built = []

    class Recorded(lm_eval_tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("include_defaults", True))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval_tasks, "TaskManager", Recorded)
    loaded = load(tiny_lm, params_only=True)
    (line,) = harness.evaluate_tasks(loaded, ["plays_next_line"], limit=2)
    assert line["task"] == "plays_next_line" and line["samples"] == 2
    assert built == [False]  # lm-eval's own tasks never indexed

    built.clear()
    (tmp_path / "group.yaml").write_text(
        "group: plays_and_arc\ntask:\n  - plays_next_line\n  - arc_easy\n"
    )
    with pytest.raises(ConfigError, match="plays_and_arc.*allenai/ai2_arc"):
        harness.evaluate_tasks(loaded, ["plays_and_arc"], limit=2, include_path=str(tmp_path))
    assert built == [False, True]


GOLDEN = ROOT / "tests" / "golden" / "harness_smollm2.json"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from gguf_to_hf import convert, smollm2_gguf

    from jaxlm.hf import import_hf

    tmp = tmp_path_factory.mktemp("smollm2_harness")
    import_hf(convert(smollm2_gguf(), tmp / "hf"), tmp / "workdir")
    return tmp / "workdir"


def test_smollm2_equals_the_harness_hf_backend(smollm2, tmp_path):
    """SmolLM2-135M imported into jaxlm, through jaxlm's harness model, against the harness's
    own Hugging Face backend on the same weights (tests/golden/make_harness_golden.py): the
    same metrics, every log-likelihood within 1e-4 relative, the same greedy generations."""
    golden = json.loads(GOLDEN.read_text())
    from jaxlm import harness

    tasks = list(golden["results"])
    out = tmp_path / "results.json"
    loaded = load(smollm2, params_only=True)
    harness.evaluate_tasks(loaded, tasks, limit=golden["limit"], output=str(out))
    got = json.loads(out.read_text())
    for task in tasks:
        want_samples = sorted(golden["requests"][task], key=lambda s: s["doc_id"])
        got_samples = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in got_samples] == [s["arguments"] for s in want_samples]
        for g, w in zip(got_samples, want_samples, strict=True):
            for gr, wr in zip(g["resps"], w["resps"], strict=True):
                if isinstance(wr[0], str):  # a generation
                    assert gr[0] == wr[0], (task, g["doc_id"])
                elif isinstance(wr[0], list):  # (log-likelihood, greedy)
                    np.testing.assert_allclose(float(gr[0][0]), float(wr[0][0]), rtol=1e-4)
                    assert bool(gr[0][1]) == bool(wr[0][1]), (task, g["doc_id"])
                else:  # a rolling log-likelihood
                    np.testing.assert_allclose(float(gr[0]), float(wr[0]), rtol=1e-4)
        for key, value in golden["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert got["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


def test_two_processes_give_the_metrics_of_one(tiny_lm, capsys):
    """`jaxlm eval --tasks ... --distributed` on 2 processes x 4 devices: every model call one
    step over both, process 0 prints; the same figures as 1 process x 8 devices."""
    import os
    import subprocess
    import sys

    import portpicker

    tasks = ["eval", str(tiny_lm), "--tasks", "plays_next_line,plays_passages,plays_complete_line"]
    tasks += ["--limit", "5"]
    assert cli.main(tasks) == 0
    want = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            XLA_FLAGS=xla_flags(4),
        )
        cmd = [sys.executable, "-m", "jaxlm.cli", *tasks, "--distributed"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    # process 0 reports (XLA's CPU collectives print Gloo's lines on both)
    got = [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]
    assert not [line for line in outs[1].splitlines() if line.startswith("{")]
    assert [g["task"] for g in got] == [w["task"] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-5), (w["task"], k)
            else:
                assert g[k] == w[k]
