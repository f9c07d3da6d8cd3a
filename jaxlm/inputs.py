"""Text inputs of `jaxlm data prepare` and of raw `data.files`: which files an entry names,
how they are cut into work units, and the documents of a unit.

Kinds: `.txt` / `.txt.gz` / `.txt.zst` (blank-line separated paragraphs grouped into
documents of about DOC_CHARS, a longer paragraph cut at a line end; a file of any other name
is read as `.txt`),
`.jsonl` / `.jsonl.gz` / `.jsonl.zst` (one JSON object per line, its `text_field`),
`.parquet` (the `text_field` column), and `tfds:NAME[:DATA_DIR]` (read with
`tfds.data_source`, no TensorFlow). Paths, globs and URLs go through etils.epath, so
`gs://bucket/*.jsonl` works like a local glob.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import itertools
import json
import os
import re
from collections.abc import Iterator

from etils import epath

from jaxlm.config import ConfigError

UNIT_BYTES = 64 << 20  # text per work unit (and shard) of an uncompressed input
TFDS_UNIT = 100_000  # records per work unit of a TFDS input
DOC_CHARS = 4096  # .txt inputs: blank-line separated paragraphs grouped into ~this many chars
# .txt inputs: how far a unit's boundary looks for a blank line before it cuts at a line end
PARAGRAPH_SCAN = 1 << 20
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
COMPRESSED = (".gz", ".zst")  # one work unit a file: no seeking into the stream
# the first bytes of compressed and archive files, which a plain-text read would decode to noise
MAGIC = {
    rb"\x1f\x8b": "gzip-compressed",
    rb"\x28\xb5\x2f\xfd": "zstd-compressed",
    rb"BZh[1-9]1AY&SY": "bzip2-compressed",  # "BZh" alone could begin a text
    rb"\xfd7zXZ\x00": "xz-compressed",
    rb"PK\x03\x04": "a zip archive",
    rb"7z\xbc\xaf\x27\x1c": "a 7z archive",
}
SNIFF_BYTES = 4096


def is_remote(path: str) -> bool:
    return "://" in str(path)


def braces(pattern: str) -> list[str]:
    """Brace ranges and lists as WebDataset and OpenCLIP read them: `shard-{00000..00099}.tar`
    (zero-padded as written), `{train,extra}-*.tar`; nested and repeated braces expand too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        lo, hi = r.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in braces(head + item + tail)]


def expand(entry: str) -> list[str]:
    """A path, URL or glob (absolute, relative or `gs://...`, with brace ranges) -> the files
    it names, sorted."""
    if "{" in entry:
        return sorted({f for part in braces(entry) for f in expand(part)})
    if not any(c in entry for c in "*?["):
        return [entry]
    if is_remote(entry):
        scheme, rest = entry.split("://", 1)
        root, _, pattern = rest.partition("/")
        return sorted(str(p) for p in epath.Path(f"{scheme}://{root}").glob(pattern))
    return sorted(glob.glob(entry))


def kind_of(path: str) -> str:
    if path.startswith("tfds:"):
        return "tfds"
    for suffix in sorted(TEXT_SUFFIXES, key=len, reverse=True):  # .jsonl.gz before .jsonl
        if path.endswith(suffix):
            return suffix[1:]
    return "txt"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work item, one shard: [start, stop) in bytes (txt, jsonl), row groups (parquet)
    or records (tfds); a compressed file is one unit."""

    path: str
    kind: str
    start: int
    stop: int


def plan_units(inputs: list[str], unit_bytes: int | None = None) -> list[Unit]:
    unit_bytes, units = unit_bytes or UNIT_BYTES, []
    for entry in inputs:
        paths = [entry] if entry.startswith("tfds:") else expand(entry)
        if not paths:
            raise ConfigError(f"input {entry!r} matches no file")
        for path in paths:
            kind = kind_of(path)
            if kind == "tfds":
                n = len(_tfds_source(path))
                units += [
                    Unit(path, kind, s, min(s + TFDS_UNIT, n)) for s in range(0, n, TFDS_UNIT)
                ]
                continue
            p = epath.Path(path)
            if not p.is_file():
                raise ConfigError(f"input file {path!r} not found")
            if kind == "parquet":
                import pyarrow.parquet as pq

                with p.open("rb") as f:
                    n = pq.ParquetFile(f).num_row_groups
                units += [Unit(path, kind, g, g + 1) for g in range(n)]
            elif kind.endswith(COMPRESSED):
                units.append(Unit(path, kind, 0, -1))
            else:
                size = p.stat().length
                starts = range(0, max(size, 1), unit_bytes)
                units += [Unit(path, kind, s, min(s + unit_bytes, size)) for s in starts]
    return units


def _boundary(f, pos: int, paragraphs: bool) -> int:
    """The first record start at or after pos: after the next newline (jsonl) or the next
    blank line (txt, whose documents are paragraphs), or, where no blank line comes within
    PARAGRAPH_SCAN bytes, the line end past them: a file of lines with no blank line between
    them is still cut into units (it was one unit, read by one worker). Units split at the
    same boundaries: each is a function of pos alone."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    f.readline()
    if paragraphs:
        start = f.tell()
        while f.tell() - start < PARAGRAPH_SCAN and (line := f.readline()) and line.strip():
            pass
    return f.tell()


