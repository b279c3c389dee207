import SluiceFormat
import SluiceTesting
import XCTest

@testable import SluiceCache

/// The bounded max-heap that picks a block-order batch: the `capacity` smallest block numbers at
/// or after the sweep's cursor, in one pass over the index.
final class BoundedMaxHeapTests: XCTestCase {
    private struct Item {
        var key: UInt64
        var serial: Int
    }

    /// Random streams (empty, shorter than the capacity, much longer, with many equal keys): the
    /// heap keeps exactly the k smallest keys, in ascending order, and the elements it keeps are
    /// ones that were offered.
    func testKeepsExactlyTheKSmallestOfARandomStreamInOrder() {
        for seed in 1...200 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let capacity = random.range(1...40)
            let length = random.below(300)
            let keySpace = random.chance(30) ? 8 : 10_000
            var heap = BoundedMaxHeap<Item>(capacity: capacity) { $0.key < $1.key }
            var stream: [Item] = []
            for serial in 0..<length {
                let item = Item(key: random.next() % UInt64(keySpace), serial: serial)
                stream.append(item)
                heap.offer(item)
            }
            let kept = heap.sortedAscending()
            let context = "seed \(seed): capacity \(capacity), \(length) offered"
            XCTAssertEqual(kept.map(\.key), Array(stream.map(\.key).sorted().prefix(capacity)), context)
            for item in kept {
                XCTAssertEqual(stream[item.serial].key, item.key, "\(context): an element that was never offered")
            }
            XCTAssertEqual(Set(kept.map(\.serial)).count, kept.count, "\(context): an element kept twice")
        }
    }

    /// A capacity of one keeps the minimum; ascending and descending streams (the heap's worst
    /// cases for sifting) come out right.
    func testCapacityOneAndSortedStreams() {
        var one = BoundedMaxHeap<Int>(capacity: 1, isLess: <)
        for value in [5, 9, 3, 7, 3, 8] { one.offer(value) }
        XCTAssertEqual(one.sortedAscending(), [3])
        var ascending = BoundedMaxHeap<Int>(capacity: 5, isLess: <)
        var descending = BoundedMaxHeap<Int>(capacity: 5, isLess: <)
        for value in 0..<100 {
            ascending.offer(value)
            descending.offer(99 - value)
        }
        XCTAssertEqual(ascending.sortedAscending(), [0, 1, 2, 3, 4])
        XCTAssertEqual(descending.sortedAscending(), [0, 1, 2, 3, 4])
    }
}

/// ``WritebackRun`` forms one backing write: contiguous on the backing store and in the batch's
/// memory; superseded blocks between current ones may be bridged, but a run never ends with them.
/// These tests feed it items the way `nextWritebackRun` does.
final class WritebackRunTests: XCTestCase {
    private let blockBytes = CacheGeometry.blockBytes
    private let sectorBytes = CacheGeometry.sectorBytes

    /// A batch of whole blocks `blocks`, item i's data at i × 4 KiB.
    private func batch(_ blocks: [UInt64]) -> WritebackBatch {
        let items = blocks.enumerated().map { index, block in
            WritebackBatch.Item(blockNumber: block, position: CacheIndex.Position(index), segmentID: 1, sectorMask: 0xFF)
        }
        return WritebackBatch(trigger: .dirtyTarget, items: items, memory: WritebackMemory(blocks: max(1, blocks.count)))
    }

    /// Appends whole items `range` of `batch` to `run` (current or bridged as `current` says), as
    /// the engine does; returns how many it took before the run refused one.
    @discardableResult
    private func feed(_ run: inout WritebackRun, _ batch: WritebackBatch, _ range: Range<Int>, current: (Int) -> Bool,
                      maxBytes: Int = 32 << 20) -> Int {
        var taken = 0
        for index in range {
            let offset = batch.items[index].blockNumber * UInt64(blockBytes)
            guard run.append(offset: offset, dataOffset: index * blockBytes, length: blockBytes, maxBytes: maxBytes) else { break }
            run.noteItem(index, blockNumber: batch.items[index].blockNumber, current: current(index), batch: batch)
            batch.nextItem = index + 1
            taken += 1
        }
        return taken
    }

