import NIOCore
import SluiceFormat
import SluiceVolume

extension CacheEngine {
    /// Trims or zeroes a range. Whole blocks get a discard marker in the log (only those the cache
    /// holds, so a large request writes no zeros into the log) and the request is passed down to
    /// the backing store; for write-zeroes, the sectors of partly covered blocks at either end are
    /// written as zeros through the write path. A trim leaves partly covered blocks alone.
    func submitDiscard(offset: UInt64, lengthBytes: UInt64, zeroes: Bool, fua: Bool, completion: @escaping (VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        if isClosing { return completion(.failed(.shuttingDown)) }
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
            if fua, case .done = reply { self.addDurabilityWaiter(completion) } else { completion(reply) }
        }
        for (kind, partOffset) in zip(parts, offsets) {
            waitingUpdates.append(PendingUpdate(kind: kind, offset: partOffset, completion: join.partCompleted))
        }
        processWaitingUpdates()
    }

    /// A whole-block discard, at the head of the queue (later writes and discards wait behind it):
    /// 1. waits until no writeback batch is writing any of its blocks, so old data never lands
    ///    on the backing store after it;
    /// 2. passes the discard down to the backing store and syncs it (no batch starts meanwhile);
    /// 3. places a discard marker in the open buffer for every block the cache still holds and
    ///    drops it from the index. A batch that runs while the markers wait for ring space drops
    ///    the range's blocks instead of writing them back (see `startWriteback`).
    ///
    /// The backing store has the discard, synced, before any marker exists, so a marker can never
    /// be durable over a backing store that still holds data older than the block's newest
    /// durable copy. Until the markers are placed, reads of cached blocks in the range return the
    /// cached data and reads of the others return zeros (what the backing store now holds, or will).
    func applyDiscard(_ update: inout PendingUpdate) -> ApplyOutcome {
        guard case .discard(let lengthBytes, let zeroes, _) = update.kind else { preconditionFailure() }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let firstBlock = update.offset / blockBytes
        let endBlock = firstBlock + lengthBytes / blockBytes
        switch update.discardStage {
        case .waiting:
            if writebackIsWriting(firstBlock..<endBlock) { return .blocked }
            update.discardStage = .passingDown
            update.discardID = nextDiscardID
            nextDiscardID += 1
            discardRangesInFlight[update.discardID] = firstBlock..<endBlock
            // The head of the queue records the discard's progress; the completion below may run
            // before `discard` returns.
            waitingUpdates.first = update
            discardsInFlight += 1
            backingLoad.begin(nowNs: uptimeNs())
            let discardID = update.discardID
            backingStore.discard(offset: update.offset, count: Int(lengthBytes), zeroes: zeroes) { result in
                self.backingLoad.end(nowNs: uptimeNs())
                guard case .success = result else { return self.discardPassedDown(discardID, result: result) }
                self.backingStore.synchronize { synced in
                    self.counters.backingSyncs += 1
                    self.discardPassedDown(discardID, result: synced)
                }
            }
            update = waitingUpdates.first!
            if case .passingDown = update.discardStage { return .blocked }
            return applyDiscard(&update)
        case .passingDown:
            return .blocked
        case .failed(let error):
            discardRangesInFlight[update.discardID] = nil
            update.completion(.failed(.io(errno: error.errnoValue)))
            return .handedOff
        case .passedDown:
            var block = firstBlock + UInt64(update.appliedBytes)
            while block < endBlock {
                if index.lookup(block) != nil {
                    guard let buffer = openBufferAccepting(block) else {
                        update.appliedBytes = Int(block - firstBlock)
                        return .blocked
                    }
                    buffer.markDiscarded(blockNumber: block)
                    index.remove(blockNumber: block)
                    if buffer.isFull { sealOpenBuffer(isPartial: false) }
                }
                block += 1
            }
            discardRangesInFlight[update.discardID] = nil
            kickWriteback()
            return .applied
        }
    }

    /// The backing store has done (and synced) the discard at the head of the queue, or failed it.
    private func discardPassedDown(_ discardID: UInt64, result: Result<Void, MediumError>) {
        discardsInFlight -= 1
        guard var head = waitingUpdates.first, head.discardID == discardID, case .passingDown = head.discardStage else {
            preconditionFailure("a backing discard completed that is not at the head of the queue")
        }
        switch result {
        case .success: head.discardStage = .passedDown
        case .failure(let error): head.discardStage = .failed(error)
        }
        waitingUpdates.first = head
        processWaitingUpdates()
        kickWriteback()
    }

    /// Whether a writeback batch still has backing writes for blocks in `range` to make.
    func writebackIsWriting(_ range: Range<UInt64>) -> Bool {
        guard let batch = writeback, !batch.backingWritesDone else { return false }
        return batch.overlaps(range)
    }

    /// Whether `blockNumber` lies in a discard that has not placed its markers yet.
    func isBeingDiscarded(_ blockNumber: UInt64) -> Bool {
        guard !discardRangesInFlight.isEmpty else { return false }
        return discardRangesInFlight.values.contains { $0.contains(blockNumber) }
    }

    /// Whether `blockNumber` lies in a discard the backing store already has (markers pending).
    func isDiscardedOnBacking(_ blockNumber: UInt64) -> Bool {
        guard let head = waitingUpdates.first, case .discard(let lengthBytes, _, _) = head.kind,
              case .passedDown = head.discardStage else { return false }
        let first = head.offset / UInt64(CacheGeometry.blockBytes)
        return blockNumber >= first && blockNumber < first + lengthBytes / UInt64(CacheGeometry.blockBytes)
    }
}

/// Completes a request made of several parts once the last part is done, with the first failure.
final class CompletionJoin {
    private var outstanding: Int
    private var failure: VolumeReply?
    private let completion: (VolumeReply) -> Void

    init(outstanding: Int, completion: @escaping (VolumeReply) -> Void) {
        self.outstanding = outstanding
        self.completion = completion
    }

    func partCompleted(_ reply: VolumeReply) {
        if case .failed = reply, failure == nil { failure = reply }
        outstanding -= 1
        if outstanding == 0 { completion(failure ?? .done) }
    }
}
