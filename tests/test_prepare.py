"""Prepared token shards: every input format, resumable preparation, mixtures, any host count,
and damaged shards or a foreign tokenizer named in the error."""

import bz2
import contextlib
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import zstandard
from conftest import ROOT, load_tiny, mounted, sigint_as_in_a_terminal

from jaxlm import cli, inputs, lm, markers, mlm, prepare, tokenizer
from jaxlm.config import ConfigError
from jaxlm.train import train

PLAYS = sorted((ROOT / "jaxlm/corpus").glob("*.txt"))


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train([p.read_text() for p in PLAYS[:3]], 512)


def _documents(play: int = 0, n: int = 200) -> list[str]:
    lines = PLAYS[play].read_text().splitlines(keepends=True)
    return list(inputs.paragraph_documents(lines, doc_chars=600))[:n]


def _write(path, docs: list[str]) -> str:
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=64)
    else:
        path.write_bytes(lines)
    return str(path)


def _rows(out, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(out / shard[split]["file"]))
        if reader.num_records():
            tokens, segments = prepare.decode_rows(reader.read_all(), manifest["row_length"])
            rows += zip(tokens, segments, strict=True)
    return rows


def _decoded_documents(out, tok) -> list[str]:
    """The documents of the train split, read back from the packed rows in order."""
    stream = np.concatenate([t[s > 0] for t, s in _rows(out)])
    starts = np.flatnonzero(stream == tok.bos_id)
    return [tok.decode(d[1:-1]) for d in np.split(stream, starts[1:])]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "docs.parquet"])
def test_every_format_keeps_every_document(tmp_path, tok, name):
    docs = _documents()
    out = tmp_path / "out"
    m = prepare.prepare([_write(tmp_path / name, docs)], tok, str(out), 64, eval_fraction=0.1)
    assert m["documents"] == len(docs)
    assert m["bytes"] == sum(len(d.encode()) for d in docs)
    assert m["tokens"] == sum(len(tok.encode(d)) + 2 for d in docs)
    assert m["row_length"] == 65 and m["tokenizer_fingerprint"] == tokenizer.fingerprint(tok)
    assert 0 < m["held_out"]["documents"] < len(docs) * 0.2
    expected = {tok.decode(tok.encode(d)) for d in docs}
    got = _decoded_documents(out, tok)
    assert len(got) == m["train"]["documents"] and set(got) <= expected
    counts = np.load(out / "token_counts.npy")
    assert counts.sum() == m["train"]["tokens"]


