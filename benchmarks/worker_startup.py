"""How long a CPU worker group takes to start: workers forked from the preloaded fork server (what
`ProcessWorkerGroup` does on gloo) against workers spawned fresh (what it does on accelerators), alternating
in one run. Each group's workers import the actor's code and join a gloo group; the first fork-server group
pays for starting the server.

    .venv/bin/python benchmarks/worker_startup.py --workers 2 --groups 4

Writes benchmarks/results/worker_startup.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch.multiprocessing as mp

from ascend_rl.distributed import worker_group

ROOT = Path(__file__).resolve().parents[1]
WORKER_CODE = ("ascend_rl.distributed.actor_group",)  # what an actor worker imports before it builds


def start_seconds(workers: int, spawn: bool) -> float:
    """One group's start, from the call to every worker having built its object."""
    original = worker_group.start_context
    if spawn:
        worker_group.start_context = lambda backend: mp.get_context("spawn")
    try:
        start = time.perf_counter()
        group = worker_group.ProcessWorkerGroup(workers, "collections:Counter", {}, imports=WORKER_CODE)
        seconds = time.perf_counter() - start
        group.close()
        return seconds
    finally:
        worker_group.start_context = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()
    forked, spawned = [], []
    for _ in range(args.groups):  # alternating, so both see the same machine load
        forked.append(start_seconds(args.workers, spawn=False))
        spawned.append(start_seconds(args.workers, spawn=True))
    later = statistics.median(forked[1:]) if len(forked) > 1 else forked[0]
    lines = [f"`benchmarks/worker_startup.py --workers {args.workers} --groups {args.groups}`: seconds from creating a "
             f"group of {args.workers} CPU workers to every worker ready", "",
             "| start | group 1 | later groups (median) |", "|---|---|---|",
             f"| fork server (gloo) | {forked[0]:.2f} | {later:.2f} |",
             f"| spawn | {spawned[0]:.2f} | {statistics.median(spawned[1:] or spawned):.2f} |"]
    print("\n".join(lines))
    (ROOT / "benchmarks" / "results" / "worker_startup.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
