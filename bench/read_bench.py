#!/usr/bin/env python3
"""Read-cache benchmark: Sluice's cache in front of the testbed's slow disk, reading, side by side
with nbdkit's cache filter (cache=writeback, cache-on-read=true, 4K blocks) in front of the same kind
of slow disk, and Sluice passthrough over a fast file on the local disk (the reference), in one run.

Workloads (fio's nbd engine over Unix sockets):

  hot-set randread    4k random reads at QD32 over a hot set that fits in the cache (default 256 MiB
                      of a 2 GiB volume, 1 GiB cache), after one warm-up pass over it (64 KiB random
                      reads, each block once: 4k ones would take minutes at 8 ms a request)
  sequential read     a 1 GiB sequential read elsewhere on the volume (1 MiB at QD4), then the
                      hot-set randread again: with the default sequential cutoff the stream is not
                      cached and the hot set stays
  zipf randread       4k random reads at QD32, zipf:1.2, over a set four times the cache
  70/30 mix           4k random reads and writes, 70% reads, QD32, over the hot set

Each timed workload runs `--rounds` rounds with the systems in turn (A B C A B C ...), and the
median round of each system is shown, so a machine whose speed drifts during the run (these are
shared VMs) touches every system alike. Sluice's block read hit ratio for each workload comes from
`sluice status` (block_counts, before the first round and after the last). This is a benchmark, not
a test: nothing here asserts timings.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import markdown_table, run_fio, run_fio_job, log, record_command  # noqa: E402
from cache_bench import (start_sluice_cache, start_nbdkit_cache, start_sluice_passthrough,  # noqa: E402
                         sluice_status, kill_processes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ["sluice-cache", "nbdkit-cache", "sluice-passthrough"]


def read_counts(status):
    """(hits, all) block reads from a status's block_counts (read_hit_* and read_miss_*)."""
    counts = status["block_counts"]
    hits = sum(v for k, v in counts.items() if k.startswith("read_hit"))
    return hits, sum(v for k, v in counts.items() if k.startswith("read_"))


