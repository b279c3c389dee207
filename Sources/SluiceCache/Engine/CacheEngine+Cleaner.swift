import NIOCore
import SluiceFormat

/// The cleaner's relocation of one segment: its dirty blocks when it started, in position order,
/// and where their data comes from.
final class RelocationJob {
    struct Item {
        var blockNumber: UInt64
        var position: CacheIndex.Position
        var sectorMask: UInt8
        /// A clean copy read since it was cached (whole, mask 0xFF): moved to the head as a clean
        /// copy, so a hot read set outlives the ring's laps.
        var isClean = false
        /// Where the block's 4 KiB are in ``data``.
        var offset = 0
    }

    let segmentID: UInt64
    let slot: Int
    var items: [Item]
    /// The blocks' bytes, 4 KiB-aligned so the cache device reads them with O_DIRECT (the
    /// device's DMA fills them, not a page-cache copy on the engine's thread): read per run of
    /// nearby positions, or copied from the segment's buffer while it was still in memory.
    private(set) var data = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    var readsOutstanding = 0
    var readsIssued = 0
    var failure: MediumError?
    /// The next item to append, and how many were appended.
    var next = 0
    var relocatedCount = 0

    init(segmentID: UInt64, slot: Int, items: [Item]) {
        self.segmentID = segmentID
        self.slot = slot
        self.items = items
    }

    deinit { data.deallocate() }

    /// Allocates ``data``; once per job.
    func allocate(bytes: Int) {
        precondition(data.baseAddress == nil, "relocation data allocated twice")
        data = .allocate(byteCount: max(bytes, CacheGeometry.blockBytes), alignment: CacheGeometry.blockBytes)
    }

    /// Calls `body` with the fetched 4 KiB of item `index`.
    func withData<Result>(_ index: Int, _ body: (UnsafeRawBufferPointer) -> Result) -> Result {
        let offset = items[index].offset
        return body(UnsafeRawBufferPointer(rebasing: data[offset..<(offset + CacheGeometry.blockBytes)]))
    }
}

extension CacheEngine {
    /// Gaps of up to this many blocks between dirty blocks are read with them: one larger read
    /// costs the device (and the engine's thread) less than two, and a tail segment usually
    /// comes in one or two reads.
    static let relocationReadGapBlocks = 4

    /// Asks the cleaner what to do with the ring's tail and does it; reclaims without I/O go on
    /// in a loop, a relocation runs in the background.
    func stepCleaner() {
        guard failure == nil, relocation == nil else { return }
        cleaner.settings = Cleaner.Settings(highWatermarkPercent: tunables.highWatermarkPercent, lowWatermarkPercent: tunables.lowWatermarkPercent)
        for _ in 0..<ring.segmentCount {
            let situation = cleanerSituation()
            let phase = cleaner.phase
            let decision = cleaner.decide(situation)
            if phase == .resting && cleaner.phase == .cleaning { counters.cleaningRounds += 1 }
            switch decision {
            case .rest:
                return
            case .reclaimWithoutIO(let id):
                reclaim(id, withoutIO: true)
            case .relocate(let id), .relocateForStalledWriters(let id):
                // Writing everything back, or closing, cleans the blocks anyway: no relocation.
                guard lifecycle.acceptsRequests, writeBackAllWaiters.isEmpty else { return }
                if case .relocateForStalledWriters = decision { counters.relocationsForStalledWriters += 1 }
                return startRelocation(id)
            case .waitForWriteback:
                counters.cleanerWaitsForWriteback += 1
                return
            }
        }
    }

    private func cleanerSituation() -> Cleaner.Situation {
        // The blocks a relocation would move: the dirty ones and the hot clean ones it keeps.
        let tail = ring.reclaimableTailID.map { id -> Cleaner.Tail in
            let slot = ring.slot(of: id)
            return Cleaner.Tail(id: id, dirtyBlocks: index.dirtyBlocks(inSlot: slot) + hotCleanBlocksToKeep(inSlot: slot))
        }
        var reclaimClean = !lifecycle.acceptsRequests
        if !writeBackAllWaiters.isEmpty { reclaimClean = true }
        return Cleaner.Situation(
            occupancyPercent: (ring.liveSegments - ring.reclaimedNotRetired) * 100 / ring.segmentCount,
            freeSegments: ring.freeSegments, reserveSegments: reserveSegments,
            writersWaitedForSpaceNs: updates.headWait.isForSlot ? clock.nowNs &- (updates.headWait.sinceNs ?? clock.nowNs) : nil,
            reclaimCleanSegments: reclaimClean,
            tail: tail, blocksPerSegment: geometry.dataBlocksPerSegment)
    }

