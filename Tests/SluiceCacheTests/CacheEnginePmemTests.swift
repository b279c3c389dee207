import NIOCore
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Pmem mode's promises, checked exactly on simulated media: FUA and FLUSH never write a partial
/// segment, the cache device sees only full segments (write amplification of one header block per
/// segment), concurrent replies share drains, rewrites append, and an area is reused only after
/// the cache device has synced its segment.
final class CacheEnginePmemTests: XCTestCase {
    private func data(_ tag: UInt32, sector: Int, count: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: sector, sectors: count)
    }

    private func pmemHarness(areas: Int = 8, wrapMedia: ((SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium))? = nil)
        throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = 0
        return try EngineHarness(cacheBytes: 2 << 20, backingBytes: 4 << 20, segmentBytes: 64 * 1024, tunables: tunables,
                                 periodicWork: false, pmemMode: true, pmemAreas: areas, wrapMedia: wrapMedia)
    }

    func testFUAAndFlushWriteNoPartialSegmentAndOnlyFullOnes() throws {
        let harness = try pmemHarness()
        defer { harness.close() }
        let dataBlocks = try harness.inspect { $0.geometry.dataBlocksPerSegment }
        // Four segments' worth of 4 KiB writes, each with FUA or followed by a FLUSH.
        let writes = 4 * dataBlocks
        for block in 0..<writes {
            try harness.write(data(UInt32(block + 1), sector: block * 8, count: 8), at: UInt64(block * 4096), fua: block % 2 == 0)
            if block % 2 == 1 { try harness.flush() }
        }
        let counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.partialSegments, 0)
        XCTAssertEqual(counters.segmentsWritten, 4, "only full segments reach the cache device")
        XCTAssertEqual(counters.userBytesWritten, UInt64(writes * 4096))
        let status = try harness.inspect { $0.status() }
        XCTAssertEqual(status.mode, "pmem")
        // One header block per segment of 15 data blocks.
        XCTAssertEqual(status.writeAmplification, Double(dataBlocks + 1) / Double(dataBlocks), accuracy: 1e-9)
        XCTAssertLessThanOrEqual(status.writeAmplification, 1.07)
        XCTAssertGreaterThan(counters.pmemDrains, 0)
        XCTAssertEqual(counters.pmemPersistedReplies, UInt64(writes), "every write was persisted before its reply")
        // Everything reads back.
        for block in 0..<writes {
            XCTAssertEqual(try harness.read(at: UInt64(block * 4096), count: 4096), data(UInt32(block + 1), sector: block * 8, count: 8))
        }
    }

    func testRepliesDueInOneTurnShareOneDrain() throws {
        let harness = try pmemHarness()
        defer { harness.close() }
        let count = 10
        let replies = try harness.loop.flatSubmit { () -> EventLoopFuture<[VolumeReply]> in
            let engine = harness.engine!
            let before = engine.counters.pmemDrains
            var futures: [EventLoopFuture<VolumeReply>] = []
            for index in 0..<count {
                let promise = harness.loop.makePromise(of: VolumeReply.self)
                engine.submitWrite(offset: UInt64(index * 4096), data: ByteBuffer(bytes: self.data(UInt32(index + 1), sector: index * 8, count: 8)),
                                   fua: true) { promise.succeed($0) }
                futures.append(promise.futureResult)
            }
            XCTAssertEqual(engine.counters.pmemDrains, before, "no reply is sent before the drain")
            return EventLoopFuture.whenAllSucceed(futures, on: harness.loop)
        }.wait()
        XCTAssertEqual(replies.count, count)
        for reply in replies { guard case .done = reply else { return XCTFail("\(reply)") } }
        let counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.pmemPersistedReplies, UInt64(count))
        XCTAssertEqual(counters.pmemDrains, 1, "ten FUA writes in one turn share one drain")
    }

    func testRewritesInTheOpenBufferAppendAndMergeSectors() throws {
        let harness = try pmemHarness()
        defer { harness.close() }
        try harness.write(data(1, sector: 0, count: 8), at: 0)
        try harness.write(data(2, sector: 2, count: 1), at: 1024)
        try harness.write(data(3, sector: 7, count: 1), at: 3584)
        var expected = data(1, sector: 0, count: 8)
        expected.replaceSubrange(1024..<1536, with: data(2, sector: 2, count: 1))
        expected.replaceSubrange(3584..<4096, with: data(3, sector: 7, count: 1))
        XCTAssertEqual(try harness.read(at: 0, count: 4096), expected)
        let (blockCount, mask) = try harness.inspect { engine -> (Int, UInt8) in
            let buffer = engine.buffers.open!
            return (buffer.blockCount, buffer.sectorMask(at: buffer.dataIndex(of: 0)!))
        }
        XCTAssertEqual(blockCount, 3, "each rewrite took a new data block: a persisted copy is never overwritten")
        XCTAssertEqual(mask, 0xFF)
        XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 1)
        // After a power failure the newest copy, merged, comes back from the pmem file.
        try harness.crash(seed: 5)
        XCTAssertEqual(try harness.read(at: 0, count: 4096), expected)
        XCTAssertEqual(harness.lastRecovery?.report.pmemOpenEntries, 3)
    }

    func testAnAreaIsReusedOnlyAfterTheCacheDeviceSyncedItsSegment() throws {
        var controlled: ControlledMedium?
        let harness = try pmemHarness(areas: 2) { cache, backing, _ in
            let medium = ControlledMedium(cache, isCache: true, journal: ControlledMedium.Journal())
            controlled = medium
            return (medium, backing)
        }
        defer { harness.close() }
        let dataBlocks = try harness.inspect { $0.geometry.dataBlocksPerSegment }
        // Hold every cache-device sync.
        try harness.loop.submit { controlled!.hold = { kind, _, _ in kind == .sync } }.wait()
        // Fill the first segment: it is sealed and written, and its area waits for a sync.
        for block in 0..<dataBlocks {
            try harness.write(data(UInt32(block + 1), sector: block * 8, count: 8), at: UInt64(block * 4096))
        }
        // Fill the second area too; a write past it must wait, since both areas are taken.
        for block in dataBlocks..<(2 * dataBlocks) {
            try harness.write(data(UInt32(block + 1), sector: block * 8, count: 8), at: UInt64(block * 4096))
        }
        var lateReply: VolumeReply?
        let late = 2 * dataBlocks
        harness.start({ engine, done in
            engine.submitWrite(offset: UInt64(late * 4096), data: ByteBuffer(bytes: self.data(999, sector: late * 8, count: 8)), fua: false, completion: done)
        }, completion: { lateReply = $0 })
        let state = try harness.inspect { engine in (engine.buffers.awaitingSync.count, engine.buffers.free.count, engine.counters.segmentsWritten) }
        XCTAssertEqual(state.0, 2, "both written segments wait for a sync before their areas are reused")
        XCTAssertEqual(state.1, 0)
        XCTAssertEqual(state.2, 2)
        XCTAssertNil(try harness.loop.submit { lateReply }.wait(), "a write was acknowledged without a free pmem area")
        // Release the syncs: the areas come free and the waiting write goes on.
        try harness.loop.submit { controlled!.hold = nil; controlled!.releaseAll() }.wait()
        for _ in 0..<200 where try harness.loop.submit({ lateReply }).wait() == nil { usleep(1000) }
        guard case .done = try harness.loop.submit({ lateReply }).wait() else { return XCTFail("the waiting write never completed") }
        XCTAssertEqual(try harness.read(at: UInt64(late * 4096), count: 4096), data(999, sector: late * 8, count: 8))
    }

    func testCleanShutdownWritesTheOpenSegmentAndRestartsWithoutThePmemCopy() throws {
        let harness = try pmemHarness()
        defer { harness.close() }
        try harness.write(data(7, sector: 16, count: 3), at: 16 * 512)
        try harness.restartCleanly()
        let report = try XCTUnwrap(harness.lastRecovery?.report)
        XCTAssertTrue(report.cleanShutdown)
        XCTAssertNil(report.pmemOpenSegmentWritten, "the clean shutdown wrote the open segment; the pmem copy is stale")
        XCTAssertEqual(try harness.read(at: 16 * 512, count: 3 * 512), data(7, sector: 16, count: 3))
    }

    /// BUG: recovery leaves the pmem file's control words as it found them. An open area whose
    /// entries all failed to persist is not written to the log, so the next engine gives the
    /// next segment that area's id, in whichever area it takes first; a second power failure then
    /// found two open areas with one id, and recovery stopped on a precondition.
    /// 1. a write opens segment N in an area; the power fails before its entry is drained
    /// 2. recovery finds the open area with no valid entry (nothing to replay): the log ends at N-1
    /// 3. the new engine opens segment N for the next write, in another area; the power fails again
    /// Expected: recovery succeeds and every acknowledged write reads back.
    func testAnOpenAreaLeftEmptyByACrashIsNeverTakenForASecondOneWithItsId() throws {
        try runInChildProcess("SluiceCacheTests.CacheEnginePmemTests/testAnOpenAreaLeftEmptyByACrashIsNeverTakenForASecondOneWithItsId") {
            for seed: UInt64 in 1...12 {
                let harness = try pmemHarness(areas: 4)
                defer { harness.close() }
                // Two full segments first, so the crashing write opens a new segment in a third area.
                let dataBlocks = try harness.inspect { $0.geometry.dataBlocksPerSegment }
                for block in 0..<(2 * dataBlocks) {
                    try harness.write(data(UInt32(block + 1), sector: block * 8, count: 8), at: UInt64(block * 4096))
                }
                for round in 0..<2 {
                    let blockNumber = 100 + round
                    try harness.loop.submit {
                        harness.engine.submitWrite(offset: UInt64(blockNumber * 4096),
                                                   data: ByteBuffer(bytes: self.data(999, sector: blockNumber * 8, count: 8)), fua: false) { _ in }
                        harness.powerFailOnLoop(seed: seed &* 7 &+ UInt64(round))
                    }.wait()
                    try harness.recoverFromPowerFailure()
                }
                for block in 0..<(2 * dataBlocks) {
                    XCTAssertEqual(try harness.read(at: UInt64(block * 4096), count: 4096), data(UInt32(block + 1), sector: block * 8, count: 8),
                                   "seed \(seed): block \(block)")
                }
            }
        }
    }
}
