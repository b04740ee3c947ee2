"""Wait until a server answers /health with 200 (the perf shell scripts start one and call this).

    python3 perf/wait_healthy.py PORT PID [SECONDS]

Exits 0 once ``http://127.0.0.1:PORT/health`` answers 200; non-zero, with the reason, when the
process PID exits first (a bad config, a missing tokenizer) or SECONDS (default 600) pass.
"""
from __future__ import annotations

import os
import sys
import time
import urllib.request


def main(argv: list[str]) -> int:
    port, pid = int(argv[0]), int(argv[1])
    seconds = int(argv[2]) if len(argv) > 2 else 600
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("the server exited before it became healthy", file=sys.stderr)
            return 1
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return 0
        except Exception:
            pass
        time.sleep(1)
    print(f"server did not become healthy in {seconds} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