    /// How many of the slot's hot clean copies (read since cached, whole) a relocation keeps: as
    /// many as leave the relocation its yield (``Cleaner/relocationYieldPercentMin``), so keeping
    /// them never stops the ring from freeing space. None while space is short, reads are not
    /// cached, or everything is being written back or the engine closes (no relocation then).
    func hotCleanBlocksToKeep(inSlot slot: Int) -> Int {
        guard lifecycle.acceptsRequests, writeBackAllWaiters.isEmpty, effectiveCacheMode.cachesReads, tunables.readPromoteHits > 0, !spaceIsShort, index.liveBlocks(inSlot: slot) > index.dirtyBlocks(inSlot: slot) else { return 0 }
        let budget = geometry.dataBlocksPerSegment * (100 - Cleaner.relocationYieldPercentMin) / 100 - index.dirtyBlocks(inSlot: slot)
        guard budget > 0 else { return 0 }
        var hot = 0
        for position in index.positions(ofSlot: slot) where index.wasHit(at: position) {
            guard let resident = index.resident(at: position), !resident.isDirty, resident.sectorMask == 0xFF else { continue }
            hot += 1
            if hot == budget { break }
        }
        return hot
    }

    /// Segment `id` holds no dirty block any more: record it with its fence, the newest segment
    /// holding an append so far.
    private func reclaim(_ id: UInt64, withoutIO: Bool) {
        let slot = ring.slot(of: id)
        precondition(index.dirtyBlocks(inSlot: slot) == 0, "segment \(id) reclaimed with dirty blocks in slot \(slot)")
        ring.reclaimed(id)
        cleaner.reclaimed(id, fenceID: newestAppendedSegmentID)
        counters.segmentsReclaimed += 1
        if withoutIO { counters.segmentsReclaimedWithoutIO += 1 }
    }

    /// Collects the tail's dirty blocks and fetches their data: from the segment's buffer if it is
    /// still in memory, otherwise from the cache device in runs of nearby positions.
    private func startRelocation(_ id: UInt64) {
        let slot = ring.slot(of: id)
        var items: [RelocationJob.Item] = []
        var hotToKeep = hotCleanBlocksToKeep(inSlot: slot)
        for position in index.positions(ofSlot: slot) {
            guard let resident = index.resident(at: position) else { continue }
            if !resident.isDirty {
                if hotToKeep > 0, resident.sectorMask == 0xFF, index.wasHit(at: position) {
                    hotToKeep -= 1
                    items.append(RelocationJob.Item(blockNumber: resident.blockNumber, position: position, sectorMask: 0xFF, isClean: true))
                }
                continue
            }
            if discards.isDiscardedOnBacking(resident.blockNumber) {
                // The backing store has the discard at the head of the queue, synced: this copy
                // needs nothing more, and its marker follows.
                index.markClean(at: position)
                continue
            }
            items.append(RelocationJob.Item(blockNumber: resident.blockNumber, position: position, sectorMask: resident.sectorMask))
        }
        let job = RelocationJob(segmentID: id, slot: slot, items: items)
        cleaner.relocationStarted(id)
        relocation = job
        if let memory = buffers.inMemory(slot: slot, segmentID: id) {
            // Copied now: the buffer may be reused for another segment before every block is
            // appended (the relocation can wait for a slot).
            copyForRelocation(job, from: memory)
        } else {
            readForRelocation(job)
        }
        continueRelocation()
    }

    private func copyForRelocation(_ job: RelocationJob, from memory: any WriteBuffer) {
        job.allocate(bytes: job.items.count * CacheGeometry.blockBytes)
        for index in job.items.indices {
            let offset = index * CacheGeometry.blockBytes
            job.items[index].offset = offset
            memory.withBlock(at: dataIndex(of: job.items[index].position)) {
                UnsafeMutableRawBufferPointer(rebasing: job.data[offset..<(offset + CacheGeometry.blockBytes)]).copyMemory(from: $0)
            }
        }
    }

    private func readForRelocation(_ job: RelocationJob) {
        cacheDevice.submittingTogether { issueRelocationReads(job) }
    }

