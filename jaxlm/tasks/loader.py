"""Datasets of the shipped tasks, read from the files beside this one (the harness's
`custom_dataset`: a YAML's `data_files` would resolve against the current directory)."""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the harness brings `datasets`; jaxlm does not need it
    import datasets

HERE = Path(__file__).resolve().parent


def _test_split(name: str, **_) -> "datasets.DatasetDict":
    import datasets

    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_json(str(HERE / f"{name}.jsonl"), keep_in_memory=True)}
    )


def plays_next_line(**kwargs) -> "datasets.DatasetDict":
    return _test_split("plays_next_line", **kwargs)


def plays_passages(**kwargs) -> "datasets.DatasetDict":
    return _test_split("plays_passages", **kwargs)


def plays_complete_line(**kwargs) -> "datasets.DatasetDict":
    return _test_split("plays_complete_line", **kwargs)
