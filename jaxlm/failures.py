"""How a failure reaches the user: a user's mistake, the disk, Cloud Storage, the device's
memory or a diverged loss in one line (`said`), and the libraries' own reports of the same
failure (their logged tracebacks, asyncio's, TensorStore's late callbacks) kept out of its
way (`quiet_libraries`)."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys

from jaxlm.config import ConfigError, error_chain


class Diverged(RuntimeError):
    """The loss is NaN or infinite: the run stops before it saves that state. Every process
    sees the same global loss at the same step, so all raise it together."""

    on_every_process = True


def quiet_libraries() -> None:
    """Install the filters below (each kept once however often this is called)."""
    logging.getLogger("gcsfs").addFilter(no_traceback)
    for orbax_logs in ("absl", "asyncio"):
        logging.getLogger(orbax_logs).addFilter(orbax_line_only)
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = unraisable_hook


def no_traceback(record: logging.LogRecord) -> bool:
    """gcsfs logs each error it then raises with its traceback (logger.exception): the raise
    reaches the user once, as jaxlm's one line or a traceback; its warnings stay."""
    return not record.exc_info


def orbax_line_only(record: logging.LogRecord) -> bool:
    """Orbax logs a background save's error with its traceback (80-100 lines of asyncio
    frames, up to four times: each thread it passes through), then raises it in the main
    thread, where it reaches the user once; its logged lines stay, without the frames.
    asyncio's "exception was never retrieved" for each of Orbax's (and TensorStore's) other
    writes that failed alike (a full disk: dozens, some after the run's own error) is
    dropped."""
    if not record.exc_info:
        return True
    error, caught = record.exc_info[1], record.exc_info[2]  # caught: the frame that caught it
    in_orbax = caught and "/orbax/" in caught.tb_frame.f_code.co_filename.replace(os.sep, "/")
    if record.name == "asyncio":
        return not (in_orbax or (error is not None and disk_full(error)))
    if in_orbax:
        record.exc_info, record.exc_text = None, None
    return True


def unraisable_hook(unraisable: sys.UnraisableHookArgs) -> None:
    """Python's report of an error nothing could catch, less one kind: TensorStore finishing
    a write after Orbax closed the event loop it was to report to, which happens for each
    write still in flight when one failed (dozens of tracebacks after a full disk, none
    saying more than the failure itself, which the run reports)."""
    late = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == (
        "Event loop is closed"
    )
    tb = unraisable.exc_traceback
    if late and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return
    sys._unraisable_hookhook__(unraisable)


def said(error: Exception, argv: list[str]) -> int | None:
    """Print a user's mistake, Cloud Storage out of reach or refusing, or an out-of-memory
    error in one line (argv: the command's arguments, whose gs:// ones it names); its exit
    status, or None for anything else (a traceback is then the useful report)."""
    if isinstance(error, ConfigError):
        print(f"jaxlm: error: {error}", file=sys.stderr)
        return 2
    if isinstance(error, Diverged):
        print(f"jaxlm: error: {error}", file=sys.stderr)
        return 1
    storage = storage_error(error)
    if storage:
        paths = [
            f"{argv[i - 1]} {a}" if i and argv[i - 1].startswith("--") else a
            for i, a in enumerate(argv)
            if "gs://" in a
        ]
        named = f". This run's gs:// arguments: {' '.join(paths)}" if paths else ""
        print(f"jaxlm: error: Google Cloud Storage {storage}{named}", file=sys.stderr)
        return 1
    full = disk_full(error)
    if full:
        print(
            f"jaxlm: error: no space left on the disk ({full}). Free space or choose a "
            "directory on a larger disk; the same command rerun goes on from what was "
            "finished (the newest complete checkpoint, the prepared shards)",
            file=sys.stderr,
        )
        return 1
    if "RESOURCE_EXHAUSTED" not in str(error):
        return None
    print(
        f"jaxlm: error: out of device memory ({str(error).splitlines()[0][:200]}). Try "
        "model.remat=full with model.scan_layers=true, a smaller train.batch_size with "
        "train.grad_accum, or spread the parameters with mesh.fsdp",
        file=sys.stderr,
    )
    return 1


def disk_full(error: BaseException) -> str | None:
    """The write that found the disk full, where that is behind `error`: Python's OSError, or
    TensorStore's (Orbax's writer) as a ValueError whose RESOURCE_EXHAUSTED would otherwise
    read as the device's memory."""
    for e in error_chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            path = e.filename2 or e.filename  # a copy's is its destination
            return f"writing {path}" if path else str(e)
        if "No space left on device" in str(e):
            written = re.search(r'Failed writing: "([^"]+)"', str(e))
            return f"writing {written[1]}" if written else str(e).splitlines()[0][:300]
    return None


def storage_error(error: BaseException) -> str | None:
    """What went wrong with Google Cloud Storage, where that is behind `error`, as the rest of a
    line: gcsfs (etils.epath's gs:// paths) raises it under 50-200 lines of asyncio traceback
    that do not say it is the storage, after about 35 s of retries where it retries;
    TensorStore (a checkpoint's arrays) as a ValueError carrying gRPC's status name."""
    for e in error_chain(error):
        module = type(e).__module__
        if isinstance(e, OSError) and module.startswith("aiohttp"):
            return (
                f"not reachable ({e}; gcsfs gave up after its retries). A gs:// path "
                "needs the network, or STORAGE_EMULATOR_HOST naming a running emulator"
            )
        text = str(e)
        forbidden = isinstance(e, OSError) and text.startswith("Forbidden: ")
        forbidden |= module.startswith("gcsfs") and getattr(e, "code", 0) in (401, 403)
        # TensorStore (Orbax's writer) says it as PERMISSION_DENIED / UNAUTHENTICATED, with
        # the response's body after the message: a credential that may read but not write
        refused = re.match(r"(PERMISSION_DENIED|UNAUTHENTICATED): .*gs://", text)
        if forbidden or refused:
            said = " ".join(text.split(" [http_response_")[0].split())[:300]
            return (
                f"refused access ({said}). Credentials: `gcloud auth application-default "
                "login`, or a service account that may read the bucket (and write a workdir)"
            )
    return None
