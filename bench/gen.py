"""A seeded generator of recipient CSV files (`email,name,city,plan`) for the import benchmarks.

About 2% of rows carry an invalid email and about 5% repeat an earlier address in a different letter case, later
in the file. Rows are streamed to disk, so a million of them never sit in memory: the only state is a small heap
of addresses waiting to be repeated. The same rows and seed always give the same bytes.

Run `python -m bench.gen --rows 1000000` to make (or find) a cached file and see how long generation took.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import os
import random
import time
import unicodedata
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Bump when the output changes, so cached files made by an older generator are not reused.
VERSION = 1
DATA_DIR = Path(__file__).resolve().parent / "data"
HEADER = ("email", "name", "city", "plan")

INVALID_RATE = 0.02
DUPLICATE_RATE = 0.05
# A repeat lands between 1 and MAX_GAP rows after its original; this bounds the heap to ~MAX_GAP * 5% entries.
MAX_GAP = 50_000

# fmt: off
FIRST = (
    "Ada", "Alan", "Grace", "Linus", "Barbara", "Ken", "Dennis", "Margaret", "Edsger", "Donald", "Frances", "John",
    "Radia", "Tim", "Guido", "Anita", "Bjarne", "Sophie", "Hedy", "Katherine", "Niklaus", "Leslie", "Shafi", "Jean",
    "Carl", "Mary", "Ahmed", "Wei", "Priya", "Olga", "José", "Zoë", "Björn", "Łukasz",
)
LAST = (
    "Lovelace", "Turing", "Hopper", "Torvalds", "Liskov", "Thompson", "Ritchie", "Hamilton", "Dijkstra", "Knuth",
    "Allen", "McCarthy", "Perlman", "Lee", "Rossum", "Borg", "Stroustrup", "Wilson", "Lamarr", "Johnson", "Wirth",
    "Lamport", "Goldwasser", "Sammet", "Hewitt", "Shaw", "Khan", "Zhang", "Patel", "Ivanova", "García", "Müller",
    "Nørgaard", "Kowalski",
)
DOMAINS = (
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "example.com", "example.org", "mail.example.net",
    "acme-corp.co.uk", "posteo.de", "fastmail.fm", "proton.me", "web.de",
)
# A few cities need CSV quoting (a comma, a quote), as real files do.
CITIES = (
    "London", "Paris", "Berlin", "Madrid", "Lisbon", "Warsaw", "Oslo", "Dublin", "Zürich", "Kraków", "Montréal",
    "São Paulo", "Washington, D.C.", 'Springfield "Old Town"', "Tokyo",
)
# fmt: on
PLANS = ("free", "free", "free", "pro", "pro", "team", "enterprise")
# Each shape is rejected by email-validator (checked without DNS), and carries the row number so that no two
# invalid rows are alike.
INVALID = (
    "{u}{n}example.com",
    "{u}{n}@@example.com",
    "",
    "{u} {n}@example.com",
    "{u}{n}@localhost",
    "{u}{n}@example..com",
    "@example{n}.com",
    "{u}{n}@",
    ".{u}{n}@example.com",
    "{u}{n}.@example.com",
    "{u}{n}@example.test",
    "{u}{n}@-example.com",
    "{u}..{n}@example.com",
    "{u}{n}@example.local",
    "{u}({n}@example.com",
    "{u}{n}@example_org.com",
)


def _fold(word: str) -> str:
    return unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode() or "x"


# Accent-free spellings, worked out once rather than per row.
_ASCII = {word: _fold(word) for word in (*FIRST, *LAST)}


@dataclass(frozen=True)
class Dataset:
    """A generated file and what is in it, so an import's counts can be checked against it."""

    path: Path
    rows: int
    seed: int
    invalid: int
    duplicates: int
    seconds: float  # how long generating it took (when it was made, cached or not)
    generated_now: bool = False  # False when it came from the cache

    @property
    def unique_valid(self) -> int:
        return self.rows - self.invalid - self.duplicates


