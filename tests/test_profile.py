"""`jaxlm bench --profile`: the trace of a few steps, and where their device time went by part
of the model (named scopes joined to the trace through the compiled HLO)."""

import json

import numpy as np
from conftest import run_python

from jaxlm import config, lm
from jaxlm.profile import _line_groups, op_kinds, op_scopes, summarize_saved
from jaxlm.shards import document_starts

BENCH = """
import os
os.environ.pop("JAX_PLATFORMS", None)  # as `jaxlm bench` runs: libtpu looks for a TPU first
import json, sys
for absent in ("grain", "tensorflow_datasets", "array_record"):  # as on the GPU image
    sys.modules[absent] = None  # an import of one raises ImportError
from jaxlm import cli, config  # `jaxlm bench`'s own imports too
from jaxlm.bench import bench
cfg = config.load("configs/gpt.py:tiny", {overrides!r})
print(json.dumps(bench(cfg, steps=2, warmup=1, profile={trace!r})))
import jaxlm.bench
def unreadable(*args, **kwargs):
    raise ValueError("no operation of module 'train_step'")
readable, jaxlm.bench.summarize = jaxlm.bench.summarize, unreadable  # a trace this reader
print(json.dumps(bench(cfg, steps=1, warmup=0, profile={trace!r})))  # does not understand
jaxlm.bench.summarize = readable
for value in ("", "BOGUS"):  # a GPU's options for the traced steps (no command buffers)
    option = {{"xla_gpu_enable_command_buffer": value}}
    jaxlm.bench.profile_compiler_options = lambda platform: option
    print(json.dumps(bench(cfg, steps=1, warmup=0, profile={trace!r})))
"""


def test_op_scopes_take_the_innermost_part_forward_and_backward():
    hlo = "\n".join(
        [
            '  %fusion.1 = f32[4]{0} fusion(%p), metadata={op_name="jit(train_step)/jvp(mlp)/dot"}',
            '  %dot.2 = f32[4]{0} dot(%a, %b), metadata={op_name="jit(train_step)/transpose('
            'jvp())/while/body/attention/attention_kernel/exp"}',
            '  ROOT %add.3 = f32[] add(%x, %y), metadata={op_name="jit(train_step)/optimizer/add"}',
            '  %copy.4 = f32[4]{0} copy(%z), metadata={op_name="jit(f)/while/body/squeeze"}',
            "  %copy.5 = f32[4]{0} copy(%z)",
        ]
    )
    assert op_scopes(hlo) == {
        "fusion.1": "mlp",
        "dot.2": "attention_kernel",
        "add.3": "optimizer",
        "copy.4": "other",
    }


def test_the_models_scopes_are_the_profiles_parts():
    """The parts `bench --profile` reports (profile.SCOPES) are the names the code gives its
    jax.named_scope calls, no more and no fewer: a renamed scope fails here, not silently in
    a GPU profile as "other"."""
    import re

    from conftest import ROOT

    from jaxlm.profile import SCOPES

    used = {
        name
        for path in (ROOT / "jaxlm").glob("*.py")
        for name in re.findall(r"named_scope\(\"(\w+)\"\)", path.read_text())
    }
    assert used == set(SCOPES), (used, SCOPES)


def test_device_lines_are_found_on_each_platform():
    """Which trace lines hold the program's operations: a TPU's "XLA Ops" line; a GPU's CUDA
    streams (not its other lines); on a CPU the host's XLA threads, even where an empty
    "/device:" plane is there too (libtpu installed adds "/device:CUSTOM:Megascale Trace")."""
    from types import SimpleNamespace as NS

    def plane(name, *lines):
        return NS(name=name, lines=[NS(name=line, events=[]) for line in lines])

    def names(groups):
        return [[[line.name for line in group] for group in g] for g in groups]

    host = plane("/host:CPU", "python", "XLAEigen/1", "CpuClient/2")
    tpu = plane("/device:TPU:0", "Steps", "XLA Modules", "XLA Ops")
    gpu = plane("/device:GPU:0", "Stream #13(compute)", "Stream #14(memcpy)", "Launch Stats")
    empty = plane("/device:CUSTOM:Megascale Trace")
    assert names(_line_groups(NS(planes=[tpu, host])))[0] == [["XLA Ops"]]
    assert names(_line_groups(NS(planes=[gpu, host])))[0] == [
        ["Stream #13(compute)", "Stream #14(memcpy)"]
    ]
    cpu = names(_line_groups(NS(planes=[empty, host])))
    assert cpu == [[[]], [["XLAEigen/1", "CpuClient/2"]]]  # the empty device, then the host


