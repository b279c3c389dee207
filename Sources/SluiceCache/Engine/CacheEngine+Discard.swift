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
            if fua, case .done = reply { self.addBarrierWaiter(completion) } else { completion(reply) }
        }
        for (kind, partOffset) in zip(parts, offsets) {
            waitingUpdates.append(PendingUpdate(kind: kind, offset: partOffset, completion: join.partCompleted))
        }
        processWaitingUpdates()
    }

    /// A whole-block discard, at the head of the queue (later writes wait behind it):
    /// 1. waits for a writeback batch holding any of its blocks, so old data never lands after it;
    /// 2. passes the discard down to the backing store and syncs it;
    /// 3. only then places the discard markers and drops the blocks from the index.
    ///
    /// The order of 2 and 3 matters: a marker can reach the cache device (and survive a crash) as
    /// soon as its segment is written, and a durable marker over a backing discard that was lost
    /// would let the block fall back to what the backing store held before its newest durable copy.
    func applyDiscard(_ update: inout PendingUpdate) -> ApplyOutcome {
        guard case .discard(let lengthBytes, let zeroes, _) = update.kind else { preconditionFailure() }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let firstBlock = update.offset / blockBytes
        let endBlock = firstBlock + lengthBytes / blockBytes
        switch update.discardStage {
        case .waiting:
            if let batch = writeback, batch.overlaps(firstBlock..<endBlock) { return .blocked }
            update.discardStage = .passingDown
            // The head of the queue is the record of this discard's progress: the completion below
            // (which may run before `discard` returns) updates it there.
            waitingUpdates.first = update
            discardsInFlight += 1
            backingLoad.begin(nowNs: uptimeNs())
            let offset = update.offset
            backingStore.discard(offset: offset, count: Int(lengthBytes), zeroes: zeroes) { result in
                self.backingLoad.end(nowNs: uptimeNs())
                switch result {
                case .success:
                    self.backingStore.synchronize { synced in
                        self.counters.backingSyncs += 1
                        self.discardPassedDown(offset: offset, result: synced)
                    }
                case .failure:
                    self.discardPassedDown(offset: offset, result: result)
                }
            }
            update = waitingUpdates.first!
            if case .passingDown = update.discardStage { return .blocked }
            return applyDiscard(&update)
        case .passingDown:
            return .blocked
        case .failed(let error):
            discardsInFlight -= 1
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
            discardsInFlight -= 1
            kickWriteback()
            return .applied
        }
    }

    /// The backing store finished (or failed) the discard at the head of the queue.
    private func discardPassedDown(offset: UInt64, result: Result<Void, MediumError>) {
        guard var head = waitingUpdates.first, case .discard = head.kind, head.offset == offset,
              case .passingDown = head.discardStage else {
            preconditionFailure("a backing discard completed that is not at the head of the queue")
        }
        switch result {
        case .success: head.discardStage = .passedDown
        case .failure(let error): head.discardStage = .failed(error)
        }
        waitingUpdates.first = head
        processWaitingUpdates()
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
