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

    /// A whole-block discard, at the head of the queue (later writes wait behind it until its
    /// markers are placed):
    /// 1. waits for a writeback batch holding any of its blocks, so old data never lands after it;
    /// 2. places a discard marker in the open buffer for every block the cache holds and drops
    ///    those blocks from the index;
    /// 3. passes the discard down to the backing store and syncs it, while later requests go on.
    ///    Until then, reads of the range return zeros (a value a trim or write-zeroes may leave),
    ///    never what the backing store held before, and the segments holding its markers are not
    ///    written: a marker must not become durable before the backing discard, or a crash could
    ///    let the block fall back to what the backing store held before its newest durable copy.
    ///    No writeback batch starts meanwhile, so no older data can overtake the discard.
    func applyDiscard(_ update: inout PendingUpdate) -> ApplyOutcome {
        guard case .discard(let lengthBytes, let zeroes, _) = update.kind else { preconditionFailure() }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let firstBlock = update.offset / blockBytes
        let endBlock = firstBlock + lengthBytes / blockBytes
        if case .waiting = update.discardStage {
            if writebackIsWriting(firstBlock..<endBlock) { return .blocked }
            update.discardStage = .placingMarkers
            update.discardID = nextDiscardID
            nextDiscardID += 1
            // From here on reads of the range return zeros and no segment holding its markers is
            // written until the backing store has the discard.
            discardRangesInFlight[update.discardID] = firstBlock..<endBlock
        }
        let discardID = update.discardID
        var block = firstBlock + UInt64(update.appliedBytes)
        while block < endBlock {
            if index.lookup(block) != nil {
                guard let buffer = openBufferAccepting(block) else {
                    update.appliedBytes = Int(block - firstBlock)
                    return .blocked
                }
                buffer.markDiscarded(blockNumber: block)
                index.remove(blockNumber: block)
                discardIDsBySegment[buffer.segmentID, default: []].insert(discardID)
                if buffer.isFull { sealOpenBuffer(isPartial: false) }
            }
            block += 1
        }
        update.appliedBytes = Int(endBlock - firstBlock)
        // A batch that started while markers waited for ring space may hold blocks of the range:
        // its writes must reach the backing store before the discard does. (Only its writes: the
        // rest of the batch waits for a barrier that may need this discard to finish.)
        if writebackIsWriting(firstBlock..<endBlock) { return .blocked }
        discardsInFlight += 1
        backingLoad.begin(nowNs: uptimeNs())
        let completion = update.completion
        backingStore.discard(offset: update.offset, count: Int(lengthBytes), zeroes: zeroes) { result in
            self.backingLoad.end(nowNs: uptimeNs())
            guard case .success = result else { return self.discardPassedDown(discardID, result: result, completion: completion) }
            self.backingStore.synchronize { synced in
                self.counters.backingSyncs += 1
                self.discardPassedDown(discardID, result: synced, completion: completion)
            }
        }
        return .handedOff
    }

    /// The backing store has done (and synced) a discard, or failed it.
    private func discardPassedDown(_ discardID: UInt64, result: Result<Void, MediumError>, completion: (VolumeReply) -> Void) {
        discardsInFlight -= 1
        discardRangesInFlight[discardID] = nil
        if case .failure(let error) = result {
            // The markers dropped cached copies whose blocks the backing store may still hold
            // older data for: nothing more may be acknowledged on that state.
            fail(error, doing: "passing a trim or write-zeroes down to the backing store")
            completion(.failed(.io(errno: error.errnoValue)))
            return
        }
        completion(.done)
        // Segments holding its markers may be written now.
        for slot in Array(segmentWritesWaiting.keys) { startSegmentWriteIfReady(slot: slot) }
        kickWriteback()
    }

    /// Whether a writeback batch still has backing writes for blocks in `range` to make.
    func writebackIsWriting(_ range: Range<UInt64>) -> Bool {
        guard let batch = writeback, !batch.backingWritesDone else { return false }
        return batch.overlaps(range)
    }

    /// Whether `blockNumber` lies in a discard being passed down (reads of it return zeros).
    func isBeingDiscarded(_ blockNumber: UInt64) -> Bool {
        guard !discardRangesInFlight.isEmpty else { return false }
        return discardRangesInFlight.values.contains { $0.contains(blockNumber) }
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
