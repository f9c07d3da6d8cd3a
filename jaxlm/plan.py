"""`jaxlm plan CONFIG --devices N [--device KIND]`: will this config fit, before a pod is booked?

The train step is compiled ahead of time, exactly as `jaxlm train` would jit it (same
shardings, donation, loss), for N devices, and XLA's own memory and cost analyses are read:

- KIND a TPU kind with libtpu installed: compiled for that TPU topology (no TPU needed);
- KIND a GPU kind with JAX's CUDA plugin installed (`jax[cuda12]`): compiled by XLA's GPU
  compiler for that GPU, described by its spec (XLA's deviceless compile: no GPU, no driver
  needed), 8 GPUs a host;
- otherwise on N fake CPU devices. The CPU compiler fuses less than a TPU's or a GPU's, so
  its temporaries are an upper bound; KIND then only sets the memory to fit in.

Per device: `state_bytes_per_device` (parameters + optimizer state, from the shardings),
`temp_bytes_per_device` (XLA's temporaries), `peak_bytes_per_device` (XLA's own peak where the
backend reports one, but never less than its buffers: arguments + outputs - donated +
temporaries, which a GPU executable allocates whole; on CPU, which reports none, that sum: all
live at once, an upper bound). `collectives`: per kind, the compiled step's instructions and
its largest result (what moves between devices, and the most one device receives at once).
`custom_calls`: the kernels the compiled step calls (cuDNN's attention, a Pallas kernel), so a
plan says which attention it holds. `fits`: the peak against `memory_limit_bytes`, a TPU's HBM
or the pool JAX's allocator makes of a GPU's memory (75% by default, `memory_limit`).
"""

from __future__ import annotations

import collections
import math
import os
import re
from typing import TYPE_CHECKING

import numpy as np

from jaxlm.config import ConfigError

if TYPE_CHECKING:  # compiling imports JAX and the step where it is asked for
    import jax

    from jaxlm.config import Config
    from jaxlm.step import Setup

GIB = 1 << 30
# Memory of one chip / GPU, bytes. A100 and H100 as their 80 GB parts.
DEVICE_MEMORY = {
    "v4": 32 * GIB,
    "v5e": 16 * GIB,
    "v5p": 95 * GIB,
    "v6e": 32 * GIB,
    "a100": 80 * GIB,
    "h100": 80 * GIB,
    "h200": 141 * 10**9,
}
TPU_KINDS = ("v4", "v5e", "v5p", "v6e")
GPUS_PER_HOST = 8
# What XLA's GPU compiler reads of a GPU (GpuTargetConfigProto, the fields of XLA's own specs
# in xla/tools/hlo_opt/gpu_specs), from NVIDIA's data sheets: the SXM parts. The compute
# capability decides the code and kernels (Hopper's: 9.0); the rest sizes fusions and tiles.
GPU_SPECS = {
    "a100": dict(name="A100-SXM4-80GB", capability=(8, 0), sms=108, fpus_per_sm=64,
                 clock_ghz=1.41, bandwidth=2_039 * 10**9, l2=40 << 20,
                 smem_per_sm=167_936, smem_per_block_optin=166_912),
    "h100": dict(name="H100 80GB HBM3", capability=(9, 0), sms=132, fpus_per_sm=128,
                 clock_ghz=1.98, bandwidth=3_352 * 10**9, l2=50 << 20,
                 smem_per_sm=233_472, smem_per_block_optin=232_448),
    "h200": dict(name="H200", capability=(9, 0), sms=132, fpus_per_sm=128,
                 clock_ghz=1.98, bandwidth=4_800 * 10**9, l2=50 << 20,
                 smem_per_sm=233_472, smem_per_block_optin=232_448),
}  # fmt: skip


