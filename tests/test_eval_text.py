"""`jaxlm eval WORKDIR --data FILE`: loss, perplexity and bits per byte of any text."""

import json
import logging
import math
import shutil

import jax
import numpy as np
import pytest
from conftest import mounted, run_python

from jaxlm import cli, data
from jaxlm.evaluate import load, text_rows

# One document per jsonl line; non-ASCII letters make bytes differ from characters (the
# byte count is UTF-8's).
DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "Étienne: ça va, très bien.",
]
TEXT = "".join(json.dumps({"text": d}) + "\n" for d in DOCS)


def _direct(workdir) -> tuple[float, int]:
    """Summed next-token nats of each document on its own ([bos] tokens [eos]), computed
    from the model's full logits, and the number of targets."""
    loaded = load(workdir)
    tok, model = loaded.tokenizer, loaded.setup.model(loaded.params)
    nats, targets = 0.0, 0
    with jax.set_mesh(loaded.setup.mesh):
        for text in DOCS:
            ids = np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]])[None]
            assert ids.shape[1] <= loaded.cfg.model.seq_len + 1  # each fits one row
            t = ids.shape[1] - 1
            batch = {  # 8 copies: one row per device of the batch axes
                "inputs": np.repeat(ids[:, :-1], 8, 0),
                "positions": np.repeat(np.arange(t)[None], 8, 0),
                "segment_ids": np.ones((8, t), np.int32),
            }
            logp = jax.nn.log_softmax(np.asarray(model(batch), np.float64), -1)
            nats -= float(np.take_along_axis(logp[0], ids[0, 1:, None], -1).sum())
            targets += t
    return nats, targets


