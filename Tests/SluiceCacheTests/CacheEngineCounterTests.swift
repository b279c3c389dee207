import NIOCore
import SluiceFormat
import XCTest
import SluiceTesting

@testable import SluiceCache

/// The counters count exactly: per-block request classes, bytes, segments, writeback requests.
final class CacheEngineCounterTests: XCTestCase {
    private func tinyHarness(cacheBytes: Int = 1 << 20) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = 0
        return try EngineHarness(cacheBytes: cacheBytes, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables)
    }

    private func data(_ tag: UInt32, sector: Int, count: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: sector, sectors: count)
    }

    private func index(write: Bool, hit: Bool, buffer: Bool, full: Bool) -> Int {
        CacheCounters.index(write: write, hit: hit, inBuffer: buffer, fullBlock: full)
    }

    func testEveryRequestShapeIsCountedInItsClass() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        var expected = [UInt64](repeating: 0, count: 16)
        try harness.write(data(1, sector: 0, count: 8), at: 0)                       // block 0: miss, full
        expected[index(write: true, hit: false, buffer: false, full: true)] += 1
        try harness.write(data(2, sector: 0, count: 1), at: 0)                       // block 0 again, in the buffer, partial
        expected[index(write: true, hit: true, buffer: true, full: false)] += 1
        try harness.write(data(3, sector: 8, count: 16), at: 4096)                   // blocks 1, 2: miss, full
        expected[index(write: true, hit: false, buffer: false, full: true)] += 2
        try harness.flush()
        try harness.flush()                                                          // nothing to write
        let afterFlush = try harness.inspect { $0.counters }
        XCTAssertEqual(afterFlush.partialSegments, 1, "one flush had data")
        XCTAssertEqual(afterFlush.segmentsWritten, 1)
        XCTAssertEqual(afterFlush.cacheBytesWritten, 4 * 4096, "a header block and three data blocks")

        try harness.write(data(4, sector: 0, count: 8), at: 0)                       // block 0 on the device, full
        expected[index(write: true, hit: true, buffer: false, full: true)] += 1
        try harness.write(data(5, sector: 10, count: 2), at: 4096 + 1024)            // block 1 on the device, partial: merge
        expected[index(write: true, hit: true, buffer: false, full: false)] += 1
        try harness.write(data(6, sector: 40, count: 4), at: 5 * 4096)               // block 5: miss, partial
        expected[index(write: true, hit: false, buffer: false, full: false)] += 1

        _ = try harness.read(at: 0, count: 4096)                                     // block 0 in the buffer
        expected[index(write: false, hit: true, buffer: true, full: true)] += 1
        _ = try harness.read(at: 2 * 4096, count: 4096)                              // block 2 on the device
        expected[index(write: false, hit: true, buffer: false, full: true)] += 1
        _ = try harness.read(at: 9 * 4096, count: 4096)                              // block 9: miss
        expected[index(write: false, hit: false, buffer: false, full: true)] += 1
        _ = try harness.read(at: 2 * 4096 + 512, count: 512)                         // block 2, partial
        expected[index(write: false, hit: true, buffer: false, full: false)] += 1
        _ = try harness.read(at: 9 * 4096 + 512, count: 512)                         // block 9, cached by its miss above: a partial hit
        expected[index(write: false, hit: true, buffer: true, full: false)] += 1
        _ = try harness.read(at: 11 * 4096 + 512, count: 512)                        // block 11, partial miss (partial misses are not cached)
        expected[index(write: false, hit: false, buffer: false, full: false)] += 1
        _ = try harness.read(at: 4096, count: 4096)                                  // block 1, merged into the buffer
        expected[index(write: false, hit: true, buffer: true, full: true)] += 1

        let counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.blockCounts, expected, "blockCounts, by index (write 8 | hit 4 | buffer 2 | full 1)")
        let writtenBytes: UInt64 = 4096 + 512 + 8192 + 4096 + 1024 + 2048
        XCTAssertEqual(counters.userBytesWritten, writtenBytes)
        XCTAssertEqual(counters.userBytesRead, UInt64(4 * 4096 + 3 * 512))
        XCTAssertEqual(counters.mergeReads, 1)
        XCTAssertEqual(counters.partialSegments, 1)
        XCTAssertEqual(counters.writtenBackBlocks, 0, "writeback_threshold 0 and nothing urged")

        // Flush, then drain: one batch takes segments 1 and 2, sorted: blocks 0, 1 (segment 2), 2
        // (segment 1) are one run of 12 KiB, sectors 0-3 of block 5 one run of 2 KiB. (Without the
        // flush, `drain()` starts writeback of segment 1 before its barrier seals the open buffer,
        // and the two batches split blocks 0-2 into two writes.)
        try harness.flush()
        try harness.drain()
        let drained = try harness.inspect { $0.counters }
        XCTAssertEqual(drained.partialSegments, 2, "the second flush sealed the open buffer; the drain had nothing to seal")
        XCTAssertEqual(drained.writebackBatches, 1)
        XCTAssertEqual(drained.backingWriteRequests, 2)
        XCTAssertEqual(drained.backingBytesWritten, UInt64(3 * 4096 + 2048))
        XCTAssertEqual(drained.writtenBackBlocks, 4)
        XCTAssertEqual(drained.backingSyncs, 1)
    }

    /// The backing store gets exactly one write per contiguous run of dirty sectors.
    func testWritebackIssuesOneBackingWritePerContiguousRun() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        for blockNumber in [0, 1, 2, 10, 11] {
            try harness.write(data(UInt32(blockNumber + 1), sector: blockNumber * 8, count: 8), at: UInt64(blockNumber * 4096))
        }
        try harness.drain()
        var counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.backingWriteRequests, 2, "blocks 0-2 and 10-11")
        XCTAssertEqual(counters.backingBytesWritten, 5 * 4096)
        XCTAssertEqual(counters.writtenBackBlocks, 5)

        // Sectors 6-7 of block 20 and 0-1 of block 21 are one run; sectors 0 and 2 of block 30 are two.
        try harness.write(data(50, sector: 20 * 8 + 6, count: 4), at: 20 * 4096 + 3072)
        try harness.write(data(51, sector: 30 * 8, count: 1), at: 30 * 4096)
        try harness.write(data(52, sector: 30 * 8 + 2, count: 1), at: 30 * 4096 + 1024)
        try harness.drain()
        counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.backingWriteRequests, 2 + 3)
        XCTAssertEqual(counters.backingBytesWritten, 5 * 4096 + 2048 + 1024)
        XCTAssertEqual(counters.writtenBackBlocks, 5 + 3)
        XCTAssertEqual(try harness.backingBytes(at: 20 * 4096 + 3072, count: 2048), data(50, sector: 20 * 8 + 6, count: 4))
        XCTAssertEqual(try harness.backingBytes(at: 30 * 4096, count: 512), data(51, sector: 30 * 8, count: 1))
        XCTAssertEqual(try harness.backingBytes(at: 30 * 4096 + 512, count: 512), [UInt8](repeating: 0, count: 512),
                       "a sector nobody wrote is not written back")
        XCTAssertEqual(try harness.backingBytes(at: 30 * 4096 + 1024, count: 512), data(52, sector: 30 * 8 + 2, count: 1))
    }

    /// Every flush or FUA write that has data in the open buffer seals exactly one partial
    /// segment; one that has none seals nothing. The open buffer is modelled: 15 data blocks per
    /// segment, sealed (as a full segment) as soon as the 15th distinct block is in. The ring (255
    /// slots) stays below the high watermark, so the cleaner relocates nothing into the buffer.
    func testPartialSegmentsCountTheBarriersThatHadData() throws {
        let harness = try tinyHarness(cacheBytes: 16 << 20)
        defer { harness.close() }
        var rng = SplitMix64(seed: 3)
        var openBlocks = Set<Int>()
        var partial: UInt64 = 0
        var full: UInt64 = 0
        var userBytes: UInt64 = 0
        func barrier() {
            if !openBlocks.isEmpty { partial += 1 }
            openBlocks.removeAll()
        }
        for step in 0..<150 {
            if rng.below(4) == 0 {
                try harness.flush()
                barrier()
                continue
            }
            let fua = rng.chance(30)
            let sector = step * 16 + rng.below(8)
            let sectors = rng.range(1...16)
            try harness.write(data(UInt32(step + 1), sector: sector, count: sectors), at: UInt64(sector * 512), fua: fua)
            userBytes += UInt64(sectors * 512)
            for blockNumber in (sector / 8)...((sector + sectors - 1) / 8) where !openBlocks.contains(blockNumber) {
                openBlocks.insert(blockNumber)
                if openBlocks.count == 15 {
                    full += 1
                    openBlocks.removeAll()
                }
            }
            if fua { barrier() }
        }
        let counters = try harness.inspect { $0.counters }
        XCTAssertEqual(counters.relocatedBlocks, 0, "the model assumes the cleaner stayed idle")
        XCTAssertEqual(counters.partialSegments, partial)
        XCTAssertEqual(counters.segmentsWritten, partial + full)
        XCTAssertEqual(counters.userBytesWritten, userBytes)
    }
}