    /// current, bridged, current, bridged, bridged: the write covers the first three blocks, starts
    /// only the two current items, and gives the trailing bridged blocks back to the next run.
    func testARunEndsAtItsLastCurrentItemAndGivesTrailingBridgedBlocksBack() {
        let batch = batch([10, 11, 12, 13, 14])
        var run = WritebackRun()
        let currents: Set<Int> = [0, 2]
        feed(&run, batch, 0..<5) { currents.contains($0) }
        XCTAssertEqual(run.bridged, 2)
        XCTAssertEqual(batch.nextItem, 5)
        guard let write = run.finish(batch) else { return XCTFail("a run with current items must make a write") }
        XCTAssertEqual(write.offset, 10 * UInt64(blockBytes))
        XCTAssertEqual(write.bytes.count, 3 * blockBytes, "the write must not end with the bridged blocks 13 and 14")
        XCTAssertEqual(write.bytes.baseAddress, UnsafeRawPointer(batch.memory.bytes.baseAddress!))
        XCTAssertEqual(write.blocks, 10..<13)
        XCTAssertEqual(write.items, [0, 2])
        XCTAssertEqual(batch.items.map(\.issued), [true, false, true, false, false], "bridged blocks are never issued (never marked clean)")
        XCTAssertEqual(batch.nextItem, 3, "the next run starts after the last current item")
        XCTAssertEqual(batch.nextSector, 0)
    }

    /// A run that ends on a current item leaves the batch's position where the loop put it.
    func testARunEndingOnACurrentItemLeavesThePositionAlone() {
        let batch = batch([4, 5, 6])
        var run = WritebackRun()
        feed(&run, batch, 0..<3) { $0 != 1 }
        XCTAssertEqual(run.bridged, 0, "a current item ends the bridged stretch")
        let write = run.finish(batch)
        XCTAssertEqual(write?.blocks, 4..<7)
        XCTAssertEqual(write?.bytes.count, 3 * blockBytes)
        XCTAssertEqual(batch.nextItem, 3)
    }

    /// Nothing current, nothing to write.
    func testARunWithoutACurrentItemMakesNoWrite() {
        let empty = batch([1])
        XCTAssertNil(WritebackRun().finish(empty))
        var run = WritebackRun()
        feed(&run, empty, 0..<1) { _ in false }
        XCTAssertNil(run.finish(empty))
        XCTAssertFalse(empty.items[0].issued)
    }

    /// A run joins only what continues it on the backing store and in memory, and stays within the
    /// largest write; an unstarted run bridges nothing.
    func testARunTakesOnlyContiguousSectorsWithinTheLargestWrite() {
        var run = WritebackRun()
        XCTAssertFalse(run.isStarted)
        XCTAssertFalse(run.canBridge(offset: 0, dataOffset: 0), "nothing to bridge from")
        XCTAssertTrue(run.append(offset: 8192, dataOffset: 4096, length: 4096, maxBytes: 12_288))
        XCTAssertTrue(run.isStarted)
        XCTAssertFalse(run.canBridge(offset: 16_384, dataOffset: 8192), "a hole on the backing store")
        XCTAssertFalse(run.append(offset: 16_384, dataOffset: 8192, length: 4096, maxBytes: 12_288))
        XCTAssertFalse(run.append(offset: 12_288, dataOffset: 12_288, length: 4096, maxBytes: 12_288), "a hole in memory")
        XCTAssertTrue(run.append(offset: 12_288, dataOffset: 8192, length: 4096, maxBytes: 12_288))
        XCTAssertTrue(run.append(offset: 16_384, dataOffset: 12_288, length: 4096, maxBytes: 12_288))
        XCTAssertFalse(run.append(offset: 20_480, dataOffset: 16_384, length: 512, maxBytes: 12_288), "past the largest write")
    }

