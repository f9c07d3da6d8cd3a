"""Prepared image-text shards (`jaxlm data prepare --images`) and the contrastive batches read
from them: damaged inputs counted or named, reruns that finish the rest, resizing, mixtures,
and global batches that do not depend on the process count or the step a run resumed at."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import ROOT, load_tiny, sigint_as_in_a_terminal, tiny_overrides, xla_flags
from PIL import Image

from jaxlm import clip_data, images, tokenizer
from jaxlm import prepare_images as prep
from jaxlm.config import ConfigError


def photo(value: int, size: tuple[int, int] = (12, 12), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def pairs(first: int, n: int, fmt: str = "png", size=(12, 12)) -> dict[str, bytes]:
    out = {}
    for i in range(first, first + n):
        out[f"{i:05d}.{fmt}"] = photo(i, size, "JPEG" if fmt == "jpg" else "PNG")
        out[f"{i:05d}.txt"] = f"picture number {i}".encode()
    return out


def test_prepare_counts_and_names_what_it_skips_and_reruns_finish_the_rest(tmp_path):
    """A corrupt image, a pair without a caption, one without an image: counted by reason and
    named (file and member); an unreadable parquet file: named, left out; a truncated tar:
    the one fatal error, naming the file, and a rerun after replacing it prepares only it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    members = pairs(0, 20)
    members["00020.jpg"] = b"\xff\xd8 not a jpeg"
    members["00020.txt"] = b"a broken picture"
    members["00021.png"] = photo(21)  # no caption
    members["00022.txt"] = b"a caption without its image"
    write_tar(tmp_path / "shard-00000.tar", members)
    write_tar(tmp_path / "shard-00001.tar", pairs(100, 10))
    full = tmp_path / "full.tar"
    write_tar(full, pairs(200, 10))
    (tmp_path / "shard-00002.tar").write_bytes(full.read_bytes()[:3000])  # cut mid-member
    table = {  # Hugging Face datasets' image structs
        "image": [{"bytes": photo(300 + i), "path": None} for i in range(6)],
        "caption": [f"parquet picture {i}" for i in range(6)],
    }
    pq.write_table(pa.table(table), tmp_path / "hf.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")

    inputs = [str(tmp_path / "shard-{00000..00002}.tar"), str(tmp_path / "*.parquet")]
    out = tmp_path / "prepared"
    with pytest.raises(ConfigError, match=r"shard-00002.tar: truncated or damaged tar"):
        prep.prepare(inputs, str(out), workers=1, eval_count=4, progress=False)
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert done == ["shard-00000.json", "shard-00001.json"]  # kept for the rerun
    (tmp_path / "shard-00002.tar").write_bytes(full.read_bytes())
    before = (out / "shard-00000.json").stat().st_mtime_ns
    manifest = prep.prepare(inputs, str(out), workers=2, eval_count=4, progress=False)
    assert (out / "shard-00000.json").stat().st_mtime_ns == before  # not prepared again
    assert manifest["pairs"] == 20 + 10 + 10 + 6
    assert manifest["skipped"] == {
        "no_caption": 1,
        "no_image": 1,
        "undecodable": 1,
        "too_small": 0,
    }
    named = "\n".join(manifest["skipped_named"])
    assert "shard-00000.tar: 00020 (undecodable)" in named
    assert "shard-00000.tar: 00021 (no_caption)" in named
    assert "shard-00000.tar: 00022 (no_image)" in named
    assert (
        len(manifest["unreadable_files"]) == 1
        and "broken.parquet" in manifest["unreadable_files"][0]
    )
    assert manifest["held_out"]["pairs"] == 4 and manifest["train"]["pairs"] == 42
    source = clip_data.ImageSource(str(out))
    held = [images.decode_pair(r)["key"] for _, _, r in source.records("eval").get(range(4))]
    assert held == ["00000", "00001", "00002", "00003"]  # the first pairs in shard order
    first = images.decode_pair(source.records("train").get([0])[0][2])
    assert first["key"] == "00004" and first["caption"] == "picture number 4"
    assert first["image"] == photo(4)  # small images keep their bytes
    with pytest.raises(ConfigError, match=r"already being prepared|already prepared"):
        prep.prepare(inputs, str(out), eval_count=5, progress=False)


def test_image_size_resizes_larger_images_only(tmp_path):
    members = pairs(0, 3, "jpg", size=(64, 40)) | pairs(3, 2, "png", size=(16, 20))
    write_tar(tmp_path / "a.tar", members)
    out = prep.prepare(
        [str(tmp_path / "a.tar")], str(tmp_path / "p"), image_size=24, eval_count=1, progress=False
    )
    assert out["image_size"] == 24
    source = clip_data.ImageSource(str(tmp_path / "p"))
    records = source.records("train")
    got = [images.decode_pair(r) for _, _, r in records.get(range(len(records)))]
    sizes = {p["key"]: Image.open(io.BytesIO(p["image"])).size for p in got}
    assert sizes == {"00001": (38, 24), "00002": (38, 24), "00003": (16, 20), "00004": (16, 20)}
    assert Image.open(io.BytesIO(got[0]["image"])).format == "JPEG"


