import NIOCore
import SluiceFormat

/// One writeback batch: dirty blocks sorted by block number, their data, and how far the batch
/// has got writing them to the backing store.
final class WritebackBatch {
    struct Item {
        var blockNumber: UInt64
        /// Where the copy being written back is, and the segment holding it (a position is reused
        /// only after its segment is retired, so the pair names one copy forever).
        var position: CacheIndex.Position
        var segmentID: UInt64
        var sectorMask: UInt8
        /// A trim or write-zeroes of the block started: its data must never reach the backing
        /// store again.
        var discarded = false
        /// Rewritten in place (the DRAM open buffer): the data read is an older copy.
        var rewrittenInPlace = false
        var issued = false
        /// A clean cached block between two dirty ones, read only to join their writes: the
        /// backing store already holds its data, so writing it again changes nothing there.
        var isFiller = false
    }

    /// Where the batch stands: reading its data, writing it back, syncing the backing store.
    enum Phase: Equatable {
        case fetching
        case writing
        case syncing
        case finished
    }

    /// A cache-device read of positions `first ..< first + count` of one slot, straight into the
    /// data of items `firstItem ..< firstItem + count` (consecutive on the device and in the batch).
    struct Read {
        var slot: Int
        var first: CacheIndex.Position
        var count: Int
        var firstItem: Int
    }

    let trigger: WritebackBatcher.Trigger
    /// Sorted by block number; item *i*'s 4 KiB are at `i × 4096` in `memory`.
    var items: [Item]
    /// 4 KiB-aligned, so reads land in it with O_DIRECT and backing writes go out from it: the
    /// data is never copied on its way from the cache device to the backing store.
    let memory: WritebackMemory
    var phase = Phase.fetching
    /// Issuing reads or writes: completions within the call go round the running pass again.
    var pass = ReentrantPass()
    var reads: [Read] = []
    var nextRead = 0
    var readsOutstanding = 0
    var writesOutstanding = 0
    /// The next item to consider for a backing write, and the next sector of it.
    var nextItem = 0
    var nextSector = 0
    /// Block ranges of backing writes in flight (a discard of any of them must wait).
    var writesInFlight: [UInt64: Range<UInt64>] = [:]
    private var nextWriteID: UInt64 = 0
    var failure: (MediumError, String)?
    var writingStartedNs: UInt64?
    /// When the batch was collected (its whole duration counts for the opportunistic duty cycle).
    var startedNs: UInt64 = 0
    /// Items written to the backing store (issued and completed).
    var writtenItems = 0

    init(trigger: WritebackBatcher.Trigger, items: [Item], memory: WritebackMemory) {
        precondition(memory.bytes.count >= items.count * CacheGeometry.blockBytes, "writeback memory too small for the batch")
        self.trigger = trigger
        self.items = items
        self.memory = memory
    }

    /// The 4 KiB of item `index`.
    func data(ofItem index: Int, count: Int = 1) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: memory.bytes[(index * CacheGeometry.blockBytes)..<((index + count) * CacheGeometry.blockBytes)])
    }

    var allIssued: Bool { nextItem == items.count }

    /// The index of `blockNumber`'s item, if the batch has one.
    func item(for blockNumber: UInt64) -> Int? {
        var low = 0
        var high = items.count
        while low < high {
            let middle = (low + high) / 2
            if items[middle].blockNumber < blockNumber { low = middle + 1 } else { high = middle }
        }
        return low < items.count && items[low].blockNumber == blockNumber ? low : nil
    }

    /// The block's copy changed where it lies (a rewrite in place): the data read is older.
    func rewrittenInPlace(_ blockNumber: UInt64) {
        if let index = item(for: blockNumber) { items[index].rewrittenInPlace = true }
    }

    /// A discard of the block started: nothing of it may be written any more.
    func discarded(_ blockNumber: UInt64) {
        if let index = item(for: blockNumber) { items[index].discarded = true }
    }

    /// The cleaner moved the block's copy (same data) to a new place.
    func relocated(_ blockNumber: UInt64, from old: CacheIndex.Position, to position: CacheIndex.Position, segmentID: UInt64) {
        guard let index = item(for: blockNumber), items[index].position == old else { return }
        items[index].position = position
        items[index].segmentID = segmentID
    }

    /// A discard of `range` is about to go to the backing store: items not yet written are
    /// dropped (the discard supersedes them). Returns whether a backing write of the range is in
    /// flight, which the discard must wait for.
    func discardStarting(_ range: Range<UInt64>) -> Bool {
        for index in nextItem..<items.count where range.contains(items[index].blockNumber) { items[index].discarded = true }
        return writesInFlight.values.contains { $0.overlaps(range) }
    }

    func writeStarted(_ blocks: Range<UInt64>) -> UInt64 {
        nextWriteID += 1
        writesInFlight[nextWriteID] = blocks
        writesOutstanding += 1
        return nextWriteID
    }

    func writeFinished(_ id: UInt64) {
        writesInFlight[id] = nil
        writesOutstanding -= 1
    }
}

