#!/usr/bin/env python3
"""How many durable writes per second this machine's disk completes with 1,
2 and 4 of them in flight: each thread writes 8 KiB blocks with O_DIRECT and
RWF_DSYNC (the WAL's durable write), to its own region of one file. And, for
comparison, what Redis's `appendfsync always` does: append 4 KiB to a
growing file with write(), then fdatasync, one at a time.

    python3 benches/dsync-concurrency.py [directory] [seconds]

The directory defaults to target/tmp (on the disk the benchmarks use). The
ratio of the two single-writer rates bounds how far Quiver's group commit
can outrun Redis's at the same group size (README, Performance).
"""
import mmap
import os
import sys
import threading
import time

BLOCK = 8192
REGION = 16 << 20


def measure(path, threads, seconds):
    # Zero-filled and synced first, as the WAL pre-allocates its segments:
    # the measured writes then change no file system metadata.
    with open(path, "wb") as f:
        zeros = bytes(1 << 20)
        for _ in range(threads * REGION // len(zeros)):
            f.write(zeros)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        counts = [0] * threads

        def writer(i):
            buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
            buf.write(b"x" * BLOCK)
            base, n, deadline = i * REGION, 0, time.monotonic() + seconds
            while time.monotonic() < deadline:
                os.pwritev(fd, [buf], base + (n % (REGION // BLOCK)) * BLOCK, os.RWF_DSYNC)
                n += 1
            counts[i] = n

        workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / seconds
    finally:
        os.close(fd)
        os.unlink(path)


def measure_append(path, seconds):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    try:
        buf, n, deadline = b"x" * 4096, 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.write(fd, buf)
            os.fdatasync(fd)
            n += 1
        return n / seconds
    finally:
        os.close(fd)
        os.unlink(path)


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "tmp")
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "dsync-concurrency.dat")
    for round_ in range(2):
        for threads in (1, 2, 4):
            rate = measure(path, threads, seconds)
            print(f"round {round_ + 1}: {threads} in flight: {rate:8.0f} durable writes/s")
        rate = measure_append(path, seconds)
        print(f"round {round_ + 1}: append + fdatasync: {rate:8.0f} durable writes/s")


if __name__ == "__main__":
    main()
