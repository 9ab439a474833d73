"""A file's sha256, hashed in pieces on several threads; standard library only, so it also runs
as a script in a child process (`python -I -S filehash.py --workers N FILE...`).

Why a child process: a first run hashes the checkpoint (13 GB at 7B) while the main thread
imports transformers and loads the tokenizer. Threads of the same process share its GIL, and in
a cProfile of a cold 7B run on an H200 host with 16 hashing threads (perf/profile_cold.sh, round
8) the main thread's 47k stat() calls took 5.9 s against the plain script's 0.8 s, waiting for it.
A child has a GIL of its own and imports nothing beyond the standard library, so that cannot
happen at any thread count. (With four threads, round 10's A/B in perf/hash_probe.py measured no
difference beyond the spread between identical processes: the child is kept for the guarantee.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIECE = 256 * 2**20
READ = 16 * 2**20


def _sha256_piece(path: Path, offset: int) -> bytes:
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(READ, PIECE)))  # one buffer a piece: no 16 MB allocation per read
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        left = PIECE
        while left and (n := fh.readinto(buf[: min(len(buf), left)])):
            h.update(buf[:n])  # releases the GIL: pieces hash in parallel threads
            left -= n
    return h.digest()


def sha256_file(path: Path, workers: int | None = None) -> str:
    """sha256 of the sha256s of the file's 256 MB pieces (and its size), hashed on `workers` threads
    (default: all cores, at most 16).

    One sha256 stream runs at ~1 GB/s: 12 s for a 7B checkpoint's single 13 GB shard (measured
    on the benchmark machine). Pieces in parallel make it I/O-bound; any changed byte still
    changes the digest.
    """
    size = path.stat().st_size
    offsets = range(0, max(size, 1), PIECE)
    with ThreadPoolExecutor(max_workers=min(workers or 16, os.cpu_count() or 1)) as pool:
        pieces = list(pool.map(lambda o: _sha256_piece(path, o), offsets))
    return hashlib.sha256(b"".join(pieces) + str(size).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Print each file's sha256_file digest, one a line, in the order given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for f in args.files:
        print(sha256_file(f, args.workers), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