extension CacheEngine {
    /// The most bytes one backing write carries: NBD servers commonly refuse more than 32 MiB.
    static let writebackWriteBytesMax = 32 << 20
    /// The most backing writes, and cache-device reads, a batch keeps in flight.
    static let writebackWritesInFlightMax = 64
    /// ... and an opportunistic batch (the backing store looked idle): a foreground read arriving
    /// meanwhile waits behind at most this many writes on a backing store that serializes requests.
    static let opportunisticWritesInFlightMax = 8
    static let writebackReadsInFlightMax = 64

    /// Starts a writeback batch if the batcher wants one now.
    func stepWriteback() {
        if !writeBackAllWaiters.isEmpty { stepWriteBackAll() }
        guard batch == nil, failure == nil, lifecycle.acceptsRequests || !writeBackAllWaiters.isEmpty else { return }
        let now = clock.nowNs
        let situation = WritebackBatcher.Situation(
            nowNs: now, dirtyBlocks: index.dirtyCount, cacheBlocks: geometry.cacheBlocks, writeBackAll: !writeBackAllWaiters.isEmpty,
            tailNeedsWriteback: tailNeedsWriteback, spaceIsShort: spaceIsShort,
            oldestDirtyOpenedAtNs: oldestDirtySegmentID().map { ring.openedAtNs(of: $0) },
            backingBusyPercent: backingLoad.busyPercent(nowNs: now), discardPassingDown: discards.isPassingDown,
            blocksPerSegment: geometry.dataBlocksPerSegment, tunables: writebackTunables)
        guard let (trigger, selection, maxBlocks) = writeback.next(situation) else { return }
        let items = collectWriteback(selection, maxBlocks: maxBlocks)
        guard !items.isEmpty else { return }
        let batch = WritebackBatch(trigger: trigger, items: items, memory: writebackMemory(forBlocks: items.count))
        batch.startedNs = now
        self.batch = batch
        fetchWritebackData(batch)
    }

    /// The oldest sealed segment holding a dirty block, if any.
    private func oldestDirtySegmentID() -> UInt64? {
        guard index.dirtyCount > 0 else { return nil }
        var id = ring.reclaimedThroughID + 1
        while id < ring.nextSegmentID {
            if index.dirtyBlocks(inSlot: ring.slot(of: id)) > 0 { return id }
            id += 1
        }
        return nil
    }

    /// The dirty blocks a batch takes, sorted by block number. Only sealed segments are
    /// candidates: a block in the open DRAM buffer may still change in place.
    private func collectWriteback(_ selection: WritebackBatcher.Selection, maxBlocks: Int) -> [WritebackBatch.Item] {
        let openID = buffers.open?.segmentID ?? ring.nextSegmentID
        var items: [WritebackBatch.Item] = []
        switch selection {
        case .oldest(let openedBeforeNs):
            items = collectOldest(openedBeforeNs: openedBeforeNs, below: openID, maxBlocks: maxBlocks)
        case .blockOrder(let from):
            items = collectInBlockOrder(from: from, below: openID, maxBlocks: maxBlocks)
            if items.isEmpty && from > 0 {
                writeback.sweepWrapped()
                items = collectInBlockOrder(from: 0, below: openID, maxBlocks: maxBlocks)
            }
            if let last = items.last { writeback.sweptThrough(last.blockNumber) }
        }
        return items
    }

