# Sluice: the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Build: liburing, libpmem, libnbd, ISA-L. Tests and bench: the NBD clients and peer servers, and
# matplotlib for bench-sustained's plot.
PACKAGES := pkg-config liburing-dev libpmem-dev libnbd-dev libisal-dev \
	libnbd-bin nbdkit qemu-utils fio nbd-server python3-libnbd python3-matplotlib

VAR := $(CURDIR)/var
SOCKET := $(VAR)/sluice.sock

.PHONY: run test soak soak-kill bench bench-cache bench-pmem bench-sustained bench-read deps build release clean

## Install the Debian packages that are missing.
deps:
	@missing=$$(for p in $(PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

build: deps
	swift build

# Release builds turn off runtime exclusivity checks in every module, dependencies included: they
# cost about a fifth of the server's user-space time per request. Debug builds and tests keep them.
RELEASE_FLAGS := -c release -Xswiftc -enforce-exclusivity=unchecked

release: deps
	swift build $(RELEASE_FLAGS) --product sluice
	swift build $(RELEASE_FLAGS) --product sluice-recover

## Serve the embedded default stack: a 1 GiB backing file and a 256 MiB cache file under var/,
## with the write buffer in a pmem file on /dev/shm, on var/sluice.sock. The cache is formatted
## on the first run and recovered on later ones.
# The pmem file is this checkout's own: /dev/shm is shared by every checkout of a user, so the
# name carries the checkout's directory and a hash of its path, and a second clone (or this one
# after `make clean`) never finds another cache's write buffer there.
USER_ID := $(shell id -u)
CHECKOUT_PMEM := /dev/shm/sluice-$(USER_ID)-$(notdir $(CURDIR))-$(shell printf '%s' '$(CURDIR)' | sha256sum | cut -c1-10).pmem
PMEM ?= $(CHECKOUT_PMEM)
# Where every checkout kept it before; `make run` takes it over if it is this checkout's cache's.
SHARED_PMEM := /dev/shm/sluice-$(USER_ID)-default.pmem
RECOVER := .build/release/sluice-recover
run: release
	@mkdir -p $(VAR)
	@[ -e $(VAR)/disk.img ] || truncate -s 1G $(VAR)/disk.img
	@# An older Makefile's shared pmem file: moved here only if `check` says it is this cache's.
	@if [ -e $(VAR)/cache.img ] && [ ! -e $(PMEM) ] && [ "$(PMEM)" = "$(CHECKOUT_PMEM)" ] && [ -e $(SHARED_PMEM) ]; then \
		$(RECOVER) check --cache $(VAR)/cache.img --pmem $(SHARED_PMEM) >/dev/null 2>&1; \
		if [ $$? -le 1 ]; then echo "moving this cache's write buffer from $(SHARED_PMEM) to $(PMEM)"; mv $(SHARED_PMEM) $(PMEM); fi; \
	fi
	@# var/ deleted by hand leaves this checkout's pmem file behind, useless without var/cache.img.
	@if [ ! -e $(VAR)/cache.img ] && [ -e $(PMEM) ] && [ "$(PMEM)" = "$(CHECKOUT_PMEM)" ] && flock -n $(PMEM) true; then \
		echo "removing $(PMEM): its cache var/cache.img is gone (var/ was deleted without make clean)"; rm -f $(PMEM); \
	fi
	@if [ -e $(VAR)/cache.img ] && [ ! -e $(PMEM) ]; then \
		echo "the pmem file $(PMEM) is gone (a reboot empties /dev/shm); re-creating it, which is safe only after a clean shutdown:"; \
		.build/release/sluice mode --cache $(VAR)/cache.img --backing $(VAR)/disk.img --volatile --pmem $(PMEM) && \
		.build/release/sluice mode --cache $(VAR)/cache.img --backing $(VAR)/disk.img --pmem $(PMEM) || exit 1; \
	fi
	@if [ ! -e $(VAR)/cache.img ]; then \
		truncate -s 256M $(VAR)/cache.img && \
		.build/release/sluice format --cache $(VAR)/cache.img --backing $(VAR)/disk.img --pmem $(PMEM) \
			|| { rm -f $(VAR)/cache.img; exit 1; }; \
	fi
	.build/release/sluice serve --cache $(VAR)/cache.img --backing $(VAR)/disk.img --pmem $(PMEM) \
		--socket $(SOCKET) --description "Sluice default export"

## Run the whole test suite.
test: deps
	swift build --build-tests
	swift test --skip-build --disable-swift-testing

## A longer power-failure soak of the simulated crash tests, both modes (seeds per test: SOAK_SEEDS).
SOAK_SEEDS ?= 2000
soak: deps
	swift build --build-tests
	SLUICE_CRASH_SEEDS=$(SOAK_SEEDS) SLUICE_CRASH_FIRST_SEED=$${SLUICE_CRASH_FIRST_SEED:-1} \
		swift test --skip-build --disable-swift-testing --filter 'CacheEngineCrashTests.testP' 2>&1 | grep -E 'crash test|error|Executed'

## The kill harness for longer: the built sluice serve killed with SIGKILL at random instants
## under a multi-connection workload, both modes, every restart checked (KILL_CYCLES cycles in
## all; a random seed unless SLUICE_KILL_SEED is set; the volume and cache sizes of issue 5).
KILL_CYCLES ?= 300
soak-kill: deps
	swift build --build-tests
	set -o pipefail; SLUICE_KILL_CYCLES=$(KILL_CYCLES) SLUICE_KILL_SEED=$${SLUICE_KILL_SEED:-$$RANDOM} \
		SLUICE_KILL_VOLUME_MIB=$${SLUICE_KILL_VOLUME_MIB:-128} SLUICE_KILL_CACHE_MIB=$${SLUICE_KILL_CACHE_MIB:-64} \
		swift test --skip-build --disable-swift-testing --filter 'KillHarnessTests' 2>&1 | grep -E 'kill harness|error|Executed'

## Benchmark Sluice against nbdkit and qemu-nbd, side by side (not a test: no timing assertions).
bench: release
	python3 bench/bench.py $(BENCH_ARGS)

## The cache over slow disks, side by side with nbdkit's cache filter and qemu-nbd; then the
## persistent buffer against the volatile one and the peers under FUA and FLUSH (bench-pmem), and
## the caches under sustained load (bench-sustained).
bench-cache: release .build/fua_load
	python3 bench/cache_bench.py $(BENCH_ARGS)
	python3 bench/pmem_bench.py $(PMEM_BENCH_ARGS)
	$(DEBIAN_PYTHON) bench/sustained_bench.py $(SUSTAINED_BENCH_ARGS)
	python3 bench/read_bench.py $(READ_BENCH_ARGS)

## Only the persistent-memory comparison of issue 4.
bench-pmem: release .build/fua_load
	python3 bench/pmem_bench.py $(PMEM_BENCH_ARGS)

## Sustained load: 4k random writes at QD32 for 60 s into caches that fill several times over (Sluice's
## in pmem and volatile mode, nbdkit's cache filter; working sets of 25% and 150% of the cache), one
## IOPS figure a second, beside Sluice passthrough and the slow disk alone; a table, JSON and a plot
## under bench/results/ (options through SUSTAINED_BENCH_ARGS, e.g. "--runtime 10 --cache-mib 256").
bench-sustained: release
	$(DEBIAN_PYTHON) bench/sustained_bench.py $(SUSTAINED_BENCH_ARGS)

## The read cache: hot-set random reads, a sequential read that must not evict the hot set, a
## Zipfian mix over four times the cache, and a 70/30 read/write mix, beside nbdkit's cache filter.
bench-read: release
	python3 bench/read_bench.py $(READ_BENCH_ARGS)

# Debian's python3, for which `make deps` installs python3-matplotlib (the plot); a python3 earlier on
# PATH may not have it.
DEBIAN_PYTHON := /usr/bin/python3

# The FUA load generator (fio's nbd engine never sends FUA). libnbd comes from `make deps`; an
# order-only prerequisite, so installing nothing new does not rebuild the tool.
.build/fua_load: bench/fua_load.c | deps
	@mkdir -p .build
	cc -O2 -Wall -Wextra -pthread -o $@ bench/fua_load.c $$(pkg-config --cflags --libs libnbd)

## Remove the build and the default stack: var/ and this checkout's pmem file (give the same
## PMEM=... as to `make run` if you overrode it). That deletes the default export's data, whether
## or not the cache had written it back: var/disk.img goes with var/, so draining the cache into
## it first would be pointless. To keep the data, copy the export out while `make run` serves it
## (nbdcopy 'nbd+unix:///?socket=var/sluice.sock' backup.img). Refused while a server holds the
## cache (its files are flock'ed), so a running `make run` never loses its files under it.
clean:
	@busy=; for file in $(VAR)/cache.img $(VAR)/disk.img $(PMEM); do \
		[ ! -e $$file ] || flock -n $$file true || busy="$$busy $$file"; \
	done; \
	if [ -n "$$busy" ]; then \
		echo "make clean: a running server holds$$busy; stop it first (Ctrl-C where make run runs, or kill -TERM its pid), then run make clean again" >&2; \
		exit 1; \
	fi
	rm -rf .build $(VAR)
	rm -f $(PMEM)
