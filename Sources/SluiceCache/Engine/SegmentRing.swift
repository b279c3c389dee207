/// The ring of segment slots on the cache device, and where the log stands in it.
///
/// Segment ids grow by one forever; segment *id* lives in ring slot `(id − 1) mod segmentCount`.
/// Five positions, in this order, describe the log:
///
/// ```
///   retired ≤ R │ reclaimed R+1 … C │ live C+1 … (sealed, written ≤ W, synced ≤ S) … │ open │ next N
/// ```
///
/// - **retired** (`retiredThroughID`, R): a durable superblock record says no segment up to R is
///   needed any more; their slots are free (once no read of them is in flight).
/// - **reclaimed** (`reclaimedThroughID`, C ≥ R): the cleaner has left no dirty block in segments
///   up to C (each was relocated, written back, or superseded); they are retired by the next
///   record write whose durability fence has passed.
/// - **written** (`writtenThroughID`, W) and **synced** (`syncedThroughID`, S ≤ W): every
///   segment up to W is on the cache device, and up to S also synced.
/// - **next** (`nextSegmentID`, N): the id the next opened segment gets. Slots of segments
///   R+1 … N−1 are in use.
///
/// The ring only keeps these positions and their invariants; the engine decides when to move
/// them. Every change asserts the order R ≤ C ≤ W < N, S ≤ W, and that no more segments are live
/// than the ring has slots.
struct SegmentRing {
    let segmentCount: Int
    private(set) var retiredThroughID: UInt64
    private(set) var reclaimedThroughID: UInt64
    private(set) var nextSegmentID: UInt64
    private(set) var writtenThroughID: UInt64
    /// Segments written out of order, waiting for earlier ones before `writtenThroughID` moves.
    private var writtenAheadIDs: Set<UInt64> = []
    private(set) var syncedThroughID: UInt64
    /// Device reads in flight per ring slot: a slot is not overwritten while it is being read.
    private var readersPerSlot: [UInt16]
    /// When each slot's segment was opened: how old its oldest dirty block can be (`max_age`).
    private var openedAtNs: [UInt64]

    /// A ring whose log (after recovery) holds segments `retiredThroughID + 1 ..< nextSegmentID`,
    /// all on the device and synced.
    init(segmentCount: Int, retiredThroughID: UInt64, nextSegmentID: UInt64, nowNs: UInt64) {
        precondition(segmentCount >= 2, "a ring needs at least two slots")
        precondition(nextSegmentID > retiredThroughID, "the log cannot end before the last retired segment")
        precondition(nextSegmentID - 1 - retiredThroughID <= UInt64(segmentCount), "more live segments than slots")
        self.segmentCount = segmentCount
        self.retiredThroughID = retiredThroughID
        self.reclaimedThroughID = retiredThroughID
        self.nextSegmentID = nextSegmentID
        self.writtenThroughID = nextSegmentID - 1
        self.syncedThroughID = nextSegmentID - 1
        readersPerSlot = [UInt16](repeating: 0, count: segmentCount)
        openedAtNs = [UInt64](repeating: nowNs, count: segmentCount)
    }

    /// Segments occupying a slot (reclaimed, sealed or open) and slots free for new segments.
    var liveSegments: Int { Int(nextSegmentID - 1 - retiredThroughID) }
    var freeSegments: Int { segmentCount - liveSegments }
    /// Live segments as a share of the ring, in percent (what the watermarks compare against).
    var occupancyPercent: Int { liveSegments * 100 / segmentCount }
    /// Segments reclaimed and waiting for a record to retire them.
    var reclaimedNotRetired: Int { Int(reclaimedThroughID - retiredThroughID) }

    func slot(of id: UInt64) -> Int {
        precondition(id > 0, "segment ids start at 1")
        return Int((id - 1) % UInt64(segmentCount))
    }

    /// The live (not yet retired) segment in `slot`, if any.
    func segmentID(inSlot slot: Int) -> UInt64? {
        guard liveSegments > 0 else { return nil }
        let oldest = retiredThroughID + 1
        let distance = (UInt64(slot) + UInt64(segmentCount) - UInt64(self.slot(of: oldest))) % UInt64(segmentCount)
        let id = oldest + distance
        return id < nextSegmentID ? id : nil
    }

    /// The oldest segment not yet reclaimed, if it is on the device (reclaim needs its data there
    /// or in a buffer that stays until the device has it).
    var reclaimableTailID: UInt64? {
        let tail = reclaimedThroughID + 1
        return tail <= writtenThroughID ? tail : nil
    }

    /// When segment `id` was opened.
    func openedAtNs(of id: UInt64) -> UInt64 { openedAtNs[slot(of: id)] }

    // MARK: Events

    /// Opens the next segment in its slot. The caller checked that a slot is free; reads of the
    /// slot's retired segment may still be in flight, so the new segment's write waits for them.
    mutating func open(nowNs: UInt64) -> UInt64 {
        precondition(freeSegments > 0, "opening a segment in a full ring")
        let id = nextSegmentID
        nextSegmentID += 1
        openedAtNs[slot(of: id)] = nowNs
        return id
    }

    /// Segment `id`'s write to the device completed.
    mutating func written(_ id: UInt64) {
        precondition(id > retiredThroughID && id < nextSegmentID, "segment \(id) written outside the live log")
        guard id == writtenThroughID + 1 else {
            precondition(id > writtenThroughID && !writtenAheadIDs.contains(id), "segment \(id) written twice")
            writtenAheadIDs.insert(id)
            return
        }
        writtenThroughID = id
        while writtenAheadIDs.remove(writtenThroughID + 1) != nil { writtenThroughID += 1 }
        precondition(writtenThroughID < nextSegmentID)
    }

    /// A cache-device sync issued after every segment up to `id` had been written completed.
    mutating func synced(through id: UInt64) {
        precondition(id <= writtenThroughID, "a sync covers only segments written before it")
        syncedThroughID = max(syncedThroughID, id)
    }

    /// The cleaner left no dirty block in segment `id`, the oldest not yet reclaimed.
    mutating func reclaimed(_ id: UInt64) {
        precondition(id == reclaimedThroughID + 1 && id <= writtenThroughID,
                     "segment \(id) reclaimed out of order (reclaimed through \(reclaimedThroughID), written through \(writtenThroughID))")
        reclaimedThroughID = id
    }

    /// A record saying segments up to `id` are retired is durable: their slots are free.
    mutating func retired(through id: UInt64) {
        precondition(id > retiredThroughID && id <= reclaimedThroughID, "retiring segments that were not reclaimed")
        retiredThroughID = id
    }

    // MARK: Readers

    mutating func readerStarted(slot: Int) {
        readersPerSlot[slot] += 1
    }

    /// Returns whether the slot has no reader left.
    mutating func readerFinished(slot: Int) -> Bool {
        precondition(readersPerSlot[slot] > 0, "a read of slot \(slot) finished that never started")
        readersPerSlot[slot] -= 1
        return readersPerSlot[slot] == 0
    }

    func hasReaders(slot: Int) -> Bool { readersPerSlot[slot] > 0 }
}
