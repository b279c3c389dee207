import NIOCore
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Directed interleavings on media whose operations the test holds and releases by hand.
final class CacheEngineInterleavingTests: XCTestCase {
    private func block(_ tag: UInt32, _ blockNumber: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: blockNumber * 8, sectors: 8)
    }

    private func controlledHarness(threshold: Int = 0) throws -> (EngineHarness, ControlledMedium, ControlledMedium) {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = threshold
        let harness = try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024,
                                        tunables: tunables, wrapMedia: ControlledMedium.wrapper())
        return (harness, harness.cacheMedium as! ControlledMedium, harness.backingMedium as! ControlledMedium)
    }

    /// BUG: the old copy fetched for a merge is kept in `fetchedOldCopy` keyed only by its cache
    /// position. If writeback of that copy finishes while the merge read is in flight, the write no
    /// longer needs the copy (the block is clean; it takes the plain path) and `fetchedOldCopy` is
    /// left behind. Once the ring wraps and another block's copy lands at the same position, a
    /// partial write to that block "finds" the stale fetched copy and merges another block's data
    /// into it.
    ///
    /// 1. write blocks 0...3 and flush (segment 1, slot 0; block 0 at cache position 0, on the device)
    /// 2. hold cache-device reads; write sector 3 of block 0 (a merge read of position 0 is held);
    ///    drain (writeback of segment 1 reads the slot: held too)
    /// 3. release the writeback read: writeback of segment 1 completes, block 0 is clean
    /// 4. release the merge read: the write completes without it; the fetched copy stays
    /// 5. write full blocks until the ring wraps to slot 0; block 400 lands at position 0; a flush
    ///    writes it to the device
    /// 6. write sector 0 of block 400: merges with the stale copy of block 0
    /// Expected: block 400 reads its own data in sectors 1...7. Actual: block 0's old data.
    func testStaleFetchedCopyIsNeverMergedIntoAnotherBlock() throws {
        let (harness, cacheMedium, _) = try controlledHarness()
        defer { harness.close() }
        for blockNumber in 0..<4 { try harness.write(block(1000 + UInt32(blockNumber), blockNumber), at: UInt64(blockNumber * 4096)) }
        try harness.flush()
        XCTAssertEqual(try harness.inspect { $0.index.lookup(0)?.position }, 0, "block 0 sits at cache position 0")

        var partialReply: VolumeReply?
        var drained: Result<Void, Error>?
        try harness.loop.submit {
            cacheMedium.hold = { kind, _, _ in kind == .read }
            harness.engine.submitWrite(offset: 3 * 512, data: ByteBuffer(bytes: SectorCodec.bytes(tag: 2, firstLBA: 3, sectors: 1)),
                                       fua: false) { partialReply = $0 }
            harness.engine.writeBackAll { drained = $0 }
        }.wait()
        let held = try harness.loop.submit { cacheMedium.held.map(\.count) }.wait()
        XCTAssertEqual(held, [4096, 4 * 4096], "held: the merge read of block 0, then writeback's read of segment 1")
        guard held.count == 2 else { return }
        try harness.loop.submit {
            cacheMedium.hold = nil
            cacheMedium.release(1)
        }.wait()
        XCTAssertNotNil(drained, "writeback of segment 1 finished while the merge read was in flight")
        XCTAssertNil(partialReply)
        try harness.loop.submit { cacheMedium.release(0) }.wait()
        guard case .done? = partialReply else { return XCTFail("the partial write did not complete: \(String(describing: partialReply))") }

        // Wrap the ring: write other blocks until the next write lands at cache position 0 (data
        // block 0 of slot 0), where the stale fetched copy came from.
        var next = 100
        func nextWriteLandsAtPositionZero() throws -> Bool {
            try harness.inspect { engine in
                if let open = engine.buffers.open { return engine.ring.slot(of: open.segmentID) == 0 && open.isEmpty }
                return engine.ring.slot(of: engine.ring.nextSegmentID) == 0
            }
        }
        while try next < 1000 && (next == 100 || !nextWriteLandsAtPositionZero()) {
            try harness.write(block(UInt32(5000 + next), next), at: UInt64(next * 4096))
            next += 1
        }
        try harness.write(block(7400, 400), at: 400 * 4096)
        try harness.flush()
        XCTAssertEqual(try harness.inspect { $0.index.lookup(400)?.position }, 0, "block 400 now sits at cache position 0")
        XCTAssertEqual(try harness.inspect { $0.ring.writtenThroughID >= $0.ring.segmentID(inSlot: 0)! }, true, "and its segment is on the device")

        try harness.write(SectorCodec.bytes(tag: 3, firstLBA: 400 * 8, sectors: 1), at: 400 * 4096)
        let bytes = try harness.read(at: 400 * 4096, count: 4096)
        let after = SectorCodec.decodeAll(bytes, firstLBA: 400 * 8)
        let asBlockZero = SectorCodec.decodeAll(bytes, firstLBA: 0)
        XCTAssertEqual(after[0], 3)
        for sector in 1..<8 {
            XCTAssertEqual(after[sector], 7400, "sector \(sector) of block 400 must keep its data, read \(describe(after[sector]))"
                           + (asBlockZero[sector].map { " = block 0's sector \(sector) from write #\($0)" } ?? ""))
        }
        // Block 0 itself is still right.
        let zero = SectorCodec.decodeAll(try harness.read(at: 0, count: 4096), firstLBA: 0)
        XCTAssertEqual(zero, [1000, 1000, 1000, 2, 1000, 1000, 1000, 1000])
    }

    /// A segment slot is reused only after writeback of its previous segment wrote the live blocks
    /// to the backing store, synced it, and made a record saying so durable (written, then synced).
    /// Checked on the journal of every operation both media performed.
    func testSlotsAreReusedOnlyAfterBackingSyncAndRecord() throws {
        let (harness, cacheMedium, _) = try controlledHarness(threshold: 100)
        defer { harness.close() }
        let geometry = try harness.inspect { $0.geometry }
        var rng = SplitMix64(seed: 77)
        for step in 0..<600 {
            let blockNumber = rng.below(300)
            let sectors = rng.chance(30) ? rng.range(1...7) : 8
            try harness.write(SectorCodec.bytes(tag: UInt32(step + 1), firstLBA: blockNumber * 8, sectors: sectors),
                              at: UInt64(blockNumber * 4096), fua: rng.chance(5))
        }
        try harness.drain()
        let journal = try harness.loop.submit { cacheMedium.journal.entries }.wait()
        func isSegmentWrite(_ entry: (isCache: Bool, kind: ControlledMedium.Kind, offset: UInt64, count: Int)) -> Bool {
            entry.isCache && entry.kind == .write && entry.offset >= geometry.firstSegmentOffset
        }
        XCTAssertGreaterThan(journal.filter(isSegmentWrite).count, 3 * geometry.segmentCount, "the ring wrapped a few times")
        var lastWriteOfSlot: [Int: Int] = [:]
        var checked = 0
        for (index, entry) in journal.enumerated() where isSegmentWrite(entry) {
            let slot = Int((entry.offset - geometry.firstSegmentOffset) / UInt64(geometry.segmentBytes))
            defer { lastWriteOfSlot[slot] = index }
            guard let previous = lastWriteOfSlot[slot] else { continue }
            let between = Array(journal[(previous + 1)..<index])
            // backing sync, then a record write, then a cache sync: in this order.
            guard let backingSync = between.firstIndex(where: { !$0.isCache && $0.kind == .sync }),
                  let record = between[backingSync...].firstIndex(where: { $0.isCache && $0.kind == .write && $0.offset < geometry.firstSegmentOffset }),
                  between[record...].contains(where: { $0.isCache && $0.kind == .sync })
            else {
                XCTFail("slot \(slot) rewritten at operation \(index) without backing sync, record write and cache sync since its previous write at \(previous)")
                break
            }
            checked += 1
        }
        XCTAssertGreaterThan(checked, 10)
    }

    /// BUG: a trim or write-zeroes places its discard markers in the open buffer (and drops the
    /// blocks from the index) before the backing store has even done the discard. A flush that
    /// arrives meanwhile makes the markers durable on the cache device, but syncs the backing store
    /// only for discards already completed. After a power failure, recovery applies the marker, and
    /// the block falls through to the backing store, which still holds data older than the block's
    /// last durable write.
    ///
    /// 1. write block 5 = #1, drain (backing store: #1, synced)
    /// 2. write block 5 = #2 with FUA (durable in the cache)
    /// 3. write-zeroes block 5 without FUA; the backing store's discard is held (in flight)
    /// 4. flush (the engine places the marker only once the backing discard is synced, so the
    ///    flush has no marker to make durable yet)
    /// 5. power failure before the discard reaches the backing store
    /// Expected: block 5 reads #2 (its last durable value) or zeros. Actual (before the fix): #1.
    /// Then, on a second run, the discard is released: the flush and the write-zeroes complete and
    /// the zeros survive a power failure.
    func testDiscardMarkerIsNotDurableBeforeTheBackingStoreDiscard() throws {
        for release in [false, true] {
            let (harness, _, backingMedium) = try controlledHarness()
            defer { harness.close() }
            try harness.write(block(1, 5), at: 5 * 4096)
            try harness.drain()
            try harness.write(block(2, 5), at: 5 * 4096, fua: true)
            var zeroReply: VolumeReply?
            var flushReply: VolumeReply?
            try harness.loop.submit {
                backingMedium.hold = { kind, _, _ in kind == .discard }
                harness.engine.submitDiscard(offset: 5 * 4096, lengthBytes: 4096, zeroes: true, fua: false) { zeroReply = $0 }
            }.wait()
            XCTAssertEqual(try harness.loop.submit { backingMedium.held.count }.wait(), 1, "the backing store's discard is in flight")
            let during = SectorCodec.decodeAll(try harness.read(at: 5 * 4096, count: 4096), firstLBA: 40)
            XCTAssertTrue(during.allSatisfy { $0 == 2 || $0 == 0 },
                          "while the write-zeroes is in flight the block reads #2 or zeros, never the backing store's older data")
            try harness.loop.submit { harness.engine.submitFlush { flushReply = $0 } }.wait()
            for _ in 0..<5 { try harness.loop.submit {}.wait() }
            XCTAssertNil(try harness.loop.submit { zeroReply }.wait(), "the write-zeroes is not acknowledged")
            if release {
                try harness.loop.submit {
                    backingMedium.hold = nil
                    backingMedium.releaseAll()
                }.wait()
                for _ in 0..<20 where try harness.loop.submit({ flushReply == nil || zeroReply == nil }).wait() {
                    try harness.loop.submit {}.wait()
                }
                XCTAssertTrue(try harness.loop.submit { if case .done = flushReply { true } else { false } }.wait(), "the flush completes")
                XCTAssertTrue(try harness.loop.submit { if case .done = zeroReply { true } else { false } }.wait(), "the write-zeroes completes")
                try harness.flush()
            }
            try harness.crash(seed: 1)
            let after = SectorCodec.decodeAll(try harness.read(at: 5 * 4096, count: 4096), firstLBA: 40)
            if release {
                XCTAssertEqual(after, Array(repeating: 0, count: 8), "the flushed write-zeroes survives")
            } else {
                XCTAssertTrue(after.allSatisfy { $0 == 2 || $0 == 0 },
                              "block 5 must read #2 (its last durable write) or zeros, read \(Set(after.map(describe)))")
            }
        }
    }

    /// BUG: `shutdown()` does not wait for writes still queued in `waitingUpdates` (here, a
    /// partial write waiting for its merge read). Its barrier finds nothing to seal, the clean
    /// record is written and the shutdown completes; then the merge read returns and the write is
    /// applied to the open buffer and acknowledged, after the clean shutdown, in memory only. The
    /// next start trusts the clean record and the acknowledged write is gone.
    ///
    /// 1. write block 1 = #1, flush (on the device)
    /// 2. hold cache reads; write sector 0 of block 1 = #2 (waits for its merge read)
    /// 3. shutdown: completes
    /// 4. release the read: the write is acknowledged
    /// 5. start again
    /// Expected: the write fails (shutting down) or the shutdown waits for it and it survives.
    /// Actual: acknowledged after the shutdown completed, then lost.
    func testShutdownDoesNotCompleteBeforeQueuedWritesAndNeverLosesThem() throws {
        let (harness, cacheMedium, _) = try controlledHarness()
        defer { harness.close() }
        try harness.write(block(1, 1), at: 4096)
        try harness.flush()
        var writeReply: VolumeReply?
        var shutDown: Result<Void, Error>?
        var order: [String] = []
        try harness.loop.submit {
            cacheMedium.hold = { kind, _, _ in kind == .read }
            harness.engine.submitWrite(offset: 4096, data: ByteBuffer(bytes: SectorCodec.bytes(tag: 2, firstLBA: 8, sectors: 1)), fua: false) {
                writeReply = $0
                order.append("write replied")
            }
            harness.engine.shutdown {
                shutDown = $0
                order.append("shutdown completed")
            }
        }.wait()
        for _ in 0..<20 { try harness.loop.submit {}.wait() }
        try harness.loop.submit {
            cacheMedium.hold = nil
            cacheMedium.releaseAll()
        }.wait()
        for _ in 0..<20 { try harness.loop.submit {}.wait() }
        let (reply, events) = try harness.loop.submit { (writeReply, order) }.wait()
        XCTAssertNotNil(shutDown)
        XCTAssertEqual(events.first, "write replied", "a clean shutdown completes after every queued write has its reply; got \(events)")
        try harness.startEngine()
        XCTAssertEqual(harness.lastRecovery?.report.cleanShutdown, true)
        if case .done? = reply {
            let sector = SectorCodec.decodeAll(try harness.read(at: 4096, count: 512), firstLBA: 8)
            XCTAssertEqual(sector, [2], "the write was acknowledged, so it must survive the clean shutdown; read \(describe(sector[0]))")
        }
    }

    // MARK: Cache modes

    private func tags(_ harness: EngineHarness, block blockNumber: Int) throws -> [UInt32?] {
        SectorCodec.decodeAll(try harness.read(at: UInt64(blockNumber * 4096), count: 4096), firstLBA: blockNumber * 8)
    }

    private func setMode(_ harness: EngineHarness, _ mode: CacheMode) throws {
        try harness.loop.flatSubmit {
            let promise = harness.loop.makePromise(of: Void.self)
            harness.engine.setCacheMode(mode) { promise.completeWith($0) }
            return promise.futureResult
        }.wait()
    }

    private func settle(_ harness: EngineHarness, until done: @escaping () -> Bool) throws {
        for _ in 0..<50 where try !harness.loop.submit(done).wait() { try harness.loop.submit {}.wait() }
    }

    /// BUG (found by the pmem power-failure test of mode switches): a FLUSH after a bypass write
    /// cleared the "backing store unsynced" flag and started a backing sync; a second FLUSH saw the
    /// flag clear and completed with the log's durability alone, before that sync finished. The
    /// bypass write, acknowledged before the second FLUSH, was then lost in a power failure.
    ///
    /// 1. passthrough; a bypass write of block 9 completes
    /// 2. hold backing syncs; FLUSH 1 (its backing sync is held); FLUSH 2
    /// Expected: FLUSH 2 is not answered while the sync is held; after a power failure then, block
    /// 9 may read old data, and once released both FLUSHes complete and the write survives.
    func testASecondFlushWaitsForTheFirstFlushsBackingSync() throws {
        let (harness, _, backingMedium) = try controlledHarness()
        defer { harness.close() }
        try setMode(harness, .passthrough)
        try harness.write(block(3, 9), at: 9 * 4096)
        var first: VolumeReply?
        var second: VolumeReply?
        try harness.loop.submit {
            backingMedium.hold = { kind, _, _ in kind == .sync }
            harness.engine.submitFlush { first = $0 }
            harness.engine.submitFlush { second = $0 }
        }.wait()
        try settle(harness) { second != nil }
        XCTAssertNil(try harness.loop.submit { second }.wait(), "the second FLUSH waits for a backing sync too")
        XCTAssertNil(try harness.loop.submit { first }.wait())
        try harness.loop.submit {
            backingMedium.hold = nil
            backingMedium.releaseAll()
        }.wait()
        try settle(harness) { first != nil && second != nil }
        XCTAssertTrue(try harness.loop.submit { if case .done = second { true } else { false } }.wait())
        try harness.crash(seed: 3)
        XCTAssertEqual(try tags(harness, block: 9), Array(repeating: 3, count: 8), "the flushed bypass write survives")
    }

    /// BUG (found by the power-failure test of mode switches): a FUA bypass write waited for its
    /// own markers only. An earlier write without FUA had voided the block's cached copy with a
    /// marker not yet durable; the FUA write (no marker of its own: the block was no longer cached)
    /// was acknowledged, and after a power failure recovery replayed the old copy over it.
    ///
    /// 1. block 4 written back (a clean copy whose dirty log entry is still replayable)
    /// 2. writearound: a write of block 4 without FUA places a marker in the open buffer
    /// 3. hold cache-device syncs; a FUA write of block 4 (no marker: block 4 is not cached)
    /// Expected: the FUA write is not answered until the marker is durable.
    func testAFUABypassWriteWaitsForAnEarlierWritesMarker() throws {
        let (harness, cacheMedium, _) = try controlledHarness(threshold: 100)
        defer { harness.close() }
        try harness.write(block(1, 4), at: 4 * 4096)
        try harness.flush()
        // Opportunistic writeback (the backing store is idle) cleans it; its segment stays in the log.
        try settle(harness) { harness.engine.index.lookup(4)?.isDirty == false }
        try setMode(harness, .writearound)
        XCTAssertEqual(try harness.loop.submit { harness.engine.index.lookup(4)?.isDirty }.wait(), false, "block 4 is cached clean")
        try harness.write(block(2, 4), at: 4 * 4096)
        var reply: VolumeReply?
        try harness.loop.submit {
            cacheMedium.hold = { kind, _, _ in kind == .sync }
            harness.engine.submitWrite(offset: 4 * 4096, data: ByteBuffer(bytes: self.block(3, 4)), fua: true) { reply = $0 }
        }.wait()
        try settle(harness) { reply != nil }
        XCTAssertNil(try harness.loop.submit { reply }.wait(), "the FUA write waits for the earlier marker to be durable")
        try harness.loop.submit {
            cacheMedium.hold = nil
            cacheMedium.releaseAll()
        }.wait()
        try settle(harness) { reply != nil }
        XCTAssertTrue(try harness.loop.submit { if case .done = reply { true } else { false } }.wait())
        try harness.crash(seed: 4)
        XCTAssertEqual(try tags(harness, block: 4), Array(repeating: 3, count: 8), "the FUA write survives; the old copy is not replayed")
    }

    /// A read miss racing a bypass write of the same block (writearound): the read's backing data
    /// may be older than the write, so it is never cached; a later read returns the new data.
    ///
    /// 1. writearound; hold backing reads; read block 6 (never written: a miss, its backing read held)
    /// 2. write block 6 (bypass: it goes to the backing store and completes)
    /// 3. release the read: it returns the old or the new data, and caches neither
    /// Expected: the next read returns the write's data, from the backing store.
    func testAReadMissRacingABypassWriteIsNotCached() throws {
        let (harness, _, backingMedium) = try controlledHarness()
        defer { harness.close() }
        try setMode(harness, .writearound)
        var readReply: VolumeReply?
        try harness.loop.submit {
            backingMedium.hold = { kind, _, _ in kind == .read }
            harness.engine.submitRead(offset: 6 * 4096, lengthBytes: 4096, buffer: ByteBuffer()) { readReply = $0 }
        }.wait()
        XCTAssertEqual(try harness.loop.submit { backingMedium.held.count }.wait(), 1, "the miss is being read")
        var writeReply: VolumeReply?
        try harness.loop.submit {
            harness.engine.submitWrite(offset: 6 * 4096, data: ByteBuffer(bytes: self.block(2, 6)), fua: false) { writeReply = $0 }
        }.wait()
        try settle(harness) { writeReply != nil }
        XCTAssertTrue(try harness.loop.submit { if case .done = writeReply { true } else { false } }.wait(), "the bypass write completes")
        try harness.loop.submit {
            backingMedium.hold = nil
            backingMedium.releaseAll()
        }.wait()
        try settle(harness) { readReply != nil }
        XCTAssertNil(try harness.loop.submit { harness.engine.index.lookup(6) }.wait(), "the racing read cached nothing")
        XCTAssertEqual(try tags(harness, block: 6), Array(repeating: 2, count: 8), "the next read returns the write's data")
    }

}
