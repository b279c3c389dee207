import RecoverCache
import SluiceFormat
import XCTest

@testable import SluiceCache

final class RecoveredCacheTests: XCTestCase {
    func testTheNewestCopyOfEachBlockWins() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        let uuid = [UInt8](repeating: 7, count: 16)
        var ring = Array(repeating: [UInt8](repeating: 0, count: geometry.segmentBytes), count: geometry.segmentCount)
        // Segment 3: blocks 10 (sectors 0-1) and 11; segment 4: block 10 again (merged mask) and 12.
        let contents: [UInt64: [(UInt64, UInt8)]] = [3: [(10, 0x03), (11, 0xFF)], 4: [(12, 0xF0), (10, 0x0F)]]
        for (id, blocks) in contents {
            let buffer = SegmentBuffer(geometry: geometry)
            buffer.open(segmentID: id)
            for (block, mask) in blocks {
                let data = [UInt8](repeating: UInt8(id), count: mask.nonzeroBitCount * 512)
                data.withUnsafeBytes { _ = buffer.write(blockNumber: block, sectorMask: mask, sectors: $0) }
            }
            let sealed = Array(buffer.seal(cacheUUID: uuid, isPartial: true))
            ring[geometry.slot(ofSegment: id)].replaceSubrange(0..<sealed.count, with: sealed)
        }
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: 2) { ring[$0] }
        XCTAssertEqual(chain.segments.map(\.segmentID), [3, 4])
        let recovered = RecoveredCache(chain: chain, geometry: geometry)
        XCTAssertEqual(recovered.index.count, 3)
        XCTAssertEqual(recovered.nextSegmentID, 5)
        XCTAssertEqual(recovered.dirtySegmentIDs, [3, 4])
        let slot4 = CacheIndex.Position(geometry.slot(ofSegment: 4) * geometry.dataBlocksPerSegment)
        XCTAssertEqual(recovered.index.lookup(10)?.position, slot4 + 1, "segment 4's copy of block 10 replaces segment 3's")
        XCTAssertEqual(recovered.index.lookup(10)?.sectorMask, 0x0F)
        XCTAssertEqual(recovered.index.lookup(11)?.position, CacheIndex.Position(geometry.slot(ofSegment: 3) * geometry.dataBlocksPerSegment + 1))
        XCTAssertEqual(recovered.index.lookup(12)?.position, slot4)
        XCTAssertNil(recovered.index.lookup(13))
    }

    /// A log that wraps the ring, with copies of one block in one segment, discard markers, and
    /// blocks written again after their marker: the index is the newest copy of each block (the
    /// replay's own check, `checkReplay`, runs in `init` and would stop the process otherwise).
    func testReplayAcrossTheRingWithMarkersAndCleanCopiesMatchesTheNewestEntries() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        let uuid = [UInt8](repeating: 7, count: 16)
        var ring = Array(repeating: [UInt8](repeating: 0, count: geometry.segmentBytes), count: geometry.segmentCount)
        var generator = SystemRandomNumberGenerator()
        var newest: [UInt64: (position: CacheIndex.Position, mask: UInt8)?] = [:]
        for id: UInt64 in 6...13 {  // slots 5, 6, 7, 0, 1, ... : the log wraps
            // Dirty copies, markers and clean copies (format version 2), in any order.
            let entries = (0..<geometry.dataBlocksPerSegment).map { _ in
                let kind = Int.random(in: 0..<3, using: &generator)
                return SegmentHeader.Entry(blockNumber: UInt64.random(in: 0..<40, using: &generator),
                                           sectorMask: kind == 1 ? 0 : kind == 2 ? 0xFF : UInt8.random(in: 1...255, using: &generator),
                                           isClean: kind == 2)
            }
            let slot = geometry.slot(ofSegment: id)
            for (offset, entry) in entries.enumerated() {
                let position = CacheIndex.Position(slot * geometry.dataBlocksPerSegment + offset)
                // Recovery keeps no clean copies (FORMAT.md, row R3): like a marker, the newest clean
                // copy of a block leaves it out of the index.
                newest[entry.blockNumber] = entry.supersedesWithoutData ? .some(nil) : (position, entry.sectorMask)
            }
            let header = SegmentHeader(segmentID: id, cacheUUID: uuid, isPartial: false, entries: entries)
            ring[slot].withUnsafeMutableBytes { raw in
                let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
                header.encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<headerBytes]),
                              data: UnsafeRawBufferPointer(rebasing: raw[headerBytes...]), geometry: geometry)
            }
        }
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: 5) { ring[$0] }
        XCTAssertEqual(chain.end, .ringFull)
        let recovered = RecoveredCache(chain: chain, geometry: geometry)
        XCTAssertEqual(recovered.index.count, newest.values.filter { $0 != nil }.count)
        for (block, copy) in newest {
            XCTAssertEqual(recovered.index.lookup(block)?.position, copy?.position, "block \(block)")
            XCTAssertEqual(recovered.index.lookup(block)?.sectorMask, copy?.mask, "block \(block)")
        }
    }

    func testAnEmptyLogRecoversToAnEmptyCache() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        let blank = [UInt8](repeating: 0, count: geometry.segmentBytes)
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: [UInt8](repeating: 1, count: 16), lastRetiredSegmentID: 41) { _ in blank }
        let recovered = RecoveredCache(chain: chain, geometry: geometry)
        XCTAssertEqual(recovered.index.count, 0)
        XCTAssertEqual(recovered.nextSegmentID, 42)
        XCTAssertTrue(recovered.dirtySegmentIDs.isEmpty)
    }
}
