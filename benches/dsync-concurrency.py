#!/usr/bin/env python3
"""How many durable writes per second this machine's disk completes with 1,
2 and 4 of them in flight: each thread writes 8 KiB blocks with O_DIRECT and
RWF_DSYNC (the WAL's durable write), to its own region of one file. And, for
comparison, what Redis's `appendfsync always` does: append 4 KiB to a
growing file with write(), then fdatasync, one at a time. And the durable
write split in its two halves (an O_DIRECT write, then fdatasync), one after
the other and with the next write overlapping the last flush.

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


def zero_filled(path, size):
    # Zero-filled and synced first, as the WAL pre-allocates its segments:
    # the measured writes then change no file system metadata.
    with open(path, "wb") as f:
        zeros = bytes(1 << 20)
        for _ in range(size // len(zeros)):
            f.write(zeros)
        f.flush()
        os.fsync(f.fileno())


def measure(path, threads, seconds):
    zero_filled(path, threads * REGION)
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


def measure_split(path, seconds):
    """The durable write in two halves: an O_DIRECT write, then fdatasync
    (which, with no metadata to record, only flushes the device's cache).
    First one after the other, timing each half; then overlapped, the next
    block written while a second thread flushes the last one, as a log could
    if the device ran the two at once. Returns (sequential rate, write us,
    flush us, overlapped rate)."""
    zero_filled(path, REGION)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    buf.write(b"x" * BLOCK)
    blocks = REGION // BLOCK
    try:
        n, write_s, flush_s, deadline = 0, 0.0, 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            os.pwritev(fd, [buf], (n % blocks) * BLOCK)
            written = time.perf_counter()
            os.fdatasync(fd)
            write_s, flush_s, n = write_s + written - start, flush_s + time.perf_counter() - written, n + 1
        sequential = (n / seconds, write_s / n * 1e6, flush_s / n * 1e6)

        # written: the last block handed to the flusher; flushed: the last
        # block a finished fdatasync covers (it started after its write).
        state = {"written": -1, "flushed": -1, "stop": False}
        changed = threading.Condition()

        def flusher():
            while True:
                with changed:
                    changed.wait_for(lambda: state["stop"] or state["written"] > state["flushed"])
                    if state["stop"]:
                        return
                    covers = state["written"]
                os.fdatasync(fd)
                with changed:
                    state["flushed"] = covers
                    changed.notify_all()

        thread = threading.Thread(target=flusher)
        thread.start()
        n, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            os.pwritev(fd, [buf], (n % blocks) * BLOCK)
            with changed:
                # At most one block waits behind the flush in flight.
                changed.wait_for(lambda: state["flushed"] >= n - 1)
                state["written"] = n
                changed.notify_all()
            n += 1
        with changed:
            changed.wait_for(lambda: state["flushed"] >= n - 1)
            state["stop"] = True
            changed.notify_all()
        thread.join()
        return sequential + (n / seconds,)
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
        rate, write_us, flush_us, overlapped = measure_split(path, seconds)
        print(
            f"round {round_ + 1}: O_DIRECT write ({write_us:.0f} us) then fdatasync ({flush_us:.0f} us):"
            f" {rate:8.0f} durable writes/s; the next write overlapping the flush: {overlapped:8.0f}"
        )


if __name__ == "__main__":
    main()