    /// For the ring's tail and `max_age`: dirty blocks of the oldest segments, at most a few more
    /// than the cleaner needs to reclaim the tail without relocating most of it (each is a random
    /// write on a slow disk, so a small batch comes back soon), each with the dirty blocks next
    /// to it in block order, which join its backing write for free; sorted by block number.
    private func collectOldest(openedBeforeNs: UInt64?, below openID: UInt64, maxBlocks: Int) -> [WritebackBatch.Item] {
        let oldestBlocks = min(maxBlocks, geometry.dataBlocksPerSegment * Cleaner.relocationYieldPercentMin / 100 + 8)
        var items: [WritebackBatch.Item] = []
        var taken = Set<UInt64>()
        var id = ring.reclaimedThroughID + 1
        while id < openID, items.count < oldestBlocks {
            if let openedBeforeNs, ring.openedAtNs(of: id) >= openedBeforeNs { break }
            let segmentID = id
            index.forEachDirty(in: index.positions(ofSlot: ring.slot(of: id))) { blockNumber, position in
                guard items.count < oldestBlocks, taken.insert(blockNumber).inserted else { return }
                items.append(WritebackBatch.Item(blockNumber: blockNumber, position: position, segmentID: segmentID,
                                                 sectorMask: index.resident(at: position)!.sectorMask))
            }
            id += 1
        }
        for item in items where items.count < maxBlocks {
            for direction in [-1, 1] {
                var neighbor = item.blockNumber
                for _ in 0..<Self.writebackBridgeBlocksMax {
                    guard items.count < maxBlocks, direction > 0 || neighbor > 0 else { break }
                    neighbor = direction > 0 ? neighbor + 1 : neighbor - 1
                    guard let extra = sealedDirtyItem(neighbor, below: openID), taken.insert(neighbor).inserted else { break }
                    items.append(extra)
                }
            }
        }
        return withFillers(items.sorted { $0.blockNumber < $1.blockNumber })
    }

    /// `blockNumber`'s copy as a writeback item, if it is dirty, whole-sector-contiguous with its
    /// neighbors (full), and in a sealed segment.
    private func sealedDirtyItem(_ blockNumber: UInt64, below openID: UInt64) -> WritebackBatch.Item? {
        guard let entry = index.lookup(blockNumber), entry.isDirty, entry.sectorMask == 0xFF,
              let segmentID = ring.segmentID(inSlot: slot(of: entry.position)), segmentID < openID else { return nil }
        return WritebackBatch.Item(blockNumber: blockNumber, position: entry.position, segmentID: segmentID, sectorMask: entry.sectorMask)
    }

    /// The `maxBlocks` dirty blocks with the smallest block numbers at or after `from`, among the
    /// sealed segments before `openID`: a bounded max-heap over one pass of the index.
    private func collectInBlockOrder(from: UInt64, below openID: UInt64, maxBlocks: Int) -> [WritebackBatch.Item] {
        var heap = BoundedMaxHeap<WritebackBatch.Item>(capacity: maxBlocks) { $0.blockNumber < $1.blockNumber }
        var id = ring.reclaimedThroughID + 1
        while id < openID {
            let segmentID = id
            let slot = ring.slot(of: id)
            if index.dirtyBlocks(inSlot: slot) > 0 {
                index.forEachDirty(in: index.positions(ofSlot: slot)) { blockNumber, position in
                    guard blockNumber >= from else { return }
                    heap.offer(WritebackBatch.Item(blockNumber: blockNumber, position: position, segmentID: segmentID,
                                                   sectorMask: index.resident(at: position)!.sectorMask))
                }
            }
            id += 1
        }
        return withFillers(heap.sortedAscending())
    }

