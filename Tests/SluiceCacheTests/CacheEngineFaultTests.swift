import NIOCore
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Injected media faults: a failing backing store must never lose data (writeback retries); a
/// failing cache device must make the engine refuse writes with EIO rather than acknowledge them
/// falsely.
final class CacheEngineFaultTests: XCTestCase {
    private func block(_ tag: UInt32, _ blockNumber: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: blockNumber * 8, sectors: 8)
    }

    private func tinyHarness(threshold: Int = 0, controlled: Bool = false) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = threshold
        return try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables,
                                 wrapMedia: controlled ? ControlledMedium.wrapper() : nil)
    }

    private func tags(_ harness: EngineHarness, block blockNumber: Int) throws -> [UInt32?] {
        SectorCodec.decodeAll(try harness.read(at: UInt64(blockNumber * 4096), count: 4096), firstLBA: blockNumber * 8)
    }

    private func backingTags(_ harness: EngineHarness, block blockNumber: Int) throws -> [UInt32?] {
        SectorCodec.decodeAll(try harness.backingBytes(at: blockNumber * 4096, count: 4096), firstLBA: blockNumber * 8)
    }

    private func isEIO(_ reply: VolumeReply?) -> Bool {
        if case .failed(.io(errno: 5))? = reply { return true }
        return false
    }

    /// Submits a request and returns its reply. On these in-order media every reply is due within a
    /// few turns of the loop (barriers run on the next turn); a request still unanswered after 50
    /// turns never will be, and fails the test instead of hanging it.
    private func reply(_ harness: EngineHarness, file: StaticString = #filePath, line: UInt = #line,
                       _ body: @escaping (CacheEngine, @escaping (consuming VolumeReply) -> Void) -> Void) throws -> VolumeReply {
        var result: VolumeReply?
        try harness.loop.submit { body(harness.engine) { result = $0 } }.wait()
        for _ in 0..<50 {
            if let result = try harness.loop.submit({ result }).wait() { return result }
        }
        XCTFail("the request never got a reply", file: file, line: line)
        throw HarnessError.failed("no reply")
    }

    /// A failed backing write (and a failed backing sync) during writeback loses nothing: reads stay
    /// right while the batch waits for its retry, the drain completes after it, and the backing
    /// store then holds every block.
    func testBackingWriteAndSyncFailuresAreRetriedWithoutLosingData() throws {
        for fault in ["write", "sync"] {
            let harness = try tinyHarness()
            defer { harness.close() }
            for blockNumber in 0..<6 { try harness.write(block(UInt32(10 + blockNumber), blockNumber), at: UInt64(blockNumber * 4096)) }
            try harness.onMedia { _, backing in
                if fault == "write" { backing.failNextWrites = 1 } else { backing.failNextSyncs = 1 }
            }
            var drained: Result<Void, Error>?
            try harness.loop.submit { harness.engine.writeBackAll { drained = $0 } }.wait()
            XCTAssertGreaterThanOrEqual(try harness.inspect { $0.counters.writebackErrors }, 1, "\(fault): the first writeback failed")
            for blockNumber in 0..<6 {
                XCTAssertEqual(try tags(harness, block: blockNumber), Array(repeating: UInt32(10 + blockNumber), count: 8),
                               "\(fault): block \(blockNumber) reads right while writeback waits to retry")
            }
            try harness.drain()
            XCTAssertNotNil(drained)
            XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 0)
            for blockNumber in 0..<6 {
                XCTAssertEqual(try backingTags(harness, block: blockNumber), Array(repeating: UInt32(10 + blockNumber), count: 8),
                               "\(fault): block \(blockNumber) on the backing store after the retried drain")
            }
        }
    }

    /// Data made durable in the cache survives a power failure that strikes while writeback is
    /// failing.
    func testDurableDataSurvivesAPowerFailureWhileWritebackFails() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        for blockNumber in 0..<20 { try harness.write(block(UInt32(100 + blockNumber), blockNumber * 3), at: UInt64(blockNumber * 3 * 4096)) }
        try harness.flush()
        try harness.onMedia { _, backing in backing.failNextWrites = 1 }
        try harness.loop.submit { harness.engine.writeBackAll { _ in } }.wait()
        try harness.crash(seed: 5)
        for blockNumber in 0..<20 {
            XCTAssertEqual(try tags(harness, block: blockNumber * 3), Array(repeating: UInt32(100 + blockNumber), count: 8))
        }
    }

    /// BUG: when a backing write of a writeback batch fails synchronously, `issueWritebackWrites`
    /// keeps issuing the rest of the failed batch after `writebackFailed` has already run (the loop
    /// does not look at `batch.failure`), and every later completion calls `writebackFailed` again.
    /// The failed batch counts once per run instead of once, and its remaining (possibly stale)
    /// writes still reach the backing store after the engine has moved on.
    ///
    /// Blocks 0, 2 and 4 are three runs; the first backing write fails.
    /// Expected: writebackErrors 1, no backing write after the failed one. Actual: 3 and 2.
    func testAFailedWritebackBatchStopsAndCountsOnce() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        for blockNumber in [0, 2, 4] { try harness.write(block(UInt32(blockNumber + 1), blockNumber), at: UInt64(blockNumber * 4096)) }
        try harness.flush()
        let writesBefore = try harness.onMedia { _, backing -> Int in
            backing.failNextWrites = 1
            return backing.writeCount
        }
        try harness.loop.submit { harness.engine.writeBackAll { _ in } }.wait()
        // Nothing else runs on the loop before the retry, one second later.
        let (errors, writesAfter) = try harness.loop.submit { (harness.engine.counters.writebackErrors, harness.backing.writeCount) }.wait()
        XCTAssertEqual(errors, 1, "one batch failed once")
        XCTAssertEqual(writesAfter - writesBefore, 0, "backing writes issued by the batch after its first write failed")
    }

    /// BUG (data corruption, no crash needed), same cause as above: a write-zeroes of block 10
    /// waits behind a writeback batch holding block 10. The batch's first backing write (block 0)
    /// fails synchronously; `writebackFailed` lets the write-zeroes go (block 10 leaves the index,
    /// the backing store zeroes it, the request is acknowledged); then the failed batch's loop goes
    /// on and writes block 10's old data over the zeros.
    ///
    /// 1. write block 0 = #1, block 10 = #2, flush (segment 1 on the device, dirty)
    /// 2. hold cache reads; drain (writeback's read of segment 1 is held)
    /// 3. write-zeroes block 10 (waits: writeback in flight touches block 10)
    /// 4. make the next backing write fail; release the read
    /// Expected: the write-zeroes completes and block 10 reads zeros. Actual: block 10 reads #2.
    func testAFailedWritebackBatchNeverWritesOverALaterWriteZeroes() throws {
        let harness = try tinyHarness(controlled: true)
        defer { harness.close() }
        let cacheMedium = harness.cacheMedium as! ControlledMedium
        try harness.write(block(1, 0), at: 0)
        try harness.write(block(2, 10), at: 10 * 4096)
        try harness.flush()
        var zeroReply: VolumeReply?
        try harness.loop.submit {
            cacheMedium.hold = { kind, _, _ in kind == .read }
            harness.engine.writeBackAll { _ in }
            harness.engine.submitDiscard(offset: 10 * 4096, lengthBytes: 4096, zeroes: true, fua: false) { zeroReply = $0 }
        }.wait()
        XCTAssertEqual(try harness.loop.submit { cacheMedium.held.count }.wait(), 1, "writeback's read of segment 1 is held")
        // The write-zeroes cancelled the batch's write of block 10 (not issued yet), so it need not
        // wait for the batch; what matters is that block 10's old data never lands after it.
        try harness.loop.submit {
            harness.backing.failNextWrites = 1
            cacheMedium.hold = nil
            cacheMedium.releaseAll()
        }.wait()
        guard case .done? = zeroReply else { return XCTFail("write-zeroes did not complete: \(String(describing: zeroReply))") }
        XCTAssertEqual(try tags(harness, block: 10), Array(repeating: 0, count: 8), "block 10 reads zeros after an acknowledged write-zeroes")
        XCTAssertEqual(try tags(harness, block: 0), Array(repeating: 1, count: 8))
    }

    /// A failed segment write to the cache device (completing later, as io_uring does) fails the
    /// FUA write waiting for it, and from then on the engine refuses writes, flushes and
    /// write-zeroes with EIO. Data acknowledged before is still served, and what was durable before
    /// survives a restart.
    func testCacheDeviceWriteFailureRefusesNewWritesWithEIO() throws {
        let harness = try tinyHarness(controlled: true)
        defer { harness.close() }
        let cacheMedium = harness.cacheMedium as! ControlledMedium
        let firstSegment = try harness.inspect { $0.geometry.firstSegmentOffset }
        try harness.write(block(1, 1), at: 4096, fua: true)
        try harness.write(block(2, 2), at: 2 * 4096)
        var fuaReply: VolumeReply?
        try harness.loop.submit {
            cacheMedium.hold = { kind, offset, _ in kind == .write && offset >= firstSegment }
            harness.engine.submitWrite(offset: 3 * 4096, data: ByteBuffer(bytes: self.block(3, 3)), fua: true) { fuaReply = $0 }
        }.wait()
        for _ in 0..<5 { try harness.loop.submit {}.wait() }
        XCTAssertEqual(try harness.loop.submit { cacheMedium.held.count }.wait(), 1, "the segment write is in flight")
        try harness.loop.submit {
            cacheMedium.hold = nil
            harness.cache.failNextWrites = 1
            cacheMedium.releaseAll()
        }.wait()
        XCTAssertTrue(isEIO(try harness.loop.submit { fuaReply }.wait()), "the FUA write whose segment failed must fail, got \(String(describing: fuaReply))")
        XCTAssertNotNil(try harness.inspect { $0.failure })
        let plain = try reply(harness) { $0.submitWrite(offset: 4 * 4096, data: ByteBuffer(bytes: self.block(4, 4)), fua: false, completion: $1) }
        XCTAssertTrue(isEIO(plain), "a write after the failure must be refused with EIO, got \(plain)")
        let flush = try reply(harness) { $0.submitFlush(completion: $1) }
        XCTAssertTrue(isEIO(flush), "a flush after the failure must be refused with EIO, got \(flush)")
        let zero = try reply(harness) { $0.submitDiscard(offset: 0, lengthBytes: 8192, zeroes: true, fua: false, completion: $1) }
        XCTAssertTrue(isEIO(zero), "write-zeroes after the failure must be refused with EIO, got \(zero)")
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "acknowledged data is still served")
        XCTAssertEqual(try tags(harness, block: 2), Array(repeating: 2, count: 8), "acknowledged data is still served")
        try harness.crash(seed: 3)
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "durable data survives")
        try harness.write(block(5, 5), at: 5 * 4096, fua: true)
        XCTAssertEqual(try tags(harness, block: 5), Array(repeating: 5, count: 8), "the restarted engine accepts writes")
    }

    /// BUG (request never answered): the same failure, completed before the write call returns
    /// (`FileMedium`, `SimulatedMedium`). `runBarrier` takes the gathered waiters out of
    /// `barrierGathering`, then seals; the segment write fails at once, `fail()` → `failBarriers()`
    /// finds the waiters in neither list; the barrier is appended to `barriersWaiting` afterwards,
    /// and `driveBarriers()` does nothing once `failure` is set. The FUA write (or flush) whose
    /// segment failed never gets a reply.
    /// Expected: EIO. Actual: no reply, ever.
    func testFUAWriteWhoseSegmentWriteFailsAtOnceGetsEIO() throws {
        for request in ["FUA write", "flush"] {
            let harness = try tinyHarness()
            defer { harness.close() }
            try harness.write(block(2, 2), at: 2 * 4096)
            try harness.onMedia { cache, _ in cache.failNextWrites = 1 }
            let answer = try? reply(harness) { engine, done in
                if request == "flush" {
                    engine.submitFlush(completion: done)
                } else {
                    engine.submitWrite(offset: 3 * 4096, data: ByteBuffer(bytes: self.block(3, 3)), fua: true, completion: done)
                }
            }
            XCTAssertTrue(isEIO(answer), "\(request) whose segment write failed must get EIO, got \(String(describing: answer))")
        }
    }

    /// A failed cache-device sync fails the flush (it must not be acknowledged) and stops writes.
    func testCacheDeviceSyncFailureFailsTheFlush() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        try harness.write(block(1, 1), at: 4096)
        try harness.onMedia { cache, _ in cache.failNextSyncs = 1 }
        let flush = try reply(harness) { $0.submitFlush(completion: $1) }
        XCTAssertTrue(isEIO(flush), "the flush whose sync failed must fail, got \(flush)")
        let plain = try reply(harness) { $0.submitWrite(offset: 0, data: ByteBuffer(bytes: self.block(2, 0)), fua: false, completion: $1) }
        XCTAssertTrue(isEIO(plain), "a write after the failure must be refused with EIO, got \(plain)")
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8))
    }

    /// BUG (process abort): a read of the old copy for a merge that fails synchronously (allowed by
    /// `BlockMedium`; `FileMedium` and `SimulatedMedium` complete before returning) calls `fail()`
    /// inside `processWaitingUpdates`; `fail()` empties `waitingUpdates`, and the running pass then
    /// stores the blocked head back with `waitingUpdates.first = update` on an empty queue:
    /// precondition failure in `BoundedQueue.first.set` (CacheEngine.swift), and the whole server
    /// process dies.
    /// Expected: the partial write fails with EIO; the old data is still served.
    func testCacheDeviceReadFailureDuringAMergeDoesNotAcknowledgeTheWrite() throws {
        try runInChildProcess("SluiceCacheTests.CacheEngineFaultTests/testCacheDeviceReadFailureDuringAMergeDoesNotAcknowledgeTheWrite") {
            let harness = try tinyHarness()
            defer { harness.close() }
            try harness.write(block(1, 1), at: 4096)
            try harness.flush()
            try harness.onMedia { cache, _ in cache.failNextReads = 1 }
            let partial = try reply(harness) {
                $0.submitWrite(offset: 4096 + 512, data: ByteBuffer(bytes: SectorCodec.bytes(tag: 2, firstLBA: 9, sectors: 1)), fua: false, completion: $1)
            }
            XCTAssertTrue(isEIO(partial), "the partial write whose merge read failed must fail, got \(partial)")
            XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "the old data is still served")
        }
    }

    /// BUG (process abort), same cause: a segment write that fails synchronously while a write
    /// fills the segment (`applyWrite` → `sealOpenBuffer` → `writeSegment` → `fail()`) empties the
    /// queue under the running pass; the write is failed by `fail()` and then `removeFirst()` runs
    /// on the empty queue (index out of range in `BoundedQueue.removeFirst`), or, if the write goes
    /// on past the segment, `waitingUpdates.first = update` trips its precondition.
    /// Expected: the write fails with EIO (exactly one reply) and the engine refuses further writes.
    func testCacheDeviceWriteFailureWhileAWriteFillsASegmentFailsThatWrite() throws {
        try runInChildProcess("SluiceCacheTests.CacheEngineFaultTests/testCacheDeviceWriteFailureWhileAWriteFillsASegmentFailsThatWrite") {
            let harness = try tinyHarness()
            defer { harness.close() }
            try harness.onMedia { cache, _ in cache.failNextWrites = 1 }
            // 16 blocks: the 15th fills segment 1, whose write fails at once.
            let data = SectorCodec.bytes(tag: 1, firstLBA: 0, sectors: 16 * 8)
            var replies: [VolumeReply] = []
            let reply = try reply(harness) { engine, done in
                engine.submitWrite(offset: 0, data: ByteBuffer(bytes: data), fua: false) { replies.append($0); done($0) }
            }
            XCTAssertTrue(isEIO(reply), "the write whose segment could not be written must fail, got \(reply)")
            XCTAssertEqual(try harness.loop.submit { replies.count }.wait(), 1, "exactly one reply")
            let next = try self.reply(harness) { $0.submitWrite(offset: 0, data: ByteBuffer(bytes: self.block(2, 0)), fua: false, completion: $1) }
            XCTAssertTrue(isEIO(next), "got \(next)")
        }
    }

    /// A failed backing-store read fails only that read; the engine goes on.
    func testBackingReadFailureFailsOnlyThatRead() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        try harness.onMedia { _, backing in backing.failNextReads = 1 }
        let read = try reply(harness) { $0.submitRead(offset: 40 * 4096, lengthBytes: 4096, buffer: ByteBuffer(), completion: $1) }
        XCTAssertTrue(isEIO(read), "got \(read)")
        try harness.write(block(1, 40), at: 40 * 4096, fua: true)
        XCTAssertEqual(try tags(harness, block: 40), Array(repeating: 1, count: 8))
    }

    /// A failed superblock-record write retiring reclaimed segments (cache device write) keeps the
    /// slots in use and the clean copies cached; the retry, a second later, completes the drain.
    func testRecordWriteFailureWhileRetiringIsRetried() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        for blockNumber in 0..<4 { try harness.write(block(UInt32(blockNumber + 1), blockNumber), at: UInt64(blockNumber * 4096)) }
        try harness.flush()
        // Writeback reads the cache device and writes the backing store; the next cache write is
        // the record retiring segment 1.
        try harness.onMedia { cache, _ in cache.failNextWrites = 1 }
        var drained: Result<Void, Error>?
        try harness.loop.submit { harness.engine.writeBackAll { drained = $0 } }.wait()
        let state = try harness.inspect { ($0.counters.recordWriteErrors, $0.dirtyBlocks, $0.cachedBlocks, $0.ring.retiredThroughID, $0.failure) }
        XCTAssertEqual(state.0, 1, "the record write failed")
        XCTAssertEqual(state.1, 0, "the blocks were written back")
        XCTAssertEqual(state.2, 4, "nothing is forgotten before the record is durable")
        XCTAssertEqual(state.3, 0)
        XCTAssertNil(state.4, "a failed record write is retried, not fatal")
        XCTAssertNil(drained)
        try harness.drain()
        XCTAssertNotNil(drained)
        XCTAssertEqual(try harness.inspect { $0.cachedBlocks }, 0)
        try harness.crash(seed: 9)
        for blockNumber in 0..<4 { XCTAssertEqual(try tags(harness, block: blockNumber), Array(repeating: UInt32(blockNumber + 1), count: 8)) }
    }

    // MARK: Degrading on cache-device errors

    /// Puts block 1 on the cache device as a clean copy (of a read miss), with later segments
    /// written after it so no buffer holds it in memory.
    private func cleanCopyOnTheDevice(_ harness: EngineHarness) throws {
        try harness.write(block(1, 1), at: 4096)
        try harness.drain()
        // A read miss now caches block 1 clean; later writes push its segment to the device.
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8))
        for index in 0..<40 { try harness.write(block(100 + UInt32(index), 20 + index), at: UInt64((20 + index) * 4096)) }
        try harness.flush()
        let entry = try harness.loop.submit { harness.engine.index.lookup(1) }.wait()
        XCTAssertEqual(entry?.isDirty, false, "block 1 is a clean copy")
    }

    func testAFailedCacheDeviceReadOfACleanCopyIsRetriedFromTheBackingStore() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        try cleanCopyOnTheDevice(harness)
        try harness.onMedia { cache, _ in cache.failNextReads = 1 }
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "served from the backing store")
        let status = try harness.loop.submit { harness.engine.status() }.wait()
        XCTAssertEqual(status.readsRetriedFromBacking, 1)
        XCTAssertEqual(status.cacheDeviceErrors, 1)
        XCTAssertNil(status.degraded, "one error is below the limit")
        XCTAssertNil(status.failure, "a read error leaves nothing acknowledged only in memory: the engine goes on")
    }

    func testAFailedCacheDeviceReadOfADirtyCopyFailsTheReadAndNothingElse() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        try harness.write(block(1, 1), at: 4096)
        for index in 0..<40 { try harness.write(block(100 + UInt32(index), 20 + index), at: UInt64((20 + index) * 4096)) }
        try harness.flush()
        try harness.onMedia { cache, _ in cache.failNextReads = 1 }
        let failed = try reply(harness) { engine, done in
            engine.submitRead(offset: 4096, lengthBytes: 4096, buffer: ByteBuffer(), completion: done)
        }
        XCTAssertTrue(isEIO(failed), "a dirty copy exists only on the cache device: the read fails, got \(String(describing: failed))")
        XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "the next read succeeds")
        try harness.write(block(2, 2), at: 8192)
        XCTAssertEqual(try tags(harness, block: 2), Array(repeating: 2, count: 8), "writes go on")
    }

    /// Past `io_error_limit` the cache serves as in passthrough: writes go to the backing store,
    /// reads are not cached, status says why; what is dirty is still served and written back.
    func testCacheDeviceErrorsPastTheLimitDegradeToPassthrough() throws {
        var tunables = CacheTunables()
        tunables.ioErrorLimit = 2
        tunables.writebackThresholdPercent = 0
        let harness = try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables)
        defer { harness.close() }
        try cleanCopyOnTheDevice(harness)
        try harness.write(block(7, 3), at: 3 * 4096)
        for attempt in 0..<3 {
            try harness.onMedia { cache, _ in cache.failNextReads = 1 }
            XCTAssertEqual(try tags(harness, block: 1), Array(repeating: 1, count: 8), "read \(attempt) served from the backing store")
        }
        let status = try harness.loop.submit { harness.engine.status() }.wait()
        XCTAssertNotNil(status.degraded, "three errors exceed a limit of 2")
        XCTAssertTrue(status.degraded?.contains("io_error_limit") ?? false, status.degraded ?? "")
        XCTAssertEqual(status.cacheMode, "writeback", "the recorded mode is kept; the degradation is not recorded")
        try harness.write(block(9, 5), at: 5 * 4096)
        XCTAssertEqual(try backingTags(harness, block: 5), Array(repeating: 9, count: 8), "a new write goes to the backing store")
        XCTAssertEqual(try tags(harness, block: 3), Array(repeating: 7, count: 8), "dirty data is still served")
        try harness.drain()
        XCTAssertEqual(try backingTags(harness, block: 3), Array(repeating: 7, count: 8), "and written back")
        let after = try harness.loop.submit { harness.engine.status() }.wait()
        XCTAssertEqual(after.bypassWrites, 1)
        XCTAssertEqual(after.dirtyBlocks, 0)
    }

}
