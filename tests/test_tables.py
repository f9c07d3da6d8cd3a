"""The lookup tables behind the optimizer and MFU: which parameters decay, which device has
which peak FLOP/s."""

import jax
import pytest
from conftest import load_tiny
from flax import nnx

from jaxlm import optim
from jaxlm.step import OBJECTIVES, device_peak_flops

MATRICES = {"wq", "wk", "wv", "wo", "wi", "wg", "tokens", "positions", "types", "head"}
MATRICES |= {"patch_embed", "image_proj", "text_proj", "head_dense"}


@pytest.mark.parametrize("config_file", ["gpt", "bert", "clip"])
def test_only_weight_matrices_decay(config_file):
    cfg = load_tiny(config_file, **{"model.use_bias": True, "model.scan_layers": True})
    model = OBJECTIVES[cfg.objective].make_model(cfg, nnx.Rngs(0))
    mask = optim.decay_mask(nnx.state(model, nnx.Param))
    decayed = {}
    for path, value in jax.tree_util.tree_leaves_with_path(mask):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = [k for k in keys if k != "value"][-1]
        decayed.setdefault(name, set()).add(bool(value))
    assert "bq" in decayed and "scale" in decayed  # the biases and norms this is about
    for name, flags in decayed.items():
        assert flags == {name in MATRICES}, (name, flags)


@pytest.mark.parametrize(
    ("kind", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA GH200 480GB", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5e", 197),
        ("TPU v5", 459),  # what a v5p reports
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("TPU v3", None),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_kind(kind, tflops):
    found = device_peak_flops(kind)
    assert (found and round(found[0] / 1e12)) == tflops


def test_the_cpu_peak_is_measured_on_one_device_inside_the_training_mesh():
    """The training loop measures a CPU's peak inside `jax.set_mesh` (8 fake devices here):
    the matmul still runs on one device (fake devices share the cores: one device's matmul is
    the machine's peak). Replicated on all 8, the peak was 8x low and MFU read 177%."""
    from jaxlm import config, sharding
    from jaxlm.step import one_device_matmul

    mesh = sharding.make_mesh(config.MeshConfig(2, 2, 2))
    with jax.set_mesh(mesh):
        assert len(one_device_matmul(64)().sharding.device_set) == 1
