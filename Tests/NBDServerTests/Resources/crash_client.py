#!/usr/bin/python3
# The kill harness's NBD client (python3-libnbd), used by KillHarnessTests.swift.
#
#   crash_client.py run     URI LOG --seed S --first-id N [--ops N] [--seconds T] [--final] ...
#   crash_client.py verify  URI IMAGE LOG... --durable volatile|pmem|live
#   crash_client.py compare BACKING IMAGE
#
# run: a mixed workload over several connections (3), each with several requests in flight (8):
# writes of 512 B .. 256 KiB (sector aligned, most 4 KiB aligned; FUA in the share --fua-share),
# FLUSH (--flush-share of the requests), TRIM and WRITE_ZEROES (5% each, some with FUA, a few up
# to 2 MiB); half of the requests rewrite a few hot regions. Every sector a write carries is
# stamped, all 512 bytes of it, with (op id, sector) repeated, so a sector's content names the
# write that produced it, a sector mixing two writes is seen, and so is one holding another
# sector's data. Requests in flight do not overlap, except for a few let through on purpose
# (the checks below hold for those too: neither of two concurrent requests is older than the other).
# Every request is appended to LOG before it is sent, and every reply when it arrives (the file is
# line buffered, and only the server gets killed): "I seq id kind first count fua" and
# "A seq id" (done) or "F seq id errno" (failed); kinds W write, Z write-zeroes, T trim,
# S flush. seq is one counter over every connection, so "acknowledged before a flush was issued"
# is a comparison of two numbers. Without --final the client runs until the server dies (it is
# killed by the harness) or the time is up; with --final it issues --ops requests and waits for
# every reply, and any failure is an error. Prints a JSON summary.
#
# verify: reads the whole volume and checks every sector against IMAGE (what each sector held at
# the previous verification, the "base") and the requests logged since:
#   - a sector holds all zeros, or one write's stamp for that very sector (else: a mixed or
#     foreign sector);
#   - the value was possible: a write logged here that covered the sector, a zero or trim that
#     covered it (a trim may also leave the old data: it is advisory), or the base;
#   - the value is not older than a durable write or write-zeroes of the sector: a value V is
#     ruled out when some durable request D on the sector (a write or write-zeroes; trims never
#     rule anything out) was issued after V's request was acknowledged (V = base: any durable D).
# Durable means: --durable volatile: acknowledged with FUA, or acknowledged before an
# acknowledged FLUSH was issued (on any connection: Sluice advertises CAN_MULTI_CONN);
# --durable pmem: every acknowledged write and write-zeroes (plain too); --durable live (no crash
# since the requests): every acknowledged request, so the value must be the newest.
# Requests never acknowledged (in flight at the kill) are possible values and rule nothing out.
# Then IMAGE is rewritten with what was read: it is the base of the next verification.
# Prints a JSON summary with the number of violations and the first few, explained.
#
# compare: the backing file against IMAGE, byte for byte, with the differing sectors explained.

import argparse
import json
import os
import random
import select
import struct
import sys
import time
from array import array

import nbd

SECTOR = 512
ZERO_SECTOR = bytes(SECTOR)
CHUNK_SECTORS = 128  # 64 KiB: the unit of the fast comparison in verify
NEVER = 1 << 62      # the acknowledgement "seq" of a request never acknowledged


def stamp(op_id, first, count):
    return b"".join(struct.pack("<QQ", op_id, sector) * 32 for sector in range(first, first + count))


def describe(sector_bytes, sector):
    """What a sector holds, in words."""
    if sector_bytes == ZERO_SECTOR:
        return "zeros"
    op_id, tagged = struct.unpack_from("<QQ", sector_bytes)
    if sector_bytes != sector_bytes[:16] * 32:
        pieces = sorted({struct.unpack_from("<QQ", sector_bytes, i) for i in range(0, SECTOR, 16)})
        shown = ", ".join(f"{w}:{s}" for w, s in pieces[:4])
        return f"a mix of {len(pieces)} values ({shown}{', ...' if len(pieces) > 4 else ''})"
    if tagged != sector:
        return f"write {op_id}'s data for sector {tagged}"
    return f"write {op_id}"


# ---------------------------------------------------------------------------------------------
# run


class Connection:
    def __init__(self, number, handle):
        self.number = number
        self.h = handle
        self.inflight = {}  # cookie -> (op id, kind, first, count, fua, buffer)
        self.dead = False


