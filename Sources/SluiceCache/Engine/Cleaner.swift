/// The cleaner: frees ring space by reclaiming the oldest segments (the ring's tail), one at a
/// time, in id order.
///
/// Reclaiming a segment leaves no dirty block in it: a block some newer write or discard
/// superseded needs nothing; a clean block (written back and synced) needs nothing either; a
/// still-live dirty block is *relocated*, copied forward to the head of the log (a sequential
/// write to the fast cache device) so the slot frees without waiting for the slow backing store.
/// A reclaimed segment is retired, and its slot reused, only after a superblock record saying so
/// is durable, and that record is written only once its *fence* has passed: every copy appended
/// up to the moment the reclaim completed (the relocated copies, and the newer copies that
/// superseded the segment's other blocks) is durable. So no slot is reused before every live
/// block it held is durable elsewhere.
///
/// A value type: the engine describes the ring (``Situation``), the cleaner answers with a
/// ``Decision``, and the engine carries it out and reports back (``relocationStarted(_:)``,
/// ``reclaimed(_:fenceID:)``).
struct Cleaner {
    struct Settings: Equatable {
        /// Start reclaiming when more of the ring than this is occupied (percent).
        var highWatermarkPercent = 50
        /// Stop once occupancy is down to this (percent).
        var lowWatermarkPercent = 45
    }

    /// The oldest segment not yet reclaimed (it is on the device).
    struct Tail: Equatable {
        var id: UInt64
        var dirtyBlocks: Int
    }

    /// What the engine tells the cleaner about the ring.
    struct Situation {
        /// Occupied slots, not counting reclaimed segments waiting for their record (percent).
        var occupancyPercent: Int
        var freeSegments: Int
        /// Slots writers may not take, so that relocation always has room to go on.
        var reserveSegments: Int
        /// How long the head of the write queue has waited for a free slot; nil: it does not wait.
        var writersWaitedForSpaceNs: UInt64?
        /// Reclaim every segment without dirty blocks, whatever the watermarks (a graceful close,
        /// or writing everything back).
        var reclaimCleanSegments: Bool
        var tail: Tail?
        var blocksPerSegment: Int
    }

    enum Decision: Equatable {
        case rest
        /// The tail holds no dirty block: reclaim it now, with no I/O but its record.
        case reclaimWithoutIO(UInt64)
        /// Relocate the tail's dirty blocks to the head of the log, then reclaim it.
        case relocate(UInt64)
        /// The same for a tail below the yield, because writers have waited for space past
        /// ``stalledWritersRelocateAfterNs``.
        case relocateForStalledWriters(UInt64)
        /// The tail is (nearly) all dirty, so relocating it would free (almost) nothing:
        /// writeback must clean the oldest segments first.
        case waitForWriteback(UInt64)
    }

    enum Phase: Equatable {
        case resting
        /// Between crossing the high watermark and getting down to the low one.
        case cleaning
    }

    /// The share of a segment that must be dead or clean for relocating it to pay while no writer
    /// waits (percent): below it, relocation would rewrite nearly a segment to free a sliver.
    static let relocationYieldPercentMin = 12
    /// Writers waiting longer than this for space get any relocation that frees something, however
    /// little: a writeback batch of the tail takes a second or more on a slow disk, and seconds in
    /// which nothing completes are worse than a burst of cache-device writes. Bounded to waits, so
    /// the ring does not turn into relocating itself lap after lap.
    static let stalledWritersRelocateAfterNs: UInt64 = 200_000_000

    var settings: Settings
    private(set) var phase = Phase.resting
    /// The segment being relocated; relocation runs one segment at a time.
    private(set) var relocatingID: UInt64?
    /// Reclaimed segments not yet retired, oldest first, each with its fence: the newest segment
    /// that held an append when its reclaim completed. The record retiring a segment waits until
    /// every segment up to its fence is durable.
    private(set) var fences: [(throughID: UInt64, fenceID: UInt64)] = []
    /// What the last ``decide(_:)`` answered.
    private(set) var lastDecision = Decision.rest
    /// No retirement record is written before this (a second after one failed).
    private(set) var retryNotBeforeNs: UInt64 = 0