    /// Reads the job's blocks in runs of nearby positions, each run into its own part of the
    /// job's buffer.
    private func issueRelocationReads(_ job: RelocationJob) {
        var runs: [(first: CacheIndex.Position, start: Int, bytes: Int)] = []
        var runStart = 0
        var total = 0
        while runStart < job.items.count {
            var runEnd = runStart + 1
            while runEnd < job.items.count,
                  Int(job.items[runEnd].position - job.items[runEnd - 1].position) <= Self.relocationReadGapBlocks + 1 { runEnd += 1 }
            let first = job.items[runStart].position
            for item in runStart..<runEnd {
                job.items[item].offset = total + Int(job.items[item].position - first) * CacheGeometry.blockBytes
            }
            let bytes = Int(job.items[runEnd - 1].position - first + 1) * CacheGeometry.blockBytes
            runs.append((first, total, bytes))
            total += bytes
            runStart = runEnd
        }
        job.allocate(bytes: total)
        for run in runs {
            job.readsOutstanding += 1
            job.readsIssued += 1
            ring.readerStarted(slot: job.slot)
            let target = UnsafeMutableRawBufferPointer(rebasing: job.data[run.start..<(run.start + run.bytes)])
            cacheDevice.read(offset: geometry.offset(ofDataBlock: dataIndex(of: run.first), inSlot: job.slot), into: target) { result in
                job.readsOutstanding -= 1
                self.readerFinished(slot: job.slot)
                switch result {
                case .success:
                    self.counters.cacheBytesRead += UInt64(run.bytes)
                case .failure(let error):
                    if job.failure == nil { job.failure = error }
                }
                if job.readsOutstanding == 0, self.relocation === job { self.drive() }
            }
        }
    }

    /// Appends the fetched dirty blocks of the tail to the head of the log, skipping those a
    /// newer write or discard superseded (relocation never resurrects an old copy) and those
    /// writeback cleaned meanwhile. Waits when the open buffer needs a slot that is not free yet.
    func continueRelocation() {
        guard let job = relocation, job.readsOutstanding == 0, failure == nil else { return }
        if let error = job.failure {
            relocation = nil
            return fail(error, doing: "reading segment \(job.segmentID) from the cache device to relocate its blocks")
        }
        while job.next < job.items.count {
            let item = job.items[job.next]
            guard let entry = index.lookup(item.blockNumber), entry.position == item.position, entry.isDirty != item.isClean else {
                job.next += 1
                continue
            }
            if item.isClean {
                relocateCleanCopy(item, job: job)
                continue
            }
            if discards.isDiscardedOnBacking(item.blockNumber) {
                index.markClean(at: item.position)
                job.next += 1
                continue
            }
            guard let buffer = openBufferAccepting(item.blockNumber, for: .cleaner) else { return }
            precondition(buffer.dataIndex(of: item.blockNumber) == nil, "block \(item.blockNumber) is newer in the open buffer than its indexed copy")
            let dataIndex = job.withData(job.next) {
                buffer.write(blockNumber: item.blockNumber, sectorMask: entry.sectorMask, block: $0)
            }
            let position = CacheIndex.Position(firstPosition(ofSlot: ringSlot(of: buffer)) + dataIndex)
            let replaced = index.insert(item.blockNumber, sectorMask: entry.sectorMask, at: position)
            precondition(replaced == item.position, "a relocated copy replaced another copy than the one relocated")
            batch?.relocated(item.blockNumber, from: item.position, to: position, segmentID: buffer.segmentID)
            counters.relocatedBlocks += 1
            job.relocatedCount += 1
            job.next += 1
            if buffer.isFull { sealOpenBuffer(isPartial: false) }
        }
        relocation = nil
        reclaim(job.segmentID, withoutIO: job.relocatedCount == 0 && job.readsIssued == 0)
    }

    /// Moves a hot clean copy to the head as a clean copy, if that takes no waiting and none of the
    /// cleaner's reserve (as a read's clean copy): otherwise it is dropped with its segment, as it
    /// would have been without the move. Nothing else could free a slot it waited for: writeback
    /// has nothing to do for a clean block, and the slot would come from reclaiming this segment.
    private func relocateCleanCopy(_ item: RelocationJob.Item, job: RelocationJob) {
        let itemIndex = job.next
        job.next += 1
        // About to be voided anyway: dropped.
        guard !discards.isBeingDiscarded(item.blockNumber), !bypass.covers(item.blockNumber) else { return }
        guard let buffer = openBufferAccepting(item.blockNumber, for: .reader) else { return }
        precondition(buffer.dataIndex(of: item.blockNumber) == nil, "block \(item.blockNumber) is newer in the open buffer than its indexed copy")
        let (position, replaced) = job.withData(itemIndex) { appendCleanCopy(item.blockNumber, $0, to: buffer) }
        precondition(replaced == item.position, "a relocated clean copy replaced another copy than the one relocated")
        batch?.relocated(item.blockNumber, from: item.position, to: position, segmentID: buffer.segmentID)
        counters.relocatedCleanBlocks += 1
        job.relocatedCount += 1
    }

    /// Writers wait for ring space, or the free slots are down to twice the cleaner's reserve: the
    /// tail's writeback frees space, and nothing else may take the free slots left.
    var spaceIsShort: Bool {
        updates.headWait.isForSlot || ring.freeSegments <= 2 * reserveSegments
    }