    /// Adds, between dirty blocks a few blocks apart, the clean cached blocks that join them, so
    /// the two become one backing write: a sweep over data being rewritten leaves clean blocks
    /// scattered among the dirty ones, and on a slow disk each request costs milliseconds.
    private func withFillers(_ dirty: [WritebackBatch.Item]) -> [WritebackBatch.Item] {
        guard dirty.count > 1 else { return dirty }
        var items: [WritebackBatch.Item] = []
        items.reserveCapacity(dirty.count)
        for (position, item) in dirty.enumerated() {
            if position > 0 {
                let previous = dirty[position - 1]
                let gap = item.blockNumber - previous.blockNumber - 1
                if gap > 0, gap <= UInt64(Self.writebackBridgeBlocksMax), previous.sectorMask & 0x80 != 0, item.sectorMask & 0x01 != 0,
                   let fillers = cleanFillers(previous.blockNumber + 1..<item.blockNumber) {
                    items += fillers
                }
            }
            items.append(item)
        }
        return items
    }

    /// The clean, whole cached copies of every block of `blocks`, or nil if one is missing.
    private func cleanFillers(_ blocks: Range<UInt64>) -> [WritebackBatch.Item]? {
        var fillers: [WritebackBatch.Item] = []
        for blockNumber in blocks {
            guard let entry = index.lookup(blockNumber), !entry.isDirty, entry.sectorMask == 0xFF,
                  !discards.isBeingDiscarded(blockNumber),
                  let segmentID = ring.segmentID(inSlot: slot(of: entry.position)) else { return nil }
            var filler = WritebackBatch.Item(blockNumber: blockNumber, position: entry.position, segmentID: segmentID, sectorMask: 0xFF)
            filler.isFiller = true
            fillers.append(filler)
        }
        return fillers
    }

    /// Copies each item's data from its buffer if the segment is still in memory, and plans reads
    /// of the others from the cache device, one per run of items consecutive both on the device
    /// and in the batch (a sequentially written range comes in one read).
    private func fetchWritebackData(_ batch: WritebackBatch) {
        for (itemIndex, item) in batch.items.enumerated() {
            let slot = slot(of: item.position)
            if let memory = buffers.inMemory(slot: slot, segmentID: item.segmentID) {
                memory.withBlock(at: dataIndex(of: item.position)) { batch.data(ofItem: itemIndex).copyMemory(from: $0) }
                continue
            }
            if let last = batch.reads.last, last.slot == slot, last.first + CacheIndex.Position(last.count) == item.position,
               last.firstItem + last.count == itemIndex {
                batch.reads[batch.reads.count - 1].count += 1
            } else {
                batch.reads.append(WritebackBatch.Read(slot: slot, first: item.position, count: 1, firstItem: itemIndex))
            }
        }
        issueWritebackReads(batch)
    }

    /// Keeps up to ``writebackReadsInFlightMax`` reads in flight, topping them up only once half
    /// have completed, so each submission hands the device a group (one system call for many);
    /// once all are in, the writes start.
    private func issueWritebackReads(_ batch: WritebackBatch) {
        guard batch.pass.begin() else { return }
        repeat {
            guard batch.readsOutstanding <= Self.writebackReadsInFlightMax / 2 else { continue }
            cacheDevice.submittingTogether {
                while batch.failure == nil, batch.readsOutstanding < Self.writebackReadsInFlightMax, batch.nextRead < batch.reads.count {
                    let read = batch.reads[batch.nextRead]
                    batch.nextRead += 1
                    readForWriteback(batch, read)
                }
            }
        } while batch.pass.again()
        let done = batch.nextRead == batch.reads.count || batch.failure != nil
        guard done, batch.readsOutstanding == 0, batch.phase == .fetching else { return }
        batch.phase = .writing
        issueWritebackWrites(batch)
    }

