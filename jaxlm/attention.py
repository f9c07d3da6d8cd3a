"""Which attention kernel for which backend, dtype, head size, lengths and masking.

One function, `choose`, decides, and says why; `attend` runs the choice. The rules are JAX's
own (jax/_src/cudnn/fused_attention_stablehlo.py, `check_layout` and
`check_is_flash_attention`, the same in JAX 0.10.2 and 0.11.2): cuDNN's fused attention takes
float16 / bfloat16 only and head sizes that are multiples of 8 up to 128 (256 from Hopper on).
Its backward pass takes even lengths only: JAX's check names the bias, but on an H200 (JAX
0.11.2, 2026-11-30) a ViT's 197 patches without any mask and CLIP's 77 caption tokens with
sequence lengths were refused too. jaxlm never hands cuDNN what it refuses:

- rows without a mask (a ViT's patches), with causal masking alone (a causal LM with
  `model.document_mask=false`) or with one right-padded sequence each (CLIP captions: lengths)
  go to cuDNN without a bias: is_causal and sequence lengths are cuDNN's own mask types;
- packed documents need their mask: a dense bias for cuDNN, or, with `model.max_segments`
  on a Hopper GPU, cuDNN's packed layout (each row's documents as sequences of their own,
  given by their starts and lengths: no bias); a batch with a row of more documents than
  that runs the dense bias instead (same result, slower). JAX has no public argument for the
  packed layout: jaxlm calls the function jax.nn.dot_product_attention calls, with its
  offsets (jax/_src/cudnn/fused_attention_stablehlo.py, in JAX 0.10.2 and 0.11.2);
- an odd length is padded by one position, hidden as a key (by the lengths, or as a segment
  of its own where there are segment ids), and cut off again: once for a whole stack
  (`stack_pad`, as jaxlm's Transformer does), else around the one call;
- anything else falls back to XLA's attention, with the reason logged once; and should cuDNN
  still refuse a call while it is traced (a rule this module does not know), the call falls
  back to XLA and says so.

On TPU, `auto` runs Pallas splash attention (jaxlm/splash.py, the kernel MaxText runs) with
segment ids, under shard_map; `model.attention=splash` elsewhere runs it in Pallas interpret
mode (slow: for tests). The platform is that of the mesh in context, so a step compiled here
for a TPU topology (`jaxlm plan --device v5p`) gets the TPU's kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxlm import splash

log = logging.getLogger("jaxlm")
CUDNN_DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Who may see whom, causality aside. segment_ids [B, T]: packed documents, each seeing
    only itself (segment 0, padding, sees only padding); lengths [B]: one sequence per row,
    right-padded, of that many positions; neither: every position sees every other. Only
    segment_ids costs a dense [B, 1, T, S] mask (a bias for cuDNN). pad: the last `pad`
    positions were appended to the whole stack (`stack_pad`): no other position sees them;
    they see the rest, and are cut off after the stack."""

    segment_ids: jax.Array | None = None
    lengths: jax.Array | None = None
    pad: int = 0

    def __post_init__(self) -> None:
        if self.segment_ids is not None and self.lengths is not None:
            raise ValueError("Mask takes segment_ids or lengths, not both")
        if self.segment_ids is not None and self.pad:
            raise ValueError("Mask: a pad goes into segment_ids as a segment of its own")

    def padded(self, pad: int) -> Mask:
        """This mask for rows with `pad` positions appended: a segment of their own where
        there are segment ids; else hidden as keys (the lengths already end before them)."""
        if self.segment_ids is None:
            return Mask(lengths=self.lengths, pad=self.pad + pad)
        pad_id = jnp.max(self.segment_ids) + 1
        widths = ((0, 0), (0, pad))
        return Mask(segment_ids=jnp.pad(self.segment_ids, widths, constant_values=pad_id))


@dataclasses.dataclass(frozen=True)
class Choice:
    implementation: str  # "cudnn" | "xla" (jax.nn.dot_product_attention's) | "splash"
    reason: str
    pad: int = 0  # positions appended to T and S (to an even length for cuDNN's bias rule)
    packed: int = 0  # cuDNN's packed layout for up to this many documents a row (0: not)