    init(settings: Settings) {
        self.settings = settings
    }

    /// Whether writers should be told that space is short (reclaim is urgent).
    static func isUrgent(_ situation: Situation) -> Bool {
        situation.writersWaitedForSpaceNs != nil || situation.freeSegments <= situation.reserveSegments
    }

    mutating func decide(_ situation: Situation) -> Decision {
        lastDecision = decideNext(situation)
        return lastDecision
    }

    private mutating func decideNext(_ situation: Situation) -> Decision {
        if situation.occupancyPercent > settings.highWatermarkPercent {
            phase = .cleaning
        } else if situation.occupancyPercent <= settings.lowWatermarkPercent {
            phase = .resting
        }
        guard relocatingID == nil, let tail = situation.tail else { return .rest }
        let urgent = Self.isUrgent(situation)
        let wanted = phase == .cleaning || urgent
        if tail.dirtyBlocks == 0 {
            return wanted || situation.reclaimCleanSegments ? .reclaimWithoutIO(tail.id) : .rest
        }
        guard wanted else { return .rest }
        // Relocating a tail that is nearly all dirty frees almost nothing and rewrites almost a
        // segment: in a ring full of dirty data that turns into rewriting the ring over and over
        // (each lap gathers less garbage the faster it goes). Writeback of the tail's oldest blocks
        // brings it over the yield instead, whether or not writers wait.
        let gain = situation.blocksPerSegment - tail.dirtyBlocks
        if gain * 100 >= situation.blocksPerSegment * Self.relocationYieldPercentMin {
            return .relocate(tail.id)
        }
        if gain > 0, let waitedNs = situation.writersWaitedForSpaceNs, waitedNs >= Self.stalledWritersRelocateAfterNs {
            return .relocateForStalledWriters(tail.id)
        }
        return .waitForWriteback(tail.id)
    }

    mutating func relocationStarted(_ id: UInt64) {
        precondition(relocatingID == nil, "two segments relocated at once")
        relocatingID = id
    }

    /// The relocation of segment `id` stopped before it finished (a graceful close): the segment
    /// stays in the log, unreclaimed; what was relocated stays relocated.
    mutating func relocationAbandoned(_ id: UInt64) {
        precondition(relocatingID == id, "abandoning a relocation that is not running")
        relocatingID = nil
    }

    /// Segment `id` holds no dirty block any more; `fenceID` is the newest segment holding an
    /// append made so far.
    mutating func reclaimed(_ id: UInt64, fenceID: UInt64) {
        precondition(relocatingID == nil || relocatingID == id, "segment \(id) reclaimed while \(relocatingID!) is being relocated")
        precondition(fences.last.map { $0.throughID < id && $0.fenceID <= fenceID } ?? true, "reclaims out of order")
        relocatingID = nil
        fences.append((id, fenceID))
    }

    /// The newest reclaimed segment whose fence has passed, now that every segment up to
    /// `durableThroughID` is durable; those fences are dropped (a record will retire them).
    mutating func retirable(durableThroughID: UInt64) -> UInt64? {
        var ready: UInt64?
        while let first = fences.first, first.fenceID <= durableThroughID {
            ready = first.throughID
            fences.removeFirst()
        }
        return ready
    }

    /// The record retiring segments up to `id` failed: they are retirable again, a second from now.
    mutating func retryRetirement(through id: UInt64, nowNs: UInt64) {
        precondition(fences.first.map { $0.throughID > id } ?? true, "retirements out of order")
        fences.insert((id, 0), at: 0)
        retryNotBeforeNs = nowNs + 1_000_000_000
    }

    /// The fence the oldest waiting reclaim needs, if any.
    var oldestFenceID: UInt64? { fences.first?.fenceID }
}
