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

/// Clean bits and per-slot counts: the cleaner decides from `dirtyBlocks(inSlot:)` whether a tail
/// needs relocating, writeback from `dirtyCount`, and retirement refuses a slot with a dirty
/// block, so a count off by one either loses data (a dirty block taken for clean) or stalls.
final class CacheIndexCleanBitsTests: XCTestCase {
    private struct Copy: Equatable {
        var position: CacheIndex.Position
        var mask: UInt8
        var dirty: Bool
    }

    /// A random key, the same for the same seed (a dictionary's order changes from run to run).
    private func pick(_ model: [UInt64: Copy], _ random: inout SplitMix64) -> UInt64? {
        model.isEmpty ? nil : model.keys.sorted()[random.below(model.count)]
    }

    /// Every slot's live and dirty counts, the totals, and the scan check, against the model.
    private func checkCounts(_ index: CacheIndex, _ model: [UInt64: Copy], slots: Int, _ context: String,
                             file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertTrue(index.countsAreConsistent(), "counts disagree with the entries, \(context)", file: file, line: line)
        XCTAssertEqual(index.count, model.count, context, file: file, line: line)
        XCTAssertEqual(index.dirtyCount, model.values.filter(\.dirty).count, context, file: file, line: line)
        var live = [Int](repeating: 0, count: slots)
        var dirty = live
        for copy in model.values {
            live[Int(copy.position) / index.positionsPerSlot] += 1
            if copy.dirty { dirty[Int(copy.position) / index.positionsPerSlot] += 1 }
        }
        XCTAssertEqual((0..<slots).map { index.liveBlocks(inSlot: $0) }, live, "live per slot, \(context)", file: file, line: line)
        XCTAssertEqual((0..<slots).map { index.dirtyBlocks(inSlot: $0) }, dirty, "dirty per slot, \(context)", file: file, line: line)
    }