def test_global_batches_do_not_depend_on_processes_or_the_resume_step(tmp_path):
    """The contract of the text path: batch s of 2 processes (concatenated) equals batch s of
    one, pixels and tokens; a reader started at step s gives what one started at 0 gives at
    s; crops and captions are keyed by the pair's global index. Two entries mix by weight."""
    out = tmp_path / "p"
    write_tar(tmp_path / "a.tar", pairs(0, 30, size=(20, 16)))
    prep.prepare([str(tmp_path / "a.tar")], str(out), eval_count=2, progress=False)
    cfg = load_tiny(
        "clip",
        **{"clip.source": f"{out},digits", "data.weights": "0.5,0.5", "clip.random_crop": "true"},
    )
    tok = tokenizer.train([f"picture number {i}" for i in range(40)] + ["a handwritten seven"], 128)
    data = clip_data.ClipData(cfg, tok, tmp_path / "run")
    one = data.train_batches(0, 0, 1)
    whole = [next(one) for _ in range(6)]
    halves = [data.train_batches(0, p, 2) for p in (0, 1)]
    for batch in whole:
        split = [next(h) for h in halves]
        for k in ("images", "text", "text_segments"):
            np.testing.assert_array_equal(np.concatenate([s[k] for s in split]), batch[k])
    resumed = data.train_batches(4, 1, 2)
    np.testing.assert_array_equal(next(resumed)["images"], whole[4]["images"][4:])
    captions = {
        tok.decode(t[1 : s.sum() - 1])
        for b in whole
        for t, s in zip(b["text"], b["text_segments"], strict=True)
    }
    assert any("picture number" in c for c in captions) and any(
        "picture" not in c for c in captions
    )
    assert not np.array_equal(whole[0]["images"], whole[1]["images"])


