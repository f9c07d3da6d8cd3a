"""The state of a prepared directory, kept in files whose existence says that work is done
(a shard's stats, the plan, the manifest): each written whole or not at all, a damaged one
done again, a directory of another plan refused."""

from __future__ import annotations

import json
import logging

from etils import epath

from jaxlm.config import ConfigError
from jaxlm.inputs import is_remote

log = logging.getLogger("jaxlm")

MANIFEST = "manifest.json"
PLAN = "plan.json"


def _temporary(target: epath.Path) -> epath.Path:
    """Where a local file is written before it is renamed to `target`."""
    return target.parent / f".{target.name}.tmp"


def copy_whole(local: str, target: epath.Path) -> None:
    """Local file -> target, never seen half-written: a cloud object appears only once its
    upload is complete; a local file is written under a temporary name and renamed."""
    if is_remote(str(target)):
        epath.Path(local).copy(target, overwrite=True)
        return
    tmp = _temporary(target)
    epath.Path(local).copy(tmp, overwrite=True)
    tmp.replace(target)


def write_json(path: epath.Path, value, indent: int | None = None) -> None:
    """path <- value as JSON, never seen half-written: the markers (a shard's stats, the
    plan, the manifest) say by existing that what they mark is done, so a full disk or a
    killed host must not leave one cut short."""
    write_whole(path, json.dumps(value, indent=indent))


def write_whole(path: epath.Path, text: str) -> None:
    """path <- text, never seen half-written, as copy_whole."""
    path = epath.Path(path)
    if is_remote(str(path)):
        path.write_text(text)
        return
    tmp = _temporary(path)
    try:
        tmp.write_text(text)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def read_marker(path: epath.Path) -> dict | None:
    """A marker's JSON; None if it is missing, or damaged (cut short by an older jaxlm that
    wrote it in place): what it marks is then done again."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is damaged (cut short?): what it marks is done again", path)
        return None


def begin(out_dir: epath.Path, plan: dict) -> dict | None:
    """The manifest where `out_dir` is already prepared from this plan (nothing to do); else
    None, the plan written (a new directory, or one to finish). A directory prepared, or
    being prepared, from another plan is refused, naming what differs."""
    stored, manifest = read_marker(out_dir / PLAN), read_marker(out_dir / MANIFEST)
    if stored is not None and (differ := _differences(stored, plan)):
        done = "prepared" if manifest is not None else "being prepared"
        raise ConfigError(
            f"--out {out_dir} is already {done} from other inputs or settings ({differ}): "
            "choose another --out, or finish it with the command that started it"
        )
    if manifest is not None:
        log.info("%s is already prepared", out_dir)
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PLAN, plan, indent=1)
    return None


def finished(out_dir: epath.Path) -> bool:
    """Whether a prepared directory is complete: its manifest is there and whole."""
    return read_marker(epath.Path(out_dir) / MANIFEST) is not None


def _differences(stored: dict, plan: dict) -> str:
    """The fields in which a directory's stored plan differs from this one, named with both
    values (long ones cut)."""

    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return "; ".join(
        f"{k}: {short(stored.get(k))} there, {short(plan.get(k))} now"
        for k in sorted(stored.keys() | plan.keys())
        if stored.get(k) != plan.get(k)
    )
