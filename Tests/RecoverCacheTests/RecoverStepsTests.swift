import Foundation
@testable import RecoverCache
import SluiceFormat
import XCTest

/// recover_cache's labelled steps, each run on a crafted device: a step whose postcondition fails
/// stops the process, so every case here is also a check of those preconditions.
final class RecoverStepsTests: XCTestCase {
    private let uuid: [UInt8] = Array(repeating: 0x5A, count: 16)
    private var geometry: CacheGeometry!
    private var device: MemoryDevice!

    override func setUp() {
        geometry = try! CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 64 * 1024 * 9)
        device = MemoryDevice(sizeBytes: Int(geometry.deviceBytesNeeded))
    }

    /// Writes segment `id` into its slot, as the engine would, with `blocks` data blocks.
    private func put(id: UInt64, blocks: Int = 2, uuid: [UInt8]? = nil) {
        device.bytes.replaceSubrange(slotRange(geometry.slot(ofSegment: id)),
                                     with: segmentImage(id: id, blocks: blocks, uuid: uuid ?? self.uuid, geometry: geometry))
    }

    private func slotRange(_ slot: Int) -> Range<Int> {
        let start = Int(geometry.offset(ofSlot: slot))
        return start..<(start + geometry.segmentBytes)
    }

    private func corrupt(slot: Int) {
        device.bytes[slotRange(slot).lowerBound + CacheGeometry.blockBytes + 100] ^= 0xFF
    }

    private func record(lastRetired: UInt64, lastFlushed: UInt64 = 0, clean: Bool = false) -> SuperblockRecord {
        SuperblockRecord(sequence: 3, lastRetiredSegmentID: lastRetired, lastFlushedSegmentID: lastFlushed, cleanShutdown: clean)
    }

    private func header() -> SuperblockHeader {
        SuperblockHeader(uuid: uuid, geometry: geometry, mode: .volatile, backingSizeBytes: 1 << 30, backingIdentity: "/backing",
                         pmemUUID: [UInt8](repeating: 0, count: 16), createdSeconds: 0)
    }

    /// The same chain as `SegmentChain.scan` over arrays, for every way a walk can end, with the
    /// reads running ahead of it (and past the log's end).
    func testWalkChainMatchesTheScan() throws {
        let builds: [(String, UInt64, () -> Void)] = [
            ("empty", 0, {}),
            ("clean chain", 0, { (1...3).forEach { self.put(id: $0) } }),
            ("written back", 3, { (1...5).forEach { self.put(id: $0) } }),
            ("torn last", 0, { (1...3).forEach { self.put(id: $0) }; self.corrupt(slot: 2) }),
            ("stale lap", 8, { (1...10).forEach { self.put(id: $0) } }),
            ("foreign", 0, { self.put(id: 1); self.put(id: 2, uuid: [UInt8](repeating: 1, count: 16)) }),
            ("ring full", 4, { (5...12).forEach { self.put(id: $0) } }),
        ]
        for (label, lastRetired, build) in builds {
            setUp()
            build()
            let walked = try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry,
                                                    record: record(lastRetired: lastRetired), trustedThroughID: 0,
                                                    areas: .init(), pmem: nil)
            let scanned = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: lastRetired) {
                Array(device.bytes[slotRange($0)])
            }
            XCTAssertEqual(walked.chain, scanned, label)
            XCTAssertEqual(walked.sealedWritten, [], label)
            XCTAssertEqual(device.writes, 0, "\(label): a volatile walk writes nothing")
            XCTAssertGreaterThanOrEqual(walked.bytesRead, UInt64(scanned.segments.count * geometry.segmentBytes), label)
        }
    }

    /// Up to the trusted id only headers are read, and a damaged data block there goes unnoticed;
    /// past it every segment is read whole and verified.
    func testWalkReadsHeadersOnlyUpToTheTrustedID() throws {
        (1...4).forEach { put(id: $0) }
        corrupt(slot: 1)
        let walked = try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry, record: record(lastRetired: 0),
                                                trustedThroughID: 2, areas: .init(), pmem: nil)
        XCTAssertEqual(walked.chain.segments.map(\.segmentID), [1, 2, 3, 4])
        let headerBytes = UInt64(geometry.headerBlocks * CacheGeometry.blockBytes)
        XCTAssertEqual(walked.bytesRead, 2 * headerBytes + UInt64(geometry.segmentCount - 2) * UInt64(geometry.segmentBytes),
                       "two header reads, then whole segments for the rest of the lap")
    }

    /// After a clean shutdown whose log ends right after the trusted segments, the walk reads
    /// their headers and the one slot after them, nothing more.
    func testACleanLogIsReadAsHeadersAndOneSlot() throws {
        (1...3).forEach { put(id: $0) }
        let walked = try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry, record: record(lastRetired: 0),
                                                trustedThroughID: 3, areas: .init(), pmem: nil)
        XCTAssertEqual(walked.chain.end, .empty(slot: 3))
        XCTAssertEqual(walked.bytesRead, UInt64(3 * geometry.headerBlocks * CacheGeometry.blockBytes + geometry.segmentBytes))
    }

    /// A read that fails past the log's end is never taken and fails nothing; one inside the log
    /// fails the walk.
    func testAReadFailureCountsOnlyInsideTheLog() throws {
        (1...2).forEach { put(id: $0) }
        device.failingOffsets = [geometry.offset(ofSlot: 5)]
        let walked = try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry, record: record(lastRetired: 0),
                                                trustedThroughID: 0, areas: .init(), pmem: nil)
        XCTAssertEqual(walked.chain.end, .empty(slot: 2))
        device.failingOffsets = [geometry.offset(ofSlot: 1)]
        XCTAssertThrowsError(try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry,
                                                        record: record(lastRetired: 0), trustedThroughID: 0, areas: .init(), pmem: nil))
    }

    /// Segments written after the one that tore are erased; an older lap's and another cache's
    /// segments are left; a second run erases nothing more and leaves the same device.
    func testEraseStaleSegmentsLeavesNoSegmentPastTheLog() throws {
        (1...7).forEach { put(id: $0) }  // then a crash tore 4 while 5...7 completed
        corrupt(slot: 3)
        put(id: 8, uuid: [UInt8](repeating: 1, count: 16))
        let chain = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: 0) { Array(device.bytes[slotRange($0)]) }
        XCTAssertEqual(chain.lastSegmentID, 3)
        let erasure = try RecoverCache.eraseStaleSegments(device: device, cacheUUID: uuid, geometry: geometry, chain: chain)
        XCTAssertEqual(erasure.slots, [3, 4, 5, 6], "the torn segment 4 and the later 5...7")
        XCTAssertEqual(erasure.bytesRead, UInt64(5 * geometry.headerBlocks * CacheGeometry.blockBytes))
        XCTAssertEqual(device.syncs, 1)
        let after = device.bytes
        let again = try RecoverCache.eraseStaleSegments(device: device, cacheUUID: uuid, geometry: geometry, chain: chain)
        XCTAssertEqual(again.slots, [])
        XCTAssertEqual(device.bytes, after)
    }

    /// The whole recovery, twice on the same device after a crash: the same log and device; the
    /// second run finds the torn slot erased by the first, so its chain ends at an empty slot.
    func testRecoverIsIdempotent() throws {
        (1...6).forEach { put(id: $0) }
        corrupt(slot: 2)
        let first = try RecoverCache.recover(device: device, header: header(), geometry: geometry, record: record(lastRetired: 0))
        let after = device.bytes
        let second = try RecoverCache.recover(device: device, header: header(), geometry: geometry, record: record(lastRetired: 0))
        XCTAssertEqual(first.chain.segments.map(\.segmentID), [1, 2])
        XCTAssertEqual(first.chain.end, .checksumMismatch(slot: 2, expectedID: 3))
        XCTAssertEqual(first.erasedSlots, [2, 3, 4, 5])
        XCTAssertEqual(second.chain.segments, first.chain.segments)
        XCTAssertEqual(second.chain.end, .empty(slot: 2))
        XCTAssertEqual(second.erasedSlots, [])
        XCTAssertEqual(device.bytes, after)
        XCTAssertGreaterThan(first.seconds, 0)
    }

    /// A log that ends before the recorded last flushed id is refused (row P7).
    func testALogShorterThanRecordedIsRefused() throws {
        (1...3).forEach { put(id: $0) }
        corrupt(slot: 1)
        XCTAssertThrowsError(try RecoverCache.recover(device: device, header: header(), geometry: geometry,
                                                      record: record(lastRetired: 0, lastFlushed: 3))) { error in
            guard case FormatError.logShorterThanRecorded(lastFlushedID: 3, foundID: 1, reason: _)? = error as? FormatError else {
                return XCTFail("\(error)")
            }
        }
        XCTAssertEqual(device.writes, 0, "nothing is written before the log is refused")
    }

    /// Row P2: a sealed pmem area holds a segment whose slot does not verify (its write tore):
    /// the walk writes the pmem image there and goes on to the later segments on the device; a
    /// second walk finds it on the device (P1) and writes nothing.
    func testWalkWritesASealedPmemSegmentTheDeviceLacks() throws {
        (1...4).forEach { put(id: $0) }
        corrupt(slot: 1)
        let layout = PmemLayout(cacheUUID: uuid, pmemUUID: [UInt8](repeating: 3, count: 16), segmentBytes: geometry.segmentBytes)
        var file = [UInt8](repeating: 0, count: layout.fileBytes(for: geometry))
        let image = segmentImage(id: 2, blocks: 2, uuid: uuid, geometry: geometry)
        let imageOffset = layout.imageOffset(5, geometry: geometry)
        file.replaceSubrange(imageOffset..<(imageOffset + image.count), with: image)
        try file.withUnsafeBytes { raw in
            let pmem = PmemImage(layout: layout, bytes: raw, path: "/pmem")
            let areas = RecoverCache.PmemAreas(sealed: [2: 5], open: nil)
            for (run, written) in [(1, [UInt64(2)]), (2, [])] {
                let walked = try RecoverCache.walkChain(device: device, cacheUUID: uuid, geometry: geometry, record: record(lastRetired: 0),
                                                        trustedThroughID: 0, areas: areas, pmem: pmem)
                XCTAssertEqual(walked.chain.segments.map(\.segmentID), [1, 2, 3, 4], "run \(run)")
                XCTAssertEqual(walked.sealedWritten, written, "run \(run)")
            }
        }
        XCTAssertEqual(Array(device.bytes[slotRange(1)]), image)
        XCTAssertEqual(device.writes, 1)
    }

    /// Row P5: a sealed area past the log's end means segments in between are lost; nothing is
    /// written. A sealed area inside the log (already on the device) changes nothing.
    func testReplayOpenAreaRefusesAGapAndIgnoresAStaleArea() throws {
        (1...3).forEach { put(id: $0) }
        var chain = SegmentChain.scan(geometry: geometry, cacheUUID: uuid, lastRetiredSegmentID: 0) { Array(device.bytes[slotRange($0)]) }
        let layout = PmemLayout(cacheUUID: uuid, pmemUUID: [UInt8](repeating: 3, count: 16), segmentBytes: geometry.segmentBytes)
        let file = [UInt8](repeating: 0, count: layout.fileBytes(for: geometry))
        try file.withUnsafeBytes { raw in
            let pmem = PmemImage(layout: layout, bytes: raw, path: "/pmem")
            XCTAssertTrue(RecoverCache.readPmemAreas(pmem, geometry: geometry, lastRetiredSegmentID: 0).sealed.isEmpty,
                          "a fresh pmem file has no areas in use")
            XCTAssertThrowsError(try RecoverCache.replayOpenArea(.init(sealed: [6: 0]), chain: &chain, device: device, cacheUUID: uuid,
                                                                 geometry: geometry, pmem: pmem)) { error in
                XCTAssertEqual(error as? PmemError, .logGap(path: "/pmem", expectedID: 4, foundID: 6))
            }
            let unchanged = try RecoverCache.replayOpenArea(.init(sealed: [2: 0]), chain: &chain, device: device, cacheUUID: uuid,
                                                            geometry: geometry, pmem: pmem)
            XCTAssertNil(unchanged)
        }
        XCTAssertEqual(chain.segments.count, 3)
        XCTAssertEqual(device.writes, 0)
    }

    /// The read-ahead hands out ranges in order from reused buffers, however deep it runs.
    func testReadAheadReturnsEveryRangeInOrder() throws {
        for index in 0..<device.bytes.count { device.bytes[index] = UInt8(truncatingIfNeeded: index / 4096) }
        let count = device.bytes.count / 4096
        for depth in [1, 3, 64] {
            let reader = ReadAhead(device: device, depth: depth, threads: 4, bufferBytes: 4096) { sequence in
                sequence < count ? (UInt64(sequence * 4096), 4096) : nil
            }
            for sequence in 0..<count {
                let bytes = try reader.take(sequence)
                XCTAssertEqual(bytes.count, 4096)
                XCTAssertTrue(bytes.allSatisfy { $0 == UInt8(truncatingIfNeeded: sequence) }, "depth \(depth), range \(sequence)")
                if sequence % 7 == 0 { reader.quiesce() }
            }
            reader.finish()
            XCTAssertEqual(reader.bytesRead, UInt64(device.bytes.count))
        }
    }
}

/// A device in memory whose reads may fail at chosen offsets. Reads come from several threads;
/// recovery never writes while one is in flight.
final class MemoryDevice: RecoveryDevice {
    var bytes: [UInt8]
    var failingOffsets: Set<UInt64> = []
    private(set) var writes = 0
    private(set) var syncs = 0

    init(sizeBytes: Int) {
        bytes = [UInt8](repeating: 0, count: sizeBytes)
    }

    var sizeBytes: UInt64 { UInt64(bytes.count) }

    func readBytes(offset: UInt64, count: Int) throws -> [UInt8] {
        guard !failingOffsets.contains(offset) else { throw POSIXError(.EIO) }
        return Array(bytes[Int(offset)..<(Int(offset) + count)])
    }

    func writeBytes(offset: UInt64, bytes written: [UInt8]) throws {
        bytes.replaceSubrange(Int(offset)..<(Int(offset) + written.count), with: written)
        writes += 1
    }

    func synchronizeBytes() throws {
        syncs += 1
    }
}