def fio_pass(uri, arguments):
    """One fio job that is not time based (a warm-up or a sequential pass)."""
    command = ["fio", "--name=pass", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *arguments]
    record_command(command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr.strip()[:500]}")
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    return job["read"]["bw_bytes"] / (1024 * 1024), job["job_runtime"] / 1000.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directory", default="/var/tmp/sluice-read-bench", help="local-disk folder for images and sockets")
    parser.add_argument("--volume-mib", type=int, default=4096 + 1024)
    parser.add_argument("--cache-mib", type=int, default=1024)
    parser.add_argument("--hot-mib", type=int, default=256)
    parser.add_argument("--sequential-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per timed round (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each timed workload, systems in turn (default 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--sluice", default=os.path.join(ROOT, ".build", "release", "sluice"))
    args = parser.parse_args()
    if not os.path.exists(args.sluice):
        sys.exit(f"read bench: {args.sluice} is missing; run `make release` first")
    shutil.rmtree(args.directory, ignore_errors=True)
    os.makedirs(args.directory)
    d = args.directory
    volume = args.volume_mib << 20
    hot = args.hot_mib << 20
    wanted = [s for s in args.systems.split(",") if s]
    processes = []
    uris = {}
    results = {}
    rounds = {}
    hits = {}
    try:
        if "sluice-cache" in wanted:
            uris["sluice-cache"] = start_sluice_cache(processes, d, "sluice-cache", volume, args.sluice, args.cache_mib, "1M",
                                                      serve_extra=("--volatile",))
        if "nbdkit-cache" in wanted:
            uris["nbdkit-cache"] = start_nbdkit_cache(processes, d, volume, extra=("cache-on-read=true",))
        if "sluice-passthrough" in wanted:
            uris["sluice-passthrough"] = start_sluice_passthrough(processes, d, volume, args.sluice)
        socket = os.path.join(d, "sluice-cache.sock")

        def measure_once(system, workload, arguments, size):
            if any(a.startswith("--rwmixread") for a in arguments):
                # A mix: reads and writes together (run_fio reports one side).
                job = run_fio_job(uris[system], arguments, args.runtime, size)
                result = {"iops": job["read"]["iops"] + job["write"]["iops"],
                          "p99_us": max(job[side]["clat_ns"].get("percentile", {}).get("99.000000", 0) for side in ("read", "write")) / 1000.0}
            else:
                result = run_fio(uris[system], arguments, args.runtime, size)
            rounds.setdefault((workload, system), []).append(result)
            log(f"{workload} {system}: {result['iops']:,.0f} IOPS")

        def measure(workload, arguments, size):
            """`--rounds` rounds of every system in turn, so that a drift of the machine's speed
            during the run touches each system alike; the median round counts."""
            before = sluice_status(args.sluice, socket) if "sluice-cache" in wanted else None
            for _ in range(args.rounds):
                for system in wanted:
                    measure_once(system, workload, arguments, size)
            for system in wanted:
                ordered = sorted(rounds[(workload, system)], key=lambda r: r["iops"])
                results[(workload, system)] = ordered[len(ordered) // 2]
            if before is not None:
                h0, a0 = read_counts(before)
                h1, a1 = read_counts(sluice_status(args.sluice, socket))
                hits[(workload, "sluice-cache")] = (h1 - h0) / (a1 - a0) if a1 > a0 else 0.0

        for system in wanted:
            if system != "sluice-passthrough":
                mib_s, seconds = fio_pass(uris[system], ["--rw=randread", "--bs=64k", "--iodepth=8", f"--size={hot}"])
                log(f"warm-up {system}: {args.hot_mib} MiB in {seconds:.1f} s")
        measure("hot-set 4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], hot)
        for system in wanted:
            if system != "sluice-passthrough":
                offset = volume - (args.sequential_mib << 20)
                mib_s, seconds = fio_pass(uris[system], ["--rw=read", "--bs=1M", "--iodepth=4", f"--offset={offset}",
                                                         f"--size={args.sequential_mib << 20}"])
                log(f"sequential {system}: {args.sequential_mib} MiB at {mib_s:.0f} MiB/s")
        measure("hot-set randread after a sequential read", ["--rw=randread", "--bs=4k", "--iodepth=32"], hot)
        measure("4k randread zipf:1.2 QD32 over 4× the cache",
                ["--rw=randread", "--bs=4k", "--iodepth=32", "--random_distribution=zipf:1.2"], 4 * (args.cache_mib << 20))
        measure("4k 70/30 read/write QD32 over the hot set", ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32"], hot)
        if "sluice-cache" in wanted:
            final = sluice_status(args.sluice, socket)
            fills = {k: final[k] for k in final if k.startswith("read_fills")}
    finally:
        kill_processes(processes)

    header = ["workload", "system", "IOPS", "p99 µs", "vs sluice-passthrough", "Sluice hit ratio"]
    rows = []
    workloads = []
    for workload, _ in results:
        if workload not in workloads:
            workloads.append(workload)
    for workload in workloads:
        base = results.get((workload, "sluice-passthrough"))
        for system in wanted:
            result = results.get((workload, system))
            if result is None:
                continue
            ratio = f"{result['iops'] / base['iops']:.2f}×" if base and base["iops"] else ""
            hit = f"{hits[(workload, system)] * 100:.1f}%" if (workload, system) in hits else ""
            rows.append([workload, system, f"{result['iops']:,.0f}", f"{result['p99_us']:,.0f}", ratio, hit])
    print(f"\nRead cache: {args.volume_mib} MiB volumes on slow disks (nbdkit noparallel+delay 8 ms), Sluice cache "
          f"{args.cache_mib} MiB on {d}, hot set {args.hot_mib} MiB; each timed workload {args.rounds} rounds of "
          f"{args.runtime} s per system, systems in turn, median round shown.\n")
    print(markdown_table(header, rows))
    if "sluice-cache" in wanted:
        print(f"\nsluice-cache read fills: {json.dumps(fills)}")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(ROOT, "bench", "results", f"read-{stamp}.json"), "w") as f:
        json.dump({"results": {f"{w}|{s}": r for (w, s), r in results.items()},
                   "rounds": {f"{w}|{s}": r for (w, s), r in rounds.items()},
                   "hit_ratios": {f"{w}|{s}": h for (w, s), h in hits.items()}, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
