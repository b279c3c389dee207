#!/usr/bin/env python3
"""Cache benchmark: Sluice's write-back cache in front of a slow disk, side by side with peers.

Every system gets its own slow disk: an nbdkit file export with the noparallel, rate and delay
filters of shared/TESTBED.md (8 ms per request, ≈150 MiB/s, requests serialized), on its own
image on the local disk. In front of them, in one run:

  sluice-cache        sluice serve --cache (volatile buffer; cache device = a file on the local disk)
  nbdkit-cache        nbdkit's cache filter (cache=writeback, 4K blocks; its cache in /dev/shm)
  qemu-nbd            qemu-nbd --cache=writeback with the slow disk as its image
  sluice-passthrough  Sluice without a cache, over a fast file on the local disk (the target)

Workloads (fio nbd engine over Unix sockets): 4k randwrite QD1 and QD32, and 4k randwrite QD1 with
a FLUSH after each write. Then, on Sluice: backing write requests per written-back block, and the
time to write back 64 MiB of random 4k dirty data (`sluice drain`) against writing the same data
straight to a slow disk (measured over a limited run and extrapolated, since it takes minutes).

This is a benchmark, not a test: nothing here asserts timings.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import markdown_table, run_fio, wait_for_socket, log, record_command  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = [
    ("4k randwrite QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("4k randwrite QD1 + FLUSH each", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]),
]


def unix_uri(socket):
    return f"nbd+unix:///?socket={socket}"


class Process:
    def __init__(self, name, directory, command, socket, env=None):
        self.name = name
        self.command = command
        self.socket = socket
        self.env = env
        self.log_path = os.path.join(directory, f"{name}.log")
        self.process = None

    def start(self):
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        environment = dict(os.environ)
        if self.env:
            environment.update(self.env)
        record_command(self.command, self.env)
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), env=environment)
        wait_for_socket(self.socket, self.process, timeout_s=120)

    def stop(self):
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def slow_disk(directory, name, size_bytes):
    image = os.path.join(directory, f"{name}-hdd.img")
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    socket = os.path.join(directory, f"{name}-hdd.sock")
    command = ["nbdkit", "-f", "-U", socket, "--filter=noparallel", "--filter=rate", "--filter=delay",
               "file", image, "serialize=all-requests", "rate=1200M", "rdelay=8ms", "wdelay=8ms"]
    return Process(f"{name}-hdd", directory, command, socket)


def sluice_status(binary, socket, timeout_s=120):
    result = subprocess.run([binary, "status", "--json", "--socket", socket], capture_output=True, text=True, check=True,
                            timeout=timeout_s)
    return json.loads(result.stdout)


def sparse_file(path, size_bytes):
    with open(path, "wb") as f:
        f.truncate(size_bytes)
    return path


def run_checked(command):
    """Runs a set-up command, and fails with its own message when it fails."""
    record_command(command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[:500]}")
    return result


# Each start_* function starts one system on fresh images in `directory`, appending every process it
# starts to `processes` as soon as it runs (so the caller stops them even when a later step fails),
# and returns the URI clients connect to.

def start_sluice_cache(processes, directory, name, size_bytes, binary, cache_mib, segment_size,
                       format_extra=(), serve_extra=()):
    """Sluice's cache in front of a slow disk of its own; the NBD socket is `<name>.sock`."""
    hdd = slow_disk(directory, name, size_bytes)
    processes.append(hdd)
    hdd.start()
    cache = sparse_file(os.path.join(directory, f"{name}-ssd.img"), cache_mib << 20)
    backing = unix_uri(hdd.socket)
    run_checked([binary, "format", "--cache", cache, "--backing", backing, "--segment-size", segment_size, *format_extra])
    socket = os.path.join(directory, f"{name}.sock")
    server = Process(name, directory, [binary, "serve", "--cache", cache, "--backing", backing, "--socket", socket,
                                       "--log-level", "warning", *serve_extra], socket)
    processes.append(server)
    server.start()
    return unix_uri(socket)


def start_nbdkit_cache(processes, directory, size_bytes, name="nbdkit-cache", rate=None, extra=()):
    """nbdkit's cache filter over a delayed, serialized file, as in shared/TESTBED.md; `rate` (e.g.
    "1200M") adds the rate filter of the testbed's slow disk, `extra` more filter parameters."""
    image = sparse_file(os.path.join(directory, f"{name}-hdd.img"), size_bytes)
    socket = os.path.join(directory, f"{name}.sock")
    rate_filter, rate_parameter = (["--filter=rate"], [f"rate={rate}"]) if rate else ([], [])
    server = Process(name, directory, ["nbdkit", "-f", "-U", socket, "--filter=cache", "--filter=noparallel",
                                       *rate_filter, "--filter=delay", "file", image, "cache=writeback",
                                       "cache-min-block-size=4K", "serialize=all-requests", *rate_parameter,
                                       "rdelay=8ms", "wdelay=8ms", *extra], socket,
                     env={"TMPDIR": "/dev/shm"})
    processes.append(server)
    server.start()
    return unix_uri(socket)