    /// Whether the tail must be written back before the cleaner can reclaim it: it is (nearly)
    /// all dirty, or its relocation waits for a slot that only retiring it would free.
    var tailNeedsWriteback: Bool {
        if case .waitForWriteback = cleaner.lastDecision { return true }
        if let job = relocation, job.readsOutstanding == 0, job.next < job.items.count {
            return updates.headWait.isForSlot || ring.freeSegments == 0
        }
        // Space is short and the tail is below the yield: the next reclaim needs writeback of it,
        // whatever the cleaner answered a moment ago (a block-order batch now would be wasted).
        guard spaceIsShort, let tail = ring.reclaimableTailID else { return false }
        let gain = geometry.dataBlocksPerSegment - index.dirtyBlocks(inSlot: ring.slot(of: tail))
        return gain * 100 < geometry.dataBlocksPerSegment * Cleaner.relocationYieldPercentMin
    }

    /// Abandons a relocation (a graceful close): what was relocated stays relocated, and the
    /// segment stays in the log, unreclaimed.
    func abandonRelocation() {
        guard let job = relocation else { return }
        relocation = nil
        cleaner.relocationAbandoned(job.segmentID)
    }

    /// Retires reclaimed segments whose fence has passed: in pmem mode one drain makes every
    /// append durable; in volatile mode the fence segment must be synced on the cache device.
    func retireReclaimedSegments() {
        guard failure == nil, records.isIdle, let fence = cleaner.oldestFenceID, clock.nowNs >= cleaner.retryNotBeforeNs,
              retirementIsDue else { return }
        var durableThrough = ring.syncedThroughID
        if fence > durableThrough, persistAppended() { durableThrough = .max }
        guard let target = cleaner.retirable(durableThroughID: durableThrough) else { return }
        lastRetirementNs = clock.nowNs
        writeRecord(.retire(target)) { result in
            if case .failure(let error) = result, !self.lifecycle.isPoweredOff {
                self.logger.error("recording retired segments up to \(target) in the superblock failed: \(error); retrying")
                self.cleaner.retryRetirement(through: target, nowNs: self.clock.nowNs)
            }
        }
    }

    /// In volatile mode a reclaim's fence may be the open segment, and only a barrier (a partial
    /// segment) makes it durable before it fills. It is sealed when the tick comes round (so a
    /// reclaimed segment waits at most a tick for its record), or at once when writers wait for
    /// space and the cleaner can do nothing more without the slots that retirement frees. Sealing
    /// it any sooner would turn each relocation into a partial segment of its own, which frees
    /// nothing.
    func sealFenceSegmentIfWaiting(onlyIfCleanerIsStuck: Bool) {
        guard !durability.persistsAppends, retirementIsDue, let fence = cleaner.oldestFenceID, fence > ring.syncedThroughID, let open = buffers.open,
              open.segmentID == fence, !open.isEmpty, !barriers.isGathering else { return }
        if onlyIfCleanerIsStuck {
            if let job = relocation, job.readsOutstanding > 0 || job.next == job.items.count { return }
            if relocation == nil, case .relocate = cleaner.lastDecision { return }
        }
        addBarrierWaiter { _ in }
    }

    /// Reclaimed segments gathered before one record retires them all. Each retirement costs a
    /// record write and a cache-device sync (two in volatile mode, with the fences' segments),
    /// and device flushes are what a busy SSD does worst; slots are retired sooner when the ring
    /// needs them.
    var retirementBatchSegments: Int { max(1, geometry.segmentCount / 16) }
    static let retirementIntervalNs: UInt64 = 1_000_000_000

    /// Whether reclaimed segments should be retired now: writers wait for a slot, free slots run
    /// short, enough have gathered, a second has passed, or the cache is closing or writing
    /// everything back.
    var retirementIsDue: Bool {
        guard ring.reclaimedNotRetired > 0 else { return false }
        if updates.headWait.isForSlot || !lifecycle.acceptsRequests || !writeBackAllWaiters.isEmpty { return true }
        if ring.freeSegments <= 2 * reserveSegments + retirementBatchSegments { return true }
        if ring.reclaimedNotRetired >= retirementBatchSegments { return true }
        return clock.nowNs &- lastRetirementNs >= Self.retirementIntervalNs
    }

    /// A durable record retired every segment up to `id`: the clean copies still pinned in their
    /// slots are forgotten, and the slots are free.
    func retire(through id: UInt64) {
        var segment = ring.retiredThroughID + 1
        while segment <= id {
            let slot = ring.slot(of: segment)
            precondition(index.dirtyBlocks(inSlot: slot) == 0, "retiring segment \(segment) with dirty blocks")
            if index.liveBlocks(inSlot: slot) > 0 {
                for position in index.positions(ofSlot: slot) { index.remove(at: position) }
            }
            segment += 1
        }
        counters.segmentsRetired += id - ring.retiredThroughID
        ring.retired(through: id)
    }
}
