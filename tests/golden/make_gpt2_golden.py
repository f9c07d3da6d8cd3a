"""Writes tests/golden/gpt2_tiny/ (a small jaxlm GPT-2, trained 20 steps on the test corpus and
exported with `jaxlm export hf`) and tests/golden/gpt2_tiny.npz: what Hugging Face
transformers makes of that directory (AutoModelForCausalLM logits, AutoTokenizer ids), the
reference tests/test_hf_export.py holds jaxlm's import and export to. Run once, on CPU, with
torch and transformers (neither is needed by the test):

    pip install torch transformers && python tests/golden/make_gpt2_golden.py
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from conftest import load_tiny  # noqa: E402

from jaxlm.hf import export_hf  # noqa: E402
from jaxlm.train import train  # noqa: E402

TEXTS = [
    "ROMEO: But soft, what light\nthrough yonder window breaks?",
    "To be, or not to be, that is the question.",
    "Thé café's naïve résumé  [MASK]\n\n",
]


def main() -> None:
    out = HERE / "gpt2_tiny"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as workdir:
        train(load_tiny(**{"train.steps": 20}), workdir)
        export_hf(workdir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    width = max(map(len, ids))
    logits = np.zeros((len(ids), width, model.config.vocab_size), np.float32)
    for row, i in zip(logits, ids, strict=True):
        with torch.no_grad():
            row[: len(i)] = model(torch.tensor([i])).logits[0].float().numpy()
    np.savez_compressed(
        HERE / "gpt2_tiny.npz",
        texts=np.asarray(TEXTS),
        ids=np.asarray([i + [-1] * (width - len(i)) for i in ids], np.int32),
        logits=logits,
    )
    print(f"wrote {out} and gpt2_tiny.npz: ids of {[len(i) for i in ids]} tokens")


if __name__ == "__main__":
    main()
