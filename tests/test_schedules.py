"""Learning-rate schedules (cosine, warmup-stable-decay, constant) and time-based checkpoints."""

import logging
import shutil
import time

import numpy as np
import pytest
from conftest import load_tiny, losses, read_metrics

from jaxlm import optim
from jaxlm import train as train_lib
from jaxlm.config import ConfigError, OptimConfig
from jaxlm.train import train


def test_schedules_follow_their_formulas():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.25)
    rates = {}
    for name, shape in (("wsd", "linear"), ("wsd", "1-sqrt"), ("constant", "linear")):
        c = OptimConfig(**{**cfg.__dict__, "schedule": name, "decay_shape": shape})
        rates[name, shape] = [float(optim.schedule(c, 12)(s)) for s in range(13)]
    warm_stable = [0.0, 0.5] + [1.0] * 8  # steps 0..9; the decay is the last 3 of 12
    np.testing.assert_allclose(rates["wsd", "linear"], warm_stable + [0.7, 0.4, 0.1], rtol=1e-6)
    sqrt = [0.1 + 0.9 * (1 - np.sqrt(k / 3)) for k in (1, 2, 3)]
    np.testing.assert_allclose(rates["wsd", "1-sqrt"], warm_stable + sqrt, rtol=1e-6)
    np.testing.assert_allclose(rates["constant", "linear"], [0.0, 0.5] + [1.0] * 11)
    no_warmup = OptimConfig(**{**cfg.__dict__, "warmup_steps": 0})
    for name in ("cosine", "wsd", "constant"):  # the peak from the first step
        c = OptimConfig(**{**no_warmup.__dict__, "schedule": name})
        assert float(optim.schedule(c, 12)(0)) == pytest.approx(1.0)
    # WSD's rate before the decay does not depend on the run's length; cosine's does
    wsd = OptimConfig(**{**cfg.__dict__, "schedule": "wsd"})
    assert [float(optim.schedule(wsd, 8)(s)) for s in range(6)] == rates["wsd", "linear"][:6]
    assert float(optim.schedule(cfg, 8)(4)) < float(optim.schedule(cfg, 12)(4))
    # a decay that begins inside the warmup (a short run) goes down from where the warmup is,
    # never up to the peak first: min(step / 10, 1 - (step - 5) / 5)
    short = OptimConfig(
        lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.0
    )
    want = [min(s / 10, 1 - max(0, s - 5) / 5) for s in range(11)]
    got = [float(optim.schedule(short, 10)(s)) for s in range(11)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_tiny(**{"optim.schedule": "linear"})
    with pytest.raises(ConfigError, match=r"'optim.decay_fraction' must be in \(0, 1\], got 0"):
        load_tiny(**{"optim.schedule": "wsd", "optim.decay_fraction": 0})


def test_a_wsd_run_extended_from_its_stable_phase_equals_the_longer_run(tmp_path, caplog):
    """Checkpointed at step 4 (stable phase) of an 8-step WSD run, resumed with
    train.steps=12: steps 5..12 are bit for bit those of a 12-step run from the start."""
    wsd = {"optim.schedule": "wsd", "optim.decay_fraction": 0.25, "checkpoint.every": 4}
    short = tmp_path / "short"
    train(load_tiny(**wsd, **{"train.steps": 8}), short)
    shutil.rmtree(short / "checkpoints" / "8")  # as if it had stopped at its step-4 save
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**wsd, **{"train.steps": 12}), short)
    assert f"resumed from {short}/checkpoints/4" in caplog.text
    assert "the learning-rate schedule now ends at step 12 (it was made for 8)" in caplog.text
    assert "the learning rate at step 4" not in caplog.text  # the same rate: nothing to say
    train(load_tiny(**wsd, **{"train.steps": 12}), tmp_path / "long")
    extended, long = losses(short), losses(tmp_path / "long")
    assert sorted(long) == list(range(1, 13))
    assert [extended[s] for s in range(1, 13)] == [long[s] for s in range(1, 13)]  # bitwise
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "long") if "lr" in r}
    assert lrs[12] < lrs[11] < lrs[10] == max(lrs.values())  # it did decay at the end
    # the same extension from inside the decay (step 12; it began at 9) climbs back: a warning
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**wsd, **{"train.steps": 13}), tmp_path / "long")
    peak = max(lrs.values())  # 13 steps decay over 10..13: step 12 at 0.1 + 0.9 / 3 of it
    climbs = [r for r in caplog.records if "inside the checkpoint's WSD decay" in r.message]
    assert len(climbs) == 1 and climbs[0].levelno == logging.WARNING, caplog.text
    assert (
        f"(it began at step 9 of 12): the rate climbs back from {0.1 * peak:.4g} to "
        f"{0.4 * peak:.4g}. A WSD run extends without a jump from a checkpoint at or before "
        "step 9" in climbs[0].message
    )
    assert 13 in losses(tmp_path / "long")


def test_time_based_checkpoints_besides_step_based(tmp_path, monkeypatch, caplog):
    """checkpoint.every_minutes with a slowed step: saves come by the clock as well as every
    3 steps, each logged with the minutes since the last. What stays: the newest
    checkpoint.keep=1 at a multiple of 3 (6) and the newest save (the final, 7); the clock's
    saves at other steps went once a newer save existed."""
    make = train_lib.make_train_step

    def slowed(s):
        step = make(s)

        def run(state, batch):
            time.sleep(0.5)
            return step(state, batch)

        return run

    monkeypatch.setattr(train_lib, "make_train_step", slowed)
    opts = {"train.steps": 7, "checkpoint.every": 3, "checkpoint.keep": 1}
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**opts, **{"checkpoint.every_minutes": 0.012}), tmp_path / "timed")
    by_clock = {
        int(r.message.split("checkpoint at step ")[1].split(":")[0])
        for r in caplog.records
        if "minutes since the last" in r.message
    }
    assert by_clock - {3, 6, 7}, by_clock  # saved by the clock alone, then let go
    steps = sorted(int(p.name) for p in (tmp_path / "timed" / "checkpoints").iterdir())
    assert steps == [6, 7], steps
    opts |= {"train.steps": 6, "checkpoint.keep": 3}
    train(load_tiny(**opts), tmp_path / "steps")  # every_minutes=0: every 3 steps only
    assert sorted(p.name for p in (tmp_path / "steps" / "checkpoints").iterdir()) == ["3", "6"]
    # a rerun with another checkpoint.every says which earlier steps its next save deletes
    caplog.clear()
    opts |= {"train.steps": 8, "checkpoint.every": 4}
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        train(load_tiny(**opts), tmp_path / "steps")
    assert "checkpoint.every=4: steps 3, 6 in " in caplog.text, caplog.text[-2000:]
    assert sorted(p.name for p in (tmp_path / "steps" / "checkpoints").iterdir()) == ["8"]
