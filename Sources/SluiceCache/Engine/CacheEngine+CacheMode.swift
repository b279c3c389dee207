import NIOCore
import SluiceFormat
import SluiceVolume

/// Writes that go straight to the backing store (writethrough, writearound and passthrough modes)
/// and are in flight there. While one is, no writeback batch writes any of its blocks (the older
/// data would land in either order), no read of them becomes a clean copy, and a later bypass
/// write or discard of them waits at the head of the queue: requests touching the same blocks
/// take effect in the order they arrived, on every path.
struct BypassWrites {
    /// Block ranges in flight, by id. Bounded by the requests in flight.
    private(set) var rangesInFlight: [UInt64: Range<UInt64>] = [:]
    private var nextID: UInt64 = 1
    /// A bypass write without FUA completed since the backing store's last sync: a FLUSH must sync
    /// the backing store too.
    var backingUnsynced = false
    /// Backing syncs started for FLUSHes after bypass writes and not finished: a FLUSH arriving
    /// meanwhile needs one too (the flag was cleared when the first started, but its writes are
    /// not durable until it finishes), so it starts its own.
    var flushSyncsInFlight = 0
    /// The newest segment holding a discard marker (a bypass write's or a trim's). Until the cache
    /// device has it synced (or pmem drained), an older copy of the marked block could be replayed
    /// by recovery: a FUA bypass write waits for it to be durable, whichever write placed it.
    var newestMarkerSegmentID: UInt64 = 0

    var isEmpty: Bool { rangesInFlight.isEmpty }

    mutating func begin(_ blocks: Range<UInt64>) -> UInt64 {
        let id = nextID
        nextID += 1
        rangesInFlight[id] = blocks
        return id
    }

    mutating func end(_ id: UInt64) {
        precondition(rangesInFlight.removeValue(forKey: id) != nil, "a bypass write ended that never began")
    }

    func overlaps(_ blocks: Range<UInt64>) -> Bool {
        guard !rangesInFlight.isEmpty else { return false }
        return rangesInFlight.values.contains { $0.overlaps(blocks) }
    }

    func covers(_ blockNumber: UInt64) -> Bool {
        guard !rangesInFlight.isEmpty else { return false }
        return rangesInFlight.values.contains { $0.contains(blockNumber) }
    }
}

/// The path a write takes, decided when it reaches the head of the queue.
enum WritePath {
    /// Not decided yet, or waiting for an earlier bypass write of the same blocks to finish.
    case undecided
    /// Into the log, as in writeback mode.
    case logged
    /// Straight to the backing store: `id` in ``BypassWrites``, and the next block whose cached
    /// (clean) copy needs a discard marker before the write goes out.
    case bypassing(id: UInt64, nextMarkerBlock: UInt64)
}

