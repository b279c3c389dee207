import NIOCore
import SluiceFormat
import SluiceVolume

extension CacheEngine {
    /// Trims or zeroes a range. Whole blocks get a discard marker in the log (only those the cache
    /// holds, so a large request writes no zeros into the log) and the request is passed down to
    /// the backing store; for write-zeroes, the sectors of partly covered blocks at either end are
    /// written as zeros through the write path. A trim leaves partly covered blocks alone.
    func submitDiscard(offset: UInt64, lengthBytes: UInt64, zeroes: Bool, fua: Bool, completion: @escaping (consuming VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        guard lifecycle.acceptsRequests else { return completion(.failed(.shuttingDown)) }
        let end = offset + lengthBytes
        guard end <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let wholeStart = (offset + blockBytes - 1) / blockBytes * blockBytes
        let wholeEnd = end / blockBytes * blockBytes
        var parts: [PendingUpdate.Kind] = []
        var offsets: [UInt64] = []
        func zeroWrite(from: UInt64, to: UInt64) {
            guard zeroes, to > from else { return }
            parts.append(.write(data: ByteBuffer(repeating: 0, count: Int(to - from)), fua: false))
            offsets.append(from)
        }
        if wholeStart >= wholeEnd {
            zeroWrite(from: offset, to: end)
        } else {
            zeroWrite(from: offset, to: wholeStart)
            parts.append(.discard(lengthBytes: wholeEnd - wholeStart, zeroes: zeroes, fua: false))
            offsets.append(wholeStart)
            zeroWrite(from: wholeEnd, to: end)
        }
        guard !parts.isEmpty else { return completion(.done) }
        let join = CompletionJoin(outstanding: parts.count) { reply in
            // Zeroed sectors at either end may have gone straight to the backing store (a bypass
            // mode): FUA syncs it too.
            if fua, case .done = reply { self.awaitDurability(self.durability.replyWait(fua: true), self.flushBypassWrites(completion)) } else { completion(reply) }
        }
        for (kind, partOffset) in zip(parts, offsets) {
            updates.waiting.append(PendingUpdate(kind: kind, offset: partOffset, completion: join.partCompleted))
        }
        processWaitingUpdates()
        if updates.headWait.isForSlot { drive() }
    }

    /// A whole-block discard at the head of the queue, through the stages of
    /// ``DiscardSequencer``: it waits for backing writes of its blocks in flight, is passed down
    /// to the backing store and synced there, then places a discard marker for every block the
    /// cache holds in its range (dirty or clean: a clean copy is still in the log until its
    /// segment is retired, and recovery would replay it over the discard).
    func applyDiscard(_ update: inout PendingUpdate) -> ApplyOutcome {
        guard case .discard(let lengthBytes, let zeroes, _) = update.kind else { preconditionFailure() }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let firstBlock = update.offset / blockBytes
        let blocks = firstBlock..<(firstBlock + lengthBytes / blockBytes)
        switch update.discardStage {
        case .waiting:
            if let batch, batch.discardStarting(blocks) { return .blocked }
            // A write of these blocks still at the backing store lands first.
            if bypass.overlaps(blocks) { return .blocked }
            update.discardStage = .passingDown
            // Reads of these blocks in flight must not cache what they read.
            fills.poison(blocks)
            update.discardID = discards.passDown(blocks)
            // The head of the queue records the discard's progress; the completion below may run
            // before `discard` returns.
            updates.waiting.first = update
            passDown(update.discardID, offset: update.offset, lengthBytes: lengthBytes, zeroes: zeroes)
            update = updates.waiting.first!
            if case .passingDown = update.discardStage { return .blocked }
            return applyDiscard(&update)
        case .passingDown:
            return .blocked
        case .failed(let error):
            update.completion(.failed(.io(errno: error.errnoValue)))
            return .handedOff
        case .passedDown:
            var block = blocks.lowerBound + UInt64(update.appliedBytes)
            let placed = placeDiscardMarkers(through: blocks.upperBound, from: &block)
            update.appliedBytes = Int(block - blocks.lowerBound)
            guard placed else { return .blocked }
            discards.markersPlaced(update.discardID)
            return .applied
        }
    }

    /// Places a discard marker for every block from `block` up to `end` that the cache holds, and
    /// forgets the block: the one way a trim and a bypass write void cached copies. Returns false
    /// when the open buffer must wait for a slot, with `block` where to go on.
    func placeDiscardMarkers(through end: UInt64, from block: inout UInt64) -> Bool {
        while block < end {
            if index.lookup(block) != nil {
                guard let buffer = openBufferAccepting(block, for: .writer) else { return false }
                buffer.markDiscarded(blockNumber: block)
                bypass.newestMarkerSegmentID = max(bypass.newestMarkerSegmentID, buffer.segmentID)
                updates.unsyncedWritesSinceBarrier = true
                index.remove(blockNumber: block)
                batch?.discarded(block)
                if buffer.isFull { sealOpenBuffer(isPartial: false) }
            }
            block += 1
        }
        return true
    }

    /// Passes discard `id` down to the backing store and syncs it there.
    private func passDown(_ id: UInt64, offset: UInt64, lengthBytes: UInt64, zeroes: Bool) {
        backingLoad.begin(nowNs: clock.nowNs)
        backingStore.discard(offset: offset, count: Int(lengthBytes), zeroes: zeroes) { result in
            self.backingLoad.end(nowNs: self.clock.nowNs)
            guard case .success = result else { return self.discardPassedDown(id, result: result) }
            self.backingStore.synchronize { synced in
                self.counters.backingSyncs += 1
                self.discardPassedDown(id, result: synced)
            }
        }
    }

    /// The backing store has done (and synced) the discard at the head of the queue, or failed it.
    private func discardPassedDown(_ id: UInt64, result: Result<Void, MediumError>) {
        guard var head = updates.waiting.first, head.discardID == id, case .passingDown = head.discardStage else {
            preconditionFailure("a backing discard completed that is not at the head of the queue")
        }
        switch result {
        case .success:
            head.discardStage = .passedDown
            discards.passedDown(id, succeeded: true)
        case .failure(let error):
            head.discardStage = .failed(error)
            discards.passedDown(id, succeeded: false)
        }
        updates.waiting.first = head
        drive()
    }

    /// Fails every waiting write and discard after a medium failure. A discard whose backing
    /// request is still out is failed when that returns.
    func failWaitingUpdates() {
        guard let failure else { return }
        var keep: [PendingUpdate] = []
        for update in updates.waiting.removeAll() {
            if case .discard = update.kind, case .passingDown = update.discardStage {
                keep.append(update)
                continue
            }
            if case .discard = update.kind, update.discardID != 0 { discards.abandoned(update.discardID) }
            update.completion(.failed(.io(errno: failure.errnoValue)))
        }
        for update in keep { updates.waiting.append(update) }
    }
}

/// Completes a request made of several parts once the last part is done, with the first failure.
final class CompletionJoin {
    private var outstanding: Int
    private var failure: VolumeReply?
    private let completion: (consuming VolumeReply) -> Void

    init(outstanding: Int, completion: @escaping (consuming VolumeReply) -> Void) {
        self.outstanding = outstanding
        self.completion = completion
    }

    func partCompleted(_ reply: VolumeReply) {
        if case .failed = reply, failure == nil { failure = reply }
        outstanding -= 1
        if outstanding == 0 { completion(failure ?? .done) }
    }
}
