"""Start-up cost of a training run: seconds from the command to its first step, and the peak
memory of the process, printed as one JSON line.

    python launch/bench_startup.py -- jaxlm train configs/gpt.py:tiny data.files=DIR train.steps=1
"""

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    first_step = None
    for line in proc.stderr:
        if first_step is None and " step 1/" in line:
            first_step = time.monotonic() - start
    code = proc.wait()
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: kilobytes
    print(
        json.dumps(
            {
                "command": " ".join(cmd),
                "returncode": code,
                "seconds_to_first_step": None if first_step is None else round(first_step, 1),
                "seconds_total": round(time.monotonic() - start, 1),
                "peak_rss_mb": round(peak_kb / 1024),
            }
        )
    )


if __name__ == "__main__":
    main()