def choose(
    setting: str,
    backend: str,
    dtype: str,
    head_size: int,
    length: int,
    masked: bool,
    training: bool = True,
    hopper: bool = False,
    max_segments: int = 0,
) -> Choice:
    """The implementation for q, k, v of `length` positions and `head_size`, in `dtype`.
    masked: packed documents go with the call; hopper: compute capability >= 9.0 (larger
    head sizes, the packed layout); max_segments: model.max_segments."""
    if setting == "xla":
        return Choice("xla", "model.attention=xla")
    if backend == "tpu" and setting in ("auto", "splash"):
        return Choice("splash", "Pallas splash attention" + (" with segment ids" if masked else ""))
    if setting == "splash":
        if backend == "cpu":
            return Choice("splash", "model.attention=splash on a CPU: Pallas interpret mode (slow)")
        return Choice(
            "xla", f"model.attention=splash is a TPU kernel, and the backend is {backend}"
        )
    if backend != "gpu":
        if setting == "cudnn":
            return Choice("xla", f"model.attention=cudnn, but the backend is {backend}")
        return Choice("xla", f"{backend}: XLA attention (no fused kernel wired in here)")
    if dtype not in CUDNN_DTYPES:
        return Choice("xla", f"cuDNN takes float16 / bfloat16 only, not {dtype}")
    limit = 256 if hopper else 128
    if head_size > limit or head_size % 8:
        return Choice(
            "xla", f"cuDNN takes head sizes that are multiples of 8 up to {limit}: {head_size}"
        )
    if masked and max_segments and hopper:
        kind = f"cuDNN fused attention, packed layout of up to {max_segments} documents a row"
        return Choice("cudnn", kind, pad=length % 2 if training else 0, packed=max_segments)
    kind = "cuDNN fused attention" + (" with a mask" if masked else "")
    if masked and max_segments:
        kind += " (model.max_segments: the packed layout needs compute capability 9.0)"
    if training and length % 2:
        return Choice("cudnn", f"{kind}; odd length {length} padded to even", pad=1)
    return Choice("cudnn", kind)


def _platform() -> str:
    """The platform of the mesh in context (a TPU topology's when compiling for one ahead of
    time), else this process's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return jax.devices()[0].platform if device is None else device.platform


_targets: list[jax.Device] = []  # innermost last: the device `compiling_for` names


@contextlib.contextmanager
def compiling_for(device: jax.Device) -> Iterator[None]:
    """Choose for `device` while tracing (`jaxlm plan` compiling for a GPU it does not have:
    the mesh in context gives the platform, not the compute capability)."""
    _targets.append(device)
    try:
        yield
    finally:
        _targets.pop()


def _hopper() -> bool:
    """Compute capability >= 9.0 of the device compiled for (an H200's spec says 9.0)."""
    device = _targets[-1] if _targets else jax.devices()[0]
    if device.platform != "gpu":
        return False
    capability = getattr(device, "compute_capability", "0.0")
    return tuple(int(x) for x in str(capability).split(".")) >= (9, 0)


@functools.cache
def _logged(choice: Choice, what: str) -> None:
    log.info("attention for %s: %s (%s)", what, choice.implementation, choice.reason)


def _choose_here(setting: str, dtype, head_size: int, length: int, mask: Mask, max_segments: int):
    """`choose` for the platform and device compiled for."""
    platform = _platform()
    hopper = platform == "gpu" and _hopper()
    masked = mask.segment_ids is not None
    name = jnp.dtype(dtype).name
    return choose(setting, platform, name, head_size, length, masked, True, hopper, max_segments)


def stack_pad(
    setting: str, dtype, head_size: int, length: int, mask: Mask, max_segments: int
) -> int:
    """Positions to append to a whole stack of `length` so that its layers need no pad of their
    own (cuDNN's even-length rule met once, not by a pad and a cut around every layer's
    kernel: 4.0 of ViT-B/16's 103 ms in a traced H200 step, BENCHMARKS.md 2026-12-04)."""
    pad = _choose_here(setting, dtype, head_size, length, mask, max_segments).pad
    if pad:
        _logged_pad(length, pad)
    return pad


@functools.cache
def _logged_pad(length: int, pad: int) -> None:
    log.info("attention: length %d padded to %d once for the stack", length, length + pad)


# JAX's cuDNN checks while a call is traced. The packed layout calls a private JAX function,
# which a JAX version may lack or call differently: that is a refusal too, not a crash.
REFUSALS = (NotImplementedError, ValueError, RuntimeError)
PACKED_REFUSALS = (*REFUSALS, ImportError, AttributeError, TypeError)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask,
    causal: bool,
    setting: str = "auto",
    max_segments: int = 0,
) -> jax.Array:
    """Attention of q [B, T, H, K] over k, v [B, S, N, K] (N divides H), masked by `mask`;
    setting, max_segments: model.attention, model.max_segments."""
    b, t, h, size = q.shape
    segment_ids, platform = mask.segment_ids, _platform()
    choice = _choose_here(setting, q.dtype, size, t, mask, max_segments)
    what = f"{h} heads x {size}, length {t}, {q.dtype}"
    _logged(choice, what)
    if choice.implementation == "splash":
        if mask.lengths is not None or mask.pad:  # padding: segment 0, seeing only itself
            ends = jnp.full((b,), t - mask.pad) if mask.lengths is None else mask.lengths
            segment_ids = (jnp.arange(t)[None] < ends[:, None]).astype(jnp.int32)
        return splash.attend(q, k, v, segment_ids, causal, interpret=platform != "tpu")
    if choice.pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, choice.pad), (0, 0), (0, 0))) for x in (q, k, v))
        mask = mask.padded(choice.pad)
        segment_ids = mask.segment_ids
    lengths = None if mask.lengths is None else mask.lengths.astype(jnp.int32)
    key_lengths = lengths  # the pad, hidden as keys only: its queries see the rest (finite)
    if mask.pad and lengths is None:
        key_lengths = jnp.full((b,), q.shape[1] - mask.pad, jnp.int32)

    def call(q, k, v, implementation: str) -> jax.Array:
        dense = None
        if segment_ids is not None:
            dense = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # B 1 T S
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=dense,
            is_causal=causal,
            query_seq_lengths=lengths,
            key_value_seq_lengths=key_lengths,
            implementation=implementation,
        )

    # what was chosen, then what is left should cuDNN refuse it while it is traced
    attempts = [(choice.implementation, choice.packed)]
    attempts += [("cudnn", 0)] if choice.packed else []
    attempts += [("xla", 0)] if choice.implementation == "cudnn" else []
    for i, (implementation, packed) in enumerate(attempts):
        refusals = PACKED_REFUSALS if packed else REFUSALS
        try:
            if packed:
                out = _packed(q, k, v, segment_ids, causal, packed, call)
            else:
                out = call(q, k, v, implementation)
            break
        except refusals as refusal:
            if i == len(attempts) - 1:
                raise
            _logged(Choice(attempts[i + 1][0], f"cuDNN refused the call: {refusal}"), what)
    return out[:, :t] if choice.pad else out


