#!/usr/bin/env python3
"""Side-by-side NBD benchmark: Sluice against peer servers, in one run, on the same kind of file.

Starts each server on its own fresh backing file, drives it with fio's nbd engine over a Unix
socket, and prints one table with IOPS, MiB/s, mean and p99 latency, and the ratio of Sluice to
the reference server for each workload. Raw results go to bench/results/<timestamp>.json.

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = [
    # name, fio arguments
    ("4k randwrite QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("1M write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"]),
    ("4k randwrite QD1 fsync=1", ["--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1"]),
]


def log(message):
    print(message, file=sys.stderr, flush=True)


# Every command line the shared helpers start (servers, set-up commands, fio), in order, so a bench
# can save exactly what it ran beside its results.
command_log = []


def record_command(command, env=None):
    command_log.append({"time": time.time(), "command": list(command), **({"env": env} if env else {})})


def wait_for_socket(path, process, timeout_s=30):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(path):
            probe = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={path}"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited early with status {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"server did not start listening on {path}")


class Server:
    def __init__(self, name, directory, size_bytes):
        self.name = name
        self.directory = directory
        self.size_bytes = size_bytes
        self.socket = os.path.join(directory, f"{name}.sock")
        self.image = os.path.join(directory, f"{name}.img")
        self.process = None
        self.pidfile = os.path.join(directory, f"{name}.pid")

    def make_image(self):
        if os.path.exists(self.image):
            os.unlink(self.image)
        with open(self.image, "wb") as f:
            f.truncate(self.size_bytes)

    def command(self):
        raise NotImplementedError

    def start(self):
        self.make_image()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=open(os.path.join(self.directory, f"{self.name}.log"), "w"))
        wait_for_socket(self.socket, self.process)

    def stop(self):
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        for path in (self.socket, self.image):
            if os.path.exists(path):
                os.unlink(path)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"


class Sluice(Server):
    def __init__(self, directory, size_bytes, binary):
        super().__init__("sluice", directory, size_bytes)
        self.binary = binary

    def command(self):
        return [self.binary, "serve", "--backing", self.image, "--socket", self.socket, "--log-level", "warning"]


class NbdkitFile(Server):
    def __init__(self, directory, size_bytes):
        super().__init__("nbdkit-file", directory, size_bytes)

    def command(self):
        return ["nbdkit", "-f", "-U", self.socket, "file", self.image]


class NbdkitMemory(Server):
    def __init__(self, directory, size_bytes):
        super().__init__("nbdkit-memory", directory, size_bytes)

    def make_image(self):
        pass

    def command(self):
        return ["nbdkit", "-f", "-U", self.socket, "memory", str(self.size_bytes)]


class QemuNbd(Server):
    def __init__(self, directory, size_bytes):
        super().__init__("qemu-nbd", directory, size_bytes)

    def command(self):
        return ["qemu-nbd", "-t", "-e", "8", "-k", self.socket, "-f", "raw", "--cache=writeback",
                "--aio=io_uring", self.image]


def run_fio_job(uri, arguments, runtime_s, size_bytes, ramp_s=1, timeout_s=None):
    """Runs one fio job over NBD and returns its JSON job record (`ramp_s` seconds of warmup first;
    a fio that is still running `timeout_s` seconds later is killed and reported as failed)."""
    command = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size_bytes}",
               "--time_based", f"--runtime={runtime_s}", f"--ramp_time={ramp_s}", "--output-format=json",
               "--randrepeat=0", "--norandommap"] + arguments
    record_command(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio did not finish within {timeout_s} s")
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr.strip()[:500]}")
    data = json.loads(result.stdout[result.stdout.index("{"):])
    return data["jobs"][0]


def run_fio(uri, arguments, runtime_s, size_bytes):
    job = run_fio_job(uri, arguments, runtime_s, size_bytes)
    side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    latency = side.get("clat_ns", {})
    percentiles = latency.get("percentile", {})
    result = {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / (1024 * 1024),
        "mean_us": side["lat_ns"]["mean"] / 1000.0,
        "p50_us": percentiles.get("50.000000", 0) / 1000.0,
        "p99_us": percentiles.get("99.000000", 0) / 1000.0,
    }
    # With --fsync, fio times each FLUSH on its own, apart from the write before it, so the
    # FLUSH latency is reported beside the write's.
    sync = job.get("sync", {})
    if sync.get("total_ios", 0) > 0:
        sync_percentiles = sync["lat_ns"].get("percentile", {})
        result["flush_mean_us"] = sync["lat_ns"]["mean"] / 1000.0
        result["flush_p50_us"] = sync_percentiles.get("50.000000", 0) / 1000.0
        result["flush_p99_us"] = sync_percentiles.get("99.000000", 0) / 1000.0
    return result


def prefill(uri, size_bytes):
    subprocess.run(["fio", "--name=prefill", "--ioengine=nbd", f"--uri={uri}", f"--size={size_bytes}",
                    "--rw=write", "--bs=1M", "--iodepth=8", "--output-format=terse"],
                   capture_output=True, check=True)


def markdown_table(header, rows):
    """A Markdown table with its columns padded to line up, as every bench prints its results."""
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(header)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def format_table(servers, workloads, results, reference, subject):
    header = ["workload", "server", "IOPS", "MiB/s", "mean µs", "p99 µs", f"{subject}/{reference}"]
    rows = []
    for workload in workloads:
        base = results.get((reference, workload))
        for server in servers:
            result = results.get((server, workload))
            if result is None:
                continue
            ratio = ""
            if server == subject and base and base["iops"] > 0:
                ratio = f"{result['iops'] / base['iops']:.2f}×"
            rows.append([workload, server, f"{result['iops']:,.0f}", f"{result['mib_s']:,.1f}",
                         f"{result['mean_us']:,.1f}", f"{result['p99_us']:,.1f}", ratio])
    return markdown_table(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directory", default="/dev/shm/sluice-bench",
                        help="where backing files and sockets go (default /dev/shm/sluice-bench; use a local-disk folder to include media cost)")
    parser.add_argument("--size", default="1G", help="backing size (default 1G)")
    parser.add_argument("--runtime", type=int, default=5, help="seconds per workload (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each result is the median over rounds (default 3)")
    parser.add_argument("--servers", default="sluice,nbdkit-file,nbdkit-memory,qemu-nbd")
    parser.add_argument("--workloads", default=None, help="comma-separated workload name substrings")
    parser.add_argument("--sluice", default=os.path.join(ROOT, ".build", "release", "sluice"))
    args = parser.parse_args()

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size_bytes = int(args.size[:-1]) * units[args.size[-1]] if args.size[-1] in units else int(args.size)
    os.makedirs(args.directory, exist_ok=True)
    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed (make bench installs it)")

    factories = {
        "sluice": lambda: Sluice(args.directory, size_bytes, args.sluice),
        "nbdkit-file": lambda: NbdkitFile(args.directory, size_bytes),
        "nbdkit-memory": lambda: NbdkitMemory(args.directory, size_bytes),
        "qemu-nbd": lambda: QemuNbd(args.directory, size_bytes),
    }
    server_names = [s for s in args.servers.split(",") if s]
    workloads = WORKLOADS
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",")]
        workloads = [w for w in WORKLOADS if any(x in w[0] for x in wanted)]

    # Every server runs for the whole benchmark, each on its own file, and every workload runs on
    # every server back to back (in a rotating order) before the next workload starts, so drift in
    # this shared machine's speed hits all servers alike. Each device is written in full first,
    # so writes measure the steady state and reads find data.
    servers = [factories[name]() for name in server_names]
    samples = {}
    try:
        for server in servers:
            log(f"starting {server.name}")
            server.start()
            prefill(server.uri, size_bytes)
        for round_index in range(args.rounds):
            for workload, fio_arguments in workloads:
                rotation = round_index % len(servers)
                for server in servers[rotation:] + servers[:rotation]:
                    result = run_fio(server.uri, fio_arguments, args.runtime, size_bytes)
                    samples.setdefault((server.name, workload), []).append(result)
                    log(f"round {round_index + 1}/{args.rounds} {workload} {server.name}: "
                        f"{result['iops']:,.0f} IOPS, p99 {result['p99_us']:,.1f} µs")
    finally:
        for server in servers:
            server.stop()

    results = {}
    for key, runs in samples.items():
        results[key] = {field: statistics.median(run[field] for run in runs) for field in runs[0]}

    table = format_table(server_names, [w for w, _ in workloads], results, "nbdkit-file", "sluice")
    print(f"\nBackings on {args.directory}, {args.size} each, written in full first; fio nbd engine over Unix "
          f"sockets; {args.runtime} s per workload; median of {args.rounds} interleaved round(s).\n")
    print(table)

    results_directory = os.path.join(ROOT, "bench", "results")
    os.makedirs(results_directory, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    output = {
        "timestamp": stamp,
        "directory": args.directory,
        "size_bytes": size_bytes,
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "results": [{"server": s, "workload": w, **r} for (s, w), r in results.items()],
        "samples": [{"server": s, "workload": w, "runs": r} for (s, w), r in samples.items()],
    }
    path = os.path.join(results_directory, f"{stamp}.json")
    with open(path, "w") as f:
        json.dump(output, f, indent=2)
    print(f"\nraw results: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
