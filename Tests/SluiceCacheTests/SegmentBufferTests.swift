import SluiceFormat
import XCTest

@testable import SluiceCache

final class SegmentBufferTests: XCTestCase {
    private let uuid: [UInt8] = Array(repeating: 0xAB, count: 16)

    private func sectors(_ value: UInt8, count: Int) -> [UInt8] {
        [UInt8](repeating: value, count: count * 512)
    }

    func testRewritesMergeSectorsInPlaceAndSealedSegmentsVerify() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 1 << 20)
        let buffer = SegmentBuffer(geometry: geometry)
        XCTAssertEqual(geometry.dataBlocksPerSegment, 15)
        buffer.open(segmentID: 9)
        sectors(1, count: 2).withUnsafeBytes { _ = buffer.write(blockNumber: 100, sectorMask: 0b0000_0011, sectors: $0) }
        sectors(2, count: 8).withUnsafeBytes { _ = buffer.write(blockNumber: 7, sectorMask: 0xFF, sectors: $0) }
        // A rewrite of sectors 1 and 7 of block 100 stays in the same data block.
        let index = sectors(3, count: 2).withUnsafeBytes { buffer.write(blockNumber: 100, sectorMask: 0b1000_0010, sectors: $0) }
        XCTAssertEqual(index, 0)
        XCTAssertEqual(buffer.blockCount, 2)
        let block = try XCTUnwrap(buffer.read(blockNumber: 100))
        XCTAssertEqual(block.sectorMask, 0b1000_0011)
        let data = Array(block.block)
        XCTAssertEqual(Array(data[0..<512]), [UInt8](repeating: 1, count: 512))
        XCTAssertEqual(Array(data[512..<1024]), [UInt8](repeating: 3, count: 512))
        XCTAssertEqual(Array(data[3584..<4096]), [UInt8](repeating: 3, count: 512))
        XCTAssertNil(buffer.read(blockNumber: 8))

        let sealed = Array(buffer.seal(cacheUUID: uuid, isPartial: true))
        XCTAssertEqual(sealed.count, 3 * 4096, "a partial segment holds only its used blocks")
        let header = try sealed.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: uuid) }
        XCTAssertEqual(header.segmentID, 9)
        XCTAssertTrue(header.isPartial)
        XCTAssertEqual(header.entries, [SegmentHeader.Entry(blockNumber: 100, sectorMask: 0b1000_0011),
                                        SegmentHeader.Entry(blockNumber: 7, sectorMask: 0xFF)])
        buffer.reset()
        XCTAssertTrue(buffer.isEmpty)
        XCTAssertNil(buffer.read(blockNumber: 100))
    }

    func testFillsUpAndRefusesNewBlocksButAcceptsRewrites() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 1 << 20)
        let buffer = SegmentBuffer(geometry: geometry)
        buffer.open(segmentID: 1)
        for block in 0..<UInt64(geometry.dataBlocksPerSegment) {
            XCTAssertTrue(buffer.canAccept(block))
            sectors(UInt8(block), count: 8).withUnsafeBytes { _ = buffer.write(blockNumber: block, sectorMask: 0xFF, sectors: $0) }
        }
        XCTAssertTrue(buffer.isFull)
        XCTAssertFalse(buffer.canAccept(999))
        XCTAssertTrue(buffer.canAccept(3), "a block already here can still be rewritten")
        let sealed = Array(buffer.seal(cacheUUID: uuid, isPartial: false))
        XCTAssertEqual(sealed.count, geometry.segmentBytes)
        let header = try sealed.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: uuid) }
        XCTAssertEqual(header.entries.count, geometry.dataBlocksPerSegment)
        XCTAssertFalse(header.isPartial)
    }
}