def use_fake_cpus(devices: int) -> None:
    """Ask for `devices` fake CPU devices: must run before JAX touches a device."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def libtpu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def plan(cfg, devices: int, kind: str | None = None) -> dict:
    """Compile cfg's train step for `devices` devices (the current backend's, or a TPU
    topology when kind is a TPU kind and libtpu is there) and report its memory and FLOPs."""
    import jax

    if kind is not None and kind not in DEVICE_MEMORY:
        raise ConfigError(f"--device {kind!r}: expected one of {', '.join(DEVICE_MEMORY)}")
    limit, limit_source = memory_limit(kind) if kind else (None, None)
    targets, compiled_for = None, None
    if kind in TPU_KINDS:
        targets, compiled_for = _tpu_devices(kind, devices), f"{kind} x {devices} (TPU compile)"
    elif kind in GPU_SPECS:
        targets = _gpu_devices(kind, devices)
        compiled_for = f"{kind} x {devices} (GPU compile, no GPU needed)"
    if targets is None:
        targets = jax.devices()
        if len(targets) != devices:
            raise ConfigError(
                f"--devices {devices}: this process has {len(targets)} devices (run `jaxlm "
                "plan`, which makes N fake CPU devices, rather than calling plan() after JAX "
                "started)"
            )
        compiled_for = f"{targets[0].platform} x {devices}"
        if targets[0].platform == "cpu":
            compiled_for += " (fake CPU devices: temporaries are an upper bound)"
            if kind in GPU_SPECS:
                compiled_for += (
                    f"; to compile for the {kind}: JAX's CUDA plugin (`pip install "
                    "'jax[cuda12]'`), started (JAX_PLATFORMS=cpu where there is no GPU)"
                )
    s = setup(cfg, targets)
    state = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(s.abstract)
    )
    items = cfg.train.batch_size * s.objective.items_per_example(cfg)
    result = {
        "config": cfg.name,
        "params": s.num_params(),
        "devices": devices,
        "mesh": dict(s.mesh.shape),
        "compiled_for": compiled_for,
        "state_bytes_per_device": state,
        "flops_per_step": items * s.objective.flops_per_item(cfg),
        "flops_source": "6N + attention per item x items per step (the MFU count)",
        "device_memory_bytes": DEVICE_MEMORY.get(kind) if kind else None,
        "memory_limit_bytes": limit,
        "memory_limit_source": limit_source,
    }
    try:
        compiled = compile_step(s)
    except Exception as e:  # a TPU compile refuses what does not fit in its HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = re.search(r"temporaries \(([\d.]+)G\)", str(e))
        temp = round(float(needed.group(1)) * GIB) if needed else None
        return result | {
            "temp_bytes_per_device": temp,
            "peak_bytes_per_device": None if temp is None else temp + state,
            "peak_source": "the compiler's out-of-memory message: temporaries + state",
            "fits": False,
            "compile_error": str(e).splitlines()[0][:300],
        }
    memory, text = compiled.memory_analysis(), compiled.as_text()
    temp = int(memory.temp_size_in_bytes)
    reported_peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
    allocated = int(  # what the executable holds at once: its buffers are allocated whole
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + temp
    )
    if targets[0].platform == "cpu" or not reported_peak:
        peak, peak_source = allocated, "arguments + outputs - donated + temporaries"
    elif reported_peak < allocated:  # seen for an H200: 458.5 MB against 466.0 MB allocated
        peak = allocated
        peak_source = (
            "arguments + outputs - donated + temporaries (XLA's peak_memory_in_bytes, "
            f"{reported_peak}, is less than its buffers)"
        )
    else:
        peak, peak_source = reported_peak, "XLA's peak_memory_in_bytes"
    return result | {
        "temp_bytes_per_device": temp,
        "peak_bytes_per_device": peak,
        "peak_source": peak_source,
        "compiled_flops_per_device": _compiled_flops(compiled),
        "collectives": collectives(text),
        "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
        "fits": None if limit is None else peak <= limit,
    }


def memory_limit(kind: str, environ: dict | None = None) -> tuple[int, str]:
    """(bytes a device's step may hold, why) on a KIND device. A TPU's step has its HBM. A GPU's
    has the pool JAX's allocator makes of it: 75% of the memory by default in JAX 0.10 and 0.11
    (a fixed cap, preallocated or not: XLA's GpuAllocatorConfig), the fraction set by
    XLA_CLIENT_MEM_FRACTION or its older name XLA_PYTHON_CLIENT_MEM_FRACTION, or the whole
    memory with XLA_PYTHON_CLIENT_ALLOCATOR=platform. A step that fits the card but not the
    pool fails with an out-of-memory error at its first step, so `fits` asks the pool.
    Newer XLA reads the fraction as a policy, `START-CAP` or `START+` (up to all the memory):
    the cap is what counts, and `--xla_gpu_memory_fraction_policy` overrides both. Where
    newer XLA lets a bare fraction grow, this cap is the conservative reading."""
    memory = DEVICE_MEMORY[kind]
    if kind not in GPU_SPECS:
        return memory, f"the {kind}'s HBM"
    environ = os.environ if environ is None else environ
    allocator = environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default").lower()
    if allocator == "platform":
        return memory, "the whole GPU: XLA_PYTHON_CLIENT_ALLOCATOR=platform (no pool)"
    flag = re.search(r"--xla_gpu_memory_fraction_policy=(\S+)", environ.get("XLA_FLAGS", ""))
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if environ.get(name):
            setting, where = environ[name], name
            break
    else:
        setting, where = "0.75", None
    if flag:
        setting, where = flag.group(1), "--xla_gpu_memory_fraction_policy"
    cap = _pool_cap(setting, where or "the memory fraction")
    why = f"{where}={setting}" if where else "JAX's default pool: XLA_CLIENT_MEM_FRACTION unset"
    return int(memory * cap), f"{100 * cap:.3g}% of the {kind}'s memory ({why})"


def _pool_cap(setting: str, where: str) -> float:
    """The most of a GPU's memory a memory-fraction setting lets JAX's pool hold."""
    number = r"(\d*\.?\d+(?:[eE][-+]?\d+)?)"
    match = re.fullmatch(rf"\s*{number}\s*(?:(\+)|-\s*{number})?\s*", setting)
    if not match:
        raise ConfigError(
            f"{where}={setting!r}: expected a fraction of the GPU's memory (0.9), or START-CAP "
            "or START+ (fractions)"
        )
    start, grows, cap = match.groups()
    cap = 1.0 if grows else float(cap or start)
    if cap <= 0:
        raise ConfigError(f"{where}={setting!r}: the pool would hold nothing; expected above 0")
    return cap


def compile_train_step(cfg: Config, devices: list) -> tuple[Setup, jax.stages.Compiled]:
    """(Setup, compiled train step) for cfg on these devices, as `jaxlm train` jits it, from
    abstract arrays only: nothing is allocated."""
    s = setup(cfg, devices)
    return s, compile_step(s)


def setup(cfg: Config, devices: list) -> Setup:
    """The model, shardings and optimizer of cfg on a mesh of these devices."""
    from jaxlm import sharding
    from jaxlm.step import build

    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.train.batch_size, cfg.train.grad_accum, mesh)
    return build(cfg, mesh)


def compile_step(s: Setup) -> jax.stages.Compiled:
    return lower_step(s).compile()


def lower_step(s: Setup, platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
    """The train step lowered from abstract arrays (a synthetic batch's shapes, split over the
    batch axes), for this process's platform or for `platforms` (("cuda",): a GPU's program,
    lowered on a machine without one)."""
    import jax

    from jaxlm import attention, sharding
    from jaxlm.step import make_train_step

    cfg, mesh = s.cfg, s.mesh
    batch = s.objective.synthetic_batch(cfg, cfg.train.batch_size, np.random.default_rng(0))
    in_batch = jax.sharding.NamedSharding(mesh, sharding.logical_spec(("batch", None)))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=in_batch) for k, v in batch.items()}
    with jax.set_mesh(mesh), attention.compiling_for(mesh.devices.flat[0]):
        traced = make_train_step(s).trace(s.abstract, batch)
        return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collective_shapes(hlo: str) -> collections.Counter:
    """(op, dtype, shape) -> how many instructions of a compiled HLO module make that result;
    a combined (tuple-shaped) collective counts once per element. Static counts: an
    instruction inside a loop (the layers of a scanned stack) counts once."""
    out = collections.Counter()
    ops = "|".join(COLLECTIVES)
    for m in re.finditer(rf"= (\(.*?\)|\S+) ({ops})(?:-start)?\(", hlo):
        for dtype, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", m.group(1)):
            out[m.group(2), dtype, tuple(int(d) for d in dims.split(",") if d)] += 1
    return out


def collectives(hlo: str) -> dict:
    """Per collective kind: instructions and the largest result in bytes. The largest
    all-gather says what the step puts whole on one device (a layer's weights under fsdp)."""
    out = {}
    for (op, dtype, shape), n in collective_shapes(hlo).items():
        size = math.ceil(math.prod(shape) * _bits(dtype) / 8)
        entry = out.setdefault(op, {"ops": 0, "largest_bytes": 0})
        entry["ops"] += n
        entry["largest_bytes"] = max(entry["largest_bytes"], size)
    return dict(sorted(out.items()))


def _bits(dtype: str) -> int:
    """Bits per element of an HLO element type, from its name (f32, bf16, s8, f8e4m3fn, c64,
    ...); pred takes a byte, a token none. Any other type raises, rather than a guessed size
    in the report."""
    if dtype in ("pred", "token"):
        return 8 if dtype == "pred" else 0
    bits = re.match(r"[a-z]+(\d+)", dtype)
    if not bits:
        raise ValueError(f"HLO element type {dtype!r}: no bit width to size a collective by")
    return int(bits.group(1))


def _compiled_flops(compiled) -> float | None:
    """XLA's cost analysis of the per-device program (None where the backend has none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops)


def _tpu_devices(kind: str, devices: int) -> list | None:
    """The devices of a `kind` TPU topology with `devices` chips, compiled for without a
    TPU (libtpu from PyPI: `pip install 'jax[tpu]'`); None where libtpu is missing."""
    if not libtpu_installed():
        return None
    from jax.experimental import topologies

    from jaxlm.config import ConfigError

    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{kind}:{_tpu_shape(kind, devices)}"
        )
    except Exception as e:
        raise ConfigError(
            f"--device {kind} --devices {devices}: no such TPU topology ({e})"
        ) from None
    return list(topology.devices)


def _tpu_shape(kind: str, chips: int) -> str:
    """A slice shape of `chips` chips: 2-D for v5e / v6e, 3-D (4 chips per host) for v4 / v5p."""
    if kind in ("v5e", "v6e"):
        x = 2 ** math.ceil(math.log2(chips) / 2)
        return f"{x}x{chips // x}" if chips > 1 else "1x1"
    dims = [1, 1, 1]
    for i in range(int(math.log2(chips))):
        dims[i % 3] *= 2
    return "x".join(map(str, dims))  # largest first: 2x2x1 hosts tile it


def _gpu_devices(kind: str, devices: int) -> list | None:
    """The devices of `devices` GPUs of `kind`, 8 a host, for XLA's GPU compiler without a GPU
    (JAX's CUDA plugin: `pip install 'jax[cuda12]'`); None where the plugin is missing or
    did not start (on a machine without a GPU it starts only with JAX_PLATFORMS=cpu, as
    `jaxlm plan` sets it; otherwise its version check fails)."""
    from jax.experimental import topologies

    from jaxlm.config import ConfigError

    if devices > GPUS_PER_HOST and devices % GPUS_PER_HOST:
        raise ConfigError(
            f"--devices {devices}: GPUs come {GPUS_PER_HOST} to a host; expected 1 to "
            f"{GPUS_PER_HOST} or a multiple of {GPUS_PER_HOST}"
        )
    per_host = min(devices, GPUS_PER_HOST)
    try:
        topology = topologies.get_topology_desc(
            platform="cuda",
            topology=f"1x{devices // per_host}x{per_host}",  # slices x hosts x GPUs a host
            target_config=_target_config(kind),
        )
    except NotImplementedError:  # "topology not implemented for cuda": no CUDA plugin
        return None
    return list(topology.devices)


def _target_config(kind: str) -> str:
    """GPU_SPECS[kind] as XLA's GpuTargetConfigProto text (the limits every NVIDIA GPU since
    Volta shares written out)."""
    g = GPU_SPECS[kind]
    major, minor = g["capability"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152 shared_memory_per_core: {g["smem_per_sm"]}
  shared_memory_per_block_optin: {g["smem_per_block_optin"]}
  core_count: {g["sms"]} fpus_per_core: {g["fpus_per_sm"]}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {g["bandwidth"]} l2_cache_size: {g["l2"]}
  clock_rate_ghz: {g["clock_ghz"]} device_memory_size: {DEVICE_MEMORY[kind]}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "NVIDIA {g["name"]}"
"""
