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

    /// Places the discard markers of a whole-block discard, then passes it down.
    func applyDiscard(_ update: inout PendingUpdate) -> ApplyOutcome {
        guard case .discard(let lengthBytes, let zeroes, _) = update.kind else { preconditionFailure() }
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let firstBlock = update.offset / blockBytes
        let endBlock = firstBlock + lengthBytes / blockBytes
        if !update.markersPlaced {
            // Writeback of these blocks in flight would land after the discard: wait for it.
            if let batch = writeback, batch.overlaps(firstBlock..<endBlock) { return .blocked }
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
            update.markersPlaced = true
        }
        discardsInFlight += 1
        backingLoad.begin(nowNs: uptimeNs())
        let completion = update.completion
        backingStore.discard(offset: update.offset, count: Int(lengthBytes), zeroes: zeroes) { result in
            self.discardsInFlight -= 1
            self.backingLoad.end(nowNs: uptimeNs())
            switch result {
            case .success:
                self.backingHasUnsyncedDiscards = true
                self.unsyncedWritesSinceBarrier = true
                completion(.done)
            case .failure(let error):
                completion(.failed(.io(errno: error.errnoValue)))
            }
            self.kickWriteback()
        }
        return .handedOff
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
