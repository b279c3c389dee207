import NIOCore
import SluiceFormat

/// One writeback batch: the oldest sealed segments, their live blocks sorted by block number.
final class WritebackBatch {
    let firstID: UInt64
    let lastID: UInt64
    /// Live blocks at collection time, sorted by block number once the data is in.
    var items: [(blockNumber: UInt64, position: CacheIndex.Position, sectorMask: UInt8)] = []
    /// The data blocks read from each slot, from data block 0 up to its last live block.
    var slotData: [Int: ByteBuffer] = [:]
    var readsOutstanding = 0
    var writesOutstanding = 0
    var writesToIssue: [(offset: UInt64, bytes: ByteBuffer)] = []
    var nextWrite = 0
    var failure: (MediumError, String)?
    var isFinished = false
    /// The batch's data is on the backing store and synced; only the record is left.
    var backingWritesDone = false
    /// The smallest and largest block numbers in the batch, for quick overlap checks.
    var lowestBlock = UInt64.max
    var highestBlock: UInt64 = 0
    var sortedBlockNumbers: [UInt64] = []

    init(firstID: UInt64, lastID: UInt64) {
        self.firstID = firstID
        self.lastID = lastID
    }

    /// Whether any block in `range` is being written back by this batch.
    func overlaps(_ range: Range<UInt64>) -> Bool {
        guard !range.isEmpty, range.lowerBound <= highestBlock, range.upperBound > lowestBlock else { return false }
        // Binary search for the first block number at or after the range's start.
        var low = 0
        var high = sortedBlockNumbers.count
        while low < high {
            let middle = (low + high) / 2
            if sortedBlockNumbers[middle] < range.lowerBound { low = middle + 1 } else { high = middle }
        }
        return low < sortedBlockNumbers.count && sortedBlockNumbers[low] < range.upperBound
    }
}

extension CacheEngine {
    /// The most bytes one backing write carries: NBD servers commonly refuse more than 32 MiB, and
    /// a default batch (32 segments of 1 MiB) holds less dirty data than that, so a contiguous run
    /// is never split into two requests.
    static let writebackWriteBytesMax = 32 << 20
    /// The most backing writes a batch keeps in flight.
    static let writebackWritesInFlightMax = 64

    /// Starts a writeback batch if there is work and it is allowed now: always when urged (free
    /// segments short, writers waiting, a drain), otherwise only while the backing store's
    /// foreground load is under `writeback_threshold`.
    func kickWriteback() {
        guard writeback == nil, failure == nil, discardsInFlight == 0, !recordWriteInFlight,
              !isClosing || !drainWaiters.isEmpty, uptimeNs() >= writebackRetryNotBeforeNs else { return }
        if writtenThroughID == lastWrittenBackID {
            // Nothing sealed is on the device. A drain still needs the open buffer written.
            if !drainWaiters.isEmpty {
                if index.count == 0 {
                    let waiters = drainWaiters
                    drainWaiters.removeAll()
                    for waiter in waiters { waiter(.success(())) }
                } else if openBuffer.map({ !$0.isEmpty }) ?? false, !barrierScheduled {
                    addBarrierWaiter { _ in }
                }
            }
            return
        }
        let urgent = !drainWaiters.isEmpty || isWaitingForRing
            || freeSegments <= max(2, geometry.segmentCount / 8)
        if !urgent {
            guard tunables.writebackThresholdPercent > 0,
                  backingLoad.busyPercent(nowNs: uptimeNs()) < tunables.writebackThresholdPercent else { return }
        }
        let lastID = min(writtenThroughID, lastWrittenBackID + UInt64(tunables.maxBatchedWritebackSegments))
        startWriteback(firstID: lastWrittenBackID + 1, lastID: lastID)
    }

    private func startWriteback(firstID: UInt64, lastID: UInt64) {
        let batch = WritebackBatch(firstID: firstID, lastID: lastID)
        writeback = batch
        var lastLiveIndex: [Int: Int] = [:]
        for id in firstID...lastID {
            let slot = geometry.slot(ofSegment: id)
            let first = firstPosition(ofSlot: slot)
            for dataIndex in 0..<geometry.dataBlocksPerSegment {
                let position = CacheIndex.Position(first + dataIndex)
                guard let resident = index.resident(at: position) else { continue }
                if isDiscardedOnBacking(resident.blockNumber) {
                    // The discard at the head of the queue is on the backing store, synced, and
                    // waits for ring space to place this block's marker. Its newest copy is in this
                    // batch, so retiring the batch removes every copy from the log: drop it.
                    index.remove(at: position)
                    continue
                }
                batch.items.append((resident.blockNumber, position, resident.sectorMask))
                lastLiveIndex[slot] = dataIndex
            }
        }
        batch.sortedBlockNumbers = batch.items.map(\.blockNumber).sorted()
        batch.lowestBlock = batch.sortedBlockNumbers.first ?? .max
        batch.highestBlock = batch.sortedBlockNumbers.last ?? 0
        guard !lastLiveIndex.isEmpty else {
            // Every block of these segments was superseded or discarded: only the record moves.
            return finishWriteback(batch)
        }
        batch.readsOutstanding = lastLiveIndex.count
        for (slot, lastIndex) in lastLiveIndex {
            let count = (lastIndex + 1) * CacheGeometry.blockBytes
            cacheDevice.read(offset: geometry.offset(ofDataBlock: 0, inSlot: slot), count: count) { result in
                batch.readsOutstanding -= 1
                switch result {
                case .success(let bytes):
                    self.counters.cacheBytesRead += UInt64(count)
                    batch.slotData[slot] = bytes
                case .failure(let error):
                    if batch.failure == nil { batch.failure = (error, "reading segment data for writeback") }
                }
                if batch.readsOutstanding == 0 { self.writeBatchBack(batch) }
            }
        }
    }

