"""Writes tests/golden/{gpt2,llama}_tiny/ (small jaxlm causal LMs, trained 20 steps on the test
corpus and exported with `jaxlm export hf`) and tests/golden/{gpt2,llama}_tiny.npz: what
Hugging Face transformers makes of each directory (AutoModelForCausalLM logits, AutoTokenizer
ids), the references tests/test_hf_export.py holds jaxlm's import and export to. The GPT-2 is
the tiny config (learned positions, biases, tied head); the Llama has RoPE, RMSNorm, SwiGLU,
2 of 4 kv heads and an untied head. Run once, on CPU, with torch and transformers (neither is
needed by the test):

    pip install torch transformers && python tests/golden/make_export_goldens.py
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
    "Th\u00e9 caf\u00e9's na\u00efve r\u00e9sum\u00e9  [MASK]\n\n",
]
MODELS = {
    "gpt2_tiny": {},
    "llama_tiny": {
        "model.position": "rope",
        "model.norm": "rmsnorm",
        "model.mlp": "swiglu",
        "model.use_bias": False,
        "model.num_kv_heads": 2,
        "model.tie_embeddings": False,
    },
}


def main() -> None:
    for name, overrides in MODELS.items():
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        with tempfile.TemporaryDirectory() as workdir:
            train(load_tiny(**{"train.steps": 20, **overrides}), workdir)
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
            HERE / f"{name}.npz",
            texts=np.asarray(TEXTS),
            ids=np.asarray([i + [-1] * (width - len(i)) for i in ids], np.int32),
            logits=logits,
        )
        lengths = [len(i) for i in ids]
        print(f"wrote {out} and {name}.npz ({type(model).__name__}): ids of {lengths}")


if __name__ == "__main__":
    main()
