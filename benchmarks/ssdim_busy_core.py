"""Benchmark: ``ssdim()`` called as from a notebook, on an idle CPU and beside a busy core.

SSDIM's solvers make thousands of small BLAS calls; with a multi-threaded BLAS and a core
taken by another process, OpenBLAS threads spin-wait for each other. ``ssdim`` limits its own
hot loop to one BLAS thread (threadpoolctl), so its speed should not depend on the caller's
environment. This measures it: each row is a fresh process with the BLAS thread count the user
left (``OPENBLAS_NUM_THREADS`` and ``OMP_NUM_THREADS`` unset unless ``--blas-threads``), timing
``ssdim(E, k)`` on clustered synthetic embeddings (M=1300, d=512: an ImageNet class), median
of ``--repeats`` calls after one warm-up, first with nothing else running, then while
``--busy`` processes each spin one core. The goal: the busy median within 2x of the idle one.

Usage: python benchmarks/ssdim_busy_core.py [--repeats 7] [--k 160 16] [--busy 1]
Run it on an otherwise quiet machine: "idle" is only as idle as the machine is.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

CHILD = """
import json, statistics, sys, time
sys.path.insert(0, {benchmarks!r})
from selection import clustered_embeddings
from gridistill.tasks.ssdim import ssdim
embeddings = clustered_embeddings({m}, {d}, seed=1)
out = {{}}
for k in {ks}:
    ssdim(embeddings, k)
    times = []
    for _ in range({repeats}):
        started = time.perf_counter()
        ssdim(embeddings, k)
        times.append(time.perf_counter() - started)
    out[k] = statistics.median(times)
print(json.dumps(out))
"""


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def timed_child(args: argparse.Namespace) -> dict[int, float]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if args.blas_threads:
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(args.blas_threads)
    code = CHILD.format(benchmarks=os.path.dirname(os.path.abspath(__file__)), m=args.m,
                        d=args.d, ks=tuple(args.k), repeats=args.repeats)
    result = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                            capture_output=True, text=True)
    return {int(k): v for k, v in json.loads(result.stdout.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--k", type=int, nargs="+", default=[160, 16])
    parser.add_argument("--m", type=int, default=1300)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--busy", type=int, default=1, help="processes spinning a core each")
    parser.add_argument("--blas-threads", type=int, default=0,
                        help="set OPENBLAS/OMP_NUM_THREADS in the child (0: leave unset)")
    args = parser.parse_args()

    idle = timed_child(args)
    stop_at = time.time() + 600
    spinners = [multiprocessing.Process(target=spin, args=(stop_at,), daemon=True)
                for _ in range(args.busy)]
    for process in spinners:
        process.start()
    try:
        busy = timed_child(args)
    finally:
        for process in spinners:
            process.terminate()
    print(f"# M={args.m} d={args.d}, {os.cpu_count()} CPUs, BLAS threads "
          f"{args.blas_threads or 'unset'}, median of {args.repeats}, {args.busy} busy "
          f"process(es) in the second column")
    print("| k | idle s | beside a busy core s | ratio | goal <= 2x |")
    print("|---:|---:|---:|---:|---|")
    for k in args.k:
        ratio = busy[k] / idle[k]
        print(f"| {k} | {idle[k]:.3f} | {busy[k]:.3f} | {ratio:.2f} | "
              f"{'met' if ratio <= 2 else 'missed'} |")


if __name__ == "__main__":
    main()
