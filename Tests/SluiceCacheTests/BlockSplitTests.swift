import XCTest

@testable import SluiceCache

final class BlockSplitTests: XCTestCase {
    func testExamples() {
        XCTAssertEqual(Array(BlockSplit(offset: 4096, lengthBytes: 4096)),
                       [.init(blockNumber: 1, sectorMask: 0xFF, requestOffset: 0, lengthBytes: 4096)])
        XCTAssertEqual(Array(BlockSplit(offset: 1024, lengthBytes: 512)),
                       [.init(blockNumber: 0, sectorMask: 0b0000_0100, requestOffset: 0, lengthBytes: 512)])
        XCTAssertEqual(Array(BlockSplit(offset: 3584, lengthBytes: 1024)), [
            .init(blockNumber: 0, sectorMask: 0b1000_0000, requestOffset: 0, lengthBytes: 512),
            .init(blockNumber: 1, sectorMask: 0b0000_0001, requestOffset: 512, lengthBytes: 512),
        ])
        XCTAssertTrue(Array(BlockSplit(offset: 0, lengthBytes: 0)).isEmpty)
    }

    /// Every aligned range within three blocks: the pieces tile the range exactly, sector by sector.
    func testPiecesTileEveryRangeExactly() {
        for startSector in 0..<24 {
            for sectors in 0...(24 - startSector) {
                let offset = UInt64(startSector * 512)
                let pieces = Array(BlockSplit(offset: offset + (1 << 40), lengthBytes: UInt64(sectors * 512)))
                var covered: [Int] = []
                var expectedRequestOffset = 0
                for piece in pieces {
                    XCTAssertEqual(piece.requestOffset, expectedRequestOffset)
                    XCTAssertEqual(piece.lengthBytes, piece.sectorMask.nonzeroBitCount * 512)
                    let block = Int(piece.blockNumber - (1 << 40) / 4096)
                    for sector in 0..<8 where piece.sectorMask & (1 << sector) != 0 { covered.append(block * 8 + sector) }
                    expectedRequestOffset += piece.lengthBytes
                }
                XCTAssertEqual(covered, Array(startSector..<(startSector + sectors)))
            }
        }
    }
}
