import NIOCore
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Read caching: whole-block misses become clean copies; a write, trim or write-zeroes racing the
/// read that would cache a block wins; the sequential cutoff and promotion decide what is cached.
final class CacheEngineReadCacheTests: XCTestCase {
    private func block(_ tag: UInt32, _ blockNumber: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: blockNumber * 8, sectors: 8)
    }

    private func harness(_ adjust: (inout CacheTunables) -> Void = { _ in }, controlled: Bool = false) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = 0
        tunables.dirtyTargetPercent = 100
        adjust(&tunables)
        return try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables,
                                 wrapMedia: controlled ? ControlledMedium.wrapper() : nil)
    }

    /// Puts `blocks` on the backing store directly, as if written before the cache existed.
    private func seedBacking(_ harness: EngineHarness, _ blocks: Range<Int>, tag: UInt32) throws {
        try harness.onMedia { _, backing in
            for blockNumber in blocks {
                backing.write(offset: UInt64(blockNumber * 4096), bytes: ByteBuffer(bytes: self.block(tag, blockNumber))) { _ in }
            }
        }
    }

    func testAMissIsCachedCleanAndTheNextReadHitsWithoutTheBackingStore() throws {
        let harness = try harness()
        defer { harness.close() }
        try seedBacking(harness, 0..<8, tag: 7)
        let before = try harness.inspect { $0.counters.backingBytesRead }
        XCTAssertTrue(try harness.read(at: 3 * 4096, count: 8192) == block(7, 3) + block(7, 4))
        let afterMiss = try harness.inspect { ($0.counters.backingBytesRead - before, $0.counters.readFills, $0.index.lookup(3), $0.dirtyBlocks) }
        XCTAssertEqual(afterMiss.0, 8192)
        XCTAssertEqual(afterMiss.1, 2)
        XCTAssertEqual(afterMiss.2?.isDirty, false, "a clean copy")
        XCTAssertEqual(afterMiss.3, 0, "nothing to write back")
        XCTAssertTrue(try harness.read(at: 3 * 4096, count: 8192) == block(7, 3) + block(7, 4))
        XCTAssertEqual(try harness.inspect { $0.counters.backingBytesRead } - before, 8192, "served from the cache")
        // Flushed to the cache device, the clean copies serve from there; a drain writes nothing.
        try harness.flush()
        let deviceBefore = try harness.inspect { $0.counters.cacheBytesRead }
        XCTAssertTrue(try harness.read(at: 4 * 4096, count: 4096) == block(7, 4))
        XCTAssertEqual(try harness.inspect { $0.counters.backingBytesRead } - before, 8192)
        XCTAssertEqual(try harness.inspect { $0.counters.cacheBytesRead } - deviceBefore, 4096, "from the cache device")
        // The simulated page cache holds every second read the engine tries inline: one of two
        // reads of both blocks is one inline call, the other goes through the medium's read.
        let inlineBefore = try harness.inspect { $0.counters.cacheReadsInline }
        let mediumReadsBefore = harness.cache.readCount
        for _ in 0..<2 { XCTAssertTrue(try harness.read(at: 3 * 4096, count: 8192) == block(7, 3) + block(7, 4)) }
        XCTAssertEqual(try harness.inspect { $0.counters.cacheReadsInline } - inlineBefore, 1)
        XCTAssertEqual(harness.cache.readCount - mediumReadsBefore, 1, "a read the page cache lacked is asked for once, then read")
        try harness.drain()
        XCTAssertEqual(try harness.inspect { $0.counters.backingBytesWritten }, 0)
        // A partial write over a clean copy: the other sectors keep the backing store's data.
        try harness.write(SectorCodec.bytes(tag: 9, firstLBA: 3 * 8 + 2, sectors: 1), at: 3 * 4096 + 1024)
        XCTAssertEqual(SectorCodec.decodeAll(try harness.read(at: 3 * 4096, count: 4096), firstLBA: 24), [7, 7, 9, 7, 7, 7, 7, 7])
        try harness.drain()
        XCTAssertEqual(SectorCodec.decodeAll(try harness.backingBytes(at: 3 * 4096, count: 4096), firstLBA: 24), [7, 7, 9, 7, 7, 7, 7, 7])
        // A clean restart: recovery keeps no clean copies (FORMAT.md R3); the data is still right.
        try harness.restartCleanly()
        XCTAssertEqual(try harness.inspect { $0.index.lookup(4) }?.position, nil)
        XCTAssertTrue(try harness.read(at: 4 * 4096, count: 4096) == block(7, 4))
    }

    /// The read that would cache block 5 is held at the backing store while a write (then, in a
    /// second round, a trim and a write-zeroes) of block 5 completes: the read may return the old
    /// data, but it must not cache it, so the next read returns what the write left.
    func testAWriteOrDiscardRacingTheFillingReadWins() throws {
        for racer in ["write", "trim", "zeroes"] {
            let harness = try harness(controlled: true)
            defer { harness.close() }
            let backing = harness.backingMedium as! ControlledMedium
            try seedBacking(harness, 0..<8, tag: 7)
            var readReply: VolumeReply?
            try harness.loop.submit {
                backing.hold = { kind, _, _ in kind == .read }
                harness.engine.submitRead(offset: 5 * 4096, lengthBytes: 4096, buffer: ByteBuffer()) { readReply = $0 }
            }.wait()
            XCTAssertEqual(try harness.loop.submit { backing.held.count }.wait(), 1, "\(racer): the read is held")
            try harness.loop.submit { backing.hold = nil }.wait()
            switch racer {
            case "write": try harness.write(block(8, 5), at: 5 * 4096)
            case "trim": try harness.discard(at: 5 * 4096, count: 4096, zeroes: false)
            default: try harness.discard(at: 5 * 4096, count: 4096, zeroes: true)
            }
            try harness.loop.submit { backing.releaseAll() }.wait()
            let expected = racer == "write" ? block(8, 5) : [UInt8](repeating: 0, count: 4096)
            guard case .data(let raced)? = readReply else { return XCTFail("\(racer): the held read did not complete") }
            let racedBytes = Array(raced.readableBytesView)
            XCTAssertTrue(racedBytes == block(7, 5) || racedBytes == expected, "\(racer): the racing read saw the old or the new data")
            XCTAssertEqual(try harness.inspect { $0.counters.readFillsSkippedRaced }, 1, racer)
            XCTAssertTrue(try harness.read(at: 5 * 4096, count: 4096) == expected, "\(racer): the next read returns what the \(racer) left")
            try harness.flush()
            try harness.drain()
            XCTAssertTrue(try harness.read(at: 5 * 4096, count: 4096) == expected, "\(racer): and so after a drain")
        }
    }

    /// A stream of 64 KiB reads: cached up to the cutoff (128 KiB), not beyond; a read elsewhere
    /// is cached as usual. Cutoff 0 caches the whole stream.
    func testTheSequentialCutoffStopsStreamsFromFillingTheCache() throws {
        for cutoff in [128 * 1024, 0] {
            let harness = try harness { $0.sequentialCutoffBytes = cutoff }
            defer { harness.close() }
            for chunk in 0..<8 { _ = try harness.read(at: UInt64(chunk * 65536), count: 65536) }
            _ = try harness.read(at: 300 * 4096, count: 4096)
            let counters = try harness.inspect { $0.counters }
            if cutoff == 0 {
                XCTAssertEqual(counters.readFills + counters.readFillsSkippedNoRoom, 8 * 16 + 1)
                XCTAssertEqual(counters.readFillsSkippedSequential, 0)
            } else {
                XCTAssertEqual(counters.readFills, 2 * 16 + 1, "the first 128 KiB of the stream, and the other read")
                XCTAssertEqual(counters.readFillsSkippedSequential, 6 * 16)
            }
        }
    }

    func testPromotionAfterNMissesAndNoReadCaching() throws {
        let harness = try harness { $0.readPromoteHits = 3 }
        defer { harness.close() }
        for round in 1...3 {
            _ = try harness.read(at: 9 * 4096, count: 4096)
            XCTAssertEqual(try harness.inspect { $0.index.lookup(9) != nil }, round == 3, "round \(round)")
        }
        XCTAssertEqual(try harness.inspect { $0.counters.readFillsSkippedNotPromoted }, 2)
        try harness.perform { engine, done in
            try? engine.setTunable("read_promote_hits", to: 0)
            done(.done)
        }
        _ = try harness.read(at: 10 * 4096, count: 4096)
        XCTAssertEqual(try harness.inspect { $0.index.lookup(10) }?.position, nil, "read_promote_hits 0: no read caching")
    }

    /// Clean copies fill the ring: the cleaner reclaims them without I/O and writes keep going.
    func testCleanCopiesAreReclaimedWithoutWriteback() throws {
        let harness = try harness()
        defer { harness.close() }
        for blockNumber in 200..<500 { _ = try harness.read(at: UInt64(blockNumber * 4096), count: 4096) }
        let filled = try harness.inspect { $0.counters.readFills }
        XCTAssertGreaterThan(filled, 100)
        for blockNumber in 0..<100 { try harness.write(block(UInt32(100 + blockNumber), blockNumber), at: UInt64(blockNumber * 4096)) }
        try harness.flush()
        let counters = try harness.inspect { $0.counters }
        XCTAssertGreaterThan(counters.segmentsReclaimedWithoutIO, 0, "segments of clean copies reclaimed without I/O")
        XCTAssertEqual(counters.writtenBackBlocks, 0, "a hundred dirty blocks fit: clean copies made the room, not writeback")
        for blockNumber in [0, 50, 99] {
            XCTAssertTrue(try harness.read(at: UInt64(blockNumber * 4096), count: 4096) == block(UInt32(100 + blockNumber), blockNumber), "block \(blockNumber)")
        }
        XCTAssertTrue(try harness.read(at: 450 * 4096, count: 4096).allSatisfy { $0 == 0 })
    }
    /// A hot read set outlives the ring's laps: clean copies read since they were cached are moved
    /// to the head by the cleaner (as clean copies) instead of dropped, while writes lap the ring
    /// again and again; the hot set keeps hitting.
    func testHotCleanCopiesSurviveTheCleanerWhileWritesLapTheRing() throws {
        let harness = try harness()
        defer { harness.close() }
        try seedBacking(harness, 300..<330, tag: 7)
        func readHotSet() throws {
            for blockNumber in 300..<330 {
                XCTAssertTrue(try harness.read(at: UInt64(blockNumber * 4096), count: 4096) == block(7, blockNumber), "block \(blockNumber)")
            }
        }
        try readHotSet()
        let filled = try harness.inspect { $0.counters.backingBytesRead }
        for pass in 0..<8 {
            try readHotSet()
            for blockNumber in 0..<60 { try harness.write(block(UInt32(1000 + pass), blockNumber), at: UInt64(blockNumber * 4096)) }
            try harness.flush()
        }
        try readHotSet()
        let counters = try harness.inspect { $0.counters }
        XCTAssertGreaterThan(counters.segmentsReclaimed, 15, "the writes lapped the ring (15 slots)")
        XCTAssertGreaterThan(counters.relocatedCleanBlocks, 0, "hot clean copies were moved, not dropped")
        // On this tiny ring space is often short (then the cleaner drops them to free it fast):
        // most re-reads still hit. Without the moves every lap drops the whole hot set.
        let reread = Int(counters.backingBytesRead - filled) / 4096
        XCTAssertLessThan(reread, 60, "\(reread) of the hot set's 270 re-reads went to the backing store")
    }

    /// Blocks read while dirty stay hot once written back: writeback makes them clean in place,
    /// and when the cleaner reaches their segment it moves them (the reads count) instead of
    /// dropping them as cold, so the next reads of a read/write mix's hot set hit rather than go
    /// to the slow disk. (A copy moved and then not read for another lap is dropped: CLOCK.)
    func testBlocksReadWhileDirtyAreKeptOnceWrittenBack() throws {
        let harness = try harness()
        defer { harness.close() }
        for blockNumber in 300..<330 { try harness.write(block(9, blockNumber), at: UInt64(blockNumber * 4096)) }
        try harness.flush()
        for blockNumber in 300..<330 {
            XCTAssertTrue(try harness.read(at: UInt64(blockNumber * 4096), count: 4096) == block(9, blockNumber), "block \(blockNumber)")
        }
        // Writeback (not a drain, which drops every clean copy) makes them clean in place.
        try harness.inspect { try? $0.setTunable("dirty_target", to: 0) }
        for _ in 0..<1000 where try harness.inspect({ $0.dirtyBlocks }) > 0 { usleep(1000) }
        XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 0, "written back")
        let readBefore = try harness.inspect { $0.counters.backingBytesRead }
        // Writes elsewhere until the cleaner has reached the hot set's segments.
        var written = 0
        while try written < 400 && harness.inspect({ e in (300..<330).contains { e.index.lookup(UInt64($0)).map { $0.position < 30 } ?? false } }) {
            try harness.write(block(1000, written % 60), at: UInt64(written % 60 * 4096))
            written += 1
        }
        for blockNumber in 300..<330 {
            XCTAssertTrue(try harness.read(at: UInt64(blockNumber * 4096), count: 4096) == block(9, blockNumber), "block \(blockNumber)")
        }
        let counters = try harness.inspect { $0.counters }
        XCTAssertGreaterThanOrEqual(counters.relocatedCleanBlocks, 20, "moved, not dropped, after \(written) writes")
        let reread = Int(counters.backingBytesRead - readBefore) / 4096
        XCTAssertLessThan(reread, 10, "\(reread) of the 30 blocks read while dirty were dropped once clean")
    }

    /// Clean copies in the log and in the pmem buffer, dirty copies over some of them, a trimmed
    /// block read (and cached) again, then a power failure at seeded points: every block reads its
    /// last durable value, and recovery indexes no clean copy (FORMAT.md, R3).
    func testPowerFailuresWithCleanCopiesInTheLogAndInPmem() throws {
        for pmemMode in [false, true] {
            for seed in 1...12 as ClosedRange<UInt64> {
                var tunables = CacheTunables()
                tunables.writebackThresholdPercent = 0
                tunables.dirtyTargetPercent = 100
                let harness = try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables,
                                                pmemMode: pmemMode)
                defer { harness.close() }
                try seedBacking(harness, 0..<40, tag: 7)
                try harness.onMedia { _, backing in backing.synchronize { _ in } }
                var rng = SplitMix64(seed: seed)
                var expected = (0..<40).map { block(7, $0) }
                for round in 0..<4 {
                    _ = try harness.read(at: 0, count: 40 * 4096)
                    for _ in 0..<3 {
                        let target = rng.below(40)
                        let tag = UInt32(100 + round * 10 + target)
                        try harness.write(block(tag, target), at: UInt64(target * 4096), fua: true)
                        expected[target] = block(tag, target)
                    }
                    let trimmed = rng.below(40)
                    try harness.discard(at: UInt64(trimmed * 4096), count: 4096, zeroes: true, fua: true)
                    expected[trimmed] = [UInt8](repeating: 0, count: 4096)
                    if rng.chance(50) { try harness.flush() }
                }
                _ = try harness.read(at: 0, count: 40 * 4096)
                let cleanBefore = try harness.inspect { engine in (0..<40).filter { engine.index.lookup(UInt64($0))?.isDirty == false }.count }
                XCTAssertGreaterThan(cleanBefore, 0, "seed \(seed): clean copies before the power failure")
                try harness.crash(seed: seed)
                let context = "\(pmemMode ? "pmem" : "volatile") seed \(seed)"
                XCTAssertEqual(try harness.inspect { engine in (0..<40).filter { engine.index.lookup(UInt64($0))?.isDirty == false }.count }, 0,
                               "\(context): recovery indexes no clean copy")
                for target in 0..<40 {
                    XCTAssertTrue(try harness.read(at: UInt64(target * 4096), count: 4096) == expected[target], "\(context): block \(target)")
                }
            }
        }
    }
}