def _lines(unit: Unit) -> Iterator[str]:
    raw = epath.Path(unit.path).open("rb")
    with raw:
        if unit.kind.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif unit.kind.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            if unit.start == 0:  # a file's first unit: is it text at all?
                check_text(unit.path, raw.read(SNIFF_BYTES))
            paragraphs = unit.kind == "txt"
            start = _boundary(raw, unit.start, paragraphs)
            stop = _boundary(raw, unit.stop, paragraphs) if unit.stop < _size(raw) else None
            raw.seek(start)
            pos = start
            while stop is None or pos < stop:
                line = raw.readline()
                if not line:
                    break
                pos += len(line)
                yield line.decode("utf-8", errors="replace")
            return
        yield from io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


def check_text(path: str, head: bytes) -> None:
    """Refuse a plain-text input whose first bytes are not text. Read as UTF-8 with errors
    replaced, a compressed file or an archive would train the tokenizer and the model on
    noise, silently."""
    kinds = ", ".join(TEXT_SUFFIXES)
    for magic, what in MAGIC.items():
        if re.match(magic, head):
            raise ConfigError(
                f"{path}: {what}, not text (read as {kind_of(path)} by its name). jaxlm reads "
                f"{kinds}: rename a gzip or zstd file to its kind's suffix, or decompress it"
            )
    if b"\x00" in head:
        raise ConfigError(
            f"{path}: binary data (a NUL byte in its first {len(head):,} bytes), not UTF-8 text "
            f"(read as {kind_of(path)} by its name); jaxlm reads {kinds}"
        )


def _size(f) -> int:
    here = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(here)
    return size


def paragraph_documents(lines, doc_chars: int = DOC_CHARS) -> Iterator[str]:
    """Blank-line separated paragraphs grouped into documents of about doc_chars. A paragraph
    that grows past doc_chars (lines with no blank line between them, as in a file of one
    sentence or record a line) is cut at the line end there: it would otherwise be one
    document, and held in memory, however large the file."""
    current, para, size = "", [], 0
    for line in itertools.chain(lines, [""]):  # streamed: a unit is never held whole
        if line.strip():
            para.append(line.rstrip("\n"))
            size += len(para[-1]) + 1
            if size < doc_chars:
                continue
        elif not para:
            continue
        text, para, size = "\n".join(para), [], 0
        if current and len(current) + len(text) > doc_chars:
            yield current
            current = ""
        current = f"{current}\n\n{text}" if current else text
    if current:
        yield current


def documents(unit: Unit, text_field: str = "text") -> Iterator[str]:
    """The texts of a unit; a record without the text field is an error naming the file."""
    if unit.kind.startswith("txt"):
        yield from paragraph_documents(_lines(unit))
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        with epath.Path(unit.path).open("rb") as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise ConfigError(
                    f"{unit.path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                    "choose one with --text-field"
                )
            for g in range(unit.start, unit.stop):
                texts = pf.read_row_group(g, [text_field])[text_field].to_pylist()
                for j, text in enumerate(texts):
                    yield _string(text, f"{unit.path}: row {j} of row group {g}", text_field)
    elif unit.kind == "tfds":
        source = _tfds_source(unit.path)
        for i in range(unit.start, unit.stop):
            text = source[i].get(text_field)
            if text is None:
                raise ConfigError(f"{unit.path}: record {i} has no field {text_field!r}")
            yield _string(text, f"{unit.path}: record {i}", text_field)
    else:
        for i, line in enumerate(_lines(unit), 1):
            if not line.strip():
                continue
            where = f"{unit.path}: line {i} of the unit at byte {unit.start}"
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(
                    f"{where} is not a JSON object with a {text_field!r} field"
                ) from None
            yield _string(text, where, text_field)


def _string(text, where: str, text_field: str) -> str:
    """A record's text as the tokenizer takes it: a string. A null, a number or a list there
    is an error naming the record (sentencepiece's own TypeError names neither)."""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes):  # a parquet binary column of text
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{where}: its {text_field!r} field is bytes, not UTF-8 ({e})"
            ) from None
    shown = "null" if text is None else f"{repr(text)[:40]} ({type(text).__name__})"
    raise ConfigError(f"{where}: its {text_field!r} field is {shown}, not a string")


def _tfds_source(spec: str):
    import tensorflow_datasets as tfds

    name, _, data_dir = spec[len("tfds:") :].partition(":")
    try:
        return tfds.data_source(name, split="train", data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types for a missing or unprepared dataset
        raise ConfigError(f"input {spec!r}: cannot open the dataset ({e})") from None
