"""`python -m bench.lock_probe DATABASE STOPFILE`: opt out a new address every 50 ms, through cm's own service, until
STOPFILE exists; print each opt-out's latency (seconds) as JSON. Run beside an import, it shows how long a person's
opt-out waits for the import's write lock; run alone first, it gives the same opt-out on an idle database."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from campaign_manager.db import open_session
from campaign_manager.services import consent


def main() -> int:
    database, stop = sys.argv[1], Path(sys.argv[2])
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # at most this many (0: until STOPFILE)
    latencies: list[float] = []
    while not stop.exists() and (not limit or len(latencies) < limit):
        started = time.perf_counter()
        with open_session(database) as session:
            consent.opt_out(session, f"probe{time.time_ns()}@example.org", reason=None, source="bench")
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    print(json.dumps(latencies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
