import SluiceFormat
import XCTest
import SluiceTesting

@testable import SluiceCache

/// The pmem buffer's persistence protocol under simulated power failures: every append that was
/// persisted before the failure is recovered with its data, nothing is invented, and a torn or
/// unpersisted append is either whole or absent.
final class PmemSegmentBufferTests: XCTestCase {
    func testEveryPersistedAppendSurvivesAndNothingIsInvented() throws {
        let geometry = try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 1 << 20)
        let layout = PmemLayout(cacheUUID: [UInt8](repeating: 1, count: 16), pmemUUID: [UInt8](repeating: 2, count: 16),
                                segmentBytes: geometry.segmentBytes, areaCount: 1)
        var checkedCuts = 0
        // Seeded: a failing seed replays.
        for seed in UInt64(1)...300 {
            var rng = SplitMix64(seed: seed)
            let memory = SimulatedPersistentMemory(sizeBytes: layout.fileBytes(for: geometry))
            // A previous segment left stale entries in this area.
            let previous = PmemSegmentBuffer(memory: memory, layout: layout, area: 0, geometry: geometry)
            previous.open(segmentID: seed)
            for block in 0..<5 {
                let bytes = [UInt8](repeating: 0xEE, count: 4096)
                bytes.withUnsafeBytes { _ = previous.append(blockNumber: UInt64(block), sectorMask: 0xFF, block: $0) }
            }
            previous.persist()

            let buffer = PmemSegmentBuffer(memory: memory, layout: layout, area: 0, geometry: geometry)
            buffer.open(segmentID: seed + 1000)
            var persistedCount = 0
            var written: [(UInt64, UInt8, UInt8)] = []   // block, mask, fill byte
            let appends = rng.range(1...geometry.dataBlocksPerSegment)
            for index in 0..<appends {
                let block = UInt64(rng.below(8))
                let mask = UInt8(rng.range(1...255))
                let fill = UInt8(truncatingIfNeeded: index &* 37 &+ 1)
                let bytes = [UInt8](repeating: fill, count: 4096)
                bytes.withUnsafeBytes { _ = buffer.append(blockNumber: block, sectorMask: mask, block: $0) }
                written.append((block, mask, fill))
                if rng.chance(50) {
                    buffer.persist()
                    persistedCount = written.count
                }
            }
            let survivor = memory.powerFail(seed: seed)
            let recovered = survivor.withUnsafeBytes { layout.decodeArea(0, in: $0, geometry: geometry) }
            XCTAssertEqual(recovered.segmentID, seed + 1000)
            XCTAssertEqual(recovered.state, .open)
            let validIndexes = Set(recovered.validEntries.map(\.index))
            for index in 0..<persistedCount {
                XCTAssertTrue(validIndexes.contains(index), "seed \(seed): persisted append \(index) was lost")
            }
            let reloaded = SimulatedPersistentMemory(persistentBytes: survivor)
            for (index, entry) in recovered.validEntries {
                XCTAssertLessThan(index, written.count, "seed \(seed): a stale entry of the previous segment was taken")
                guard index < written.count else { continue }
                XCTAssertEqual(entry.blockNumber, written[index].0)
                XCTAssertEqual(entry.sectorMask, written[index].1)
                // The data of a valid entry is the data that was appended, in every masked sector.
                let offset = layout.dataOffset(0, index: index, geometry: geometry)
                let data = Array(UnsafeRawBufferPointer(start: reloaded.baseAddress + offset, count: 4096))
                for sector in 0..<8 where entry.sectorMask & (1 << sector) != 0 {
                    XCTAssertEqual(Array(data[(sector * 512)..<((sector + 1) * 512)]), [UInt8](repeating: written[index].2, count: 512),
                                   "seed \(seed): entry \(index) is valid but its data is not what was written")
                }
            }
            checkedCuts += 1
        }
        XCTAssertEqual(checkedCuts, 300)
    }
}
