"""Where a train step's device time goes, from a jax.profiler trace: `jaxlm bench --profile`.

The model names its parts with `jax.named_scope` (`attention`, `attention_kernel`, `mlp`,
`norm`, `embed`, `loss`, `optimizer`); XLA keeps the scope path of each operation in the
compiled HLO's `op_name` metadata, forward and backward alike ("transpose(jvp(mlp))"). The
trace gives each executed operation's duration by its HLO name; joining the two sums the
device time per part. Where the device is idle between operations (`host_gap`: the step's
wall time not covered by any operation) the host, not the device, is the limit. The most
expensive operations (`top_ops`: name, kind, result shape, part, ms per step) say which
fusion or kernel to look at, after the machine that ran them is gone.

Read with `jax.profiler.ProfileData` (no TensorFlow): the device planes of a GPU or TPU
trace (`/device:...`, their "XLA Ops" line); on CPU, the host threads that run the XLA
program's operations, as one device (their times add up over threads, so a part's
milliseconds can exceed the wall time there)."""

from __future__ import annotations

import collections
import glob
import gzip
import os
import re

SCOPES = ("attention_kernel", "attention", "mlp", "norm", "embed", "loss", "optimizer")
HLO_FILE = "train_step.hlo.txt.gz"  # `bench --profile` saves the traced program beside its trace


def op_scopes(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the innermost of SCOPES in its op_name ("other" if none)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M):
        tokens = [t for t in re.findall(r"[A-Za-z_]+", m.group(2)) if t in SCOPES]
        out[m.group(1)] = tokens[-1] if tokens else "other"
    return out


def op_kinds(hlo: str) -> dict[str, str]:
    """HLO instruction name -> what it is: the opcode and result shape, with a fusion's kind
    or a custom call's target (a cuDNN or cuBLAS kernel)."""
    out = {}
    pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$"
    for m in re.finditer(pattern, hlo, re.M):
        name, shape, opcode, rest = m.groups()
        detail = re.search(r"kind=(k\w+)|custom_call_target=\"([^\"]+)\"", rest)
        what = opcode + (f" {detail.group(1) or detail.group(2)}" if detail else "")
        out[name] = f"{what} {shape[:80]}"
    return out


def _line_groups(data) -> list[list[list]]:
    """Where the XLA program's operations may be, in the order to try: the devices' lines,
    one group per device (its "XLA Ops" line where the trace has one, as TPU traces do; else
    its CUDA streams' lines, whose kernel events carry the same hlo_op and hlo_module stats);
    then, where no device holds any (a CPU run: other "/device:" planes may be there, empty),
    the host threads that run them, as one device."""
    devices = []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        ops = [line for line in lines if line.name == "XLA Ops"]
        streams = [line for line in lines if line.name.startswith("Stream")]
        devices.append(ops or streams or lines)
    host = [
        line
        for plane in data.planes
        if plane.name == "/host:CPU"
        for line in plane.lines
        if "XLAEigen" in line.name or "CpuClient" in line.name
    ]
    return [devices, [host]]


def summarize(
    trace_dir: str | os.PathLike, hlo: str, steps: int, module: str, top: int = 15
) -> dict:
    """Milliseconds per step in each part (SCOPES, "other"), the traced wall time per step,
    the share of it no operation covered (`host_gap`) and the `top` most expensive operations,
    from the newest trace in trace_dir, averaged over devices. `module`: the jitted
    function's name (its HLO module is jit_<module>)."""
    import jax

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    scopes, kinds = op_scopes(hlo), op_kinds(hlo)
    for groups in _line_groups(data):  # the first place that holds the program's operations
        per_device = [ops for ops in (_operations(group, module) for group in groups) if ops]
        if per_device:
            break
    else:
        raise ValueError(f"the trace in {trace_dir} holds no operation of module {module!r}")
    per_scope, per_op = collections.Counter(), collections.Counter()
    busy = wall = 0.0
    for ops in per_device:
        for op, _, duration in ops:
            per_scope[scopes.get(op, "other")] += duration
            per_op[op] += duration
        intervals = [(start, start + duration) for _, start, duration in ops]
        busy += _covered(intervals)
        wall += max(e for _, e in intervals) - min(s for s, _ in intervals)
    devices = len(per_device)
    return {
        "ms_per_step": {
            k: round(per_scope[k] / devices / steps / 1e6, 3)
            for k in (*SCOPES, "other")
            if per_scope[k]
        },
        "traced_ms_per_step": round(wall / devices / steps / 1e6, 3),
        "host_gap": round(1 - busy / wall, 4),
        "top_ops": [
            {
                "op": op,
                "kind": kinds.get(op, "?"),
                "part": scopes.get(op, "other"),
                "ms": round(ns / devices / steps / 1e6, 3),
            }
            for op, ns in per_op.most_common(top)
        ],
    }


def summarize_saved(trace_dir: str | os.PathLike, steps: int = 3, top: int = 15) -> dict:
    """summarize() from what `jaxlm bench --profile` left in trace_dir (the trace and the
    program it ran, HLO_FILE), on another machine after the run: `top` as long as wanted,
    each operation with its part and kind; its fused computation is in HLO_FILE by name."""
    files = glob.glob(os.path.join(trace_dir, "**", HLO_FILE), recursive=True)
    if not files:
        raise FileNotFoundError(f"no {HLO_FILE} under {trace_dir}")
    with gzip.open(files[0], "rt") as f:
        return summarize(trace_dir, f.read(), steps, "train_step", top)


def _operations(lines: list, module: str) -> list[tuple[str, float, float]]:
    """(HLO op, start ns, duration ns) of every event of `module` on these lines; an event
    without its module named is taken (the traced steps run one program)."""
    out = []
    for line in lines:
        for event in line.events:
            stats = dict(event.stats)
            if "hlo_op" in stats and module in str(stats.get("hlo_module", module)):
                out.append((str(stats["hlo_op"]), event.start_ns, event.duration_ns))
    return out


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (operations may overlap on a line's threads)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total
