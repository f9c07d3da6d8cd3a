"""Datasets of the shipped tasks, read from the files beside this one (the harness's
`custom_dataset`: a YAML's `data_files` would resolve against the current directory)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _test_split(name: str, **_):
    import datasets

    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_json(str(HERE / f"{name}.jsonl"), keep_in_memory=True)}
    )


def plays_next_line(**kwargs):
    return _test_split("plays_next_line", **kwargs)


def plays_passages(**kwargs):
    return _test_split("plays_passages", **kwargs)


def plays_complete_line(**kwargs):
    return _test_split("plays_complete_line", **kwargs)