    /// Random inserts (new blocks and replacements of dirty and clean copies), removals by block
    /// and by position (current or superseded), markClean and updateMask against a model, with the
    /// counts checked after every step. 16 positions per slot over 257 positions: the last slot
    /// has one.
    func testCleanBitsAndSlotCountsAgreeWithAModelUnderRandomOperations() {
        for seed in 1...4 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let capacity = 257
            let perSlot = 16
            let slots = (capacity + perSlot - 1) / perSlot
            var index = CacheIndex(capacity: capacity, positionsPerSlot: perSlot)
            var model: [UInt64: Copy] = [:]
            var free = Array((0..<CacheIndex.Position(capacity)).reversed())
            var cleaned = 0
            var redirtied = 0
            for step in 0..<4_000 {
                let context = "seed \(seed) step \(step)"
                let blockNumber = random.next() % 300
                switch random.below(8) {
                case 0, 1:
                    guard !free.isEmpty else { continue }
                    let position = free.remove(at: random.below(free.count))
                    let mask = UInt8(truncatingIfNeeded: random.below(255) + 1)
                    let replaced = index.insert(blockNumber, sectorMask: mask, at: position)
                    XCTAssertEqual(replaced, model[blockNumber]?.position, context)
                    if let replaced {
                        free.append(replaced)
                        XCTAssertNil(index.resident(at: replaced), "a replaced copy's position must be empty, \(context)")
                    }
                    model[blockNumber] = Copy(position: position, mask: mask, dirty: true)
                case 2:
                    let removed = index.remove(blockNumber: blockNumber)
                    XCTAssertEqual(removed, model[blockNumber]?.position, context)
                    if let removed { free.append(removed) }
                    model[blockNumber] = nil
                case 3:
                    // By position: the engine retiring a slot removes every position in it.
                    let position = CacheIndex.Position(random.below(capacity))
                    let holder = model.first { $0.value.position == position }?.key
                    XCTAssertEqual(index.remove(at: position), holder != nil, context)
                    if let holder {
                        model[holder] = nil
                        free.append(position)
                    }
                case 4, 5:
                    guard let block = pick(model, &random), let copy = model[block] else { continue }
                    XCTAssertEqual(index.markClean(at: copy.position), copy.dirty, "markClean says whether it was dirty, \(context)")
                    if copy.dirty { cleaned += 1 }
                    model[block]!.dirty = false
                case 6:
                    guard let block = pick(model, &random), let copy = model[block] else { continue }
                    let mask = copy.mask | UInt8(truncatingIfNeeded: random.next())
                    index.updateMask(at: copy.position, to: mask)
                    if !copy.dirty { redirtied += 1 }
                    model[block] = Copy(position: copy.position, mask: mask, dirty: true)
                default:
                    let found = index.lookup(blockNumber)
                    XCTAssertEqual(found.map { Copy(position: $0.position, mask: $0.sectorMask, dirty: $0.isDirty) }, model[blockNumber], context)
                }
                checkCounts(index, model, slots: slots, context)
                if let copy = model[blockNumber] {
                    XCTAssertEqual(index.resident(at: copy.position),
                                   CacheIndex.Resident(blockNumber: blockNumber, sectorMask: copy.mask, isDirty: copy.dirty), context)
                }
                if step % 101 == 0 {
                    for (block, copy) in model {
                        let found = index.lookup(block)
                        XCTAssertEqual(found.map { Copy(position: $0.position, mask: $0.sectorMask, dirty: $0.isDirty) }, copy, "\(context), block \(block)")
                    }
                    var dirty: [UInt64: CacheIndex.Position] = [:]
                    for slot in 0..<slots { index.forEachDirty(in: index.positions(ofSlot: slot)) { dirty[$0] = $1 } }
                    XCTAssertEqual(dirty, model.filter(\.value.dirty).mapValues(\.position), "forEachDirty, \(context)")
                }
            }
            XCTAssertGreaterThan(cleaned, 100, "seed \(seed): the run should clean many copies")
            XCTAssertGreaterThan(redirtied, 20, "seed \(seed): the run should dirty many clean copies again")
        }
    }

    /// A rewrite in the open buffer grows the mask of a copy writeback may have cleaned meanwhile:
    /// the new sectors are not on the backing store, so the copy is dirty again, and counted so.
    func testUpdateMaskMakesACleanCopyDirty() {
        var index = CacheIndex(capacity: 32, positionsPerSlot: 8)
        index.insert(40, sectorMask: 0x0F, at: 9)
        XCTAssertTrue(index.markClean(at: 9))
        XCTAssertFalse(index.markClean(at: 9), "already clean")
        XCTAssertEqual([index.dirtyCount, index.dirtyBlocks(inSlot: 1), index.liveBlocks(inSlot: 1)], [0, 0, 1])
        index.updateMask(at: 9, to: 0xFF)
        XCTAssertEqual(index.lookup(40), CacheIndex.Entry(position: 9, sectorMask: 0xFF, isDirty: true))
        XCTAssertEqual([index.dirtyCount, index.dirtyBlocks(inSlot: 1), index.liveBlocks(inSlot: 1)], [1, 1, 1])
        // Growing an already dirty copy counts nothing twice.
        index.updateMask(at: 9, to: 0xFF)
        XCTAssertEqual([index.dirtyCount, index.dirtyBlocks(inSlot: 1)], [1, 1])
        XCTAssertTrue(index.countsAreConsistent())
    }

    /// A new copy of a block whose cached copy is clean replaces it dirty, in another slot: the old
    /// slot loses a live (not a dirty) block, and the old position's clean bit does not stick to
    /// the next copy put there.
    func testReplacingACleanCopyMovesItsCountsAndLeavesNoCleanBitBehind() {
        var index = CacheIndex(capacity: 32, positionsPerSlot: 8)
        index.insert(40, sectorMask: 0xFF, at: 3)
        index.markClean(at: 3)
        XCTAssertEqual(index.insert(40, sectorMask: 0x01, at: 20), 3)
        XCTAssertEqual([index.liveBlocks(inSlot: 0), index.dirtyBlocks(inSlot: 0)], [0, 0])
        XCTAssertEqual([index.liveBlocks(inSlot: 2), index.dirtyBlocks(inSlot: 2)], [1, 1])
        XCTAssertEqual(index.lookup(40)?.isDirty, true)
        index.insert(41, sectorMask: 0xFF, at: 3)
        XCTAssertEqual(index.lookup(41)?.isDirty, true, "a new copy at a position once clean is dirty")
        XCTAssertEqual(index.dirtyCount, 2)
        // Removing a clean copy takes it out of the live count only.
        index.markClean(at: 20)
        XCTAssertTrue(index.remove(at: 20))
        XCTAssertEqual([index.count, index.dirtyCount, index.liveBlocks(inSlot: 2), index.dirtyBlocks(inSlot: 2)], [1, 1, 0, 0])
        index.insert(42, sectorMask: 0xFF, at: 20)
        XCTAssertEqual(index.lookup(42)?.isDirty, true)
        XCTAssertTrue(index.countsAreConsistent())
    }

    /// A mask that would lose sectors (the copy holds client data there) is refused.
    func testShrinkingAMaskIsRefused() throws {
        try assertRefused(childTestName(), message: "a mask may only grow") {
            var index = CacheIndex(capacity: 8)
            index.insert(1, sectorMask: 0b0110, at: 0)
            index.updateMask(at: 0, to: 0b0011)
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