def test_eval_data_equals_the_direct_sum_on_8_and_1_devices(tiny_lm, tmp_path, capsys):
    path = tmp_path / "plays.jsonl"
    path.write_text(TEXT)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert n_bytes == len("".join(DOCS).encode()) and n_bytes > len("".join(DOCS))
    nats, targets = _direct(tiny_lm)

    def evaluate(batch_size: int) -> list[dict]:
        argv = ["eval", str(tiny_lm), "--data", str(path), "--batch-size", str(batch_size)]
        assert cli.main(argv) == 0
        return [json.loads(x) for x in capsys.readouterr().out.splitlines()]

    one, total = evaluate(8)
    assert one["data"] == str(path) and total["data"] == "total"
    for key in ("loss", "bits_per_byte", "tokens"):  # any batch size: padding rows count nothing
        assert evaluate(16)[0][key] == pytest.approx(one[key], rel=1e-6)
    assert one["tokens"] == targets and one["bytes"] == n_bytes
    assert one["loss"] == pytest.approx(nats / targets, rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(nats / targets), rel=1e-5)
    assert one["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)

    code = f"""
import json
from jaxlm.evaluate import load, evaluate_text
print(json.dumps(evaluate_text(load({str(tiny_lm)!r}, params_only=True), [{str(path)!r}], 1)))
"""
    proc = run_python(code, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(proc.stdout.splitlines()[-1])
    assert single[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_long_documents_are_cut_into_pieces_every_target_once():
    from jaxlm.lm import to_example

    docs = [np.arange(3) + 10, np.arange(9) + 20, np.arange(2) + 40]
    rows = text_rows(docs, 5, bos=1, eos=2, overlap=True)  # causal LM: rows of seq_len + 1
    np.testing.assert_array_equal(
        rows["tokens"],
        [
            [1, 10, 11, 12, 2],
            [1, 20, 21, 22, 23],
            [23, 24, 25, 26, 27],
            [27, 28, 2, 0, 0],
            [1, 40, 41, 2, 0],
        ],
    )
    assert to_example(rows)["weights"].sum() == 4 + 10 + 3  # each doc's tokens and [eos]
    rows = text_rows(docs, 4, bos=1, eos=2, overlap=False)  # masked LM: every token once
    np.testing.assert_array_equal(
        rows["tokens"],
        [
            [1, 10, 11, 12],
            [2, 0, 0, 0],
            [1, 20, 21, 22],
            [23, 24, 25, 26],
            [27, 28, 2, 0],
            [1, 40, 41, 2],
        ],
    )


def test_masked_lm_eval_data_is_seeded_and_batch_independent(tmp_path, capsys):
    from conftest import load_tiny

    from jaxlm.train import train

    train(load_tiny("bert", **{"train.steps": 2}), tmp_path / "bert")
    path = tmp_path / "plays.jsonl"
    path.write_text(TEXT * 4)

    def evaluate(*extra: str) -> dict:
        argv = ["eval", str(tmp_path / "bert"), "--data", str(path), *extra]
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])

    a, b = evaluate("--batch-size", "8"), evaluate("--batch-size", "16")
    assert set(a) == {"data", "loss", "accuracy", "perplexity", "tokens", "bytes"}
    assert 0 <= a["accuracy"] <= 1 and a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    assert a["tokens"] == b["tokens"] > 0  # the same masked positions in any batch
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["accuracy"] == pytest.approx(b["accuracy"], rel=1e-6)


def test_eval_data_names_an_empty_or_missing_input(tiny_lm, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli.main(["eval", str(tiny_lm), "--data", str(empty)]) == 2
    assert "no documents" in capsys.readouterr().err
    assert cli.main(["eval", str(tiny_lm), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_eval_data_takes_a_prepared_directory(tiny_lm, tmp_path, capsys):
    """Rows as prepared (documents end to end, both splits), each target scored once: equal to
    the direct sum over those rows, whatever the batch size."""
    path = tmp_path / "plays.jsonl"
    path.write_text(TEXT * 3)
    loaded = load(tiny_lm)
    seq_len = str(loaded.cfg.model.seq_len)
    prep = tmp_path / "prepared"
    argv = ["data", "prepare", str(path), "--tokenizer", str(tiny_lm), "--out", str(prep)]
    assert cli.main([*argv, "--seq-len", seq_len, "--eval-fraction", "0.3"]) == 0
    capsys.readouterr()

    def evaluate(batch_size: int) -> dict:
        argv = ["eval", str(tiny_lm), "--data", str(prep), "--batch-size", str(batch_size)]
        assert cli.main(argv) == 0
        return json.loads(capsys.readouterr().out.splitlines()[0])

    got = evaluate(8)
    # Read back without jaxlm's readers: every record of both splits, int32 tokens then
    # uint16 segment ids; positions and target weights computed here from the segments.
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = json.loads((prep / "manifest.json").read_text())
    width = manifest["row_length"]
    records = [
        r
        for split in ("train", "eval")
        for shard in manifest["shards"]
        if shard[split]["rows"]
        for r in ArrayRecordReader(str(prep / shard[split]["file"])).read_all()
    ]
    assert all(any(sh[s]["rows"] for sh in manifest["shards"]) for s in ("train", "eval"))
    tokens = np.stack([np.frombuffer(r[: 4 * width], "<i4") for r in records])
    segments = np.stack([np.frombuffer(r[4 * width :], "<u2") for r in records]).astype(int)
    tok = loaded.tokenizer
    # the rows hold exactly the documents, tokenized on their own, three times each
    stream = tokens[segments > 0]
    docs = np.split(stream, np.flatnonzero(stream == tok.bos_id)[1:])
    want = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in DOCS] * 3
    assert sorted(map(list, docs)) == sorted(map(list, want))
    positions = np.zeros_like(segments)
    for r in range(len(segments)):
        for i in range(1, width):
            same = segments[r, i] == segments[r, i - 1]
            positions[r, i] = positions[r, i - 1] + 1 if same else 0
    weights = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] > 0)
    pad = -len(tokens) % 8
    example = {
        "inputs": tokens[:, :-1],
        "positions": positions[:, :-1],
        "segment_ids": segments[:, :-1],
    }
    example = {k: np.pad(v, ((0, pad), (0, 0))).astype(np.int32) for k, v in example.items()}
    with jax.set_mesh(loaded.setup.mesh):
        logits = np.asarray(loaded.setup.model(loaded.params)(example), np.float64)[: len(tokens)]
    logp = np.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    nats = -float((logp * weights).sum())
    assert got["tokens"] == weights.sum() > 0
    assert got["loss"] == pytest.approx(nats / got["tokens"], rel=1e-5)
    assert got["bytes"] == 3 * sum(len(d.encode()) for d in DOCS)
    assert evaluate(16)["loss"] == pytest.approx(got["loss"], rel=1e-6)


def test_a_checkpoint_on_a_read_only_share_is_evaluated_with_its_data_prepared_elsewhere(
    tiny_lm, tmp_path, monkeypatch, capsys, caplog
):
    """A checkpoint copied without its prepared data onto a read-only mount (a shared
    filesystem, a bucket mounted read-only): `jaxlm eval` prepared its held-out data into
    WORKDIR/prepared and raised EROFS. Now it prepares into the local cache, and the metrics
    are those of the workdir it came from."""
    assert cli.main(["eval", str(tiny_lm)]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm / "checkpoints", copy / "checkpoints")
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    read_only = [["--bind", str(copy)], ["-o", "remount,bind,ro"]]
    with mounted(tmp_path / "share", *read_only) as share, caplog.at_level(logging.INFO):
        assert cli.main(["eval", str(share)]) == 0
        assert sorted(p.name for p in share.iterdir()) == ["checkpoints"]  # nothing written
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == expected
    assert f"{share} is read-only: data is prepared into {tmp_path / 'cache'}" in caplog.text