def start_qemu_nbd(processes, directory, size_bytes, name="qemu-nbd"):
    """qemu-nbd --cache=writeback with a slow disk of its own as its image."""
    hdd = slow_disk(directory, "qemu", size_bytes)
    processes.append(hdd)
    hdd.start()
    socket = os.path.join(directory, f"{name}.sock")
    server = Process(name, directory, ["qemu-nbd", "-t", "-e", "8", "-k", socket, "-f", "raw", "--cache=writeback",
                                       unix_uri(hdd.socket)], socket)
    processes.append(server)
    server.start()
    return unix_uri(socket)


def start_sluice_passthrough(processes, directory, size_bytes, binary, name="sluice-passthrough"):
    """Sluice without a cache over a fast file on the local disk."""
    image = sparse_file(os.path.join(directory, "fast.img"), size_bytes)
    socket = os.path.join(directory, f"{name}.sock")
    server = Process(name, directory, [binary, "serve", "--backing", image, "--socket", socket, "--log-level", "warning"],
                     socket)
    processes.append(server)
    server.start()
    return unix_uri(socket)


def kill_processes(processes):
    """Kills every process in reverse order of start and empties the list.

    A write-back cache holding dirty data would write it back for minutes at shutdown; the images
    are thrown away, so the servers are killed instead of stopped."""
    for process in reversed(processes):
        if process.process is not None:
            process.process.kill()
            process.process.wait()
            process.process = None
    processes.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directory", default="/var/tmp/sluice-cache-bench", help="local-disk folder for images and sockets")
    parser.add_argument("--size", type=int, default=1024, help="volume size in MiB (default 1024)")
    parser.add_argument("--cache-size", type=int, default=16384, help="Sluice cache device size in MiB (sparse; default 16384)")
    parser.add_argument("--segment-size", default="1M")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per workload (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; results are medians (default 1)")
    parser.add_argument("--writeback-mib", type=int, default=64, help="dirty data for the writeback measurement (MiB)")
    parser.add_argument("--writeback-region-mib", type=int, default=72, help="region the random 4k dirty blocks are spread over")
    parser.add_argument("--direct-seconds", type=int, default=10, help="how long to measure writing straight to the slow disk")
    parser.add_argument("--systems", default="sluice-cache,nbdkit-cache,qemu-nbd,sluice-passthrough")
    parser.add_argument("--sluice", default=os.path.join(ROOT, ".build", "release", "sluice"))
    args = parser.parse_args()

    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"cache bench: {tool} is not installed (make bench installs it)")
    if not os.path.exists(args.sluice):
        sys.exit(f"cache bench: {args.sluice} is missing; run `make release` first")
    shutil.rmtree(args.directory, ignore_errors=True)
    os.makedirs(args.directory)
    size_bytes = args.size << 20
    d = args.directory
    wanted = [s for s in args.systems.split(",") if s]

    processes = []   # started in order, stopped in reverse

    def start_systems(sluice_extra=()):
        """Starts every system on fresh images: each workload begins with empty caches."""
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        uris = {}
        if "sluice-cache" in wanted:
            uris["sluice-cache"] = start_sluice_cache(processes, d, "sluice-cache", size_bytes, args.sluice, args.cache_size,
                                                      args.segment_size, serve_extra=("--volatile", *sluice_extra))
        if "nbdkit-cache" in wanted:
            uris["nbdkit-cache"] = start_nbdkit_cache(processes, d, size_bytes)
        if "qemu-nbd" in wanted:
            uris["qemu-nbd"] = start_qemu_nbd(processes, d, size_bytes)
        if "sluice-passthrough" in wanted:
            uris["sluice-passthrough"] = start_sluice_passthrough(processes, d, size_bytes, args.sluice)
        return uris

    def stop_systems():
        kill_processes(processes)

    systems = [s for s in wanted]
    samples = {}
    extra = {}
    try:
        for round_index in range(args.rounds):
            for workload, fio_arguments in WORKLOADS:
                uris = start_systems()
                rotation = round_index % len(systems)
                for system in systems[rotation:] + systems[:rotation]:
                    result = run_fio(uris[system], fio_arguments, args.runtime, size_bytes)
                    samples.setdefault((system, workload), []).append(result)
                    log(f"round {round_index + 1}/{args.rounds} {workload} {system}: {result['iops']:,.0f} IOPS, "
                        f"p99 {result['p99_us']:,.1f} µs")
                if "sluice-cache" in uris:
                    status = sluice_status(args.sluice, os.path.join(d, "sluice-cache.sock"))
                    extra[f"sluice-cache after {workload}"] = {k: status[k] for k in (
                        "dirty_blocks", "partial_segments", "segments_written", "user_bytes_written", "cache_bytes_written",
                        "backing_bytes_written", "live_segments", "segment_count", "writes_throttled")}
                stop_systems()

        if "sluice-cache" in wanted:
            wanted = ["sluice-cache"]
            # No background writeback while the dirty data goes in: the drain writes all of it.
            uris = start_systems(sluice_extra=("--writeback-threshold", "0", "--dirty-target", "100"))
            socket = os.path.join(d, "sluice-cache.sock")
            before = sluice_status(args.sluice, socket)
            # 64 MiB of random 4k blocks, each written once, spread over a region of the volume.
            region = args.writeback_region_mib << 20
            subprocess.run(["fio", "--name=dirty", "--ioengine=nbd", f"--uri={uris['sluice-cache']}", f"--size={region}",
                            f"--io_size={args.writeback_mib << 20}", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                            "--randseed=7", "--output-format=terse"], check=True, capture_output=True)
            started = time.time()
            subprocess.run([args.sluice, "drain", "--socket", socket], check=True, capture_output=True)
            writeback_s = time.time() - started
            after = sluice_status(args.sluice, socket)
            blocks = after["written_back_blocks"] - before["written_back_blocks"]
            requests = after["backing_write_requests"] - before["backing_write_requests"]
            extra["writeback"] = {"dirty_mib": args.writeback_mib, "region_mib": args.writeback_region_mib,
                                  "seconds": writeback_s, "blocks": blocks, "backing_write_requests": requests,
                                  "requests_per_block": requests / blocks if blocks else 0}
            # The same kind of data written straight to a slow disk of its own.
            hdd = slow_disk(d, "direct", size_bytes)
            hdd.start()
            processes.append(hdd)
            direct = run_fio(unix_uri(hdd.socket), ["--rw=randwrite", "--bs=4k", "--iodepth=32"], args.direct_seconds, region)
            total_blocks = (args.writeback_mib << 20) // 4096
            extra["direct"] = {"iops": direct["iops"], "extrapolated_seconds": total_blocks / direct["iops"] if direct["iops"] else 0}
    finally:
        stop_systems()

    results = {key: {f: statistics.median(r[f] for r in runs) for f in runs[0]} for key, runs in samples.items()}
    header = ["workload", "system", "IOPS", "mean µs", "p99 µs", "vs sluice-passthrough"]
    rows = []
    for workload, _ in WORKLOADS:
        base = results.get(("sluice-passthrough", workload))
        for system in systems:
            result = results.get((system, workload))
            if result is None:
                continue
            ratio = f"{result['iops'] / base['iops']:.2f}×" if base and base["iops"] else ""
            rows.append([workload, system, f"{result['iops']:,.0f}", f"{result['mean_us']:,.1f}", f"{result['p99_us']:,.1f}", ratio])
    print(f"\nSlow disks: nbdkit noparallel+rate+delay (8 ms, 150 MiB/s), one per system; cache device and fast file on "
          f"{args.directory}; {args.size} MiB volumes; {args.runtime} s per workload, medians of {args.rounds} round(s).\n")
    print(markdown_table(header, rows))
    if "writeback" in extra:
        w = extra["writeback"]
        print(f"\nWriteback of {w['dirty_mib']} MiB of random 4k dirty data (spread over {w['region_mib']} MiB): "
              f"{w['seconds']:.1f} s, {w['backing_write_requests']} backing writes for {w['blocks']} blocks "
              f"({w['requests_per_block']:.3f} per block).")
        dr = extra["direct"]
        print(f"Writing it straight to the slow disk at QD32: {dr['iops']:,.0f} IOPS → {dr['extrapolated_seconds']:.1f} s "
              f"(extrapolated from a {args.direct_seconds} s run); ratio {dr['extrapolated_seconds'] / w['seconds']:.1f}× faster through the cache.")
    for workload, _ in WORKLOADS:
        key = f"sluice-cache after {workload}"
        if key in extra:
            print(f"sluice-cache after {workload}: {json.dumps(extra[key])}")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with open(os.path.join(ROOT, "bench", "results", f"cache-{stamp}.json"), "w") as f:
        json.dump({"results": {f"{s}|{w}": r for (s, w), r in results.items()}, "extra": extra, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
