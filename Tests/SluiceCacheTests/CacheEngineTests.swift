import NIOCore
import SluiceFormat
import XCTest

@testable import SluiceCache

final class CacheEngineTests: XCTestCase {
    func testWritesAreReadBackFromBufferDeviceAndAfterWriteback() throws {
        let harness = try EngineHarness()
        let first = pattern(1, count: 8192)
        try harness.write(first, at: 4096)
        XCTAssertEqual(try harness.read(at: 4096, count: 8192), first, "read from the open buffer")
        // Fill more than one segment so the first one is sealed and written.
        for block in 0..<40 {
            try harness.write(pattern(100 + UInt32(block), count: 4096), at: UInt64(1 << 20) + UInt64(block) * 4096)
        }
        XCTAssertEqual(try harness.read(at: 4096, count: 8192), first)
        // A sub-block rewrite of a cached block merges with the old copy.
        let sector = pattern(7, count: 512)
        try harness.write(sector, at: 4096 + 1024)
        var expected = first
        expected.replaceSubrange(1024..<1536, with: sector)
        XCTAssertEqual(try harness.read(at: 4096, count: 8192), expected)
        try harness.drain()
        XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 0)
        XCTAssertEqual(try harness.backingBytes(at: 4096, count: 8192), expected, "the backing store holds the data after a drain")
        XCTAssertEqual(try harness.read(at: 4096, count: 8192), expected)
        try harness.shutdown()
    }

    func testPartialWriteOverUncachedBlockMergesWithBackingOnRead() throws {
        let harness = try EngineHarness()
        let old = pattern(3, count: 4096)
        try harness.write(old, at: 0)
        try harness.drain()
        let sector = pattern(4, count: 512)
        try harness.write(sector, at: 2048)
        var expected = old
        expected.replaceSubrange(2048..<2560, with: sector)
        XCTAssertEqual(try harness.read(at: 0, count: 4096), expected)
        try harness.drain()
        XCTAssertEqual(try harness.backingBytes(at: 0, count: 4096), expected)
        try harness.shutdown()
    }

    func testFlushedDataSurvivesPowerFailureAndCleanRestartNeedsNoScan() throws {
        let harness = try EngineHarness()
        let data = pattern(9, count: 16384)
        try harness.write(data, at: 65536)
        try harness.flush()
        XCTAssertEqual(try harness.inspect { $0.counters.partialSegments }, 1)
        try harness.crash(seed: 42)
        XCTAssertEqual(try harness.read(at: 65536, count: 16384), data)
        try harness.restartCleanly()
        XCTAssertEqual(harness.lastRecovery?.report.cleanShutdown, true)
        XCTAssertEqual(try harness.read(at: 65536, count: 16384), data)
        try harness.shutdown()
    }
}
