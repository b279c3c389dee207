import NIOCore
import SluiceTesting
import SluiceVolume
import XCTest

@testable import SluiceCache

/// BLOCK_STATUS on the cache volume: the backing store's allocation, with every block the cache
/// holds reported as data. The property that matters: no sector reported as zero reads as
/// anything but zeros through the volume.
final class CacheEngineBlockStatusTests: XCTestCase {
    private func harness() throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = 0
        tunables.dirtyTargetPercent = 100
        return try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables)
    }

    private func blockStatus(_ harness: EngineHarness, offset: UInt64, length: UInt32, maximumExtents: Int = 1024) throws -> VolumeReply {
        try harness.perform { $0.submitBlockStatus(offset: offset, lengthBytes: length, maximumExtents: maximumExtents, completion: $1) }
    }

    private func extents(_ harness: EngineHarness, offset: UInt64, length: UInt32, maximumExtents: Int = 1024) throws -> [BlockStatusExtent] {
        let reply = try blockStatus(harness, offset: offset, length: length, maximumExtents: maximumExtents)
        guard case .extents(let extents) = reply else { throw HarnessError.failed("block status: \(reply)") }
        return extents
    }

    func testDirtyBlocksOverZerosOnTheBackingStoreAreData() throws {
        let harness = try harness()
        defer { harness.close() }
        XCTAssertEqual(try extents(harness, offset: 0, length: 2 << 20), [BlockStatusExtent(lengthBytes: 2 << 20, flags: .zero)])
        try harness.write(SectorCodec.bytes(tag: 1, firstLBA: 24, sectors: 8), at: 3 * 4096)
        try harness.write(SectorCodec.bytes(tag: 2, firstLBA: 81, sectors: 1), at: 10 * 4096 + 512)
        XCTAssertEqual(try harness.backingBytes(at: 3 * 4096, count: 4096), [UInt8](repeating: 0, count: 4096), "not written back yet")
        XCTAssertEqual(try extents(harness, offset: 0, length: 2 << 20), [
            BlockStatusExtent(lengthBytes: 3 * 4096, flags: .zero),
            BlockStatusExtent(lengthBytes: 4096, flags: []),
            BlockStatusExtent(lengthBytes: 6 * 4096, flags: .zero),
            BlockStatusExtent(lengthBytes: 4096, flags: []),
            BlockStatusExtent(lengthBytes: UInt32(2 << 20) - 11 * 4096, flags: .zero),
        ])
        // A range starting inside a held block, and one reply limited to two extents.
        XCTAssertEqual(try extents(harness, offset: 3 * 4096 + 1024, length: 8192), [
            BlockStatusExtent(lengthBytes: 3072, flags: []), BlockStatusExtent(lengthBytes: 5120, flags: .zero),
        ])
        XCTAssertEqual(try extents(harness, offset: 0, length: 2 << 20, maximumExtents: 2), [
            BlockStatusExtent(lengthBytes: 3 * 4096, flags: .zero), BlockStatusExtent(lengthBytes: 4096, flags: []),
        ])
        guard case .failed(.outOfRange) = try blockStatus(harness, offset: (2 << 20) - 512, length: 1024) else {
            return XCTFail("a range past the end is refused")
        }
    }

    /// Seeded writes, trims, write-zeroes and writebacks over a small region; after each step a
    /// random block-status request: its extents are sector multiples covering at most what was
    /// asked, and every sector reported as zero reads as zeros.
    func testNoSectorReportedZeroHoldsData() throws {
        for seed in 1...12 as ClosedRange<UInt64> {
            let harness = try harness()
            defer { harness.close() }
            var random = SplitMix64(seed: seed)
            let regionSectors = 64 * 8
            for step in 0..<60 {
                let first = random.below(regionSectors - 16)
                let count = random.range(1...16)
                switch random.below(10) {
                case 0..<5: try harness.write(SectorCodec.bytes(tag: UInt32(step + 1), firstLBA: first, sectors: count), at: UInt64(first * 512))
                case 5: try harness.discard(at: UInt64(first * 512), count: count * 512, zeroes: false)
                case 6: try harness.discard(at: UInt64(first * 512), count: count * 512, zeroes: true)
                case 7: try harness.drain()
                default: break
                }
                let offset = UInt64(random.below(regionSectors) * 512)
                let length = UInt32(random.range(1...(regionSectors + 8)) * 512)
                let found = try extents(harness, offset: offset, length: length, maximumExtents: random.range(1...8))
                let context = "seed \(seed) step \(step): \(found) for \(length) at \(offset)"
                XCTAssertFalse(found.isEmpty, context)
                XCTAssertLessThanOrEqual(found.reduce(0) { $0 + UInt64($1.lengthBytes) }, UInt64(length), context)
                var position = offset
                for extent in found {
                    XCTAssertEqual(extent.lengthBytes % 512, 0, context)
                    if extent.flags.contains(.zero) {
                        let bytes = try harness.read(at: position, count: Int(extent.lengthBytes))
                        XCTAssertTrue(bytes.allSatisfy { $0 == 0 }, "\(context): data in an extent reported zero at \(position)")
                    }
                    position += UInt64(extent.lengthBytes)
                }
            }
        }
    }
}