def segment_runs(segment_ids: jax.Array, most: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each row's runs of equal segment ids (its documents, padding included, as jaxlm packs
    them) in the form of cuDNN's packed layout: (lengths [B, most], starts [B, most + 1],
    count [B]), -1 past a row's last run; a row with more than `most` runs does not fit."""
    b, t = segment_ids.shape
    new = _run_starts(segment_ids)
    starts = jax.vmap(lambda row: jnp.nonzero(row, size=most + 1, fill_value=-1)[0])(new)
    starts = starts.astype(jnp.int32)
    ends = jnp.concatenate([starts[:, 1:], jnp.full((b, 1), -1, jnp.int32)], axis=1)
    lengths = jnp.where(starts < 0, -1, jnp.where(ends < 0, t, ends) - starts)
    return lengths[:, :most], starts, new.sum(axis=1)


def over_max_segments(segment_ids: jax.Array, most: int) -> jax.Array:
    """How many of the batches segment_ids [N, B, T] (a step's micro-batches) hold a row of
    more than `most` documents: with the packed layout (model.max_segments=most, on a Hopper
    GPU) each of those ran the dense mask, whole, as `_packed` decides per attention call.
    An odd T, which cuDNN's path pads with a segment of its own, is counted without the pad."""
    runs = _run_starts(segment_ids).sum(axis=-1)  # [N, B]
    return jnp.sum(jnp.any(runs > most, axis=-1))


def _run_starts(segment_ids: jax.Array) -> jax.Array:
    """Where each run of equal segment ids begins in rows [..., T] (a document, or padding)."""
    first = jnp.ones((*segment_ids.shape[:-1], 1), bool)
    return jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)


def _packed(q, k, v, segment_ids, causal: bool, most: int, dense) -> jax.Array:
    """cuDNN's packed layout: each document a sequence of its own, no bias; the dense mask
    (`dense`, jax.nn.dot_product_attention with it) when a row holds more than `most`."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    lengths, starts, count = segment_runs(segment_ids, most)
    mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    packed = functools.partial(
        cudnn.dot_product_attention,
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=starts,
        kv_offsets=starts,
        scale=q.shape[-1] ** -0.5,
        mask_type=mask_type,
    )
    fits = jnp.all(count <= most)
    return jax.lax.cond(fits, packed, functools.partial(dense, implementation="cudnn"), q, k, v)


def cached(
    q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, positions: jax.Array
) -> tuple[jax.Array, dict]:
    """Decoding with a KV cache: k, v [B, T, N, K] are written into cache["k"], cache["v"]
    [B, S, N, K] at positions [B, T], and q attends to every cached position at or before its
    own. Whatever a row's cache holds beyond its position (a shorter prompt's padding) is
    never seen, and is overwritten before it would be."""
    rows = jnp.arange(q.shape[0])[:, None]
    cache = {"k": cache["k"].at[rows, positions].set(k), "v": cache["v"].at[rows, positions].set(v)}
    slots = jnp.arange(cache["k"].shape[1])
    visible = slots[None, None, None, :] <= positions[:, None, :, None]  # B 1 T S
    out = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=visible)
    return out, cache
