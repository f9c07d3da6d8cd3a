"""Writes jaxlm/tasks/*.jsonl: three small evaluation sets from a play that is not in the
built-in corpus (The Winter's Tale: text no tiny jaxlm model trained on), one per request type
of lm-evaluation-harness:

- plays_next_line.jsonl: which of four lines comes next after two lines of a speech (HellaSwag's
  layout: ctx, endings, label; the three wrong endings are other lines of the play);
- plays_passages.jsonl: passages of speech (text), for rolling perplexity;
- plays_complete_line.jsonl: the first words of a line (context) and the rest (answer), for
  generation with a stop string.

    python launch/make_eval_tasks.py ../shared/data/shakespeare/winters_tale.txt

Deterministic (seed 0): rerunning it rewrites the same files.
"""

import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jaxlm" / "tasks"
SPEAKER = re.compile(r"^[A-Z][A-Z' ]+\.$")


def speeches(text: str) -> list[list[str]]:
    """The lines of each speech (a speaker's name in capitals, then lines until a blank)."""
    out, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if SPEAKER.match(line):
            current = []
            out.append(current)
        elif not line or line.startswith("["):
            current = None
        elif current is not None:
            current.append(line)
    return [s for s in out if s]


def main(play: str) -> None:
    rng = random.Random(0)
    lines_of = speeches(Path(play).read_text())
    every = [line for s in lines_of for line in s if len(line.split()) >= 4]
    long = [s for s in lines_of if len(s) >= 3]
    rng.shuffle(long)

    next_line = []
    for s in long[:200]:
        i = rng.randrange(len(s) - 2)
        true = s[i + 2]
        if len(true.split()) < 4:
            continue
        wrong = rng.sample([x for x in every if x != true], 3)
        label = rng.randrange(4)
        endings = wrong[:label] + [true] + wrong[label:]
        next_line.append({"ctx": f"{s[i]}\n{s[i + 1]}\n", "endings": endings, "label": label})

    passages = [{"text": "\n".join(s[:12])} for s in long[200:240]]

    complete = []
    for s in long[240:320]:
        words = s[0].split()
        if len(words) < 6:
            continue
        k = len(words) // 2
        complete.append({"context": " ".join(words[:k]), "answer": " " + " ".join(words[k:])})

    for name, rows in (
        ("plays_next_line", next_line),
        ("plays_passages", passages),
        ("plays_complete_line", complete),
    ):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)}")


if __name__ == "__main__":
    main(sys.argv[1])
