#!/bin/bash
# Restart time after a crash and after a clean shutdown, against the device's sequential read rate.
#
#   bench/recovery_bench.sh [SLUICE [DIR [ROUNDS]]]
#
# Builds a 4 GiB cache file in DIR (default /var/tmp/sluice-recovery-bench: a local disk, not
# /dev/shm, whose page cache would hide the device), fills it with ~3.5 GiB of dirty data through
# `sluice serve` with writeback off, FLUSHes, kills the server with SIGKILL, then ROUNDS times (5)
# drops the page cache, restarts and prints the "recovered the cache log" figures, and times
# `dd iflag=direct` over the cache file. Then the same for clean restarts (SIGTERM between them).
# Needs root (drop_caches), fio with its nbd engine and python3-libnbd. Take medians: a shared
# machine's disk and cores vary from run to run.
set -euo pipefail
SLUICE=$(realpath "${1:-.build/release/sluice}")
DIR=${2:-/var/tmp/sluice-recovery-bench}
ROUNDS=${3:-5}
mkdir -p "$DIR"
cd "$DIR"
CACHE=$DIR/cache.img
BACKING=$DIR/backing.img
SOCKET=$DIR/bench.sock
URI="nbd+unix:///?socket=$SOCKET"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Starts the server; waits until it serves. The log goes to $DIR/serve.log.
start() {
    rm -f "$SOCKET"
    "$SLUICE" serve --cache "$CACHE" --backing "$BACKING" --volatile --socket "$SOCKET" --writeback-threshold 0 > serve.log 2>&1 &
    PID=$!
    for _ in $(seq 1200); do grep -q "listening" serve.log && return; sleep 0.05; done
    echo "the server did not start: $(cat serve.log)" >&2
    exit 1
}

recovery_line() {
    grep "recovered the cache log" serve.log | grep -o "clean_shutdown=[a-z]*\|bytes_read=[0-9]*\|scan_seconds=[0-9.]*\|scan_gb_per_s=[0-9.]*\|replay_seconds=[0-9.]*\| seconds=[0-9.]*" | tr '\n' ' '
    echo
}

# A device written whole (random data), so that neither dd nor recovery reads holes.
if [ ! -e "$CACHE" ]; then dd if=/dev/urandom of="$CACHE" bs=8M count=512 oflag=direct status=none; fi
[ -e "$BACKING" ] || truncate -s 8G "$BACKING"
"$SLUICE" format --cache "$CACHE" --backing "$BACKING" --force > /dev/null
start
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --size=3500M --iodepth=8 > fill.log
/usr/bin/python3 -c "import nbd; h = nbd.NBD(); h.connect_uri('$URI'); h.flush()"
kill -9 "$PID"; wait "$PID" 2>/dev/null || true

echo "after a crash (SIGKILL):"
for _ in $(seq "$ROUNDS"); do
    drop_caches
    start
    recovery_line
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true
    drop_caches
    echo "dd: $(dd if="$CACHE" of=/dev/null bs=8M iflag=direct 2>&1 | tail -1)"
done
echo "after a clean shutdown (SIGTERM):"
start
kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
for _ in $(seq "$ROUNDS"); do
    drop_caches
    start
    recovery_line
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
done
