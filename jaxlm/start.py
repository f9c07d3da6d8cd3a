"""Where a run starts: its own newest checkpoint that restores (never from step 0 on top of
checkpoints), another checkpoint's parameters (`--init-from`), or afresh with a tokenizer
every process shares."""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType

import jax
from etils import epath

from jaxlm import markers, optim, sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.checkpoint import Checkpointer, NoReadableCheckpoint, check_resume, parse_source, stored
from jaxlm.config import Config, ConfigError
from jaxlm.step import Setup, build

log = logging.getLogger("jaxlm")


def fresh_tokenizer(
    cfg: Config, objective: ModuleType, workdir: epath.Path
) -> tokenizer_lib.AnyTokenizer:
    """data.tokenizer; else a prepared entry's; else one trained on a bounded sample.

    Made on process 0 only and written to WORKDIR/jaxlm_tokenizer.json, which every other
    process waits for and loads: a sample of a large corpus differs from one training to the
    next, and every host must map text to the same ids."""
    path = workdir / tokenizer_lib.JAXLM_TOKENIZER

    def make() -> tokenizer_lib.AnyTokenizer:
        if cfg.data.tokenizer:
            tok = tokenizer_lib.load(cfg.data.tokenizer)
        else:
            tok = objective.default_tokenizer(cfg, workdir)
        markers.write_json(path, tok.to_dict())  # never seen half-written
        return tok

    tok = sharding.on_process_0("making the tokenizer", make)
    if tok is None:  # another process: process 0's, once it is written
        tok = tokenizer_lib.load(path)
    log.info("tokenizer: %d tokens, fingerprint %s", tok.vocab_size, tokenizer_lib.fingerprint(tok))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    return tok


def restore_or_init(s: Setup, ckpt: Checkpointer, cfg: Config) -> tuple[dict, int, object]:
    """(state, step, the checkpoint's tokenizer) of the newest checkpoint that restores, or a
    fresh state where the workdir has none. Every process takes the same decision.

    A step is passed over only on evidence that its files are damaged; once an older step
    restores, the damaged newer ones are moved to checkpoints_unreadable/. Any other error
    (out of memory, I/O, a refused config) stops the run and moves nothing. Where checkpoints
    exist and none restores, the run stops with each step's reason: it never starts over on
    top of them."""
    damaged: list[tuple[int, Exception]] = []
    for step in ckpt.steps():
        meta, error = ckpt.agreed(step, lambda step=step: ckpt.restore_meta(step))
        if error is None:
            check_resume(meta[0], cfg, f"{ckpt.root}/{step}")
            check_optimizer_state(meta[0], s, f"{ckpt.root}/{step}", f"{ckpt.root.parent}:{step}")
            state, error = ckpt.agreed(step, lambda step=step: ckpt.restore(step, s.abstract))
        if error is not None:
            log.warning(
                "checkpoint step %d in %s is damaged (%s: %.200s); trying an older one",
                step,
                ckpt.root,
                type(error).__name__,
                error,
            )
            damaged.append((step, error))
            continue
        for bad, why in damaged:
            ckpt.set_aside(bad, why)
        log.info("resumed from %s/%d", ckpt.root, step)
        log_rate_change(meta[0], cfg, step)
        ckpt.warn_of_retention(cfg.checkpoint)
        return state, step, meta[1]
    if damaged:
        reasons = "; ".join(f"step {k}: {type(e).__name__}: {str(e)[:200]}" for k, e in damaged)
        raise NoReadableCheckpoint(
            f"no checkpoint in {ckpt.root} restores, and training does not start over on top "
            f"of them ({reasons}). Nothing was moved: repair or remove them, or use another "
            "--workdir"
        )
    if aside := ckpt.set_aside_steps():
        raise NoReadableCheckpoint(
            f"{ckpt.quarantine} holds damaged steps ({', '.join(aside)}) set aside by an earlier "
            f"run, and {ckpt.root} holds none that restores: training does not start over on "
            "top of them. Move that directory away to start from step 0"
        )
    return s.init(), 0, None