    private func readForWriteback(_ batch: WritebackBatch, _ read: WritebackBatch.Read) {
        let count = read.count * CacheGeometry.blockBytes
        batch.readsOutstanding += 1
        ring.readerStarted(slot: read.slot)
        cacheDevice.read(offset: geometry.offset(ofDataBlock: dataIndex(of: read.first), inSlot: read.slot),
                         into: batch.data(ofItem: read.firstItem, count: read.count)) { result in
            self.readerFinished(slot: read.slot)
            batch.readsOutstanding -= 1
            switch result {
            case .success:
                self.counters.cacheBytesRead += UInt64(count)
            case .failure(let error):
                self.cacheDeviceFailed(error, doing: "reading dirty blocks for writeback")
                if batch.failure == nil { batch.failure = (error, "reading dirty blocks from the cache device for writeback") }
            }
            self.issueWritebackReads(batch)
        }
    }

    /// Whether an item's copy is still the block's newest, dirty, and unchanged since it was read.
    private func isCurrent(_ item: WritebackBatch.Item) -> Bool {
        // A block in the discard the backing store already has must never be written there again.
        guard !item.discarded, !item.rewrittenInPlace, !discards.isDiscardedOnBacking(item.blockNumber), let entry = index.lookup(item.blockNumber), entry.position == item.position, entry.isDirty,
              entry.sectorMask == item.sectorMask else { return false }
        return ring.segmentID(inSlot: slot(of: item.position)) == item.segmentID
    }
}

extension CacheEngine {
    /// Issues the batch's backing writes in block order, a bounded number at a time, merging
    /// contiguous dirty sectors into one write. Each item is checked just before its write is
    /// formed: a block superseded since the batch read it is skipped, not written.
    private func writesInFlightLimit(_ batch: WritebackBatch) -> Int {
        batch.trigger == .backingIdle ? Self.opportunisticWritesInFlightMax : Self.writebackWritesInFlightMax
    }

    func issueWritebackWrites(_ batch: WritebackBatch) {
        guard batch.phase == .writing, batch.pass.begin() else { return }
        if batch.writingStartedNs == nil { batch.writingStartedNs = clock.nowNs }
        repeat {
            while batch.failure == nil, batch.writesOutstanding < writesInFlightLimit(batch), let run = nextWritebackRun(batch) {
                writeBack(batch, run)
            }
        } while batch.pass.again()
        guard batch.writesOutstanding == 0, batch.allIssued || batch.failure != nil, batch.phase == .writing else { return }
        if let (error, what) = batch.failure { return writebackFailed(batch, error, what) }
        batch.phase = .syncing
        syncWriteback(batch)
    }

    private func writeBack(_ batch: WritebackBatch, _ run: (offset: UInt64, bytes: UnsafeRawBufferPointer, blocks: Range<UInt64>, items: [Int])) {
        let writeID = batch.writeStarted(run.blocks)
        counters.backingWriteRequests += 1
        let length = run.bytes.count
        // The batch's memory stays put until the batch ends, after every write has completed.
        backingStore.write(offset: run.offset, unownedBytes: run.bytes) { result in
            batch.writeFinished(writeID)
            switch result {
            case .success:
                self.counters.backingBytesWritten += UInt64(length)
                batch.writtenItems += run.items.count
            case .failure(let error):
                if batch.failure == nil { batch.failure = (error, "writing back to the backing store") }
            }
            self.issueWritebackWrites(batch)
            // A discard may be waiting for this write.
            self.drive()
        }
    }

    /// Superseded blocks (rewritten since the batch read them) are skipped, but one that lies
    /// between current blocks of a run is written with it, up to this many in a row, and so are
    /// clean cached blocks the batch took to fill gaps: on a slow disk a request costs
    /// milliseconds and a block microseconds, so splitting a run costs far more than writing an
    /// older copy the newer one will overwrite, or a copy the backing store already holds.
    /// Neither is marked clean. A discarded block is never written.
    static let writebackBridgeBlocksMax = 64

