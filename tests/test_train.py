"""Training: sharding does not change the math; a killed run resumes exactly."""

import json
import logging
import shutil
import time

import jax
import numpy as np
import pytest
from conftest import (
    ROOT,
    load_tiny,
    losses,
    read_metrics,
    run_python,
    tiny_overrides,
    train_killed_after_save,
)

from jaxlm.train import train

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


def _mesh(d, f, t):
    return {"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t}


# The contrastive objective's loss and gradients on two meshes: test_clip.py; its losses on
# 2 x 4 and 1 x 8 devices of 1 and 2 processes: test_multiprocess_objectives.py.
@pytest.mark.parametrize("objective", ["gpt", "bert"])
def test_same_losses_on_every_mesh(tmp_path, objective):
    runs = {}
    for mesh in MESHES if objective == "gpt" else MESHES[:2]:
        workdir = tmp_path / "x".join(map(str, mesh))
        result = train(load_tiny(objective, **_mesh(*mesh)), workdir)
        runs[mesh] = losses(workdir)
        assert result["loss"] > 0
    reference = runs[MESHES[0]]
    assert sorted(reference) == [1, 2, 3, 4]
    assert reference[4] < reference[1]  # it learns
    for mesh in list(runs)[1:]:
        np.testing.assert_allclose(
            [runs[mesh][s] for s in reference], list(reference.values()), atol=1e-4, rtol=0
        )


def test_metrics_lines_carry_the_promised_fields(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**{"train.eval_every": 2, "train.steps": 6}), tmp_path, tmp_path / "prof")
    assert f"profile of steps 4..6 in {tmp_path / 'prof'}" in caplog.text
    assert list((tmp_path / "prof").rglob("*.xplane.pb"))  # what TensorBoard / Perfetto read
    records = read_metrics(tmp_path)
    assert "eval_unigram_loss" in records[0] and "peak_flops_source" in records[0]
    steps = [r for r in records if "loss" in r]
    assert {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(steps[-1])
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 6]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_tokens_per_s_leaves_out_checkpoint_saves(tmp_path, monkeypatch):
    """A save that blocks for 2 s at every step: the logged speed is the steps' own (as after
    an evaluation), not diluted by the saves in the interval."""
    from jaxlm.checkpoint import Checkpointer

    save = Checkpointer.save

    def slow_save(self, *args):
        time.sleep(2)
        save(self, *args)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    opts = {"train.steps": 5, "train.log_every": 2, "checkpoint.every": 1}
    cfg = load_tiny(**opts, **{"train.eval_every": 1000})
    train(cfg, tmp_path)
    per_step = cfg.train.batch_size * cfg.model.seq_len
    speed = {r["step"]: r["tokens_per_s"] for r in read_metrics(tmp_path) if "loss" in r}
    # with the saves counted, steps 3..4 would take over 4 s: under per_step / 2 tokens/s
    assert speed[4] > per_step, speed


def _killed_at_8(workdir, objective, overrides):
    proc = train_killed_after_save(f"configs/{objective}.py:tiny", overrides, workdir, 8)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, after the step-8 checkpoint
    assert sorted(losses(workdir)) == list(range(1, 9))
    assert (workdir / "checkpoints" / "8").is_dir()


def _final_params(workdir, **overrides):
    from jaxlm.evaluate import load

    loaded = load(workdir, overrides=[f"{k}={v}" for k, v in overrides.items()])
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(loaded.params)]


# The masked LM and CLIP resume across process counts in test_multiprocess.py.
@pytest.mark.parametrize("objective", ["gpt"])
def test_killed_run_resumes_bitwise_and_on_another_mesh(tmp_path, objective):
    opts = {"train.steps": 16, "checkpoint.every": 8}
    train(load_tiny(objective, **opts), tmp_path / "straight")
    straight = losses(tmp_path / "straight")

    killed = tmp_path / "killed"
    _killed_at_8(killed, objective, tiny_overrides(**opts))
    shutil.copytree(killed, tmp_path / "other_mesh")

    train(
        load_tiny(objective, **opts), killed
    )  # same mesh: every step bitwise (JSON keeps float repr)
    assert losses(killed) == straight
    for a, b in zip(_final_params(tmp_path / "straight"), _final_params(killed), strict=True):
        np.testing.assert_array_equal(a, b)

    train(load_tiny(objective, **opts, **_mesh(2, 2, 2)), tmp_path / "other_mesh")
    got = losses(tmp_path / "other_mesh")
    np.testing.assert_allclose(
        [got[s] for s in straight], list(straight.values()), atol=1e-4, rtol=0
    )


RESTORE_ON_ONE_DEVICE = """
import jax, numpy as np
from jaxlm.evaluate import load
assert jax.device_count() == 1
loaded = load({workdir!r})
np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(loaded.params)])
print(len(jax.tree.leaves(loaded.params)), loaded.step)
"""


