"""CPU by process, every second, while a benchmark runs: which process is the limit.

Sole purpose: a machine-wide figure (``bench/imap_ingest.py`` prints the machine's busy
time per pass) says how much CPU a path costs, not whose it is. This samples
``/proc/<pid>/stat`` (user + system time) once a second and prints each second's top
processes, Python processes by pid (the daemon and its parse workers apart):

    .venv/bin/python bench/cpu_by_process.py > cpu.log &
    .venv/bin/python bench/imap_ingest.py --messages 10000
    kill %1

A line reads ``second  name:cores …`` (``py1234:0.62`` is Python process 1234 at 0.62 of
a core). Benchmarks are never tests: this prints, it asserts nothing.
"""

import argparse
import os
import sys
import time
from collections import Counter

TICK = os.sysconf("SC_CLK_TCK")


def snapshot() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system ticks) of every process still there."""
    out: dict[int, tuple[str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:  # ended between the listing and the read
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry)
        out[pid] = (
            f"py{pid}" if name.startswith("python") else name,
            int(fields[11]) + int(fields[12]),
        )
    return out


def main(top: int) -> None:
    before, started = snapshot(), time.monotonic()
    while True:
        time.sleep(1)
        now = snapshot()
        used: Counter[str] = Counter()
        for pid, (name, ticks) in now.items():
            used[name] += ticks - before.get(pid, (name, 0))[1]
        before = now
        busiest = [(n, t / TICK) for n, t in used.most_common(top) if t > 0]
        line = "  ".join(f"{n}:{cores:.2f}" for n, cores in busiest)
        print(f"{time.monotonic() - started:5.0f}  {line}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=6, help="processes a line (6)")
    try:
        main(parser.parse_args().top)
    except KeyboardInterrupt:
        sys.exit(0)