    /// The next run of contiguous sectors to write: its offset, a slice of the batch's data (items
    /// are laid out in block order, so a run contiguous on the backing store is contiguous there
    /// too), its block range, and the items it starts. An item whose mask has holes is written as
    /// several runs; whether it is current is checked before its first run.
    private func nextWritebackRun(_ batch: WritebackBatch) -> (offset: UInt64, bytes: UnsafeRawBufferPointer, blocks: Range<UInt64>, items: [Int])? {
        var run = WritebackRun()
        while batch.nextItem < batch.items.count {
            let itemIndex = batch.nextItem
            let item = batch.items[itemIndex]
            if bypass.covers(item.blockNumber) && batch.nextSector == 0 && !item.issued {
                // A bypass write of the block is at the backing store: this copy (dirty since, or
                // older) waits for a later batch, so the two never race there.
                if run.isStarted { break }
                batch.nextItem += 1
                continue
            }
            if item.discarded || discards.isDiscardedOnBacking(item.blockNumber) {
                // Never written, not even the rest of an item whose first run went out.
                if run.isStarted { break }
                if batch.nextSector == 0 { skipWriteback(item) }
                batch.nextItem += 1
                batch.nextSector = 0
                continue
            }
            let current = !item.isFiller && (batch.nextSector > 0 || item.issued || isCurrent(item))
            guard let (sector, count) = SectorRuns.first(in: item.sectorMask, from: batch.nextSector) else {
                batch.nextItem += 1
                batch.nextSector = 0
                continue
            }
            let offset = item.blockNumber * UInt64(CacheGeometry.blockBytes) + UInt64(sector * CacheGeometry.sectorBytes)
            let dataOffset = itemIndex * CacheGeometry.blockBytes + sector * CacheGeometry.sectorBytes
            if !current && !(run.canBridge(offset: offset, dataOffset: dataOffset) && run.bridged < Self.writebackBridgeBlocksMax) {
                if run.isStarted { break }
                if !item.isFiller { skipWriteback(item) }
                batch.nextItem += 1
                continue
            }
            guard run.append(offset: offset, dataOffset: dataOffset, length: count * CacheGeometry.sectorBytes,
                             maxBytes: Self.writebackWriteBytesMax) else { break }
            run.noteItem(itemIndex, blockNumber: item.blockNumber, current: current, batch: batch)
            batch.nextSector = sector + count
            // A run ending inside the block cannot continue into the next block.
            if sector + count < CacheGeometry.sectorsPerBlock { break }
            batch.nextItem += 1
            batch.nextSector = 0
        }
        return run.finish(batch)
    }

    /// An item not written because it is no longer current. One in the discard the backing store
    /// already has is clean: the discard, synced, supersedes it there.
    private func skipWriteback(_ item: WritebackBatch.Item) {
        counters.writebackSkippedBlocks += 1
        guard !item.discarded, discards.isDiscardedOnBacking(item.blockNumber),
              let entry = index.lookup(item.blockNumber), entry.position == item.position, entry.isDirty else { return }
        index.markClean(at: item.position)
    }

    /// The backing store is synced before anything is marked clean.
    private func syncWriteback(_ batch: WritebackBatch) {
        backingStore.synchronize { result in
            self.counters.backingSyncs += 1
            switch result {
            case .success: self.finishWriteback(batch)
            case .failure(let error): self.writebackFailed(batch, error, "syncing the backing store after writeback")
            }
        }
    }

    /// Marks clean every written item whose copy is still the block's newest: the backing store
    /// holds exactly that data, synced. A copy superseded meanwhile stays as it is.
    private func finishWriteback(_ batch: WritebackBatch) {
        precondition(self.batch === batch && batch.phase == .syncing, "a writeback batch finished that is not the one in flight")
        batch.phase = .finished
        var cleaned: UInt64 = 0
        for item in batch.items where item.issued && isCurrent(item) {
            if index.markClean(at: item.position) { cleaned += 1 }
        }
        counters.writtenBackBlocks += cleaned
        counters.lastBatchWrittenBackBlocks = cleaned
        counters.writebackBatches += 1
        writeback.finished(blocks: batch.items.count, durationNs: clock.nowNs &- (batch.startedNs), nowNs: clock.nowNs)
        self.batch = nil
        spareWritebackMemory = batch.memory
        drive()
    }