def check_optimizer_state(saved: Config, s: Setup, where: str, source: str) -> None:
    """optim.* may change on resume (the rate, Muon's iterations), but not into an optimizer
    whose state has another form (optim.name=lion after adamw: one moment, not two): that
    is a ConfigError naming the changed keys, before Orbax reads anything (its own error is
    a tree of every parameter)."""
    if saved.optim == s.cfg.optim:
        return
    before = dataclasses.replace(s, tx=optim.make(saved.optim, saved.train.steps, s.mesh))
    old = jax.eval_shape(before._init_fn, jax.random.key(0))["opt_state"]
    new = s.abstract["opt_state"]  # this config's, as build() derived it
    if jax.tree.structure(old) == jax.tree.structure(new) and all(
        (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True)
    ):
        return
    was, now = dataclasses.asdict(saved.optim), dataclasses.asdict(s.cfg.optim)
    changed = "; ".join(
        f"optim.{k}: {was[k]!r} in the checkpoint, {now[k]!r} now" for k in was if was[k] != now[k]
    )
    raise ConfigError(
        f"cannot resume {where}: its optimizer state does not fit this config's optimizer "
        f"({changed}). Resume with the checkpoint's values, or train its parameters with the "
        f"new optimizer in a new workdir: --init-from {source} --workdir NEW"
    )


def init_from(s: Setup, spec: str) -> tuple[dict, object]:
    """(a fresh train state holding the parameters of checkpoint `WORKDIR[:STEP]`, its
    tokenizer): continued pretraining. The optimizer state and the step start afresh; the
    run's own data, schedule and model.seq_len apply. Parameters are matched by name and
    shape before anything is read; the optimizer state is never read."""
    src, step, src_cfg, tokenizer = stored(*parse_source(spec), f"--init-from {spec}: ")
    try:
        if src_cfg.objective != s.cfg.objective:
            raise ConfigError(
                f"--init-from {spec}: a {src_cfg.objective!r} checkpoint; this run's objective "
                f"is {s.cfg.objective!r}"
            )
        source = build(dataclasses.replace(src_cfg, mesh=s.cfg.mesh), s.mesh)
        have, want = _shapes(source.abstract["params"]), _shapes(s.abstract["params"])
        differ = [
            f"{name}: {have.get(name, 'absent')} there, {want.get(name, 'absent')} here"
            for name in sorted(have.keys() | want.keys())
            if have.get(name) != want.get(name)
        ]
        if differ:
            rows, hint = src_cfg.model.position_rows, ""
            if src_cfg.model.position == "learned" and any("positions" in d for d in differ):
                hint = f" (learned positions: set model.max_positions={rows})"
            raise ConfigError(
                f"--init-from {spec}: the parameters differ from this config's: "
                f"{'; '.join(differ[:8])}{'; ...' if len(differ) > 8 else ''}{hint}"
            )
        if cfg_tok := s.cfg.data.tokenizer:
            given = tokenizer_lib.load(cfg_tok)
            if tokenizer_lib.fingerprint(given) != tokenizer_lib.fingerprint(tokenizer):
                raise ConfigError(
                    f"data.tokenizer={cfg_tok} is not the tokenizer of --init-from {spec}: the "
                    "run goes on with the source's (leave data.tokenizer empty)"
                )
        state = s.init()
        state["params"] = src.restore(
            step, {**source.abstract, "params": s.abstract["params"]}, params_only=True
        )["params"]
    finally:
        src.close()
    log.info(
        "initialised %d parameter arrays from %s/%d (%s); optimizer state and step start afresh",
        len(want),
        src.root,
        step,
        src_cfg.name,
    )
    return state, tokenizer


def _shapes(params) -> dict[str, tuple]:
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value"): x.shape
        for path, x in flat
    }


def log_rate_change(saved: Config, cfg: Config, step: int) -> None:
    """A resume with another train.steps or optim.* can change the rate from the checkpoint's
    step on: say from what to what. A WSD run resumed from inside its decay with a larger
    train.steps climbs back to the peak, which is not the extension a WSD run allows: warn,
    naming the last step it could have been extended from."""
    before = float(optim.schedule(saved.optim, saved.train.steps)(step))
    after = float(optim.schedule(cfg.optim, cfg.train.steps)(step))
    if before == after:
        return
    log.info(
        "resume: the learning rate at step %d is %.4g (the checkpoint's schedule had %.4g)",
        step,
        after,
        before,
    )
    start = optim.decay_start(saved.optim, saved.train.steps)
    if saved.optim.schedule == "wsd" and step > start and after > before:
        log.warning(
            "resume: step %d is inside the checkpoint's WSD decay (it began at step %d of %d): "
            "the rate climbs back from %.4g to %.4g. A WSD run extends without a jump from a "
            "checkpoint at or before step %d",
            step,
            start,
            saved.train.steps,
            before,
            after,
            start,
        )