def test_op_kinds_name_the_kernel():
    hlo = "\n".join(
        [
            "  %fusion.7 = bf16[12,1024,768]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_7",
            "  %custom-call.3 = (bf16[12,12,1024,64]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k), "
            'custom_call_target="__cudnn$fmhaSoftmax", backend_config={}',
            "  ROOT %dot.1 = f32[8,8]{1,0} dot(%x, %y), lhs_contracting_dims={1}",
        ]
    )
    assert op_kinds(hlo) == {
        "fusion.7": "fusion kLoop bf16[12,1024,768]{2,1,0}",
        "custom-call.3": "custom-call __cudnn$fmhaSoftmax (bf16[12,12,1024,64]{3,1,2,0}, u8[0]{0})",
        "dot.1": "dot f32[8,8]{1,0}",
    }


def test_bench_profile_says_where_the_step_time_goes(tmp_path, libtpu_alone):
    """One device (no collectives), configs/gpt.py:tiny as it is (16 x 128 tokens: at the
    test configs' size the layer stack's bookkeeping, "other", outweighs the model): each
    part of the causal LM shows up with device time, the named parts hold most of it, and
    the host gap is a share. Grain and tensorflow-datasets cannot be imported, as on the GPU
    image: the bench path needs neither."""
    code = BENCH.format(overrides=["model.max_segments=4"], trace=str(tmp_path / "trace"))
    proc = run_python(code, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-4:]
    result, unread, no_buffers, bogus = (json.loads(line) for line in lines)
    # a trace that cannot be read costs the profile, never the timing
    assert unread["step_ms"] > 0 and unread["profile"] == {
        "error": "ValueError: no operation of module 'train_step'"
    }
    # whether the timed step's batch ran cuDNN's packed layout (of 4 documents a row), as
    # counted here on the same synthetic batch: its rows hold 4 documents on average
    cfg = config.load("configs/gpt.py:tiny", ["model.max_segments=4"])
    batch = lm.synthetic_batch(cfg, cfg.train.batch_size, np.random.default_rng(cfg.train.seed))
    over = bool((document_starts(batch["segment_ids"]).sum(-1) > 4).any())
    assert result["max_segments_exceeded"] == over == unread["max_segments_exceeded"]
    parts = result["profile"]["ms_per_step"]
    named = ("attention_kernel", "attention", "mlp", "norm", "embed", "loss", "optimizer")
    assert all(parts.get(k, 0) > 0 for k in named), parts
    assert sum(parts[k] for k in named) > parts.get("other", 0), parts
    assert 0 <= result["profile"]["host_gap"] < 1
    top = result["profile"]["top_ops"]
    assert len(top) == 15 and all(op["kind"] != "?" for op in top), top
    assert top == sorted(top, key=lambda op: -op["ms"])
    assert sum(op["ms"] for op in top) <= sum(parts.values()) + 1e-6
    # on a GPU the traced steps are compiled again without command buffers, and say so
    assert "compiler_options" not in result["profile"]  # none on this CPU
    assert no_buffers["profile"]["compiler_options"] == {"xla_gpu_enable_command_buffer": ""}
    assert no_buffers["profile"]["ms_per_step"]["mlp"] > 0
    # options XLA refuses (it read them: they reach the compile) cost the profile, not the timing
    refused = bogus["profile"]["error"]
    assert "BOGUS" in refused and "xla_gpu_enable_command_buffer" in refused
    assert bogus["step_ms"] > 0
    # the traced program is saved beside its trace: the same summary, read back later
    saved = summarize_saved(tmp_path / "trace", steps=2, top=40)
    assert saved["ms_per_step"].keys() == parts.keys() and len(saved["top_ops"]) == 40
