import XCTest

@testable import SluiceFormat

final class SluiceFormatTests: XCTestCase {
    private let uuid: [UInt8] = (0..<16).map { UInt8($0 * 17) }

    func testCRC32CIsTheStandardOneAndChains() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([]), 0)
        let whole = CRC32C.checksum(Array("hello, world".utf8))
        let chained = CRC32C.checksum(Array(", world".utf8), continuing: CRC32C.checksum(Array("hello".utf8)))
        XCTAssertEqual(whole, chained)
    }

    /// Combining with a block's checksum gives the checksum of the concatenation, for random
    /// prefixes and blocks; the whole-block checksum derived from an entry's is the block's own;
    /// a segment sealed from its blocks' checksums carries the checksum sealing from the data does.
    func testCRC32CCombinesWithWholeBlocks() throws {
        var rng = SystemRandomNumberGenerator()
        for round in 0..<20 {
            let prefix = (0..<Int.random(in: 0...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let block = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &rng) }
            XCTAssertEqual(CRC32C.combine(CRC32C.checksum(prefix), withBlock: CRC32C.checksum(block)), CRC32C.checksum(prefix + block), "round \(round)")
            let word0 = UInt64.random(in: 0...UInt64.max, using: &rng) | 0xFF
            block.withUnsafeBytes { raw in
                let sums = PmemLayout.entryChecksums(word0: word0, block: raw)
                XCTAssertEqual(sums.wholeBlock, CRC32C.checksum(raw), "round \(round)")
                XCTAssertEqual(sums.entry, PmemLayout.entryChecksum(word0: word0, block: raw))
                XCTAssertNil(PmemLayout.entryChecksums(word0: word0 & ~0x01, block: raw).wholeBlock, "a partial entry gives no whole-block checksum")
            }
        }
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 4 << 20)
        for count in [0, 1, 7, geometry.dataBlocksPerSegment] {
            let data = (0..<(count * 4096)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            let header = SegmentHeader(segmentID: 9, cacheUUID: uuid, isPartial: count < 7,
                                       entries: (0..<count).map { SegmentHeader.Entry(blockNumber: UInt64($0 * 3), sectorMask: 0xFF) })
            let headerBytes = geometry.headerBlocks * 4096
            var fromData = [UInt8](repeating: 0, count: headerBytes)
            var fromSums = [UInt8](repeating: 1, count: headerBytes)
            data.withUnsafeBytes { raw in
                fromData.withUnsafeMutableBytes { header.encode(into: $0, data: raw, geometry: geometry) }
                let sums = (0..<count).map { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[($0 * 4096)..<(($0 + 1) * 4096)])) }
                sums.withUnsafeBufferPointer { sums in fromSums.withUnsafeMutableBytes { header.encode(into: $0, blockChecksums: sums, geometry: geometry) } }
            }
            XCTAssertEqual(fromSums, fromData, "\(count) data blocks")
        }
    }

    func testGeometry() throws {
        let geometry = try CacheGeometry(segmentBytes: 1 << 20, deviceBytes: 64 << 20)
        XCTAssertEqual(geometry.headerBlocks, 1)
        XCTAssertEqual(geometry.dataBlocksPerSegment, 255)
        XCTAssertEqual(geometry.firstSegmentOffset, 1 << 20)
        XCTAssertEqual(geometry.segmentCount, 63)
        XCTAssertEqual(geometry.slot(ofSegment: 1), 0)
        XCTAssertEqual(geometry.slot(ofSegment: 64), 0, "the ring wraps")
        XCTAssertEqual(geometry.offset(ofDataBlock: 0, inSlot: 1), (2 << 20) + 4096)
        let big = try CacheGeometry(segmentBytes: 4 << 20, deviceBytes: 64 << 20)
        XCTAssertEqual(big.headerBlocks, 3, "1022 entries of 8 bytes and the fixed part do not fit in two blocks")
        XCTAssertEqual(big.dataBlocksPerSegment, 1021)
        XCTAssertThrowsError(try CacheGeometry(segmentBytes: 3 << 20, deviceBytes: 64 << 20))
        XCTAssertThrowsError(try CacheGeometry(segmentBytes: 1 << 20, deviceBytes: 2 << 20)) { error in
            guard case FormatError.deviceTooSmall = error else { return XCTFail("\(error)") }
        }
    }

    func testSuperblockHeaderRoundTripsAndRejectsDamage() throws {
        let geometry = try CacheGeometry(segmentBytes: 1 << 20, deviceBytes: 64 << 20)
        let header = SuperblockHeader(uuid: uuid, geometry: geometry, mode: .volatile, backingSizeBytes: 1 << 30,
                                      backingIdentity: "file:/var/lib/disk.img", createdSeconds: 1_800_000_000)
        var bytes = header.encoded()
        XCTAssertEqual(bytes.count, 4096)
        XCTAssertEqual(try bytes.withUnsafeBytes { try SuperblockHeader(decoding: $0) }, header)
        XCTAssertEqual(try CacheGeometry(header: header), geometry)
        bytes[100] ^= 1
        XCTAssertThrowsError(try bytes.withUnsafeBytes { try SuperblockHeader(decoding: $0) }) { error in
            guard case FormatError.corruptSuperblock = error else { return XCTFail("\(error)") }
        }
        let zeros = [UInt8](repeating: 0, count: 4096)
        XCTAssertThrowsError(try zeros.withUnsafeBytes { try SuperblockHeader(decoding: $0) }) { error in
            XCTAssertEqual(error as? FormatError, .notFormatted)
        }
        var future = header.encoded()
        future[8] = 9
        XCTAssertThrowsError(try future.withUnsafeBytes { try SuperblockHeader(decoding: $0) }) { error in
            XCTAssertEqual(error as? FormatError, .unsupportedVersion(found: 9, supported: SuperblockHeader.formatVersion))
        }
    }

    /// A version-1 header is refused with a message naming the upgrade; the upgrade changes the
    /// version field and the checksum only, and refuses anything but an intact version-1 header.
    func testAVersionOneHeaderIsRefusedAndUpgradesInPlace() throws {
        let geometry = try CacheGeometry(segmentBytes: 1 << 20, deviceBytes: 64 << 20)
        let header = SuperblockHeader(uuid: uuid, geometry: geometry, mode: .pmem, backingSizeBytes: 1 << 30,
                                      backingIdentity: "nbd+unix:///?socket=/run/disk.sock", pmemUUID: [UInt8](repeating: 3, count: 16),
                                      createdSeconds: 1_800_000_000)
        let current = header.encoded()
        var old = current
        old[8] = 1
        let crc = CRC32C.checksum(Array(old[0..<4092]))
        withUnsafeBytes(of: crc.littleEndian) { old.replaceSubrange(4092..<4096, with: $0) }
        XCTAssertThrowsError(try old.withUnsafeBytes { try SuperblockHeader(decoding: $0) }) { error in
            XCTAssertEqual(error as? FormatError, .unsupportedVersion(found: 1, supported: 2))
            XCTAssertTrue("\(error)".contains("sluice-recover upgrade --cache PATH"), "\(error)")
        }
        let upgraded = try SuperblockHeader.upgradedFromVersion1(old)
        XCTAssertEqual(upgraded, current, "only the version and the checksum change")
        XCTAssertThrowsError(try SuperblockHeader.upgradedFromVersion1(current)) { error in
            XCTAssertEqual(error as? FormatError, .unsupportedVersion(found: 2, supported: 2))
        }
        var damaged = old
        damaged[200] ^= 4
        XCTAssertThrowsError(try SuperblockHeader.upgradedFromVersion1(damaged)) { error in
            guard case FormatError.corruptSuperblock = error else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try SuperblockHeader.upgradedFromVersion1([UInt8](repeating: 0, count: 4096))) { error in
            XCTAssertEqual(error as? FormatError, .notFormatted)
        }
    }

    /// Clean copies use bit 63 of an entry; markers, dirty copies and the largest block number
    /// round-trip, and a version-1 entry (bit 63 clear) reads as a dirty copy or a marker.
    func testEntriesCarryTheCleanFlag() {
        let limit = SegmentHeader.Entry.blockNumberLimit
        for entry in [SegmentHeader.Entry(blockNumber: 5, sectorMask: 0xFF, isClean: true), SegmentHeader.Entry(blockNumber: limit - 1, sectorMask: 0x81),
                      SegmentHeader.Entry(blockNumber: limit - 1, sectorMask: 0xFF, isClean: true), SegmentHeader.Entry(blockNumber: 9, sectorMask: 0)] {
            XCTAssertEqual(SegmentHeader.Entry(packed: entry.packed), entry)
        }
        XCTAssertEqual(SegmentHeader.Entry(blockNumber: 5, sectorMask: 0xFF, isClean: true).packed, 1 << 63 | 5 << 8 | 0xFF)
        let versionOne = SegmentHeader.Entry(packed: 77 << 8 | 0x0F)
        XCTAssertFalse(versionOne.isClean)
        XCTAssertFalse(versionOne.supersedesWithoutData)
        XCTAssertTrue(SegmentHeader.Entry(packed: 77 << 8).supersedesWithoutData, "a marker")
        XCTAssertTrue(SegmentHeader.Entry(packed: 1 << 63 | 77 << 8 | 0xFF).supersedesWithoutData, "a clean copy")
    }

    func testRecordsAlternateAndATornSlotKeepsTheOtherOne() {
        let first = SuperblockRecord(sequence: 1, lastRetiredSegmentID: 10, lastFlushedSegmentID: 20, cleanShutdown: false)
        let second = SuperblockRecord(sequence: 2, lastRetiredSegmentID: 15, lastFlushedSegmentID: 25, cleanShutdown: true)
        XCTAssertNotEqual(first.blockOffset, second.blockOffset)
        let a = first.encoded()
        var b = second.encoded()
        let current = a.withUnsafeBytes { slotA in b.withUnsafeBytes { SuperblockRecord.current(slotA: slotA, slotB: $0) } }
        XCTAssertEqual(current, second)
        b[20] ^= 0x40  // torn or damaged
        let fallback = a.withUnsafeBytes { slotA in b.withUnsafeBytes { SuperblockRecord.current(slotA: slotA, slotB: $0) } }
        XCTAssertEqual(fallback, first)
        let empty = [UInt8](repeating: 0, count: 4096)
        XCTAssertNil(empty.withUnsafeBytes { slotA in empty.withUnsafeBytes { SuperblockRecord.current(slotA: slotA, slotB: $0) } })
    }

    func testSegmentHeaderSealsHeaderAndData() throws {
        let geometry = try CacheGeometry(segmentBytes: 1 << 20, deviceBytes: 64 << 20)
        let entries = [SegmentHeader.Entry(blockNumber: 7, sectorMask: 0xFF), SegmentHeader.Entry(blockNumber: 1 << 40, sectorMask: 0x03)]
        let header = SegmentHeader(segmentID: 42, cacheUUID: uuid, isPartial: true, entries: entries)
        var segment = [UInt8](repeating: 0, count: 1 << 20)
        for index in 4096..<(4096 + 2 * 4096) { segment[index] = UInt8(truncatingIfNeeded: index * 7) }
        segment.withUnsafeMutableBytes { raw in
            let data = UnsafeRawBufferPointer(rebasing: raw[4096...])
            header.encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<4096]), data: data, geometry: geometry)
        }
        XCTAssertEqual(try segment.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: uuid) }, header)
        // Data beyond the entries is not covered: a partial segment's unused blocks may hold anything.
        segment[4096 * 10] ^= 1
        XCTAssertNoThrow(try segment.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: uuid) })
        // Damage to a covered data block is caught.
        segment[4096 + 5] ^= 1
        XCTAssertThrowsError(try segment.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: uuid) }) { error in
            XCTAssertEqual(error as? SegmentHeader.Invalid, .checksumMismatch)
        }
        segment[4096 + 5] ^= 1
        // Another cache's segment is foreign, whatever its checksum says.
        let otherUUID = [UInt8](repeating: 9, count: 16)
        XCTAssertThrowsError(try segment.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: otherUUID) }) { error in
            XCTAssertEqual(error as? SegmentHeader.Invalid, .foreign)
        }
        let blank = [UInt8](repeating: 0, count: 4096)
        XCTAssertThrowsError(try blank.withUnsafeBytes { try SegmentHeader(decodingHeader: $0, geometry: geometry, cacheUUID: uuid) }) { error in
            XCTAssertEqual(error as? SegmentHeader.Invalid, .noHeader)
        }
    }
}