extension CacheEngine {
    /// Switches the cache mode: requests that reach the head of the queue from now on take the new
    /// mode's path (every path is safe after every other, so nothing waits or drains first), and
    /// the mode is recorded in the superblock before `completion` (a restart keeps it). Dirty
    /// blocks stay in the cache and are served until written back; in every mode but writeback
    /// writeback runs until none is left.
    public func setCacheMode(_ mode: CacheMode, completion: @escaping (Result<Void, Error>) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failure(failure)) }
        let previous = cacheMode
        cacheMode = mode
        logger.debug("cache mode \(previous.rawValue) -> \(mode.rawValue); \(index.dirtyCount) dirty blocks to write back")
        writeRecord(.cacheMode(mode)) { result in
            completion(result.mapError { $0 })
        }
        drive()
    }

    /// The tunables writeback decides with: outside writeback mode nothing may stay dirty.
    var writebackTunables: CacheTunables {
        guard effectiveCacheMode != .writeback else { return tunables }
        var effective = tunables
        effective.dirtyTargetPercent = 0
        return effective
    }

    /// Bypass modes send a write to the backing store unless a block of it is dirty in the cache
    /// (its other sectors live only here: the write joins them in the log) or being discarded.
    func chooseWritePath(offset: UInt64, lengthBytes: Int) -> WritePath {
        guard effectiveCacheMode.writesBypassLog else { return .logged }
        let blocks = blockRange(offset: offset, lengthBytes: lengthBytes)
        if bypass.overlaps(blocks) { return .undecided }
        for block in blocks {
            if discards.isBeingDiscarded(block) { return .logged }
            if let entry = index.lookup(block), entry.isDirty { return .logged }
        }
        let id = bypass.begin(blocks)
        // Reads of these blocks in flight must not cache what they read.
        fills.poison(blocks)
        return .bypassing(id: id, nextMarkerBlock: blocks.lowerBound)
    }

    func blockRange(offset: UInt64, lengthBytes: Int) -> Range<UInt64> {
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        return (offset / blockBytes)..<((offset + UInt64(lengthBytes) + blockBytes - 1) / blockBytes)
    }

    /// A bypass write at the head of the queue: it waits for writeback's backing writes of its
    /// blocks, places a discard marker for every block the cache holds (a clean copy: the backing
    /// store has its data, synced, so voiding it first loses nothing, and recovery can never
    /// replay it over the new data), then leaves the queue and goes to the backing store.
    func applyBypassWrite(_ update: inout PendingUpdate, data: ByteBuffer) -> ApplyOutcome {
        guard case .bypassing(let id, var next) = update.writePath, case .write(_, let fua) = update.kind else {
            preconditionFailure("a bypass write without its path")
        }
        let blocks = blockRange(offset: update.offset, lengthBytes: data.readableBytes)
        if let batch, batch.discardStarting(blocks) { return .blocked }
        for block in next..<blocks.upperBound {
            precondition(index.lookup(block)?.isDirty != true, "block \(block) became dirty under a bypass write")
        }
        let placed = placeDiscardMarkers(through: blocks.upperBound, from: &next)
        update.writePath = .bypassing(id: id, nextMarkerBlock: next)
        guard placed else { return .blocked }
        counters.userBytesWritten += UInt64(data.readableBytes)
        counters.bypassWrites += 1
        let copies = effectiveCacheMode == .writethrough ? writeThroughCopies(offset: update.offset, lengthBytes: data.readableBytes) : []
        sendBypassWrite(id: id, offset: update.offset, data: data, fua: fua, copies: copies,
                        completion: update.completion)
        return .handedOff
    }

    /// Writethrough: the whole blocks of a write become clean copies once the backing store has
    /// them, unless something writes or discards them meanwhile (the same rule as read misses).
    private func writeThroughCopies(offset: UInt64, lengthBytes: Int) -> [(blockNumber: UInt64, replyOffset: Int)] {
        var copies: [(blockNumber: UInt64, replyOffset: Int)] = []
        for piece in BlockSplit(offset: offset, lengthBytes: UInt64(lengthBytes)) where piece.sectorMask == 0xFF {
            fills.begin(piece.blockNumber)
            copies.append((piece.blockNumber, piece.requestOffset))
        }
        return copies
    }

    private func sendBypassWrite(id: UInt64, offset: UInt64, data: ByteBuffer, fua: Bool,
                                 copies: [(blockNumber: UInt64, replyOffset: Int)], completion: @escaping (consuming VolumeReply) -> Void) {
        backingLoad.begin(nowNs: clock.nowNs)
        let lengthBytes = data.readableBytes
        backingStore.write(offset: offset, bytes: data) { written in
            self.backingLoad.end(nowNs: self.clock.nowNs)
            let finish: (Result<Void, MediumError>) -> Void = { result in
                self.bypass.end(id)
                switch result {
                case .success:
                    self.counters.bypassBytesWritten += UInt64(lengthBytes)
                    if !fua { self.bypass.backingUnsynced = true }
                    if !copies.isEmpty { self.completeFills(copies, reply: .data(data), base: data.readerIndex, source: .writeThrough) }
                    // With FUA the markers must be durable too, this write's and any earlier one's
                    // (an earlier write or trim of the same blocks may have voided their cached
                    // copies): recovery must never find an old copy of a block whose new data was
                    // acknowledged as durable.
                    if fua && self.bypass.newestMarkerSegmentID > self.ring.syncedThroughID {
                        self.awaitDurability(self.durability.replyWait(fua: true), completion)
                    } else {
                        completion(.done)
                    }
                case .failure(let error):
                    if !copies.isEmpty { self.completeFills(copies, reply: .failed(.io(errno: error.errnoValue)), base: 0, source: .writeThrough) }
                    self.counters.bypassWriteErrors += 1
                    completion(.failed(.io(errno: error.errnoValue)))
                }
                self.drive()
            }
            guard case .success = written, fua else { return finish(written) }
            self.backingStore.synchronize { synced in
                self.counters.backingSyncs += 1
                finish(synced)
            }
        }
    }

    /// A FLUSH after bypass writes without FUA syncs the backing store as well as the log.
    func flushBypassWrites(_ completion: @escaping (consuming VolumeReply) -> Void) -> ((consuming VolumeReply) -> Void) {
        guard bypass.backingUnsynced || bypass.flushSyncsInFlight > 0 else { return completion }
        bypass.backingUnsynced = false
        bypass.flushSyncsInFlight += 1
        let join = CompletionJoin(outstanding: 2, completion: completion)
        backingStore.synchronize { synced in
            self.bypass.flushSyncsInFlight -= 1
            self.counters.backingSyncs += 1
            switch synced {
            case .success: join.partCompleted(.done)
            case .failure(let error):
                self.bypass.backingUnsynced = true
                join.partCompleted(.failed(.io(errno: error.errnoValue)))
            }
        }
        return join.partCompleted
    }
}
