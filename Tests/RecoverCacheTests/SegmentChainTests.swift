import RecoverCache
import SluiceFormat
import XCTest

/// The recovery table: one labelled case per way a segment log can end, each built on a ring and
/// checked against the chain recovery accepts.
final class SegmentChainTests: XCTestCase {
    private let uuid: [UInt8] = Array(repeating: 0x5A, count: 16)
    private var geometry: CacheGeometry!
    /// Ring slots, each the bytes of one segment (zero when never written).
    private var ring: [[UInt8]] = []

    override func setUp() {
        geometry = try! CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        ring = Array(repeating: [UInt8](repeating: 0, count: geometry.segmentBytes), count: geometry.segmentCount)
    }

    /// Writes segment `id` into its slot, as the engine would, with `blocks` data blocks.
    private func put(id: UInt64, blocks: Int = 2, uuid: [UInt8]? = nil) {
        ring[geometry.slot(ofSegment: id)] = segmentImage(id: id, blocks: blocks, uuid: uuid ?? self.uuid, geometry: geometry)
    }

    private func scan(after lastRetired: UInt64) -> SegmentChain {
        SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: lastRetired) { ring[$0] }
    }

    func testRecoveryTable() {
        XCTAssertEqual(geometry.segmentCount, 8)
        struct Case {
            var label: String
            var build: (SegmentChainTests) -> Void
            var lastRetired: UInt64
            var acceptedIDs: [UInt64]
            var end: SegmentChain.End
        }
        let cases: [Case] = [
            Case(label: "a fresh cache has an empty log",
                 build: { _ in }, lastRetired: 0, acceptedIDs: [], end: .empty(slot: 0)),
            Case(label: "a clean chain ends at the first unwritten slot",
                 build: { t in (1...3).forEach { t.put(id: $0) } }, lastRetired: 0, acceptedIDs: [1, 2, 3], end: .empty(slot: 3)),
            Case(label: "segments already written back are not replayed",
                 build: { t in (1...5).forEach { t.put(id: $0) } }, lastRetired: 3, acceptedIDs: [4, 5], end: .empty(slot: 5)),
            Case(label: "a torn last segment is dropped, the chain before it kept",
                 build: { t in (1...3).forEach { t.put(id: $0) }; t.ring[2][CacheGeometry.blockBytes + 100] ^= 0xFF },
                 lastRetired: 0, acceptedIDs: [1, 2], end: .checksumMismatch(slot: 2, expectedID: 3)),
            Case(label: "a stale segment from the previous lap ends the chain and is never replayed",
                 build: { t in (1...10).forEach { t.put(id: $0) } },  // slots 0,1 hold 9,10; slots 2...7 hold 3...8
                 lastRetired: 8, acceptedIDs: [9, 10], end: .staleLap(slot: 2, expectedID: 11, foundID: 3)),
            Case(label: "a segment of another format of the device is foreign",
                 build: { t in t.put(id: 1); t.put(id: 2, uuid: [UInt8](repeating: 1, count: 16)) },
                 lastRetired: 0, acceptedIDs: [1], end: .foreign(slot: 1)),
            Case(label: "an id jump is not trusted",
                 build: { t in t.put(id: 1); t.put(id: 10); t.ring[1] = t.ring[t.geometry.slot(ofSegment: 10)] },
                 lastRetired: 0, acceptedIDs: [1], end: .idJump(slot: 1, expectedID: 2, foundID: 10)),
            Case(label: "a ring full of unwritten-back segments is accepted whole",
                 build: { t in (5...12).forEach { t.put(id: $0) } }, lastRetired: 4, acceptedIDs: Array(5...12), end: .ringFull),
            Case(label: "a full segment (no free block) verifies like a partial one",
                 build: { t in t.put(id: 1, blocks: t.geometry.dataBlocksPerSegment) }, lastRetired: 0, acceptedIDs: [1], end: .empty(slot: 1)),
        ]
        for testCase in cases {
            setUp()
            testCase.build(self)
            let chain = scan(after: testCase.lastRetired)
            XCTAssertEqual(chain.segments.map(\.segmentID), testCase.acceptedIDs, testCase.label)
            XCTAssertEqual(chain.end, testCase.end, testCase.label)
            XCTAssertEqual(chain.lastSegmentID, testCase.acceptedIDs.last ?? testCase.lastRetired, testCase.label)
        }
    }
}
