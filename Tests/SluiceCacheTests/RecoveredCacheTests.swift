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
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastWrittenBackSegmentID: 2) { ring[$0] }
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

    func testAnEmptyLogRecoversToAnEmptyCache() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        let blank = [UInt8](repeating: 0, count: geometry.segmentBytes)
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: [UInt8](repeating: 1, count: 16), lastWrittenBackSegmentID: 41) { _ in blank }
        let recovered = RecoveredCache(chain: chain, geometry: geometry)
        XCTAssertEqual(recovered.index.count, 0)
        XCTAssertEqual(recovered.nextSegmentID, 42)
        XCTAssertTrue(recovered.dirtySegmentIDs.isEmpty)
    }
}