    /// Sorts the batch, merges contiguous dirty sectors into runs, and writes each run with one
    /// backing write.
    private func writeBatchBack(_ batch: WritebackBatch) {
        if let (error, what) = batch.failure { return writebackFailed(batch, error, what) }
        batch.items.sort { $0.blockNumber < $1.blockNumber }
        var runOffset: UInt64 = 0
        var run = ByteBuffer()
        func closeRun() {
            if run.readableBytes > 0 { batch.writesToIssue.append((runOffset, run)) }
            run = ByteBuffer()
        }
        for item in batch.items {
            let slot = slot(of: item.position)
            let dataIndex = Int(item.position) - firstPosition(ofSlot: slot)
            let blockOffset = item.blockNumber * UInt64(CacheGeometry.blockBytes)
            let data = batch.slotData[slot]!
            forEachSectorRun(item.sectorMask) { sector, count in
                let offset = blockOffset + UInt64(sector * 512)
                let length = count * 512
                if run.readableBytes == 0 || runOffset + UInt64(run.readableBytes) != offset
                    || run.readableBytes + length > Self.writebackWriteBytesMax {
                    closeRun()
                    runOffset = offset
                    run = ByteBufferAllocator().buffer(capacity: min(Self.writebackWriteBytesMax, 64 * 1024))
                }
                let source = dataIndex * CacheGeometry.blockBytes + sector * 512
                run.writeImmutableBuffer(data.getSlice(at: data.readerIndex + source, length: length)!)
            }
        }
        closeRun()
        batch.slotData.removeAll()
        counters.backingWriteRequests += UInt64(batch.writesToIssue.count)
        issueWritebackWrites(batch)
    }

    private func issueWritebackWrites(_ batch: WritebackBatch) {
        // After a failure nothing more is issued; the batch ends once what is out has returned.
        while batch.failure == nil, batch.nextWrite < batch.writesToIssue.count,
              batch.writesOutstanding < Self.writebackWritesInFlightMax {
            let (offset, bytes) = batch.writesToIssue[batch.nextWrite]
            batch.writesToIssue[batch.nextWrite].bytes = ByteBuffer()
            batch.nextWrite += 1
            batch.writesOutstanding += 1
            let length = bytes.readableBytes
            backingStore.write(offset: offset, bytes: bytes) { result in
                batch.writesOutstanding -= 1
                switch result {
                case .success: self.counters.backingBytesWritten += UInt64(length)
                case .failure(let error):
                    if batch.failure == nil { batch.failure = (error, "writing back to the backing store") }
                }
                if batch.nextWrite < batch.writesToIssue.count, batch.failure == nil {
                    self.issueWritebackWrites(batch)
                } else if batch.writesOutstanding == 0 {
                    self.syncBatch(batch)
                }
            }
        }
        if batch.writesToIssue.isEmpty { syncBatch(batch) }
    }

    /// The backing store is synced before anything is marked clean, recorded or reused.
    private func syncBatch(_ batch: WritebackBatch) {
        if let (error, what) = batch.failure { return writebackFailed(batch, error, what) }
        backingStore.synchronize { result in
            self.counters.backingSyncs += 1
            switch result {
            case .success:
                batch.backingWritesDone = true
                // A discard waiting for these writes may go on.
                self.processWaitingUpdates()
                self.finishWriteback(batch)
            case .failure(let error): self.writebackFailed(batch, error, "syncing the backing store after writeback")
            }
        }
    }