    /// A writeback step failed. The data is still safe in the cache; a new batch starts a second
    /// later, and nothing was marked clean.
    private func writebackFailed(_ batch: WritebackBatch, _ error: MediumError, _ what: String) {
        precondition(self.batch === batch && batch.phase != .finished, "a writeback batch failed that is not the one in flight")
        batch.phase = .finished
        counters.writebackErrors += 1
        if !lifecycle.isPoweredOff {
            logger.error("writeback of \(batch.items.count) blocks failed while \(what): \(error); retrying in 1 s")
        }
        writeback.failed(nowNs: clock.nowNs)
        self.batch = nil
        spareWritebackMemory = batch.memory
        drive()
    }

    // MARK: Writing everything back

    /// Writes every dirty block back, syncs the backing store, retires every segment, and
    /// completes when the cache holds nothing (what `sluice drain` and the offline drain do).
    public func writeBackAll(completion: @escaping (Result<Void, Error>) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failure(failure)) }
        writeBackAllWaiters.append(completion)
        drive()
    }

    /// Seals the open segment so its blocks can be written back and retired, and answers the
    /// waiters once nothing is left: no dirty block, no cached block, every segment retired.
    private func stepWriteBackAll() {
        if let failure {
            let waiters = writeBackAllWaiters
            writeBackAllWaiters.removeAll()
            for waiter in waiters { waiter(.failure(failure)) }
            return
        }
        let openHoldsData = buffers.open.map { !$0.isEmpty } ?? false
        if openHoldsData, !barriers.isGathering { return addBarrierWaiter { _ in } }
        guard index.count == 0, !openHoldsData, ring.retiredThroughID == newestAppendedSegmentID, relocation == nil else { return }
        let waiters = writeBackAllWaiters
        writeBackAllWaiters.removeAll()
        for waiter in waiters { waiter(.success(())) }
    }
}

/// The aligned memory a writeback batch holds its data in, kept for the next batch.
final class WritebackMemory {
    let bytes: UnsafeMutableRawBufferPointer

    init(blocks: Int) {
        bytes = .allocate(byteCount: blocks * CacheGeometry.blockBytes, alignment: CacheGeometry.blockBytes)
    }

    deinit { bytes.deallocate() }
}

extension CacheEngine {
    /// The spare batch memory if it is large enough, otherwise new memory (the spare is dropped):
    /// a steady stream of batches allocates and faults in nothing.
    func writebackMemory(forBlocks blocks: Int) -> WritebackMemory {
        if let spare = spareWritebackMemory, spare.bytes.count >= blocks * CacheGeometry.blockBytes {
            spareWritebackMemory = nil
            return spare
        }
        spareWritebackMemory = nil
        return WritebackMemory(blocks: max(blocks, Self.writebackMemoryBlocksMin))
    }

    static let writebackMemoryBlocksMin = 2048
}

/// Measures how busy the backing store is with foreground work (read misses, discards): the share
/// of the last second during which at least one such request was in flight. Writeback's own
/// requests are not counted, or writeback would throttle itself.
struct BackingLoadMeter {
    private var inFlight = 0
    private var busySinceNs: UInt64 = 0
    private var busyNs: UInt64 = 0
    private var windowStartNs: UInt64 = 0
    private var lastPercent = 0

    mutating func begin(nowNs: UInt64) {
        if inFlight == 0 { busySinceNs = nowNs }
        inFlight += 1
    }

    mutating func end(nowNs: UInt64) {
        precondition(inFlight > 0)
        inFlight -= 1
        if inFlight == 0 { busyNs += nowNs &- busySinceNs }
    }

    mutating func busyPercent(nowNs: UInt64) -> Int {
        let elapsed = nowNs &- windowStartNs
        var busy = busyNs
        if inFlight > 0 { busy += nowNs &- busySinceNs }
        guard elapsed >= 1_000_000_000 else { return max(lastPercent, Int(min(100, busy * 100 / max(elapsed, 1)))) }
        lastPercent = Int(min(100, busy * 100 / elapsed))
        windowStartNs = nowNs
        busyNs = 0
        if inFlight > 0 { busySinceNs = nowNs }
        return lastPercent
    }
}