def test_compressed_text_is_read_and_text_that_is_not_text_is_refused(tmp_path, tok):
    """A play as .txt, .txt.gz and .txt.zst gives the same documents. A compressed file or an
    archive under a plain name, or binary data, read as UTF-8 with errors replaced would train
    the tokenizer and model on noise: refused, naming the file, with no shard of it written,
    in `jaxlm data prepare` and in `jaxlm train` with raw data.files."""
    text = PLAYS[0].read_bytes()
    plain = tmp_path / "play.txt"
    plain.write_bytes(text)
    (tmp_path / "play.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "play.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    docs = {}
    for name in ("play.txt", "play.txt.gz", "play.txt.zst"):
        (unit,) = inputs.plan_units([str(tmp_path / name)], unit_bytes=len(text) + 1)
        docs[name] = list(inputs.documents(unit))
    assert len(docs["play.txt"]) > 20
    assert docs["play.txt.gz"] == docs["play.txt"] == docs["play.txt.zst"]

    (tmp_path / "play.gz").write_bytes(gzip.compress(text))
    (tmp_path / "play.md").write_bytes(zstandard.ZstdCompressor().compress(text))
    with zipfile.ZipFile(tmp_path / "plays.jsonl", "w") as z:  # an archive under a text name
        z.writestr("play.txt", text)
    (tmp_path / "play.txt.bz2").write_bytes(bz2.compress(text))
    (tmp_path / "utf16.txt").write_bytes(text[:3000].decode().encode("utf-16"))
    refused = {
        "play.gz": r"play.gz: gzip-compressed, not text \(read as txt by its name\)",
        "play.md": r"play.md: zstd-compressed, not text",
        "plays.jsonl": r"plays.jsonl: a zip archive, not text \(read as jsonl by its name\)",
        "play.txt.bz2": r"play.txt.bz2: bzip2-compressed, not text \(read as txt by its name\)",
        "utf16.txt": r"utf16.txt: binary data \(a NUL byte in its first 4,096 bytes\)",
    }
    for name, why in refused.items():
        out = tmp_path / f"out_{name}"
        with pytest.raises(ConfigError, match=why):
            prepare.prepare([str(plain), str(tmp_path / name)], tok, str(out), 64)
        assert (out / "train-00000.array_record").exists()  # the play's unit
        assert not (out / "train-00001.array_record").exists(), name
    inputs.check_text("notes.txt", b"BZh is how a bzip2 file begins, and so does this text")
    with pytest.raises(ConfigError, match=refused["play.gz"]):
        train(_cfg("gpt", [str(tmp_path / "play.gz")]), tmp_path / "run")


def test_a_record_whose_text_is_not_a_string_is_named(tmp_path, tok):
    """A null, a number or a list where the text field should be: an error naming the file and
    record (sentencepiece's TypeError named neither), never a document made of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = {"null": "null", "42": r"42 \(int\)", '["a", "b"]': r"\['a', 'b'\] \(list\)"}
    for k, (value, said) in enumerate(shown.items()):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(f'{{"text": "a play"}}\n\n{{"text": {value}}}\n')
        where = rf"bad{k}.jsonl: line 3 of the unit at byte 0"
        with pytest.raises(ConfigError, match=rf"{where}: its 'text' field is {said}, not a str"):
            prepare.prepare([str(path)], tok, str(tmp_path / f"out{k}"), 64)
    pq.write_table(pa.table({"text": ["one", None, "three"]}), tmp_path / "gap.parquet")
    (unit,) = inputs.plan_units([str(tmp_path / "gap.parquet")])
    with pytest.raises(ConfigError, match=r"gap.parquet: row 1 of row group 0: its 'text' field"):
        list(inputs.documents(unit))
    # a binary column of UTF-8 text is read as its text; bytes that are not UTF-8 are named
    binary = pa.table({"text": pa.array(["één".encode(), b"two"], pa.binary())})
    pq.write_table(binary, tmp_path / "binary.parquet")
    (unit,) = inputs.plan_units([str(tmp_path / "binary.parquet")])
    assert list(inputs.documents(unit)) == ["één", "two"]
    pq.write_table(pa.table({"text": pa.array([b"\xff\xfe"], pa.binary())}), tmp_path / "b.parquet")
    (unit,) = inputs.plan_units([str(tmp_path / "b.parquet")])
    with pytest.raises(ConfigError, match=r"row 0 of row group 0: its 'text' field is bytes, not"):
        list(inputs.documents(unit))


def test_units_split_files_at_record_boundaries(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(inputs, "UNIT_BYTES", 20_000)
    docs = _documents(n=400)
    src = _write(tmp_path / "docs.jsonl", docs)
    assert len(inputs.plan_units([src])) > 5
    m = prepare.prepare([src], tok, str(tmp_path / "out"), 64, eval_fraction=0.0)
    assert m["documents"] == len(docs) and len(m["shards"]) > 5
    got = sorted(_decoded_documents(tmp_path / "out", tok))
    assert got == sorted(tok.decode(tok.encode(d)) for d in docs)
    # .txt: paragraphs never cut in two, none lost or repeated.
    text = PLAYS[1].read_text()
    (tmp_path / "play.txt").write_text(text)
    whole = list(
        inputs.documents(inputs.Unit(str(tmp_path / "play.txt"), "txt", 0, len(text.encode())))
    )
    units = inputs.plan_units([str(tmp_path / "play.txt")])
    pieces = [d for u in units for d in inputs.documents(u)]
    assert len(units) > 3
    assert [p for d in pieces for p in d.split("\n\n")] == [
        p for d in whole for p in d.split("\n\n")
    ]


def test_rerun_prepares_only_the_missing_shards(tmp_path, tok, monkeypatch, caplog):
    monkeypatch.setattr(inputs, "UNIT_BYTES", 30_000)
    src = _write(tmp_path / "docs.jsonl", _documents(n=300))
    out = tmp_path / "out"
    first = prepare.prepare([src], tok, str(out), 64, workers=2)  # spawned worker processes
    n = len(first["shards"])
    assert n >= 3
    kept = (out / "train-00000.array_record").stat().st_mtime_ns
    for f in ("manifest.json", "shard-00001.json", "train-00001.array_record"):
        (out / f).unlink()  # as if interrupted while writing shard 1
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        again = prepare.prepare([src], tok, str(out), 64, workers=2)
    assert f"{n - 1} of {n} shards already done" in caplog.text
    assert again == first
    assert (out / "train-00000.array_record").stat().st_mtime_ns == kept
    other = tokenizer.train([PLAYS[5].read_text()], 300)
    # finished, then asked for with other settings: an error naming what differs, never the
    # old manifest
    with pytest.raises(ConfigError, match=r"already prepared from other .*row_length: 65 there"):
        prepare.prepare([src], tok, str(out), 128)
    with pytest.raises(ConfigError, match=r"already being prepared .*tokenizer_fingerprint: "):
        (out / "manifest.json").unlink()
        prepare.prepare([src], other, str(out), 64)


def test_a_restart_with_other_files_or_settings_never_reads_the_old_rows(tok, tmp_path):
    """Text files are prepared into a directory keyed by what preparation depends on: a run
    restarted (before its first checkpoint) with another play, seq_len or seed reads rows of
    that, exactly as in a fresh workdir; the same settings reuse the directory."""

    def eval_rows(workdir, play: int, **extra):
        cfg = load_tiny(**{"data.files": str(PLAYS[play]), "train.eval_steps": 3, **extra})
        dataset = lm.load_data(cfg, tok, workdir)
        (held_out,) = dataset.eval_sets()
        return dataset, np.concatenate([b["inputs"] for b in held_out.batches])

    run = tmp_path / "run"
    first, first_rows = eval_rows(run, 0)
    again, again_rows = eval_rows(run, 0)
    assert again.sources[0].path == first.sources[0].path  # reused
    np.testing.assert_array_equal(again_rows, first_rows)
    changes = [(1, {}), (0, {"model.seq_len": 16}), (0, {"train.seed": 3})]
    for i, (play, extra) in enumerate(changes):
        other, rows = eval_rows(run, play, **extra)
        _, fresh = eval_rows(tmp_path / f"fresh{i}", play, **extra)
        assert other.sources[0].path != first.sources[0].path, extra
        np.testing.assert_array_equal(rows, fresh)


@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("prepared")
    dirs = []
    for play in (0, 1):
        src = _write(root / f"play{play}.jsonl", _documents(play, n=400))
        prepare.prepare([src], tok, str(root / f"p{play}"), 32, eval_fraction=0.05)
        dirs.append(str(root / f"p{play}"))
    return dirs


def _cfg(objective, files, **extra):
    return load_tiny(objective, **{"data.files": ",".join(files), **extra})


def test_mixture_follows_the_weights(two_dirs, tok, tmp_path):
    first = {t.tobytes() for t, _ in _rows(ROOT / two_dirs[0])}
    cfg = _cfg("gpt", two_dirs, **{"data.weights": "0.7,0.3", "train.batch_size": 40})
    batches = lm.load_data(cfg, tok, tmp_path).train_batches(0)
    from_first = total = 0
    for _ in range(150):  # 6,000 rows
        b = next(batches)
        for ins, targets in zip(b["inputs"], b["targets"], strict=True):
            row = np.concatenate([ins, targets[-1:]])
            from_first += row.tobytes() in first
            total += 1
    assert abs(from_first / total - 0.7) < 0.02, from_first / total
    default = lm.load_data(_cfg("gpt", two_dirs), tok, tmp_path).weights
    tokens = [
        json.loads((ROOT / d / "manifest.json").read_text())["train"]["tokens"] for d in two_dirs
    ]
    np.testing.assert_allclose(default, np.asarray(tokens) / sum(tokens))


def test_a_zero_weight_entry_is_left_out_of_the_mixture(two_dirs, tok, tmp_path, caplog):
    second = {t.tobytes() for t, _ in _rows(ROOT / two_dirs[1])}
    cfg = _cfg("gpt", two_dirs, **{"data.weights": "1,0", "train.batch_size": 40})
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        batches = lm.load_data(cfg, tok, tmp_path).train_batches(0)
    rows = []
    assert f"{two_dirs[1]} has weight 0: not trained on" in caplog.text
    for _ in range(10):
        b = next(batches)
        for ins, targets in zip(b["inputs"], b["targets"], strict=True):
            rows.append(np.concatenate([ins, targets[-1:]]).tobytes())
    assert len(rows) == 400 and not any(r in second for r in rows)


def _local_batches(dataset, start, steps, n):
    """The global batches start..start+steps-1 as n processes would read them, joined."""
    its = [dataset.train_batches(start, p, n) for p in range(n)]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


# The contrastive objective's: tests/test_images.py.
@pytest.mark.parametrize("objective", ["gpt", "bert"])
def test_global_batches_do_not_depend_on_the_process_count(two_dirs, tok, tmp_path, objective):
    module = {"gpt": lm, "bert": mlm}[objective]
    cfg = _cfg(objective, two_dirs, **{"train.batch_size": 8})
    dataset = module.load_data(cfg, tok, tmp_path)
    straight = _local_batches(dataset, 0, 6, 1)[3:]
    for n in (1, 2, 4):
        for a, b in zip(_local_batches(dataset, 3, 3, n), straight, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    # Not the same rows twice: host p's random stream is its own (masking).
    first = straight[0]
    assert not np.array_equal(first["inputs"][:4], first["inputs"][4:])


def test_foreign_tokenizer_and_damaged_shards_are_named(two_dirs, tok, tmp_path):
    other = tokenizer.train([PLAYS[6].read_text()], 512)
    other.save(tmp_path / "other.model")
    manifest = f"{two_dirs[0]}/manifest.json"
    with pytest.raises(ConfigError, match=f"{manifest}: prepared with another tokenizer"):
        lm.load_data(_cfg("gpt", two_dirs[:1]), other, tmp_path)
    with pytest.raises(ConfigError, match=r"rows of 33 tokens .* prepare again with --seq-len 64"):
        lm.load_data(_cfg("gpt", two_dirs[:1], **{"model.seq_len": 64}), tok, tmp_path)

    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(two_dirs[0], damaged)
    shard = damaged / "train-00000.array_record"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = b"\xff" * 64  # same size, garbage inside
    shard.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=f"prepared shard {shard} is damaged"):
        batches = lm.load_data(_cfg("gpt", [str(damaged)]), tok, tmp_path).train_batches(0)
        for _ in range(200):
            next(batches)
    shard.write_bytes(bytes(raw[:-100]))  # truncated: found on first read, not at start-up
    batches = lm.load_data(_cfg("gpt", [str(damaged)]), tok, tmp_path).train_batches(0)
    with pytest.raises(ConfigError, match=f"prepared shard {shard} is damaged or missing"):
        next(batches)


def test_training_reads_the_prepared_directory_and_its_tokenizer(two_dirs, tmp_path):
    cfg = _cfg("gpt", two_dirs[:1], **{"train.steps": 2})
    result = train(cfg, tmp_path)
    assert result["eval_loss"] > 0 and result["eval_unigram_loss"] > 0
    assert not (tmp_path / "prepared").exists()  # nothing prepared again
    # The tokenizer is the one the directory was prepared with.
    from jaxlm.evaluate import load

    want = json.loads((ROOT / two_dirs[0] / "manifest.json").read_text())["tokenizer_fingerprint"]
    assert tokenizer.fingerprint(load(tmp_path).tokenizer) == want
    # --tokenizer WORKDIR: the checkpoint's tokenizer.
    assert tokenizer.fingerprint(cli.load_tokenizer(str(tmp_path))) == want


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"])
    hf.train_from_iterator([PLAYS[0].read_text()], trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = cli.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.bos_id == tok.eos_id == hf.token_to_id("<|endoftext|>")
    docs = _documents(n=50)
    m = prepare.prepare([_write(tmp_path / "d.jsonl", docs)], tok, str(tmp_path / "out"), 32)
    assert m["tokens"] == sum(len(hf.encode(d).ids) + 2 for d in docs)
    assert m["tokenizer_fingerprint"] == tokenizer.fingerprint(tokenizer.from_dict(tok.to_dict()))


def test_mlm_reads_lm_prepared_rows_with_its_own_specials(two_dirs, tok, tmp_path):
    cfg = _cfg("bert", two_dirs[:1], **{"train.batch_size": 64})
    batches = mlm.load_data(cfg, tok, tmp_path).train_batches(0)
    inputs = np.concatenate([next(batches)["inputs"] for _ in range(4)])
    assert inputs.shape == (256, cfg.model.seq_len)
    assert (inputs == tok.piece_id("[CLS]")).sum() > 10 and not (inputs == tok.bos_id).any()


def test_tfds_input_and_globs(tmp_path, tok, monkeypatch):
    from tfds_digits import JaxlmTinyDigits

    builder = JaxlmTinyDigits(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(file_format="array_record")
    spec = f"tfds:jaxlm_tiny_digits:{tmp_path / 'tfds'}"
    m = prepare.prepare([spec], tok, str(tmp_path / "out"), 32, text_field="caption")
    captions = [r["caption"].decode() for r in builder.as_data_source()["train"]]
    assert m["documents"] == 300 and m["bytes"] == sum(len(c.encode()) for c in captions)
    with pytest.raises(ConfigError, match="record 0 has no field 'text'"):
        prepare.prepare([spec], tok, str(tmp_path / "out2"), 32)
    with pytest.raises(ConfigError, match=r"record 0: its 'label' field is \d+ \(int\), not a"):
        prepare.prepare([spec], tok, str(tmp_path / "out3"), 32, text_field="label")

    for name in ("a.jsonl", "b.jsonl", "c.txt"):
        _write(tmp_path / name, _documents(n=3))
    absolute = inputs.expand(str(tmp_path / "*.jsonl"))
    monkeypatch.chdir(tmp_path)
    assert inputs.expand("*.jsonl") == ["a.jsonl", "b.jsonl"]
    assert absolute == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_a_directory_without_held_out_rows_trains_with_eval_steps_0(tok, tmp_path):
    src = _write(tmp_path / "play.jsonl", _documents(n=200))
    out = tmp_path / "no_eval"
    manifest = prepare.prepare([src], tok, str(out), 32, eval_fraction=0.0, progress=False)
    assert manifest["held_out"]["rows"] == 0
    result = train(_cfg("gpt", [str(out)], **{"train.steps": 2, "train.eval_steps": 0}), tmp_path)
    assert result["loss"] > 0 and not any(k.startswith("eval_") for k in result)
    with pytest.raises(
        ConfigError,
        match=rf"train.eval_steps=2, but no data.files entry has held-out rows \({out}: 0 of "
        r"200 documents held out at fraction 0\): hold more out .* or set train.eval_steps=0",
    ):
        train(_cfg("gpt", [str(out)], **{"train.steps": 2}), tmp_path / "with_eval")
    # a text file of 3 documents prepared at the first start: each held out with probability
    # data.eval_fraction (0.02), none was
    few = _write(tmp_path / "few.jsonl", _documents(n=3))
    why = rf"{few} \(prepared in .*\): 0 of 3 documents held out at fraction 0.02\)"
    with pytest.raises(ConfigError, match=why):
        train(_cfg("gpt", [few], **{"train.steps": 2, "data.eval_fraction": 0.02}), tmp_path / "f")


def test_a_mixture_is_evaluated_on_each_entry_and_weighted(two_dirs, tmp_path):
    """eval_loss/<entry> on each entry's own held-out rows (equal to evaluating a checkpoint
    on that entry alone), and eval_loss weighted as the mixture is; plot draws them."""
    from jaxlm.evaluate import evaluate_checkpoint
    from jaxlm.plot import plot

    cfg = _cfg("gpt", two_dirs, **{"data.weights": "0.25,0.75", "train.steps": 2})
    result = train(cfg, tmp_path / "run")
    first, second = (f"eval_loss/{p.rsplit('/', 1)[1]}" for p in two_dirs)
    assert result["eval_loss"] == pytest.approx(
        0.25 * result[first] + 0.75 * result[second], rel=1e-6
    )
    for key, entry in ((first, two_dirs[0]), (second, two_dirs[1])):
        alone = evaluate_checkpoint(
            tmp_path / "run", overrides=[f"data.files={entry}", "data.weights="]
        )
        assert alone["eval_loss"] == pytest.approx(result[key], rel=1e-5), key
    assert result[first] != pytest.approx(result[second], rel=1e-3)
    drawn = plot([str(tmp_path / "run")], tmp_path / "runs.png")
    assert f"run {second}" in drawn["loss"]


def test_start_up_on_prepared_text_reads_no_corpus_and_stats_no_shard(tmp_path, monkeypatch, tok):
    from etils import epath

    from jaxlm import shards

    cfg = _cfg("gpt", [str(PLAYS[0])])
    lm.load_data(cfg, tok, tmp_path)  # prepares WORKDIR/prepared/<key> once

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read at start-up")

    path_class = type(epath.Path(str(tmp_path)))
    stat, shard_stats = path_class.stat, []

    def counting_stat(self):
        if str(self).endswith(".array_record"):
            shard_stats.append(str(self))
        return stat(self)

    monkeypatch.setattr(inputs, "documents", no_reading)
    monkeypatch.setattr(inputs, "_lines", no_reading)
    monkeypatch.setattr(path_class, "stat", counting_stat)
    dataset = lm.load_data(cfg, tok, tmp_path)
    tables = [*dataset.shards("train"), *dataset.shards("eval")]  # what start-up builds
    assert shard_stats == [] and all(isinstance(t, shards.Shards) for t in tables)
    tables[0].read(np.arange(2))  # reading opens (and checks) the shard it reads
    assert len(shard_stats) == 1


def test_a_text_without_blank_lines_is_cut_into_units_and_documents(tmp_path, monkeypatch):
    """A .txt of one record a line and no blank line was one paragraph: one unit (the other
    units' boundaries ran to the end of the file), one document the size of the file, held
    in memory whole. Now units cut at a line end when no blank line comes within
    PARAGRAPH_SCAN bytes, and documents at about DOC_CHARS: every line kept once, in order."""
    monkeypatch.setattr(inputs, "PARAGRAPH_SCAN", 1000)
    lines = [f"record {i}: " + "word " * 16 + "\n" for i in range(2000)]  # 186 kB
    path = tmp_path / "records.txt"
    path.write_text("".join(lines))
    units = inputs.plan_units([str(path)], unit_bytes=20_000)
    per_unit = [list(inputs.documents(u)) for u in units]
    assert len(units) == 10 and all(per_unit), [len(d) for d in per_unit]
    docs = [d for unit in per_unit for d in unit]
    assert max(len(d) for d in docs) <= inputs.DOC_CHARS + len(lines[0])
    assert "\n".join(docs) == "".join(lines).rstrip("\n")


def test_paragraphs_are_streamed_not_materialised():
    def lines():
        yield from ["one\n", "\n", "two\n", "\n"] * 2000  # 16 KB of paragraphs, then trouble
        raise RuntimeError("read past what the first document needed")

    first = next(inputs.paragraph_documents(lines(), doc_chars=20))
    assert first.startswith("one\n\ntwo")


def test_ctrl_c_stops_a_preparation_in_one_line_and_the_rerun_goes_on(tmp_path, tok):
    """Ctrl-C reaches the terminal's whole process group, the spawned workers too: each
    printed its own KeyboardInterrupt traceback, under the main process's, after the
    progress bar's unfinished line. Now the workers ignore it, the main process ends them
    and says `jaxlm: interrupted` on a line of its own, exit status 130; the finished shards
    stay and the rerun prepares only the rest."""
    corpus = tmp_path / "plays.txt"
    corpus.write_text("\n\n".join(p.read_text() for p in PLAYS))  # 4.6 MB
    inputs_ = []
    for i in range(8):  # 8 names for it: 8 work units, a few seconds on 2 cores
        (tmp_path / f"copy{i}.txt").symlink_to(corpus)
        inputs_.append(str(tmp_path / f"copy{i}.txt"))
    tok.save(tmp_path / "tok.model")
    out = tmp_path / "out"
    argv = ["data", "prepare", *inputs_, "--tokenizer", str(tmp_path / "tok.model")]
    argv += ["--out", str(out), "--workers", "2"]
    cmd = [sys.executable, "-m", "jaxlm.cli", *argv]
    with sigint_as_in_a_terminal():
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    while not list(out.glob("shard-*.json")) and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-3000:]
    assert err.endswith("\njaxlm: interrupted\n"), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    done = len(list(out.glob("shard-*.json")))
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    total = json.loads(rerun.stdout.strip().splitlines()[-1])["shards"]
    assert 0 < done < total
    assert f"{done} of {total} shards already done" in rerun.stderr


def test_a_marker_is_never_left_cut_short_and_a_damaged_one_is_redone(tmp_path, tok):
    """The files that say by existing that work is done (a shard's stats, the manifest) are
    written under a temporary name and renamed: on a full disk (a real tmpfs) the write
    fails and leaves no marker, where writing in place left an empty one that every later
    run tripped on (`JSONDecodeError`). One cut short anyway (by an older jaxlm) is done
    again: the shard prepared again, the manifest rebuilt, equal to the first."""
    with mounted(tmp_path / "disk", ["-t", "tmpfs", "-o", "size=1m", "tmpfs"]) as disk:
        with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:  # until the disk is full
                f.write(bytes(4096))
        os.truncate(disk / "filler", (disk / "filler").stat().st_size - (8 << 10))
        with pytest.raises(OSError, match="No space left on device"):
            markers.write_json(disk / "shard-00000.json", {"rows": "x" * (64 << 10)})
        assert [p.name for p in disk.iterdir()] == ["filler"]  # nor its temporary file
    out = tmp_path / "out"
    src = _write(tmp_path / "docs.jsonl", _documents(n=300))
    first = prepare.prepare([src], tok, str(out), 64)
    (out / "shard-00000.json").write_text("")  # as an older jaxlm could leave them
    (out / "manifest.json").write_text('{"format": "jaxlm.prep')
    assert not markers.finished(out)
    assert prepare.prepare([src], tok, str(out), 64) == first
    assert markers.finished(out)
