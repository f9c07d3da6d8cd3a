"""`jaxlm plot` on two runs."""

import json

from PIL import Image

from jaxlm import cli


def _run(path, objective: str, scale: float) -> None:
    start = {"step": 0, "peak_flops": 1e12, "peak_flops_source": "data sheet"}
    start |= {"eval_unigram_loss": 6.0} if objective == "lm" else {"eval_majority_accuracy": 0.04}
    rows = [start]
    for step in range(10, 110, 10):
        row = {"step": step, "loss": scale * 8 / step**0.3, "lr": 1e-3 * step / 100}
        row |= {"tokens_per_s": 1000.0 + step, "mfu": 0.3}
        if objective == "mlm":
            row["accuracy"] = step / 200
        rows.append(row)
        if step % 50 == 0:
            rows.append({"step": step, "eval_loss": scale * 8 / step**0.3 + 0.1})
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_overlays_two_runs_with_their_baselines(tmp_path, capsys):
    _run(tmp_path / "gpt_run", "lm", 1.0)
    _run(tmp_path / "bert_run", "mlm", 1.2)
    out = tmp_path / "runs.png"
    args = ["plot", str(tmp_path / "gpt_run"), str(tmp_path / "bert_run"), "--out", str(out)]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["lines"] >= 12
    width, height = Image.open(out).size
    assert width >= 1200 and height >= 800

    from jaxlm.plot import plot

    drawn = plot([tmp_path / "gpt_run", tmp_path / "bert_run"], tmp_path / "again.png")
    assert "gpt_run eval_unigram_loss (baseline)" in drawn["loss"]
    assert "bert_run eval_majority_accuracy (baseline)" in drawn["accuracy"]
    assert {"gpt_run eval_loss", "bert_run eval_loss", "bert_run accuracy"} <= {
        *drawn["loss"],
        *drawn["accuracy"],
    }
    assert drawn["lr"] == ["gpt_run", "bert_run"] and drawn["mfu"] == ["gpt_run", "bert_run"]
    assert drawn["throughput"] == ["gpt_run tokens_per_s", "bert_run tokens_per_s"]


def test_plot_names_a_directory_without_metrics(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    # a run that has logged its start's baselines only: an empty figure said nothing
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_unigram_loss": 5.9}\n')
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no training step yet: nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_out_must_name_an_image_file(tmp_path, capsys):
    """matplotlib added .png to an --out without a suffix (a workdir given twice wrote
    WORKDIR.png while the line said WORKDIR) and raised a ValueError for .txt; both are
    refused, as is a directory, before anything is drawn."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    said = {
        tmp_path: "a directory; name the image file to write",
        tmp_path / "curves": "expected the name of an image file, ending in one of",
        tmp_path / "curves.txt": "expected the name of an image file, ending in one of",
    }
    for out, why in said.items():
        assert cli.main(["plot", str(tmp_path), "--out", str(out)]) == 2
        assert f"--out {out}: {why}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.parent.glob(f"{tmp_path.name}*")) == [tmp_path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.svg")]) == 0
    assert (tmp_path / "curves.svg").read_text().startswith("<?xml")