/// Keeps the `capacity` smallest elements offered (by `isLess`), in one pass and O(capacity)
/// memory: a max-heap whose root is the largest kept.
struct BoundedMaxHeap<Element> {
    private var storage: [Element] = []
    let capacity: Int
    private let isLess: (Element, Element) -> Bool

    init(capacity: Int, isLess: @escaping (Element, Element) -> Bool) {
        precondition(capacity > 0)
        self.capacity = capacity
        self.isLess = isLess
        storage.reserveCapacity(min(capacity, 1 << 16))
    }

    mutating func offer(_ element: Element) {
        if storage.count < capacity {
            storage.append(element)
            siftUp(storage.count - 1)
        } else if isLess(element, storage[0]) {
            storage[0] = element
            siftDown(0)
        }
    }

    func sortedAscending() -> [Element] { storage.sorted(by: isLess) }

    private mutating func siftUp(_ start: Int) {
        var child = start
        while child > 0 {
            let parent = (child - 1) / 2
            guard isLess(storage[parent], storage[child]) else { return }
            storage.swapAt(parent, child)
            child = parent
        }
    }

    private mutating func siftDown(_ start: Int) {
        var parent = start
        while true {
            let left = 2 * parent + 1
            guard left < storage.count else { return }
            var largest = left
            if left + 1 < storage.count, isLess(storage[left], storage[left + 1]) { largest = left + 1 }
            guard isLess(storage[parent], storage[largest]) else { return }
            storage.swapAt(parent, largest)
            parent = largest
        }
    }
}

/// A backing write being formed: contiguous on the backing store and in the batch's data.
struct WritebackRun {
    private var start: (offset: UInt64, dataOffset: Int)?
    private var lengthBytes = 0
    /// Up to the end of the last current item: a run never ends with superseded blocks.
    private var currentLengthBytes = 0
    private var items: [Int] = []
    private var lastCurrentItem: Int?
    private var lastBlock: UInt64 = 0
    /// Superseded blocks bridged in a row.
    private(set) var bridged = 0

    var isStarted: Bool { start != nil }

    func canBridge(offset: UInt64, dataOffset: Int) -> Bool {
        guard let start else { return false }
        return start.offset + UInt64(lengthBytes) == offset && start.dataOffset + lengthBytes == dataOffset
    }

    /// Adds sectors if they continue the run and fit.
    mutating func append(offset: UInt64, dataOffset: Int, length: Int, maxBytes: Int) -> Bool {
        if start != nil {
            guard canBridge(offset: offset, dataOffset: dataOffset), lengthBytes + length <= maxBytes else { return false }
        } else {
            start = (offset, dataOffset)
        }
        lengthBytes += length
        return true
    }

    mutating func noteItem(_ index: Int, blockNumber: UInt64, current: Bool, batch: WritebackBatch) {
        if current {
            currentLengthBytes = lengthBytes
            lastCurrentItem = index
            lastBlock = blockNumber
            bridged = 0
            if !batch.items[index].issued {
                batch.items[index].issued = true
                items.append(index)
            }
        } else {
            bridged += 1
        }
    }

    /// The run up to its last current item; the bridged blocks after it are given back (the next
    /// run skips them).
    func finish(_ batch: WritebackBatch) -> (offset: UInt64, bytes: UnsafeRawBufferPointer, blocks: Range<UInt64>, items: [Int])? {
        guard let start, let lastCurrentItem else { return nil }
        if bridged > 0 {
            batch.nextItem = lastCurrentItem + 1
            batch.nextSector = 0
        }
        let firstBlock = start.offset / UInt64(CacheGeometry.blockBytes)
        let bytes = UnsafeRawBufferPointer(rebasing: batch.memory.bytes[start.dataOffset..<(start.dataOffset + currentLengthBytes)])
        return (start.offset, bytes, firstBlock..<(lastBlock + 1), items)
    }
}