def test_a_mixture_without_held_out_pairs_and_bad_entries_are_named(tmp_path, caplog):
    write_tar(tmp_path / "a.tar", pairs(0, 6))
    prep.prepare([str(tmp_path / "a.tar")], str(tmp_path / "none"), eval_count=0, progress=False)
    cfg = load_tiny("clip", **{"clip.source": str(tmp_path / "none")})
    tok = tokenizer.train([f"picture number {i}" for i in range(40)], 64)
    with pytest.raises(ConfigError, match=r"holds no held-out pairs"):
        clip_data.ClipData(cfg, tok, tmp_path / "run").eval_sets()
    # 6 pairs, batches of 8: a pair meets its own copy in a batch (said); 4 per batch: not
    assert "6 training pairs, but a batch takes about 8 of them" in caplog.text
    caplog.clear()
    clip_data.ClipData(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4)),
        tok,
        tmp_path / "run",
    )
    assert "training pairs, but a batch takes" not in caplog.text
    cfg = load_tiny("clip", **{"clip.source": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match=r"clip.source '.*nothing': not a prepared image-text"):
        clip_data.ClipData(cfg, tok, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data.weights=1.0: expected 2"):  # at load
        load_tiny("clip", **{"clip.source": f"{tmp_path / 'none'},digits", "data.weights": "1"})
    assert clip_data.source_entries("a/{x,y}.tar,b") == ["a/{x,y}.tar", "b"]
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["held_out"]["pairs"] == 0


def test_worker_processes_give_the_same_batches(tmp_path):
    """data.workers=2: decoding and cropping in Grain's worker processes (each opens its own
    readers), batches in the same order and with the same contents as the read threads'."""
    cfg = load_tiny("clip", **{"clip.random_crop": "true"})
    tok = tokenizer.train(["a handwritten seven", "the digit 3 written by hand"] * 20, 64)
    threads = clip_data.ClipData(cfg, tok, tmp_path / "run").train_batches(5)
    cfg = load_tiny("clip", **{"clip.random_crop": "true", "data.workers": 2})
    workers = clip_data.ClipData(cfg, tok, tmp_path / "run").train_batches(5)
    for _ in range(3):
        a, b = next(threads), next(workers)
        for k in ("images", "text", "text_segments"):
            np.testing.assert_array_equal(a[k], b[k])
    assert type(workers).__name__ != type(threads).__name__  # not the same path twice


def test_ctrl_c_with_worker_processes_saves_once_and_no_worker_complains(tmp_path):
    """Ctrl-C reaches the terminal's whole process group, Grain's worker processes too: the
    trainer saved and returned, and each worker printed a KeyboardInterrupt traceback. The
    workers now leave SIGINT to the trainer, which closes them when its loop ends."""
    overrides = tiny_overrides("clip", **{"data.workers": 2, "train.steps": 200})
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", str(ROOT / "configs/clip.py:tiny")]
    cmd += [*overrides, "--workdir", str(tmp_path / "run")]
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    with sigint_as_in_a_terminal():
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "step 3/200" in line:
            os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends it
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err[-3000:]
    assert re.search(r"preempted at step \d+: checkpoint saved in ", err), err[-3000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err[-3000:]


def test_zeroshot_on_a_separate_labelled_set_with_its_own_classes_and_templates(tmp_path):
    """clip.zeroshot names a labelled set apart from the training pairs: prepared at the first
    start with nothing held out (all its pairs), at most clip.zeroshot_images of them, class
    names and prompts from clip.classes / clip.templates files; batches carry labels and
    global indices, the last one wrapping round."""
    write_tar(tmp_path / "a.tar", pairs(0, 12))
    (tmp_path / "classes.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    (tmp_path / "templates.txt").write_text("a photo of {word}.\na drawing of {word}.\n")
    opts = {
        "clip.source": f"tar:{tmp_path}/a.tar",
        "data.eval_fraction": 0.25,
        "clip.zeroshot": "digits",
        "clip.zeroshot_images": 50,
        "clip.classes": str(tmp_path / "classes.txt"),
        "clip.templates": str(tmp_path / "templates.txt"),
    }
    tok = tokenizer.train([f"picture number {i}" for i in range(40)], 64)
    data = clip_data.ClipData(load_tiny("clip", **opts), tok, tmp_path / "run")
    z = data.zeroshot
    assert (z.n, z.split, z.names[3]) == (50, "train", "class 3")
    assert z.templates == ("a photo of {word}.", "a drawing of {word}.")
    assert z.source.manifest["pairs"] == 1797 and z.source.manifest["held_out"]["pairs"] == 0
    batches = data.zeroshot_batches()
    assert len(batches) == 7  # 50 images in global batches of 8
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(56))
    assert set(np.concatenate([b["labels"] for b in batches])) <= set(range(10))
    held = data.eval_sets()
    assert [s.name for s in held] == ["held_out"] and data.held_out_pairs("held_out") == 3
    bad = tmp_path / "two.txt"
    bad.write_text("zero\none\n")
    with pytest.raises(ConfigError, match=r"labels go up to 9, but 2 class names"):
        clip_data.ClipData(
            load_tiny("clip", **(opts | {"clip.classes": str(bad)})), tok, tmp_path / "run"
        )


def test_data_workers_outside_the_contrastive_objective_is_refused():
    with pytest.raises(ConfigError, match=r"data.workers=2: worker processes decode images"):
        load_tiny("gpt", **{"data.workers": 2})
    with pytest.raises(ConfigError, match=r"data.workers=-1"):
        load_tiny("clip", **{"data.workers": -1})


def test_class_members_of_a_tar_are_numbers_and_a_name_there_is_named(tmp_path):
    """A WebDataset `.cls` member is the class's index; one holding a word was reported as a
    truncated or damaged tar."""
    from jaxlm import image_inputs

    good = {"a.png": photo(1), "a.txt": b"one", "a.cls": b"3\n"}
    write_tar(tmp_path / "good.tar", good)
    (unit,), _ = image_inputs.plan_units([str(tmp_path / "good.tar")])
    (member,) = image_inputs.members(unit, "image", "caption")
    assert (member.caption, member.label) == ("one", 3)
    write_tar(tmp_path / "words.tar", {**good, "a.cls": b"dog"})
    (unit,), _ = image_inputs.plan_units([str(tmp_path / "words.tar")])
    with pytest.raises(ConfigError, match=r"words.tar: a.cls holds 'dog', not a class number") as e:
        list(image_inputs.members(unit, "image", "caption"))
    assert "damaged" not in str(e.value)


def test_parquet_captions_and_labels_of_the_wrong_kind_are_named(tmp_path):
    """A binary caption column is read as text (it raised a TypeError writing the record); a
    column of numbers given as the captions was stored as numbers, a 0 taken for a missing
    caption; a label that is a class name was stored as a name. The last two are errors
    naming the file and row, and nothing more is printed on the way out (an open ArrayRecord
    writer, unwound by the error, printed `terminate called` in 2 of 3 runs before it was
    closed in a `finally`)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxlm import image_inputs

    shots = [photo(i, (32, 32)) for i in range(4)]
    tables = {
        "bytes": {"image": shots, "caption": [f"photo {i}".encode() for i in range(4)]},
        "numbers": {"image": shots, "caption": list(range(4))},
        "names": {"image": shots, "caption": ["a"] * 4, "label": ["cat", "dog"] * 2},
    }
    for name, columns in tables.items():
        pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet")
    (unit,), _ = image_inputs.plan_units([str(tmp_path / "bytes.parquet")])
    assert [m.caption for m in image_inputs.members(unit, "image", "caption")] == [
        f"photo {i}" for i in range(4)
    ]
    said = {
        "numbers": r"numbers.parquet: row 0 of row group 0: its 'caption' field is 0 \(int\), "
        "not a caption",
        "names": r"names.parquet: row 0 of row group 0: its 'label' field is 'cat' \(str\), "
        "not a class number",
    }
    for name, why in said.items():
        argv = ["data", "prepare", "--images", str(tmp_path / f"{name}.parquet")]
        argv += ["--out", str(tmp_path / f"out_{name}"), "--eval-count", "0", "--workers", "1"]
        proc = subprocess.run(
            [sys.executable, "-m", "jaxlm.cli", *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(why, proc.stderr) and "terminate called" not in proc.stderr, proc.stderr
