#!/usr/bin/env python3
"""Sustained-load benchmark: a write-back cache filled several times over, one IOPS figure a second.

4k random writes at QD32 for --runtime seconds (fio nbd engine, --rw=randwrite --bs=4k --iodepth=32
--time_based, no warmup), with a working set of 25% and one of 150% of the cache (fio --size=), into:

  sluice-pmem         sluice serve --cache (write buffer in a pmem file on /dev/shm)
  sluice-volatile     sluice serve --cache --volatile
  nbdkit-cache        nbdkit's cache filter (cache=writeback, 4K blocks, its cache file in /dev/shm)
  sluice-passthrough  Sluice without a cache over a fast file on the local disk: the reference line
                      (run once, with the 25% working set)
  slow-disk           fio straight at a slow disk, for its own rate (printed with the 150% results)

Every cache sits in front of a slow disk of its own, the testbed's (nbdkit noparallel+rate+delay: 8 ms a
request, 150 MiB/s, requests serialized), on a fresh image in --directory (the local disk; not /dev/shm);
Sluice's cache device is a fresh file there too. The slow disk is twice the cache, so the 150% working
set fits. fio logs one IOPS line a second (--write_iops_log --log_avg_msec=1000) and writes none for a
second with no completions: the timeline is rebuilt by second index from the log's timestamps, and a
missing second counts as zero. fio never logs the window its job ends in, so when the job ends on time
its last second is left out (not counted as zero; fio's total completions say how many it held). A
server that stalls keeps fio waiting for its last requests past the run's end: those seconds are
plotted and saved, and said under the table, but the statistics cover the run's own seconds.

Prints, per system and working set: min, p10 and median of the per-second IOPS, seconds with zero
completions (in all, and after the first fill: the second in which the total written reaches the
cache size), seconds below 0.25x that run's median, the median over Sluice passthrough's, and for Sluice
the cache device's write amplification and what `sluice status --json` reports at the end of the run.
Everything is saved as bench/results/sustained-YYYYMMDD-HHMMSS.json (UTC) with a plot beside it (.png).

This is a benchmark, not a test: nothing here asserts timings.
"""
import argparse
import glob
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import command_log, log, markdown_table, record_command, run_fio_job  # noqa: E402
from cache_bench import (Process, kill_processes, slow_disk, sluice_status, sparse_file,  # noqa: E402
                         start_nbdkit_cache, start_sluice_cache, start_sluice_passthrough, unix_uri)
from pmem_bench import sluice_metrics, sluice_supports_pmem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_SIZE = 4096
FIO_ARGUMENTS = ["--rw=randwrite", "--bs=4k", "--iodepth=32"]
# The slow disk of shared/TESTBED.md: its rate filter's parameter, also given to nbdkit's cache filter.
SLOW_DISK_RATE = "1200M"

CACHES = ["sluice-pmem", "sluice-volatile", "nbdkit-cache"]
SYSTEMS = CACHES + ["sluice-passthrough", "slow-disk"]
MODES = {"pmem": "sluice-pmem", "volatile": "sluice-volatile"}
SLUICE_CACHES = tuple(MODES.values())

# Keys of `sluice status --json` worth seeing after a sustained run. The engine is being changed, so
# any of them may be missing; every other key naming relocation, reclaiming, waiting or writeback is
# shown as well.
STATUS_KEYS = ["write_amplification", "relocated_blocks", "relocation_share_of_cache_writes", "segments_reclaimed",
               "segments_reclaimed_without_io", "writer_stalls", "writer_stall_seconds", "writer_stall_max_ms",
               "written_back_blocks", "written_back_blocks_per_batch", "writeback_batches", "dirty_blocks",
               "occupancy_percent", "live_segments", "free_segments"]
STATUS_KEY_PARTS = ("reloc", "reclaim", "wait", "writeback")