    /// Partial blocks: a run of sectors 2–4 of one block writes exactly those sectors, from the
    /// same place in the block's memory; the item's second run (sectors 6–7) does not start it again.
    func testAPartialBlockWritesOnlyItsSectors() {
        let batch = batch([3])
        var run = WritebackRun()
        XCTAssertTrue(run.append(offset: 3 * UInt64(blockBytes) + 2 * UInt64(sectorBytes), dataOffset: 2 * sectorBytes,
                                 length: 3 * sectorBytes, maxBytes: 32 << 20))
        run.noteItem(0, blockNumber: 3, current: true, batch: batch)
        let first = run.finish(batch)
        XCTAssertEqual(first?.offset, 3 * UInt64(blockBytes) + 2 * UInt64(sectorBytes))
        XCTAssertEqual(first?.bytes.count, 3 * sectorBytes)
        XCTAssertEqual(first?.bytes.baseAddress, UnsafeRawPointer(batch.memory.bytes.baseAddress! + 2 * sectorBytes))
        XCTAssertEqual(first?.blocks, 3..<4)
        XCTAssertEqual(first?.items, [0])
        var second = WritebackRun()
        XCTAssertTrue(second.append(offset: 3 * UInt64(blockBytes) + 6 * UInt64(sectorBytes), dataOffset: 6 * sectorBytes,
                                    length: 2 * sectorBytes, maxBytes: 32 << 20))
        second.noteItem(0, blockNumber: 3, current: true, batch: batch)
        XCTAssertEqual(second.finish(batch)?.items, [], "an item already issued is not counted twice")
    }

    /// Random patterns of current and superseded contiguous blocks, cut by random write sizes: every
    /// run starts at the batch's position, ends exactly at its last current block, starts each
    /// current item once, and over the whole batch every current item is written exactly once and
    /// no superseded one is issued.
    func testRunsCoverEveryCurrentItemOnceAndNeverEndBridged() {
        for seed in 1...100 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let count = random.range(1...24)
            let first = UInt64(random.below(1_000))
            let batch = batch((0..<count).map { first + UInt64($0) })
            var currents = Set((0..<count).filter { _ in random.chance(60) })
            if currents.isEmpty { currents.insert(random.below(count)) }
            let maxBytes = random.range(1...6) * blockBytes
            var written: [Int] = []
            var writes = 0
            while batch.nextItem < count, writes < 100 {
                // The engine skips a superseded item that cannot be bridged (no run started).
                while batch.nextItem < count, !currents.contains(batch.nextItem) { batch.nextItem += 1 }
                guard batch.nextItem < count else { break }
                let start = batch.nextItem
                var run = WritebackRun()
                feed(&run, batch, start..<count, current: { currents.contains($0) }, maxBytes: maxBytes)
                guard let write = run.finish(batch) else { return XCTFail("seed \(seed): no write from a current item") }
                writes += 1
                let last = write.items.last ?? start
                let context = "seed \(seed): write from item \(start)"
                XCTAssertEqual(write.offset, batch.items[start].blockNumber * UInt64(blockBytes), context)
                XCTAssertEqual(write.blocks, batch.items[start].blockNumber..<(batch.items[last].blockNumber + 1), context)
                XCTAssertEqual(write.bytes.count, (last - start + 1) * blockBytes, context)
                XCTAssertLessThanOrEqual(write.bytes.count, maxBytes, context)
                XCTAssertTrue(write.items.allSatisfy { currents.contains($0) }, context)
                XCTAssertEqual(write.items, write.items.sorted(), context)
                XCTAssertEqual(batch.nextItem, last + 1, "\(context): the next run must start right after the last current item")
                written += write.items
            }
            XCTAssertEqual(written, currents.sorted(), "seed \(seed): current items written, in order, once each")
            XCTAssertEqual(Set(batch.items.indices.filter { batch.items[$0].issued }), currents, "seed \(seed)")
        }
    }
}