def test_checkpoint_from_2x2x2_restores_on_one_device(tmp_path):
    train(load_tiny(**_mesh(2, 2, 2), **{"train.steps": 2}), tmp_path)
    expected = _final_params(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    proc = run_python(
        RESTORE_ON_ONE_DEVICE.format(workdir=str(tmp_path), out=str(tmp_path / "p.npz")), devices=1
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "p.npz")
    assert len(got.files) == len(expected)
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(got[f"arr_{i}"], want)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    """Run twice, the second time from the tests' persistent compilation cache: the cached
    executable of this step deadlocked until conftest.xla_flags turned the concurrency-optimised
    scheduler off (see there)."""
    train(load_tiny(), tmp_path / "one")
    accum = load_tiny(**{"train.grad_accum": 2, "mesh.data": 4, "mesh.fsdp": 1, "mesh.tensor": 2})
    train(accum, tmp_path / "two")
    train(accum, tmp_path / "again")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    np.testing.assert_allclose([b[s] for s in a], list(a.values()), atol=1e-4, rtol=0)
    assert losses(tmp_path / "again") == b


def test_eval_command_reports_held_out_metrics(tmp_path, capsys):
    from jaxlm import cli

    train(load_tiny(**{"train.steps": 2}), tmp_path)
    assert cli.main(["eval", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and result["eval_loss"] > 0 and result["eval_unigram_loss"] > 0


@pytest.fixture(autouse=True)
def _quiet_orbax(caplog):
    caplog.set_level("WARNING", logger="absl")


ACCUMULATED = """
import json, numpy as np, jax
from jaxlm import config, lm, sharding
from jaxlm.step import build, make_train_step
for accum in (1, 2):
    cfg = config.load({config!r}, {overrides!r} + [f"train.grad_accum={{accum}}"])
    batch = lm.synthetic_batch(cfg, 8, np.random.default_rng(0))
    batch["weights"][:] = 1  # (synthetic rows pack documents: no target across them)
    batch["weights"][0::2, 3:] = 0  # micro-batch 0's rows: 3 targets each; micro-batch 1's: 32
    mesh = sharding.make_mesh(cfg.mesh)
    s = build(cfg, mesh)
    with jax.set_mesh(mesh):
        _, metrics = make_train_step(s)(s.init(), sharding.to_global(batch, mesh))
        print(json.dumps({{k: float(v) for k, v in metrics.items()}}))
"""


def test_grad_accumulation_weights_micro_batches_by_their_tokens():
    """Micro-batches with very different target counts: the accumulated gradient is the
    token-weighted mean over the whole batch, equal to one big batch's (grad_norm compared:
    AdamW and clipping would hide a wrong scale in the losses). One device in a process of
    its own: the weighting is the same on any mesh, and no CPU collective is involved."""
    overrides = tiny_overrides(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    code = ACCUMULATED.format(config=str(ROOT / "configs/gpt.py:tiny"), overrides=overrides)
    proc = run_python(code, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert two["tokens"] == one["tokens"] == 4 * 3 + 4 * 32
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_init_from_starts_a_new_run_from_a_checkpoints_parameters(tiny_lm, tmp_path, caplog):
    """--init-from: the source's parameters (checked by name and shape first) and tokenizer,
    a fresh optimizer at step 0, this run's schedule and a shorter seq_len; the new workdir
    then resumes as any run does."""
    from jaxlm import cli
    from jaxlm.config import ConfigError
    from jaxlm.evaluate import load

    source = load(tiny_lm)
    zero_lr = {"train.steps": 1, "optim.lr": 0.0, "model.seq_len": 16, "model.max_positions": 32}
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**zero_lr), tmp_path / "new", init=str(tiny_lm))
    arrays = len(jax.tree.leaves(source.params))
    assert f"initialised {arrays} parameter arrays from {tiny_lm}/checkpoints/2" in caplog.text
    new = load(tmp_path / "new")
    assert new.step == 1 and new.cfg.model.seq_len == 16  # its own step count and seq_len
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(source.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # lr 0: unchanged
    assert new.tokenizer.to_dict() == source.tokenizer.to_dict()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**{**zero_lr, "train.steps": 2}), tmp_path / "new", init=str(tiny_lm))
    assert f"resumed from {tmp_path}/new/checkpoints/1" in caplog.text
    assert "--init-from" in caplog.text and "not used" in caplog.text

    differ = r"parameters differ from this config's: .*embed/tokens: \(512, 64\) there, \(512, 32\)"
    with pytest.raises(ConfigError, match=differ):
        train(load_tiny(**{"model.d_model": 32}), tmp_path / "other", init=str(tiny_lm))
    with pytest.raises(ConfigError, match=r"set model.max_positions=32"):
        train(load_tiny(**{"model.seq_len": 16}), tmp_path / "other", init=str(tiny_lm))
    assert not (tmp_path / "other" / "checkpoints").exists() or not any(
        (tmp_path / "other" / "checkpoints").iterdir()
    )
    # the command: CONFIG defaults to the source's stored config; a workdir of its own
    argv = ["train", "--init-from", f"{tiny_lm}:2", "train.steps=1", "optim.lr=0"]
    assert cli.main(argv) == 2  # no --workdir
    assert cli.main([*argv, "--workdir", str(tiny_lm)]) == 2  # the source itself
    assert cli.main([*argv, "--workdir", str(tmp_path / "cli")]) == 0
    assert load(tmp_path / "cli").cfg.model == source.cfg.model