# --- nbdkit's cache filter and cache-max-size ------------------------------------------------------
#
# nbdkit-cache-filter(1) documents cache-max-size= without naming a cache mode, but its reclaim
# (filters/cache/reclaim.c: reclaim_block) punches a hole over the least recently used block and
# marks it "not cached" whether it is clean or dirty, without writing it to the plugin first. In
# cache=writeback mode a reclaimed dirty block is therefore lost: the next read and the next flush
# see the plugin's old data. So the limit does not work with writeback, and nbdkit-cache runs without
# one (its cache grows to the volume's size in /dev/shm). Each run checks this again on the installed
# nbdkit (a few seconds: 48 MiB written through a 16 MiB limit, flushed, and compared) and gives the
# filter Sluice's cache size as its limit only if nothing was lost.

PROBE_LIMIT_MIB = 16
PROBE_WRITTEN_MIB = 48


def nbdkit_limit_keeps_dirty_data(directory):
    """Returns (True/False/None, what was seen): whether nbdkit's cache filter with cache=writeback
    and cache-max-size= still has every written block after a flush (None: could not check)."""
    probe = os.path.join(directory, "probe")
    os.makedirs(probe, exist_ok=True)
    image = sparse_file(os.path.join(probe, "plugin.img"), (PROBE_WRITTEN_MIB + 16) << 20)
    data_path = os.path.join(probe, "data.img")
    data = random.Random(42).randbytes(PROBE_WRITTEN_MIB << 20)
    with open(data_path, "wb") as f:
        f.write(data)
    socket = os.path.join(probe, "probe.sock")
    server = Process("nbdkit-cache-probe", probe, ["nbdkit", "-f", "-U", socket, "--filter=cache", "file", image,
                                                   "cache=writeback", "cache-min-block-size=4K",
                                                   f"cache-max-size={PROBE_LIMIT_MIB}M"], socket,
                     env={"TMPDIR": "/dev/shm"})
    try:
        server.start()
        command = ["nbdcopy", "--flush", data_path, unix_uri(socket)]
        record_command(command)
        copied = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if copied.returncode != 0:
            return None, f"could not check: nbdcopy failed: {copied.stderr.strip()[:200]}"
        server.stop()   # SIGTERM; the flush above already asked for everything on the plugin
        with open(image, "rb") as f:
            kept = f.read(len(data))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        return None, f"could not check: {error}"
    finally:
        if server.process is not None:
            server.process.kill()
            server.process.wait()
        shutil.rmtree(probe, ignore_errors=True)
    blocks = len(data) // BLOCK_SIZE
    lost = sum(1 for i in range(blocks) if kept[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] != data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
    seen = (f"{PROBE_WRITTEN_MIB} MiB written through cache=writeback cache-max-size={PROBE_LIMIT_MIB}M and "
            f"flushed: {lost} of {blocks} 4 KiB blocks never reached the plugin")
    return lost == 0, seen


# --- the per-second timeline -----------------------------------------------------------------------

def read_timeline(prefix, job):
    """The per-second IOPS of one fio job, by second index, from its --write_iops_log.

    A line's timestamp (ms since the job's start, ≈ k·1000 plus a drift of a few ms) ends the window it
    stands for: second round(t/1000) - 1. fio writes no line for a window without completions (zero)
    and never the window the job ends in, which is left out unless a line for it exists."""
    entries = []
    for path in sorted(glob.glob(f"{prefix}_iops*.log")):
        with open(path) as f:
            for line in f:
                fields = [field.strip() for field in line.split(",")]
                if len(fields) >= 2 and (len(fields) < 3 or fields[2] == "1"):   # direction 1: writes
                    entries.append((int(fields[0]), int(fields[1])))
    runtime_ms = job.get("job_runtime") or job["write"].get("runtime", 0)
    values = {}
    collisions = 0
    for stamp, value in entries:
        index = max(0, (stamp + 500) // 1000 - 1)
        if index in values:
            collisions += 1
            value = max(value, values[index])
        values[index] = value
    seconds = max(runtime_ms // 1000, max(values, default=-1) + 1)
    last_unlogged = seconds > 0 and (seconds - 1) not in values
    if last_unlogged:
        seconds -= 1
    timeline = [values.get(i, 0) for i in range(seconds)]
    total = job["write"].get("total_ios", 0)
    return timeline, {"log_lines": len(entries), "job_runtime_ms": runtime_ms, "fio_total_ios": total,
                      "last_second_unlogged": last_unlogged,
                      "ios_in_unlogged_tail_approx": max(0, total - sum(timeline)) if last_unlogged else 0,
                      "index_collisions": collisions}


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(timeline, cache_bytes):
    if not timeline:
        return {"seconds": 0, "min": None, "p10": None, "median": None, "mean": None, "zero_seconds": 0,
                "first_fill_second": None, "zero_seconds_after_first_fill": None, "seconds_below_quarter_median": 0}
    median = statistics.median(timeline)
    written = 0
    first_fill = None
    for second, iops in enumerate(timeline):
        written += iops * BLOCK_SIZE
        if written >= cache_bytes:
            first_fill = second
            break
    return {
        "seconds": len(timeline),
        "min": min(timeline),
        "p10": percentile(timeline, 0.10),
        "median": median,
        "mean": statistics.fmean(timeline),
        "zero_seconds": sum(1 for v in timeline if v == 0),
        "first_fill_second": first_fill,
        "zero_seconds_after_first_fill": (sum(1 for v in timeline[first_fill + 1:] if v == 0)
                                          if first_fill is not None else None),
        "seconds_below_quarter_median": sum(1 for v in timeline if v < 0.25 * median),
    }


def status_highlights(status):
    """The keys of a status worth printing, in STATUS_KEYS order first, whichever exist."""
    keys = [k for k in STATUS_KEYS if k in status]
    keys += sorted(k for k in status if k not in keys and any(part in k.lower() for part in STATUS_KEY_PARTS))
    return {k: status[k] for k in keys}


# --- one run ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, directory, pmem_path):
        self.args = args
        self.directory = directory
        self.pmem_path = pmem_path
        self.cache_bytes = args.cache_mib << 20
        self.volume_bytes = (args.volume_mib or 2 * args.cache_mib) << 20
        self.nbdkit_limit = None   # cache-max-size= for nbdkit's cache filter, when it works
        self.processes = []

    def working_set_bytes(self, percent):
        return (self.cache_bytes * percent // 100) // (1 << 20) * (1 << 20)

    def clean(self):
        kill_processes(self.processes)
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        if os.path.exists(self.pmem_path):
            os.unlink(self.pmem_path)

    def start(self, system):
        """Starts one system on fresh images; returns its URI and, for Sluice's cache, its NBD socket."""
        a, d = self.args, self.directory
        if system in SLUICE_CACHES:
            pmem = ("--pmem", self.pmem_path)
            uri = start_sluice_cache(self.processes, d, system, self.volume_bytes, a.sluice, a.cache_mib, "1M",
                                     format_extra=pmem if system == "sluice-pmem" else (),
                                     serve_extra=pmem if system == "sluice-pmem" else ("--volatile",))
            return uri, os.path.join(d, f"{system}.sock")
        if system == "nbdkit-cache":
            extra = (f"cache-max-size={self.nbdkit_limit}",) if self.nbdkit_limit else ()
            return start_nbdkit_cache(self.processes, d, self.volume_bytes, rate=SLOW_DISK_RATE, extra=extra), None
        if system == "sluice-passthrough":
            return start_sluice_passthrough(self.processes, d, self.volume_bytes, a.sluice), None
        if system == "slow-disk":
            hdd = slow_disk(d, "direct", self.volume_bytes)
            self.processes.append(hdd)
            hdd.start()
            return unix_uri(hdd.socket), None
        raise ValueError(system)

    def run(self, system, percent, runtime_s):
        """One fio job against a freshly started system; returns the result, or raises."""
        self.clean()
        settle_s = settle_disk()
        try:
            uri, sluice_socket = self.start(system)
            prefix = os.path.join(self.directory, f"{system}-{percent}")
            size = self.working_set_bytes(percent)
            job = run_fio_job(uri, FIO_ARGUMENTS + [f"--write_iops_log={prefix}", "--log_avg_msec=1000"],
                              runtime_s, size, ramp_s=0, timeout_s=runtime_s * 3 + 120)
            result = {"system": system, "working_set_percent": percent, "working_set_bytes": size,
                      "runtime_s": runtime_s, "fio_iops": job["write"]["iops"], "settle_s": settle_s}
            if sluice_socket is not None:
                # Before the server stops: what the engine did while the ring filled over and over.
                try:
                    status = sluice_status(self.args.sluice, sluice_socket)
                    result["status"] = status
                    result["status_highlights"] = status_highlights(status)
                    result["write_amplification"] = sluice_metrics(status).get("write_amplification")
                except (subprocess.SubprocessError, ValueError, KeyError) as error:
                    result["status_error"] = str(error)
            # A server that stalls keeps fio waiting for its last requests after the run's end: the whole
            # job is kept (timeline_full, and in the plot), the statistics cover the run's own seconds.
            full, notes = read_timeline(prefix, job)
            timeline = full[:runtime_s]
            notes["overrun_s"] = max(0.0, (notes["job_runtime_ms"] - runtime_s * 1000) / 1000)
            result.update(timeline=timeline, timeline_full=full, timeline_notes=notes,
                          **summarize(timeline, self.cache_bytes))
            return result
        except RuntimeError as error:
            raise RuntimeError(f"{error}{self.server_log_tail()}") from None
        finally:
            kill_processes(self.processes)

    def server_log_tail(self):
        tails = []
        for path in sorted(glob.glob(os.path.join(self.directory, "*.log"))):
            if "_iops" in path:
                continue
            with open(path, errors="replace") as f:
                text = f.read().strip()
            if text:
                tails.append(f"{os.path.basename(path)}: {text[-300:]}")
        return ("; " + "; ".join(tails)) if tails else ""


# --- output ----------------------------------------------------------------------------------------

def settle_disk():
    """Writes every dirty page to disk before a run starts, and returns how long that took: the
    previous run's page cache (a passthrough run leaves up to its whole volume dirty) would
    otherwise be written back during this one, on the same disk as this run's cache device."""
    started = time.monotonic()
    os.sync()
    return round(time.monotonic() - started, 1)


def fmt(value, digits=0):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def table(results, reference, slow):
    header = ["system", "working set", "min", "p10", "median", "zero s", "zero s after fill (fill at s)",
              "s < 0.25×median", "median ÷ passthrough", "cache WA"]
    rows = []
    for r in results:
        ratio = ""
        if reference and reference.get("median") and r.get("median") is not None:
            value = r["median"] / reference["median"]
            ratio = f"{value:.2f}×" if value >= 0.01 or value == 0 else f"{value:.4f}×"
        after = "no fill"
        if r.get("first_fill_second") is not None:
            after = f"{r['zero_seconds_after_first_fill']} ({r['first_fill_second'] + 1})"
        amplification = f"{r['write_amplification']:.2f}" if r.get("write_amplification") is not None else ""
        rows.append([r["system"], f"{r['working_set_percent']}%", fmt(r["min"]), fmt(r["p10"]), fmt(r["median"]),
                     str(r["zero_seconds"]), after, str(r["seconds_below_quarter_median"]), ratio, amplification])
    if slow is not None:
        rows.append([f"slow-disk alone ({slow['runtime_s']} s)", f"{slow['working_set_percent']}%", fmt(slow["min"]),
                     fmt(slow["p10"]), fmt(slow["median"]), str(slow["zero_seconds"]), "", "", "", ""])
    return markdown_table(header, rows)


def plot(path, results, reference, slow, working_sets, cache_mib, subtitle):
    """IOPS per second, one panel per working set, log y axis; returns None or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no plot: matplotlib is not installed for {sys.executable} (make deps installs python3-matplotlib)"
    floor = 1   # a second with no completions is drawn at 1 IOPS (log scale)
    figure, axes = plt.subplots(1, len(working_sets), figsize=(7.5 * len(working_sets), 6.2), sharey=True, squeeze=False)
    colors = {"sluice-pmem": "tab:blue", "sluice-volatile": "tab:orange", "nbdkit-cache": "tab:green"}
    for axis, percent in zip(axes[0], working_sets):
        for r in results:
            if r["working_set_percent"] != percent:
                continue
            y = [max(v, floor) for v in r["timeline_full"]]
            x = list(range(1, len(y) + 1))
            axis.plot(x, y, label=r["system"], color=colors.get(r["system"]), linewidth=1.2)
            if r.get("first_fill_second") is not None:
                second = r["first_fill_second"]
                axis.plot([second + 1], [y[second]], marker="|", markersize=14, color=colors.get(r["system"]))
        if reference is not None:
            y = [max(v, floor) for v in reference["timeline"]]
            axis.plot(list(range(1, len(y) + 1)), y, label=f"sluice-passthrough ({reference['working_set_percent']}% set, reference)",
                      color="black", linestyle="--", linewidth=1)
        if any(len(r["timeline_full"]) > r["runtime_s"] for r in results if r["working_set_percent"] == percent):
            runtime_s = max(r["runtime_s"] for r in results)
            axis.axvspan(runtime_s + 0.5, max(len(r["timeline_full"]) for r in results) + 0.5, color="gray", alpha=0.12,
                         label="after the run's end: fio waits for its last requests")
        if slow is not None and percent == max(working_sets):
            axis.axhline(slow["median"], color="gray", linestyle=":", label=f"slow disk alone (median {slow['median']:,.0f})")
        axis.set_yscale("log")
        axis.set_title(f"working set {percent}% of the {cache_mib} MiB cache")
        axis.set_xlabel("second (| = first fill: total written reaches the cache size)")
        axis.set_ylabel("IOPS (a second with none drawn at 1)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.suptitle(f"4k random writes, QD32, fio nbd engine: IOPS per second\n{subtitle}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def command_output(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def filesystem_type(path):
    """The type of the file system `path` is on, from /proc/mounts (longest matching mount point)."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def machine_info(args):
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    memory = command_output(["grep", "MemTotal", "/proc/meminfo"])
    model = command_output(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"])
    return {"uname": list(platform.uname()), "cpus": os.cpu_count(), "cpu_model": model, "memory": memory,
            "loadavg": load, "python": sys.version, "fio": command_output(["fio", "--version"]),
            "nbdkit": command_output(["nbdkit", "--version"]),
            "sluice_git": command_output(["git", "-C", ROOT, "describe", "--always", "--dirty"]),
            "directory_filesystem": filesystem_type(args.directory)}


# --- main ------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", type=int, default=60, help="seconds of each cache run (default 60)")
    parser.add_argument("--cache-mib", type=int, default=1024, help="Sluice's cache device size, MiB (default 1024)")
    parser.add_argument("--volume-mib", type=int, default=None, help="slow disk (volume) size, MiB (default 2× the cache)")
    parser.add_argument("--directory", default="/var/tmp",
                        help="local-disk folder; a fresh folder for images and sockets is made in it and removed (default /var/tmp)")
    parser.add_argument("--pmem-directory", default="/dev/shm", help="where the emulated pmem file goes (tmpfs)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {', '.join(SYSTEMS)} ('sluice' = the cache in every --modes mode)")
    parser.add_argument("--modes", default="pmem,volatile", help="Sluice cache modes: pmem, volatile (default both)")
    parser.add_argument("--working-sets", default="25,150", help="working sets, %% of the cache (default 25,150)")
    parser.add_argument("--slow-disk-runtime", type=int, default=20, help="seconds of fio straight at a slow disk (default 20)")
    parser.add_argument("--sluice", default=os.path.join(ROOT, ".build", "release", "sluice"))
    args = parser.parse_args()

    for tool in ("fio", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"sustained bench: {tool} is not installed (make deps installs it)")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        sys.exit(f"sustained bench: unknown modes in {modes}; known: {list(MODES)}")
    systems = []
    for name in (s for s in args.systems.split(",") if s):
        for system in ([MODES[m] for m in modes] if name == "sluice" else [name]):
            if system not in SYSTEMS:
                sys.exit(f"sustained bench: unknown system {system}; known: {SYSTEMS} or 'sluice'")
            if system in SLUICE_CACHES and system not in [MODES[m] for m in modes]:
                continue
            if system not in systems:
                systems.append(system)
    working_sets = [int(w) for w in args.working_sets.split(",") if w]
    if filesystem_type(args.directory) == "tmpfs":
        log(f"sustained bench: warning: {args.directory} is on tmpfs; the cache devices and slow disks belong on the local disk")

    # Systems left out, with the reason printed beside the results instead of stopping the run.
    skipped = {}
    sluice_wanted = [s for s in systems if s in SLUICE_CACHES or s == "sluice-passthrough"]
    if sluice_wanted and not os.path.exists(args.sluice):
        for s in sluice_wanted:
            skipped[s] = f"{args.sluice} is missing (run `make release`)"
    elif "sluice-pmem" in systems and not sluice_supports_pmem(args.sluice):
        skipped["sluice-pmem"] = f"{args.sluice} has no --pmem"
    if shutil.which("nbdkit") is None:
        for s in systems:
            if s != "sluice-passthrough":
                skipped[s] = "nbdkit is not installed (make deps installs it)"
    for system, reason in skipped.items():
        log(f"{system} not run: {reason}")
    systems = [s for s in systems if s not in skipped]

    os.makedirs(args.directory, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="sluice-sustained-", dir=args.directory)
    pmem_path = os.path.join(args.pmem_directory, f"sluice-sustained-{os.getpid()}.pmem")
    bench = Bench(args, directory, pmem_path)
    started = datetime.now(timezone.utc)
    machine = machine_info(args)

    # Ctrl-C and SIGTERM both stop the run and clean up (SIGINT too when started with it ignored, as a
    # shell does for background jobs).
    def terminate(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    results, failed = [], {}
    reference = slow = None
    nbdkit_limit_note = None
    interrupted = False
    try:
        if "nbdkit-cache" in systems:
            works, seen = nbdkit_limit_keeps_dirty_data(directory)
            if works:
                bench.nbdkit_limit = f"{args.cache_mib}M"
                nbdkit_limit_note = f"nbdkit-cache limited to Sluice's cache size (cache-max-size={bench.nbdkit_limit}); probe: {seen}"
            else:
                nbdkit_limit_note = (f"nbdkit-cache runs without a size limit: cache-max-size= does not work with "
                                     f"cache=writeback (reclaim drops dirty blocks); probe: {seen}")
            log(nbdkit_limit_note)
        plan = []
        if "sluice-passthrough" in systems:
            plan.append(("sluice-passthrough", min(working_sets), args.runtime))
        plan += [(s, w, args.runtime) for w in working_sets for s in CACHES if s in systems]
        if "slow-disk" in systems:
            plan.append(("slow-disk", max(working_sets), args.slow_disk_runtime))
        for index, (system, percent, runtime_s) in enumerate(plan):
            log(f"[{index + 1}/{len(plan)}] {system}, working set {percent}% ({bench.working_set_bytes(percent) >> 20} MiB), {runtime_s} s")
            try:
                result = bench.run(system, percent, runtime_s)
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                failed[f"{system}|{percent}"] = str(error)
                log(f"{system} ({percent}%) failed: {error}")
                continue
            log(f"  median {fmt(result.get('median'))} IOPS, min {fmt(result.get('min'))}, "
                f"{result.get('zero_seconds')} s with none; fio overall {result['fio_iops']:,.0f} IOPS")
            if system == "sluice-passthrough":
                reference = result
            elif system == "slow-disk":
                slow = result
            else:
                results.append(result)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process and removing the images")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.clean()
        shutil.rmtree(directory, ignore_errors=True)

    seconds = sorted({r["seconds"] for r in results + [x for x in (reference,) if x]})
    cache_results = sorted(results, key=lambda r: (working_sets.index(r["working_set_percent"]), CACHES.index(r["system"])))
    print(f"\n4k random writes at QD32 (fio nbd engine), {args.runtime} s a run on fresh images, no warmup; cache "
          f"{args.cache_mib} MiB (Sluice's cache device on {args.directory}, 1 MiB segments; pmem file in {args.pmem_directory}); "
          f"slow disks (nbdkit noparallel+rate+delay, 8 ms, 150 MiB/s) of {bench.volume_bytes >> 20} MiB, one per system; "
          f"working sets {', '.join(f'{w}%' for w in working_sets)} of the cache. Per-second IOPS over each run's "
          f"logged seconds ({' or '.join(str(n) for n in seconds) or 'none'} here: fio does not log the second its job ends "
          f"in); a second without a log line counts as zero. "
          f"fill = the second in which the total written reaches the cache size (no fill: it never did). Load average at start "
          f"{' '.join(machine['loadavg'])}: the machine is shared.\n")
    if nbdkit_limit_note:
        print(nbdkit_limit_note + "\n")
    if cache_results or reference or slow:
        print(table(([reference] if reference else []) + cache_results, reference, slow))
    if reference is None:
        print("\n(no sluice-passthrough result: the ratio column is empty)")
    for r in ([reference] if reference else []) + cache_results:
        if r["timeline_notes"]["overrun_s"] >= 1:
            print(f"\n{r['system']} {r['working_set_percent']}%: fio's last requests completed "
                  f"{r['timeline_notes']['overrun_s']:.1f} s after the {r['runtime_s']} s run ended (those seconds are "
                  f"in the plot and the JSON's timeline_full, not in the table)")
    for r in cache_results:
        if r["system"] in SLUICE_CACHES:
            where = f"{r['system']} {r['working_set_percent']}%"
            if "status_highlights" in r:
                missing = [k for k in STATUS_KEYS if k not in r["status"]]
                print(f"\n{where} status at the end: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in r["status_highlights"].items())
                      + (f" (not reported: {', '.join(missing)})" if missing else ""))
            else:
                print(f"\n{where}: no status ({r.get('status_error', 'unknown error')})")
    for key, reason in skipped.items():
        print(f"\nNote: {key} not run: {reason}.")
    for key, reason in failed.items():
        print(f"\nNote: {key.replace('|', ' ')}% failed: {reason}")
    if interrupted:
        print("\nNote: interrupted; the results above are partial.")

    results_directory = os.path.join(ROOT, "bench", "results")
    os.makedirs(results_directory, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(results_directory, f"sustained-{stamp}")
    table_text = table(([reference] if reference else []) + cache_results, reference, slow) if (cache_results or reference or slow) else ""
    with open("/proc/loadavg") as f:
        machine["loadavg_end"] = f.read().split()[:3]
    problem = plot(base + ".png", cache_results, reference, slow, working_sets, args.cache_mib,
                   f"cache {args.cache_mib} MiB, slow disks {bench.volume_bytes >> 20} MiB, {started:%Y-%m-%d %H:%M} UTC")
    with open(base + ".json", "w") as f:
        json.dump({"timestamp": stamp, "args": vars(args), "machine": machine, "systems": systems,
                   "skipped": skipped, "failed": failed, "interrupted": interrupted,
                   "nbdkit_cache_limit": bench.nbdkit_limit, "nbdkit_cache_limit_note": nbdkit_limit_note,
                   "fio_arguments": FIO_ARGUMENTS, "results": cache_results, "reference": reference, "slow_disk": slow,
                   "table": table_text, "commands": command_log}, f, indent=2)
    print(f"\nraw results: {os.path.relpath(base + '.json', ROOT)}")
    print(f"plot: {os.path.relpath(base + '.png', ROOT)}" if problem is None else problem)


if __name__ == "__main__":
    main()
