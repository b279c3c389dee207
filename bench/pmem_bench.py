#!/usr/bin/env python3
"""Persistent-memory benchmark (issue 4): FUA writes and FLUSH-heavy writes in front of a slow disk.

A persistent write buffer should let Sluice acknowledge a FUA write or a FLUSH once the data is
in persistent memory, where the volatile buffer must seal a partial segment, write it and sync
the cache device first. This compares, in one run, each system with its own slow disk (an nbdkit
file export with the noparallel, rate and delay filters of shared/TESTBED.md: 8 ms per request,
≈150 MiB/s, serialized) and the Sluice cache devices as files on the local disk:

  sluice-pmem      sluice serve --cache --pmem /dev/shm/… (write buffer in emulated pmem)
  sluice-volatile  sluice serve --cache --volatile (the write buffer in DRAM)
  nbdkit-memory    nbdkit's memory plugin, no disk at all: the transport limit
  nbdkit-cache     nbdkit's cache filter (cache=writeback, 4K blocks) over a delayed file
  qemu-nbd         qemu-nbd --cache=writeback over the slow disk

Workloads, each on fresh images for every system:

  FUA QD1      4k random writes with FUA, one connection, one in flight (bench/fua_load.c)
  FUA QD8×4    4k random writes with FUA, four connections of eight in flight each
  fsync QD1    fio 4k randwrite at depth 1 with --fsync=1 (a FLUSH after each write)

For the Sluice systems, `sluice status --json` after each workload gives the cache device's write
amplification (cache bytes written ÷ user bytes written), the partial segments written, and the
pmem drains per write. When the sluice binary has no --pmem yet, sluice-pmem is left out and
said so.

This is a benchmark, not a test: nothing here asserts timings.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import markdown_table, run_fio, log  # noqa: E402
from cache_bench import (Process, kill_processes, sluice_status, start_nbdkit_cache, start_qemu_nbd,  # noqa: E402
                         start_sluice_cache, unix_uri)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_SIZE = 4096

SYSTEMS = ["sluice-pmem", "sluice-volatile", "nbdkit-memory", "nbdkit-cache", "qemu-nbd"]
SLUICE_SYSTEMS = ("sluice-pmem", "sluice-volatile")

# (key, title, tool, arguments)
WORKLOADS = [
    ("fua-qd1", "FUA 4k QD1", "fua_load", ["--connections", "1", "--depth", "1", "--fua"]),
    ("fua-qd8x4", "FUA 4k QD8 × 4 conns", "fua_load", ["--connections", "4", "--depth", "8", "--fua"]),
    ("fsync-qd1", "fio 4k QD1 + FLUSH each", "fio", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]),
]


def run_fua_load(binary, uri, arguments, runtime_s, size_bytes):
    """Runs bench/fua_load.c's generator; one second of warmup, like fio's --ramp_time=1 in run_fio."""
    command = [binary, "--uri", uri, "--seconds", str(runtime_s), "--warmup-seconds", "1", "--block-size", str(BLOCK_SIZE),
               "--size", str(size_bytes), "--seed", "42", *arguments]
    # A server that stops answering must not hang the whole run.
    result = subprocess.run(command, capture_output=True, text=True, timeout=runtime_s * 4 + 120)
    if result.returncode != 0:
        raise RuntimeError(f"fua_load failed ({result.returncode}): {result.stderr.strip()[:500]}")
    data = json.loads(result.stdout)
    latency = data["latency_us"]
    return {"iops": data["iops"], "writes": data["writes"], "p50_us": latency["p50"], "p99_us": latency["p99"],
            "mean_us": latency["mean"]}


def sluice_supports_pmem(binary):
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    return "--pmem" in help_text


def sluice_metrics(status):
    """Issue 4's figures from a status taken after a workload on a freshly formatted cache.

    The keys Sluice computes itself are preferred; a binary without them still yields write
    amplification from the byte counters, and drains per write from `pmem_drains`."""
    user = status.get("user_bytes_written", 0)
    metrics = {"partial_segments": status.get("partial_segments"), "user_bytes_written": user,
               "cache_bytes_written": status.get("cache_bytes_written")}
    if "write_amplification" in status:
        metrics["write_amplification"] = status["write_amplification"]
    elif user:
        metrics["write_amplification"] = status["cache_bytes_written"] / user
    if "pmem_drains" in status:
        metrics["pmem_drains"] = status["pmem_drains"]
    if "drains_per_write" in status:
        metrics["drains_per_write"] = status["drains_per_write"]
    elif "pmem_drains" in status and user:
        # Every write of these workloads is one 4 KiB block.
        metrics["drains_per_write"] = status["pmem_drains"] / (user / BLOCK_SIZE)
    return metrics


def median_of(runs):
    """The median of every numeric field present in all runs (a missing status key stays missing)."""
    fields = set(runs[0])
    for run in runs[1:]:
        fields &= set(run)
    return {field: statistics.median(run[field] for run in runs) for field in fields
            if all(isinstance(run[field], (int, float)) for run in runs)}


def table(results, systems):
    header = ["workload", "system", "IOPS", "p50 µs", "p99 µs", "mean µs", "FLUSH p50/p99 µs", "cache WA",
              "partial segs", "drains/write"]
    rows = []
    for key, title, _, _ in WORKLOADS:
        for system in systems:
            result = results.get((system, key))
            if result is None:
                continue
            flush = f"{result['flush_p50_us']:,.1f} / {result['flush_p99_us']:,.1f}" if "flush_p50_us" in result else ""
            amplification = f"{result['write_amplification']:.2f}" if "write_amplification" in result else ""
            partial = f"{result['partial_segments']:,.0f}" if "partial_segments" in result else ""
            drains = f"{result['drains_per_write']:.2f}" if "drains_per_write" in result else ""
            rows.append([title, system, f"{result['iops']:,.0f}", f"{result['p50_us']:,.1f}", f"{result['p99_us']:,.1f}",
                         f"{result['mean_us']:,.1f}", flush, amplification, partial, drains])
    return markdown_table(header, rows)


def ratios(results):
    """Issue 4's ratios of IOPS, as (description, value or None, reason when None)."""
    wanted = [
        ("sluice-pmem ÷ sluice-volatile, FUA 4k QD1", ("sluice-pmem", "fua-qd1"), ("sluice-volatile", "fua-qd1")),
        ("sluice-pmem ÷ sluice-volatile, FUA 4k QD8 × 4", ("sluice-pmem", "fua-qd8x4"), ("sluice-volatile", "fua-qd8x4")),
        ("sluice-pmem ÷ nbdkit-memory, fsync QD1", ("sluice-pmem", "fsync-qd1"), ("nbdkit-memory", "fsync-qd1")),
        ("sluice-pmem ÷ nbdkit-cache, fsync QD1", ("sluice-pmem", "fsync-qd1"), ("nbdkit-cache", "fsync-qd1")),
    ]
    output = []
    for description, numerator, denominator in wanted:
        top, bottom = results.get(numerator), results.get(denominator)
        if top is None or bottom is None:
            missing = numerator[0] if top is None else denominator[0]
            output.append((description, None, f"no result for {missing}"))
        elif bottom["iops"] <= 0:
            output.append((description, None, f"{denominator[0]} made no progress"))
        else:
            output.append((description, top["iops"] / bottom["iops"], None))
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directory", default="/var/tmp/sluice-pmem-bench",
                        help="local-disk folder for images, cache devices and sockets")
    parser.add_argument("--pmem-directory", default="/dev/shm", help="where the emulated pmem file goes (tmpfs)")
    parser.add_argument("--size", type=int, default=1024, help="volume size in MiB (default 1024)")
    parser.add_argument("--cache-size", type=int, default=16384, help="Sluice cache device size in MiB (sparse; default 16384)")
    parser.add_argument("--segment-size", default="1M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per workload, after one second of warmup (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; results are medians (default 1)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=None, help="comma-separated workload keys (" +
                        ", ".join(w[0] for w in WORKLOADS) + ")")
    parser.add_argument("--sluice", default=os.path.join(ROOT, ".build", "release", "sluice"))
    parser.add_argument("--fua-load", default=os.path.join(ROOT, ".build", "fua_load"))
    args = parser.parse_args()

    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"pmem bench: {tool} is not installed (make deps installs it)")
    if not os.path.exists(args.fua_load):
        sys.exit(f"pmem bench: {args.fua_load} is missing; run `make .build/fua_load` first")
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"pmem bench: unknown systems {unknown}; known: {SYSTEMS}")
    workloads = WORKLOADS
    if args.workloads:
        keys = [w for w in args.workloads.split(",") if w]
        workloads = [w for w in WORKLOADS if w[0] in keys]
        if len(workloads) != len(keys):
            sys.exit(f"pmem bench: unknown workloads in {keys}; known: {[w[0] for w in WORKLOADS]}")
    if any(s in SLUICE_SYSTEMS for s in systems) and not os.path.exists(args.sluice):
        sys.exit(f"pmem bench: {args.sluice} is missing; run `make release` first")

    # Left out, with the reason printed beside the results rather than failing the whole run.
    skipped = {}
    if "sluice-pmem" in systems and not sluice_supports_pmem(args.sluice):
        skipped["sluice-pmem"] = f"sluice-pmem not run: {args.sluice} has no --pmem yet"
        systems.remove("sluice-pmem")
        log(skipped["sluice-pmem"])

    shutil.rmtree(args.directory, ignore_errors=True)
    os.makedirs(args.directory)
    d = args.directory
    size_bytes = args.size << 20
    pmem_path = os.path.join(args.pmem_directory, f"sluice-pmem-bench-{os.getpid()}.pmem")

    def remove_pmem():
        if os.path.exists(pmem_path):
            os.unlink(pmem_path)

    def start(system, processes):
        """Starts one system on fresh images; returns its URI and, for Sluice, its NBD socket."""
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        remove_pmem()
        if system == "sluice-pmem":
            uri = start_sluice_cache(processes, d, system, size_bytes, args.sluice, args.cache_size, args.segment_size,
                                     format_extra=("--pmem", pmem_path), serve_extra=("--pmem", pmem_path))
            return uri, os.path.join(d, f"{system}.sock")
        if system == "sluice-volatile":
            uri = start_sluice_cache(processes, d, system, size_bytes, args.sluice, args.cache_size, args.segment_size,
                                     serve_extra=("--volatile",))
            return uri, os.path.join(d, f"{system}.sock")
        if system == "nbdkit-memory":
            socket = os.path.join(d, f"{system}.sock")
            server = Process(system, d, ["nbdkit", "-f", "-U", socket, "memory", str(size_bytes)], socket)
            processes.append(server)
            server.start()
            return unix_uri(socket), None
        if system == "nbdkit-cache":
            return start_nbdkit_cache(processes, d, size_bytes), None
        if system == "qemu-nbd":
            return start_qemu_nbd(processes, d, size_bytes), None
        raise ValueError(system)

    samples = {}
    statuses = {}
    processes = []
    try:
        for round_index in range(args.rounds):
            for key, title, tool, arguments in workloads:
                # Each system runs alone on fresh images, so no other system's writeback competes
                # for the two cores; the order rotates between rounds so drift hits all alike.
                rotation = round_index % len(systems)
                for system in systems[rotation:] + systems[:rotation]:
                    try:
                        uri, sluice_socket = start(system, processes)
                        if tool == "fua_load":
                            result = run_fua_load(args.fua_load, uri, arguments, args.runtime, size_bytes)
                        else:
                            result = run_fio(uri, arguments, args.runtime, size_bytes)
                        if sluice_socket is not None:
                            status = sluice_status(args.sluice, sluice_socket)
                            statuses.setdefault(f"{system}|{key}", []).append(status)
                            result.update(sluice_metrics(status))
                    finally:
                        kill_processes(processes)
                        remove_pmem()
                    samples.setdefault((system, key), []).append(result)
                    extra = ""
                    if "write_amplification" in result:
                        extra = f", WA {result['write_amplification']:.2f}, {result['partial_segments']:,} partial segments"
                    log(f"round {round_index + 1}/{args.rounds} {title} {system}: {result['iops']:,.0f} IOPS, "
                        f"p50 {result['p50_us']:,.1f} µs, p99 {result['p99_us']:,.1f} µs{extra}")
    finally:
        kill_processes(processes)
        remove_pmem()

    results = {k: median_of(runs) for k, runs in samples.items()}
    print(f"\nSlow disks: nbdkit noparallel+rate+delay (8 ms, 150 MiB/s), one per system; Sluice cache devices "
          f"({args.cache_size} MiB, {args.segment_size} segments) on {args.directory}, pmem in {args.pmem_directory}; "
          f"{args.size} MiB volumes; {args.runtime} s per workload after 1 s of warmup, fresh images for each; "
          f"medians of {args.rounds} round(s). FUA workloads by bench/fua_load.c (latency from submission to completion); "
          f"fio's latency is the write's, its FLUSH's is in its own column. cache WA = cache bytes written ÷ user bytes "
          f"written.\n")
    print(table(results, [s for s in SYSTEMS if s in systems]))
    print()
    for description, value, reason in ratios(results):
        print(f"- {description}: {value:.2f}×" if value is not None else f"- {description}: n/a ({reason})")
    for reason in skipped.values():
        print(f"\nNote: {reason}.")

    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(ROOT, "bench", "results", f"pmem-{stamp}.json")
    with open(path, "w") as f:
        json.dump({"timestamp": stamp, "args": vars(args), "skipped": skipped,
                   "results": {f"{s}|{w}": r for (s, w), r in results.items()},
                   "samples": {f"{s}|{w}": r for (s, w), r in samples.items()},
                   "ratios": [{"ratio": description, "value": value, "reason": reason}
                              for description, value, reason in ratios(results)],
                   "sluice_status": statuses}, f, indent=2)
    print(f"\nraw results: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