def run(args):
    rng = random.Random(args.seed)
    hot_rng = random.Random(args.hot_seed)
    log = open(args.log, "a", buffering=1)
    summary = {"connected": 0, "issued": 0, "acked": 0, "failed": 0, "server_errors": 0, "bytes": 0,
               "writes": 0, "fua_writes": 0, "flushes": 0, "trims": 0, "zeroes": 0, "overlapping": 0,
               "in_flight_at_end": 0, "error_examples": []}
    connections = []
    for number in range(args.connections):
        h = nbd.NBD()
        try:
            h.connect_uri(args.uri)
        except nbd.Error as error:
            if args.final:
                raise
            summary["connect_error"] = str(error)
            break
        connections.append(Connection(number, h))
    summary["connected"] = len(connections)
    if not connections:
        print(json.dumps(summary))
        return 0
    size = connections[0].h.get_size()
    sectors = size // SECTOR
    if args.final or len(connections) == args.connections:
        assert connections[0].h.can_multi_conn(), "the server must advertise CAN_MULTI_CONN"
    # Hot regions: the same in every run of one harness (hot_seed), rewritten across cycles.
    hot = []
    for _ in range(args.hot_regions):
        length = min(sectors, args.hot_bytes // SECTOR)
        hot.append((hot_rng.randrange(sectors - length + 1) // 8 * 8, length))

    seq = 0
    next_id = args.first_id
    busy = []  # (first, end) of the requests in flight, over every connection
    started = time.monotonic()
    issued_ops = 0

    def pick_range(large):
        if large:
            count = rng.randrange(513, 4097)  # 256 KiB .. 2 MiB (trim and write-zeroes only)
        else:
            r = rng.random()
            if r < 0.35:
                count = rng.randrange(1, 9)
            elif r < 0.7:
                count = 8 * rng.randrange(1, 17)
            elif r < 0.9:
                count = rng.randrange(1, 513)
            else:
                count = 512
        if rng.random() < 0.5 and hot:
            region_first, region_length = hot[rng.randrange(len(hot))]
            count = min(count, region_length)
            first = region_first + rng.randrange(region_length - count + 1)
        else:
            count = min(count, sectors)
            first = rng.randrange(sectors - count + 1)
        if rng.random() < 0.6:
            first = first // 8 * 8
            count = min(count, sectors - first)
        return first, count

    # Shares of the request kinds: FUA writes and flushes as asked (the rest of the writes are
    # plain), trims and write-zeroes 5% each.
    fua_share, flush_share = args.fua_share, args.flush_share

    def next_op():
        r = rng.random()
        if r < flush_share:
            return "S", False, 0, 0
        r -= flush_share
        if r < 0.05:
            kind, fua = "T", rng.random() < 0.15
        elif r < 0.10:
            kind, fua = "Z", rng.random() < 0.3
        else:
            kind, fua = "W", rng.random() < fua_share
        first, count = pick_range(kind in "TZ" and rng.random() < 0.08)
        return kind, fua, first, count

    def overlaps(first, count):
        end = first + count
        return any(first < b_end and b_first < end for b_first, b_end in busy)

    def issue(conn, kind, fua, first, count):
        nonlocal seq, next_id
        op_id = next_id
        next_id += 1
        seq += 1
        log.write(f"I {seq} {op_id} {kind} {first} {count} {int(fua)}\n")
        flags = nbd.CMD_FLAG_FUA if fua else 0
        buffer = None
        if kind == "W":
            buffer = nbd.Buffer.from_buffer(bytearray(stamp(op_id, first, count)))
            cookie = conn.h.aio_pwrite(buffer, first * SECTOR, flags=flags)
            summary["writes"] += 1
            summary["fua_writes"] += int(fua)
            summary["bytes"] += count * SECTOR
        elif kind == "Z":
            cookie = conn.h.aio_zero(count * SECTOR, first * SECTOR, flags=flags)
            summary["zeroes"] += 1
        elif kind == "T":
            cookie = conn.h.aio_trim(count * SECTOR, first * SECTOR, flags=flags)
            summary["trims"] += 1
        else:
            cookie = conn.h.aio_flush()
            summary["flushes"] += 1
        summary["issued"] += 1
        conn.inflight[cookie] = (op_id, kind, first, count, fua, buffer)
        if kind != "S":
            busy.append((first, first + count))

    def retire(conn, cookie, error):
        nonlocal seq
        op_id, kind, first, count, _, _ = conn.inflight.pop(cookie)
        if kind != "S":
            busy.remove((first, first + count))
        seq += 1
        if error is None:
            log.write(f"A {seq} {op_id}\n")
            summary["acked"] += 1
        else:
            log.write(f"F {seq} {op_id} {error.errno or 0}\n")
            summary["failed"] += 1
            if not conn.h.aio_is_dead() and not conn.h.aio_is_closed():
                # An error reply on a live connection: the server failed a valid request.
                summary["server_errors"] += 1
                if len(summary["error_examples"]) < 5:
                    summary["error_examples"].append(f"{kind} {first}+{count} on connection {conn.number}: {error}")

    def kill_connection(conn, error):
        conn.dead = True
        for cookie in list(conn.inflight):
            # libnbd retires the commands of a dead connection with an error.
            try:
                conn.h.aio_command_completed(cookie)
                retire(conn, cookie, None)
            except nbd.Error as failure:
                retire(conn, cookie, failure)
        if args.final:
            raise RuntimeError(f"connection {conn.number} died: {error}")

    def stop_issuing():
        if args.ops and issued_ops >= args.ops:
            return True
        return time.monotonic() - started >= args.seconds

    while True:
        live = [c for c in connections if not c.dead]
        if not live:
            break
        stopping = stop_issuing()
        if stopping and not any(c.inflight for c in live):
            break
        # Fill every connection up to its depth.
        if not stopping:
            for conn in live:
                while len(conn.inflight) < args.depth and not stop_issuing():
                    for _attempt in range(4):
                        kind, fua, first, count = next_op()
                        if kind == "S" or not overlaps(first, count):
                            break
                        if rng.random() < args.overlap_share:
                            summary["overlapping"] += 1
                            break
                    else:
                        break  # everything tried overlaps; let replies come first
                    try:
                        issue(conn, kind, fua, first, count)
                    except nbd.Error as error:
                        kill_connection(conn, error)
                        break
                    issued_ops += 1
                if conn.dead:
                    continue
        # Wait for the sockets, then move every state machine on.
        readers, writers, by_fd = [], [], {}
        for conn in live:
            if conn.dead:
                continue
            try:
                fd = conn.h.aio_get_fd()
                direction = conn.h.aio_get_direction()
            except nbd.Error as error:
                kill_connection(conn, error)
                continue
            by_fd[fd] = conn
            if direction & nbd.AIO_DIRECTION_READ:
                readers.append(fd)
            if direction & nbd.AIO_DIRECTION_WRITE:
                writers.append(fd)
        if not by_fd:
            continue
        readable, writable, _ = select.select(readers, writers, [], 1.0)
        for fd, conn in by_fd.items():
            try:
                if fd in readable:
                    conn.h.aio_notify_read()
                elif fd in writable:
                    conn.h.aio_notify_write()
            except nbd.Error as error:
                kill_connection(conn, error)
                continue
            for cookie in list(conn.inflight):
                try:
                    if conn.h.aio_command_completed(cookie):
                        retire(conn, cookie, None)
                except nbd.Error as error:
                    retire(conn, cookie, error)
            if conn.h.aio_is_dead() or conn.h.aio_is_closed():
                kill_connection(conn, "dead")

    summary["in_flight_at_end"] = sum(len(c.inflight) for c in connections)
    summary["seconds"] = round(time.monotonic() - started, 3)
    summary["last_id"] = next_id - 1
    for conn in connections:
        if not conn.dead:
            try:
                conn.h.shutdown()
            except nbd.Error:
                pass
    log.close()
    print(json.dumps(summary))
    return 1 if args.final and (summary["failed"] or summary["server_errors"]) else 0


# ---------------------------------------------------------------------------------------------
# verify


class Op:
    __slots__ = ("op_id", "kind", "first", "count", "fua", "issue", "ack", "failed")

    def __init__(self, op_id, kind, first, count, fua, issue):
        self.op_id, self.kind, self.first, self.count, self.fua, self.issue = op_id, kind, first, count, fua, issue
        self.ack = NEVER
        self.failed = False


def read_logs(paths):
    ops = {}
    offset = 0  # each log's seqs follow the previous log's
    for path in paths:
        last = 0
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                fields = line.split()
                if not fields or (fields[0] == "I" and len(fields) != 7) or (fields[0] in "AF" and len(fields) < 3):
                    continue  # a torn last line (cannot happen: only the server is killed)
                seq = int(fields[1]) + offset
                last = max(last, seq)
                if fields[0] == "I":
                    op = Op(int(fields[2]), fields[3], int(fields[4]), int(fields[5]), fields[6] == "1", seq)
                    ops[op.op_id] = op
                elif fields[0] == "A":
                    ops[int(fields[2])].ack = seq
                else:
                    ops[int(fields[2])].failed = True
        offset += last
    return ops


def paint(target, first, count, value):
    target[first:first + count] = array("q", [value]) * count


def verify(args):
    ops = read_logs(args.logs)
    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    sectors = size // SECTOR
    with open(args.image, "rb") as f:
        image = bytearray(f.read())
    assert len(image) == size, (len(image), size)

    # Which requests are durable.
    flush_issue = max((op.issue for op in ops.values() if op.kind == "S" and op.ack != NEVER), default=-1)

    def durable(op):
        if op.ack == NEVER or op.kind not in "WZ":
            return False
        if args.durable in ("live", "pmem"):
            return True
        return op.fua or op.ack < flush_issue

    # newest[s]: the issue seq of the newest durable write or write-zeroes on sector s (-1: none);
    # newest_id[s]: its id. zeroing[s]: the latest acknowledgement (NEVER if unacknowledged) of a
    # write-zeroes or trim on s (-2: none), so zeros are possible on s when zeroing[s] >= newest[s].
    newest = array("q", [-1]) * sectors
    newest_id = array("q", [0]) * sectors
    zeroing = array("q", [-2]) * sectors
    touched = bytearray(sectors // CHUNK_SECTORS + 1)
    durable_count = 0
    for op in sorted(ops.values(), key=lambda o: o.issue):
        if op.kind == "S":
            continue
        for chunk in range(op.first // CHUNK_SECTORS, (op.first + op.count - 1) // CHUNK_SECTORS + 1):
            touched[chunk] = 1
        if durable(op):
            durable_count += 1
            paint(newest, op.first, op.count, op.issue)
            paint(newest_id, op.first, op.count, op.op_id)
    for op in sorted((o for o in ops.values() if o.kind in "ZT"), key=lambda o: o.ack):
        paint(zeroing, op.first, op.count, op.ack)

    violations = 0
    examples = []
    counts = {"zeros": 0, "base": 0, "logged_writes": 0}

    def explain_newest(sector):
        op = ops.get(newest_id[sector])
        if op is None:
            return ""
        how = "FUA" if op.fua else ("acknowledged before a flush was issued" if args.durable == "volatile" else "acknowledged")
        return f"; newest durable: {'write' if op.kind == 'W' else 'write-zeroes'} {op.op_id} ({how}, issued at {op.issue})"

    def check(sector, found, base):
        newest_issue = newest[sector]
        if found == ZERO_SECTOR:
            if zeroing[sector] >= newest_issue or (newest_issue == -1 and base == ZERO_SECTOR):
                counts["zeros"] += 1
                return None
            return "zeros, but no trim, write-zeroes or initial zeros can explain them" + explain_newest(sector)
        op_id, tagged = struct.unpack_from("<QQ", found)
        if found != found[:16] * 32 or tagged != sector:
            return describe(found, sector)
        op = ops.get(op_id)
        if op is not None and op.kind == "W" and op.first <= sector < op.first + op.count:
            if op.ack >= newest_issue:
                counts["logged_writes"] += 1
                return None
            return f"write {op_id} (acknowledged at {op.ack}), older than a durable one" + explain_newest(sector)
        if found == base:
            if newest_issue == -1:
                counts["base"] += 1
                return None
            return f"its value before these requests ({describe(base, sector)})" + explain_newest(sector)
        return f"write {op_id}, which is neither logged here for this sector nor its previous value ({describe(base, sector)})"

    # Read the whole volume, 4 MiB at a time with a few reads in flight, and check it.
    read_bytes = 4 << 20
    offsets = list(range(0, size, read_bytes))
    pending = {}
    position = 0
    changed = []
    started = time.monotonic()
    while position < len(offsets):
        while len(pending) < 4 and position + len(pending) < len(offsets):
            offset = offsets[position + len(pending)]
            buffer = nbd.Buffer(min(read_bytes, size - offset))
            pending[offset] = (h.aio_pread(buffer, offset), buffer)
        offset = offsets[position]
        cookie, buffer = pending[offset]
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        del pending[offset]
        position += 1
        data = buffer.to_bytearray()
        for start in range(0, len(data), CHUNK_SECTORS * SECTOR):
            absolute = offset + start
            chunk = absolute // (CHUNK_SECTORS * SECTOR)
            found_chunk = data[start:start + CHUNK_SECTORS * SECTOR]
            base_chunk = image[absolute:absolute + len(found_chunk)]
            if found_chunk == base_chunk and not touched[chunk]:
                counts["base"] += len(found_chunk) // SECTOR
                continue
            if found_chunk != base_chunk:
                changed.append((absolute, found_chunk))
            for i in range(0, len(found_chunk), SECTOR):
                sector = (absolute + i) // SECTOR
                problem = check(sector, found_chunk[i:i + SECTOR], base_chunk[i:i + SECTOR])
                if problem is not None:
                    violations += 1
                    # Consecutive sectors with the same problem are one example.
                    if examples and examples[-1][1] == sector - 1 and examples[-1][2] == problem:
                        examples[-1][1] = sector
                    elif len(examples) < args.examples:
                        examples.append([sector, sector, problem])
    read_seconds = time.monotonic() - started
    h.shutdown()

    # What was read is the base of the next verification.
    with open(args.image, "r+b") as f:
        for absolute, found_chunk in changed:
            f.seek(absolute)
            f.write(found_chunk)

    summary = {
        "violations": violations,
        "examples": [(f"sector {a} holds" if a == b else f"sectors {a}-{b} hold") + f" {problem}" for a, b, problem in examples],
        "sectors": sectors, "requests": len(ops),
        "durable": durable_count, "unacknowledged": sum(1 for o in ops.values() if o.ack == NEVER),
        "acked_flushes": sum(1 for o in ops.values() if o.kind == "S" and o.ack != NEVER),
        "changed_chunks": len(changed), "seconds": round(read_seconds, 3),
    }
    summary.update(counts)
    print(json.dumps(summary))
    return 0


def compare(args):
    with open(args.backing, "rb") as f:
        backing = f.read()
    with open(args.image, "rb") as f:
        image = f.read()
    differing, examples = 0, []
    if len(backing) != len(image):
        examples.append(f"the backing file holds {len(backing)} bytes, the image {len(image)}")
        differing += 1
    step = CHUNK_SECTORS * SECTOR
    for start in range(0, min(len(backing), len(image)), step):
        if backing[start:start + step] == image[start:start + step]:
            continue
        for i in range(start, min(start + step, len(image)), SECTOR):
            if backing[i:i + SECTOR] != image[i:i + SECTOR]:
                differing += 1
                if len(examples) < 10:
                    sector = i // SECTOR
                    examples.append(f"sector {sector}: backing holds {describe(backing[i:i + SECTOR], sector)}, "
                                    f"the volume served {describe(image[i:i + SECTOR], sector)}")
    print(json.dumps({"differing_sectors": differing, "examples": examples}))
    return 0


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run")
    p.add_argument("uri")
    p.add_argument("log")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--hot-seed", type=int, default=1)
    p.add_argument("--first-id", type=int, required=True)
    p.add_argument("--connections", type=int, default=3)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--ops", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--hot-regions", type=int, default=4)
    p.add_argument("--hot-bytes", type=int, default=512 << 10)
    p.add_argument("--overlap-share", type=float, default=0.05)
    p.add_argument("--fua-share", type=float, default=0.15, help="share of the writes sent with FUA")
    p.add_argument("--flush-share", type=float, default=0.05, help="share of the requests that are FLUSH")
    p.add_argument("--final", action="store_true")
    p = commands.add_parser("verify")
    p.add_argument("uri")
    p.add_argument("image")
    p.add_argument("logs", nargs="*")
    p.add_argument("--durable", choices=("volatile", "pmem", "live"), required=True)
    p.add_argument("--examples", type=int, default=12)
    p = commands.add_parser("compare")
    p.add_argument("backing")
    p.add_argument("image")
    args = parser.parse_args()
    return {"run": run, "verify": verify, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
