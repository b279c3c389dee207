import SluiceVolume

/// Orders trims and write-zeroes against writeback and the log.
///
/// A whole-block discard, at the head of the update queue (later writes and discards wait behind
/// it, so none overtakes it):
/// 1. ``Stage/waiting``: until no writeback batch still has backing writes for any of its blocks,
///    so old data never lands on the backing store after it;
/// 2. ``Stage/passingDown``: the backing store does the discard and syncs it; no writeback batch
///    starts meanwhile;
/// 3. ``Stage/passedDown``: a discard marker goes into the open buffer for every block the index
///    holds, and the block leaves the index. A block the cleaner or writeback meets in the range
///    meanwhile counts as clean: the backing store already has the discard, synced.
///
/// The backing store has the discard, synced, before any marker exists, so a marker never becomes
/// durable over a backing store that still holds data older than the block's newest durable
/// copy. Until the markers are placed, reads of uncached blocks in the range return zeros.
struct DiscardSequencer {
    enum Stage {
        case waiting
        case passingDown
        case passedDown
        case failed(MediumError)
    }

    /// Discards started and not done placing their markers, by id: their block ranges.
    private(set) var rangesInFlight: [UInt64: Range<UInt64>] = [:]
    private var nextID: UInt64 = 1
    /// The discard the backing store is doing now (there is at most one: the queue's head).
    private(set) var passingDownID: UInt64?
    /// The head discard's blocks once the backing store has them, while their markers are placed.
    private(set) var passedDownRange: Range<UInt64>?

    var isPassingDown: Bool { passingDownID != nil }

    /// A discard of `blocks` goes to the backing store; returns its id.
    mutating func passDown(_ blocks: Range<UInt64>) -> UInt64 {
        precondition(passingDownID == nil && passedDownRange == nil, "two discards at the head of the queue")
        let id = nextID
        nextID += 1
        rangesInFlight[id] = blocks
        passingDownID = id
        return id
    }

    /// The backing store finished (discard and sync) the discard `id`, or failed it.
    mutating func passedDown(_ id: UInt64, succeeded: Bool) {
        precondition(passingDownID == id, "a backing discard completed that is not at the head of the queue")
        passingDownID = nil
        if succeeded {
            passedDownRange = rangesInFlight[id]
        } else {
            rangesInFlight[id] = nil
        }
    }

    /// Every marker of discard `id` is placed.
    mutating func markersPlaced(_ id: UInt64) {
        precondition(passedDownRange != nil && rangesInFlight[id] == passedDownRange,
                     "markers placed for a discard that is not the passed-down one")
        rangesInFlight[id] = nil
        passedDownRange = nil
    }

    /// Discard `id` was failed after a medium failure, wherever it stood.
    mutating func abandoned(_ id: UInt64) {
        if passingDownID == id { passingDownID = nil }
        if let range = rangesInFlight.removeValue(forKey: id), range == passedDownRange { passedDownRange = nil }
    }

    /// Whether `blockNumber` lies in a discard that has not placed its markers yet.
    func isBeingDiscarded(_ blockNumber: UInt64) -> Bool {
        guard !rangesInFlight.isEmpty else { return false }
        return rangesInFlight.values.contains { $0.contains(blockNumber) }
    }

    /// Whether `blockNumber` lies in the discard the backing store already has (markers pending).
    func isDiscardedOnBacking(_ blockNumber: UInt64) -> Bool {
        passedDownRange?.contains(blockNumber) ?? false
    }
}