def dataset_path(*, rows: int, seed: int, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / f"recipients-{rows}-s{seed}-v{VERSION}.csv"


def ensure_dataset(*, rows: int, seed: int, data_dir: Path = DATA_DIR) -> Dataset:
    """Return the cached file for rows+seed, generating it first when missing."""
    path = dataset_path(rows=rows, seed=seed, data_dir=data_dir)
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return Dataset(path=path, **meta)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves a truncated file in the cache.
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        dataset = write_csv(tmp, rows=rows, seed=seed)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dataset = replace(dataset, path=path, generated_now=True)
    meta = {k: v for k, v in asdict(dataset).items() if k not in ("path", "generated_now")}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return dataset


def write_csv(path: Path, *, rows: int, seed: int) -> Dataset:
    """Write `rows` data rows (plus a header) to path. Deterministic for a given rows and seed."""
    started = time.perf_counter()
    rng = random.Random(seed)
    rand = rng.random
    pending: list[tuple[int, int, str]] = []  # (due row, tie-break, address) of addresses to repeat later
    invalid = duplicates = 0
    # Scheduling a repeat for ~5.4% of the 93% unique rows makes ~5% of all rows repeats.
    repeat_rate = DUPLICATE_RATE / (1 - INVALID_RATE - DUPLICATE_RATE)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for n in range(rows):
            first = FIRST[int(rand() * len(FIRST))]
            last = LAST[int(rand() * len(LAST))]
            if pending and pending[0][0] <= n:
                email = _recase(heapq.heappop(pending)[2], rng)
                duplicates += 1
            elif rand() < INVALID_RATE:
                shape = INVALID[int(rand() * len(INVALID))]
                email = shape.format(u=_ASCII[first].lower(), n=n)
                invalid += 1
            else:
                email = _address(first, last, n, rng)
                if rand() < repeat_rate and n + 1 < rows:
                    due = n + 1 + int(rand() * min(MAX_GAP, rows - n - 1))
                    heapq.heappush(pending, (due, n, email))
            writer.writerow((email, f"{first} {last}", CITIES[int(rand() * len(CITIES))], PLANS[int(rand() * 7)]))
    return Dataset(path, rows, seed, invalid, duplicates, time.perf_counter() - started)


def _address(first: str, last: str, n: int, rng: random.Random) -> str:
    # The row number makes every address unique; a few keep their accents (internationalized local parts).
    roll = rng.random()
    if roll < 0.005:
        local = f"{first}.{last}{n}".lower()
    elif roll < 0.2:
        local = f"{_ASCII[first]}.{_ASCII[last]}{n}"
    elif roll < 0.3:
        local = f"{_ASCII[first][0]}{_ASCII[last]}+news{n}".lower()
    else:
        local = f"{_ASCII[first]}.{_ASCII[last]}.{n}".lower()
    domain = DOMAINS[int(rng.random() * len(DOMAINS))]
    if rng.random() < 0.05:
        domain = domain.capitalize()
    return f"{local}@{domain}"


def _recase(email: str, rng: random.Random) -> str:
    """The same address in a different letter case (never identical to the original)."""
    roll = rng.random()
    if roll < 0.3:
        changed = email.upper()
    elif roll < 0.5:
        changed = email.title()
    else:
        changed = "".join(c.swapcase() if rng.random() < 0.3 else c for c in email)
    if changed == email:
        changed = email.swapcase()
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="write here instead of the bench/data cache (always regenerates)")
    args = parser.parse_args(argv)
    if args.out:
        dataset = replace(write_csv(args.out, rows=args.rows, seed=args.seed), generated_now=True)
    else:
        dataset = ensure_dataset(rows=args.rows, seed=args.seed)
    print(f"{dataset.path}: {describe(dataset)}")


def describe(data: Dataset) -> str:
    how = "generated by this run" if data.generated_now else "cached; generated earlier"
    return (
        f"{data.rows:,} rows ({data.invalid:,} invalid, {data.duplicates:,} duplicates), "
        f"{data.path.stat().st_size / 1e6:.1f} MB; {how} in {data.seconds:.2f} s "
        f"({data.rows / max(data.seconds, 1e-9):,.0f} rows/s)"
    )


if __name__ == "__main__":
    main()