    /// Makes every superseding copy and discard marker durable, records the progress durably, then
    /// forgets the written-back blocks and frees the segments.
    ///
    /// The batch skipped copies that newer writes or discards had superseded. Until those newer
    /// copies and markers are durable, the older copies are the durable truth: if the record
    /// retired them first, a crash could lose both and the block would fall back to what the
    /// backing store held before either. So a barrier runs first when anything is not yet synced.
    private func finishWriteback(_ batch: WritebackBatch) {
        if isPmemMode {
            // Every newer copy and marker is in a pmem area, or synced on the cache device before
            // its area was reused; one drain makes the appends not drained yet durable too.
            persistNow()
            return recordWriteback(batch)
        }
        let lastSealedID = (openBuffer?.segmentID ?? nextSegmentID) - 1
        let everythingDurable = (openBuffer?.isEmpty ?? true) && lastSealedID <= syncedThroughID && !barrierScheduled
        guard everythingDurable else {
            return addBarrierWaiter { reply in
                guard case .done = reply else {
                    return self.writebackFailed(batch, self.failure ?? .inputOutput(errno: 5), "making newer copies durable")
                }
                self.recordWriteback(batch)
            }
        }
        recordWriteback(batch)
    }

    private func recordWriteback(_ batch: WritebackBatch) {
        writeRecord(cleanShutdown: false, lastWrittenBackID: batch.lastID) { result in
            if case .failure(let error) = result {
                return self.writebackFailed(batch, error, "recording writeback progress in the superblock")
            }
            precondition(!batch.isFinished, "a writeback batch finished twice")
            batch.isFinished = true
            var cleaned = 0
            for item in batch.items where self.index.remove(at: item.position) { cleaned += 1 }
            self.counters.writtenBackBlocks += UInt64(cleaned)
            self.counters.writebackBatches += 1
            self.lastWrittenBackID = batch.lastID
            self.writeback = nil
            self.processWaitingUpdates()
            self.kickWriteback()
        }
    }

    /// A writeback step failed. The data is still safe in the cache; the batch is retried later.
    private func writebackFailed(_ batch: WritebackBatch, _ error: MediumError, _ what: String) {
        counters.writebackErrors += 1
        precondition(!batch.isFinished, "a writeback batch finished twice")
        batch.isFinished = true
        logger.error("writeback of segments \(batch.firstID)...\(batch.lastID) failed while \(what): \(error); retrying in 1 s")
        writeback = nil
        writebackRetryNotBeforeNs = uptimeNs() + 1_000_000_000
        writebackTimer = eventLoop.scheduleTask(in: .seconds(1)) { self.kickWriteback() }
        processWaitingUpdates()
    }

    /// Writes the next superblock record (to the slot the current one is not in) and syncs it.
    func writeRecord(cleanShutdown: Bool, lastWrittenBackID: UInt64? = nil, completion: @escaping (Result<Void, MediumError>) -> Void) {
        precondition(!recordWriteInFlight, "two superblock record writes at once")
        recordWriteInFlight = true
        let next = SuperblockRecord(sequence: record.sequence + 1,
                                    lastWrittenBackSegmentID: lastWrittenBackID ?? self.lastWrittenBackID,
                                    lastFlushedSegmentID: max(syncedThroughID, lastWrittenBackID ?? self.lastWrittenBackID),
                                    cleanShutdown: cleanShutdown)
        cacheDevice.write(offset: next.slotOffset, bytes: next.encoded()) { written in
            if case .failure(let error) = written {
                self.recordWriteInFlight = false
                return completion(.failure(error))
            }
            self.cacheDevice.synchronize { synced in
                self.counters.cacheSyncs += 1
                self.recordWriteInFlight = false
                switch synced {
                case .success:
                    self.record = next
                    self.lastRecordWriteUptimeNs = uptimeNs()
                    completion(.success(()))
                case .failure(let error):
                    completion(.failure(error))
                }
            }
        }
    }

    /// Writes every dirty block back, syncs the backing store, and completes when nothing is dirty.
    public func drain(completion: @escaping (Result<Void, Error>) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failure(failure)) }
        drainWaiters.append(completion)
        if openBuffer.map({ !$0.isEmpty }) ?? false { addBarrierWaiter { _ in } }
        kickWriteback()
    }

    /// Work the engine does every 100 ms: re-evaluate writeback pacing, the periodic barrier and the
    /// periodic record refresh.
    func periodicTick() {
        let now = uptimeNs()
        kickWriteback()
        if tunables.syncDataIntervalSeconds > 0, unsyncedWritesSinceBarrier, !barrierScheduled,
           now &- lastBarrierUptimeNs >= UInt64(tunables.syncDataIntervalSeconds) * 1_000_000_000 {
            lastBarrierUptimeNs = now
            addBarrierWaiter { _ in }
        }
        if tunables.updateSuperblockRecordIntervalSeconds > 0, writeback == nil, !recordWriteInFlight, failure == nil, !isClosing,
           record.lastFlushedSegmentID != syncedThroughID,
           now &- lastRecordWriteUptimeNs >= UInt64(tunables.updateSuperblockRecordIntervalSeconds) * 1_000_000_000 {
            writeRecord(cleanShutdown: false) { result in
                if case .failure(let error) = result { self.logger.error("refreshing the superblock record failed: \(error)") }
                self.kickWriteback()
            }
        }
    }
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

/// Monotonic time in nanoseconds.
func uptimeNs() -> UInt64 {
    UInt64(NIODeadline.now().uptimeNanoseconds)
}
