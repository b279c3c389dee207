import XCTest
import SluiceTesting

@testable import SluiceCache

final class CacheIndexTests: XCTestCase {
    func testInsertLookupReplaceRemove() {
        var index = CacheIndex(capacity: 100)
        XCTAssertNil(index.lookup(5))
        XCTAssertNil(index.insert(5, sectorMask: 0x0F, at: 10))
        XCTAssertEqual(index.lookup(5)?.position, 10)
        XCTAssertEqual(index.lookup(5)?.sectorMask, 0x0F)
        // A newer copy replaces the old one and hands its position back.
        XCTAssertEqual(index.insert(5, sectorMask: 0xFF, at: 11), 10)
        XCTAssertEqual(index.lookup(5)?.position, 11)
        XCTAssertNil(index.resident(at: 10))
        XCTAssertEqual(index.count, 1)
        // Removing a superseded position does nothing; removing the current one forgets the block.
        XCTAssertFalse(index.remove(at: 10))
        XCTAssertTrue(index.remove(at: 11))
        XCTAssertNil(index.lookup(5))
        XCTAssertEqual(index.count, 0)
    }

    func testMemoryIsAtMostSixteenBytesPerCacheBlock() {
        let blocks = (4 << 30) / 4096  // a 4 GiB cache device
        let index = CacheIndex(capacity: blocks)
        XCTAssertLessThanOrEqual(index.memoryBytes, blocks * 16)
    }

    /// Thousands of random operations against a dictionary model, filling the index completely.
    func testAgreesWithAModelUnderRandomOperations() {
        for seed in 1...5 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let capacity = 257
            var index = CacheIndex(capacity: capacity)
            var model: [UInt64: (CacheIndex.Position, UInt8)] = [:]
            var free = Array((0..<CacheIndex.Position(capacity)).reversed())
            for step in 0..<20_000 {
                let blockNumber = random.next() % 400  // collisions and rewrites are frequent
                switch random.next() % 3 {
                case 0, 1:
                    guard let position = free.popLast() else { continue }
                    let mask = UInt8(truncatingIfNeeded: random.next() % 255 + 1)
                    let replaced = index.insert(blockNumber, sectorMask: mask, at: position)
                    XCTAssertEqual(replaced, model[blockNumber]?.0, "seed \(seed) step \(step)")
                    if let replaced { free.append(replaced) }
                    model[blockNumber] = (position, mask)
                default:
                    let removed = index.remove(blockNumber: blockNumber)
                    XCTAssertEqual(removed, model[blockNumber]?.0, "seed \(seed) step \(step)")
                    if let removed { free.append(removed) }
                    model[blockNumber] = nil
                }
                if step % 97 == 0 {
                    XCTAssertEqual(index.count, model.count)
                    for (block, (position, mask)) in model {
                        guard let found = index.lookup(block) else { return XCTFail("seed \(seed): lost block \(block)") }
                        XCTAssertEqual(found.position, position)
                        XCTAssertEqual(found.sectorMask, mask)
                    }
                }
            }
            XCTAssertEqual(Set(index.entries().map(\.blockNumber)), Set(model.keys))
        }
    }
}

final class CacheIndexDistributionTests: XCTestCase {
    /// Every key once hashed to slot 0 (a shift bound tighter than the multiplication meant to
    /// scale it), which left lookups correct but linear in the number of entries.
    func testKeysSpreadOverTheTableSoProbesStayShort() {
        var index = CacheIndex(capacity: 30_000)
        var generator = SystemRandomNumberGenerator()
        var inserted = 0
        while inserted < 20_000 {
            let block = UInt64.random(in: 0..<(1 << 40), using: &generator)
            if index.lookup(block) == nil {
                index.insert(block, sectorMask: 0xFF, at: CacheIndex.Position(inserted))
                inserted += 1
            }
        }
        // Sequential block numbers, the common case for a disk, too.
        var sequential = CacheIndex(capacity: 30_000)
        for block in 0..<20_000 { sequential.insert(UInt64(block), sectorMask: 0xFF, at: CacheIndex.Position(block)) }
        XCTAssertLessThan(index.longestProbe(), 400, "random keys cluster")
        XCTAssertLessThan(sequential.longestProbe(), 400, "sequential keys cluster")
    }
}
