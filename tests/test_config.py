import pytest
from conftest import ROOT, tiny_overrides

from jaxlm import cli, config
from jaxlm.config import ConfigError

GPT = str(ROOT / "configs/gpt.py")


def test_override_types_are_checked():
    cfg = config.load(
        f"{GPT}:tiny", ["train.steps=7", "model.tie_embeddings=false", "optim.lr=1e-3"]
    )
    assert (cfg.train.steps, cfg.model.tie_embeddings, cfg.optim.lr) == (7, False, 1e-3)
    assert cfg.name == "gpt:tiny"


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'.*'train.steps'"):
        config.load(f"{GPT}:tiny", ["train.step=10"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train.batch_size' expects int, got 'eight'"):
        config.load(f"{GPT}:tiny", ["train.batch_size=eight"])


def test_bad_choice_and_unknown_variant():
    with pytest.raises(ConfigError, match=r"'model.norm' is 'batchnorm'; expected one of"):
        config.load(f"{GPT}:tiny", ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match=r"'train.track' is \('jsonl', 'tb'\); expected each"):
        config.load(f"{GPT}:tiny", ["train.track=jsonl,tb"])
    with pytest.raises(ConfigError, match=r"unknown variant 'huge'.*gpt2_124m"):
        config.load(f"{GPT}:huge")


@pytest.mark.parametrize(
    "override, said",
    [
        ("model.d_model=0", "'model.d_model' must be positive, got 0"),
        ("optim.lr=-0.001", "'optim.lr' must be >= 0, got -0.001"),
        ("optim.b2=1", r"'optim.b2' must be in \[0, 1\), got 1.0"),
        ("optim.min_lr_ratio=1.5", r"'optim.min_lr_ratio' must be in \[0, 1\], got 1.5"),
        ("optim.eps=0", "'optim.eps' must be positive, got 0.0"),
        ("optim.muon_ns_steps=0", "'optim.muon_ns_steps' must be positive, got 0"),
        ("optim.clip_norm=-1", "'optim.clip_norm' must be >= 0, got -1.0"),
        ("checkpoint.every_minutes=-5", "'checkpoint.every_minutes' must be >= 0, got -5.0"),
    ],
)
def test_numbers_out_of_range_name_the_key_and_the_range(override, said):
    with pytest.raises(ConfigError, match=said):
        config.load(f"{GPT}:tiny", [override])


def test_every_number_refuses_minus_three_naming_its_key():
    """No numeric key takes any number: each (but mesh.*, where -1 means "the rest" and the
    device count decides, sharding.mesh_shape) refuses -3 at load, naming itself."""
    numbers = [k for k, t in config.leaf_keys(config.Config).items() if t in (int, float)]
    assert len(numbers) > 40
    for key in numbers:
        if key.startswith("mesh."):
            continue
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.load(f"{GPT}:tiny", [f"{key}=-3"])


def test_range_bounds_are_kept_as_written():
    for ok in ("optim.lr=0", "optim.b1=0", "optim.clip_norm=0", "optim.decay_fraction=1"):
        config.load(f"{GPT}:tiny", [ok])  # a bracket's bound is allowed


def test_more_predictions_than_positions_is_refused_naming_both_keys():
    """(Once a 100,000-prediction sparse head asked XLA for 138 GB before anything said why.)"""
    bert = str(ROOT / "configs/bert.py:tiny")
    config.load(bert, ["model.seq_len=64", "mlm.max_predictions=64"])
    with pytest.raises(ConfigError, match=r"mlm.max_predictions=65 is more than model.seq_len=64"):
        config.load(bert, ["model.seq_len=64", "mlm.max_predictions=65"])


def test_a_row_too_wide_for_the_fused_norms_is_refused_naming_its_key():
    """model.norm_kernel=pallas holds a row in one block of up to 8192 positions: wider is
    named at load time, not by a trace-time error inside the kernel."""
    config.load(f"{GPT}:tiny", ["model.d_model=8192", "model.norm_kernel=pallas"])
    with pytest.raises(ConfigError, match=r"^model.d_model=8320 is over 8192, the widest row"):
        config.load(f"{GPT}:tiny", ["model.d_model=8320", "model.norm_kernel=pallas"])
    config.load(f"{GPT}:tiny", ["model.d_model=8320"])  # XLA's norm: any width
    clip = str(ROOT / "configs/clip.py:tiny")
    with pytest.raises(ConfigError, match=r"^vision.d_model=8320 is over 8192"):
        config.load(clip, ["vision.d_model=8320", "vision.num_heads=4", "model.norm_kernel=pallas"])


def test_a_vocabulary_too_large_for_the_corpus_names_its_key():
    from jaxlm import tokenizer

    with pytest.raises(ConfigError, match=r"^model.vocab_size=10: training a sentencepiece"):
        tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 10, 10)


def test_config_round_trips_through_dict():
    cfg = config.load(f"{GPT}:tiny", tiny_overrides())
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_cli_reports_user_errors_without_a_traceback(capsys):
    assert cli.main(["train", f"{GPT}:tiny", "model.d_modle=64"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.d_modle'; did you mean 'model.d_model'?" in err
    assert "Traceback" not in err


def test_a_broken_config_file_is_named_at_its_own_lines(tmp_path, capsys):
    """A config file is the user's Python: its mistakes are shown at its lines, without the
    frames of jaxlm's loader (a SyntaxError, an exception in get_config, a wrong return)."""
    cases = {
        "syntax.py": ("def get_config(:\n    pass\n", ["is not valid Python", "line 1", "^"]),
        "raises.py": (
            "def helper(d):\n    return d['nope']\n\n"
            "def get_config(variant):\n    return helper({})\n",
            ["raised KeyError: 'nope'", "line 5, in get_config", "line 2, in helper"],
        ),
        "returns.py": ("def get_config(variant):\n    return 1\n", ["returned int, not a"]),
    }
    for name, (source, said) in cases.items():
        (tmp_path / name).write_text(source)
        assert cli.main(["train", f"{tmp_path / name}:tiny"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"jaxlm: error: config file '{tmp_path / name}'"), err
        assert all(s in err for s in said), err
        assert "Traceback" not in err and "importlib" not in err, err
