"""`python -m bench.lock_probe DATABASE STOPFILE [N]`: opt out a new address every 50 ms, through cm's own service,
until STOPFILE exists (or N times); print each opt-out's latency (seconds) as JSON. Run beside an import, it shows
how long a person's opt-out waits for the import's write lock; run alone first, it gives the same opt-out on an idle
database. `python -m bench.lock_probe --longest DATABASE` prints the longest segment transaction the last import
recorded (in its own process: the benchmark's process stays small, as its children's peak RSS includes its own)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from campaign_manager.audience import recipients
from campaign_manager.db import open_session


def main() -> int:
    if sys.argv[1] == "--longest":
        print(json.dumps(longest_segment(sys.argv[2])))
        return 0
    database, stop = sys.argv[1], Path(sys.argv[2])
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 0  # at most this many (0: until STOPFILE)
    latencies: list[float] = []
    while not stop.exists() and (not limit or len(latencies) < limit):
        started = time.perf_counter()
        with open_session(database) as session:
            recipients.opt_out_address(session, f"probe{time.time_ns()}@example.org", reason=None, source="bench")
        latencies.append(time.perf_counter() - started)
        time.sleep(0.05)
    print(json.dumps(latencies))
    return 0


def longest_segment(database: str) -> float | None:
    """The last import's own record of its longest segment transaction (job.result.max_lock_seconds)."""
    from sqlmodel import col, select

    from campaign_manager.tables.jobs import Job

    with open_session(database, write=False) as session:
        jobs = session.exec(select(Job).where(col(Job.kind) == "import").order_by(col(Job.id).desc())).all()
    for job in jobs:
        if (job.result or {}).get("max_lock_seconds") is not None:
            return float(job.result["max_lock_seconds"])
    return None


if __name__ == "__main__":
    sys.exit(main())
