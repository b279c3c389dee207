/// Decides when writeback runs, which dirty blocks a batch takes, and how many: the policy half
/// of writeback (the engine carries batches out, in `CacheEngine+Writeback.swift`).
///
/// Writeback makes dirty blocks clean on the backing store. It does not free ring space by itself
/// (the cleaner does), so it runs on its own triggers:
/// - *write back everything* (`sluice drain`, and the offline drain): always, as fast as it can;
/// - *the ring's tail* is nearly all dirty and the cleaner needs it (``Trigger/ringTail``): the
///   oldest segments' blocks first, so the tail can be reclaimed without relocating it;
/// - *max_age*: blocks of segments opened longer ago than that, oldest first;
/// - *dirty_target*: continuously while more of the cache than that is dirty, whatever the
///   backing store's load;
/// - *writeback_threshold*: opportunistically while the backing store is busy with foreground
///   work less than that share of the time, for at most a quarter of its time (a hot block
///   written back is soon dirty again: that work buys little).
///
/// Except for the tail and max_age, a batch takes the next dirty blocks in block order from where
/// the previous one stopped (an elevator sweep over the whole dirty set), so contiguous blocks
/// merge into single backing writes. Its size follows what the backing store managed: blocks per
/// second measured over the previous batches, times ``batchTargetNs``, so a batch never holds
/// anything up for long and a slow store gets small batches.
struct WritebackBatcher {
    /// Why a batch runs, shown by `status`.
    enum Trigger: String, Equatable, Sendable {
        case writeBackAll = "write back everything"
        case ringTail = "ring tail"
        case maxAge = "max_age"
        case dirtyTarget = "dirty_target"
        case backingIdle = "backing idle"
    }

    /// Which blocks a batch takes.
    enum Selection: Equatable {
        /// The next dirty blocks in block order, from `from`.
        case blockOrder(from: UInt64)
        /// Dirty blocks of the oldest segments, starting at the tail; with `openedBeforeNs`, only
        /// segments opened before then.
        case oldest(openedBeforeNs: UInt64?)
    }

    /// What the engine tells the batcher.
    struct Situation {
        var nowNs: UInt64
        var dirtyBlocks: Int
        var cacheBlocks: Int
        var writeBackAll: Bool
        var tailNeedsWriteback: Bool
        /// Writers wait for ring space, or the free slots are down to twice the cleaner's reserve:
        /// the tail's blocks are the ones whose writeback frees space, so every batch serves it
        /// (a block-order batch running when the tail needs writeback would delay it).
        var spaceIsShort = false
        /// The oldest dirty segment's open time, if any segment is dirty.
        var oldestDirtyOpenedAtNs: UInt64?
        var backingBusyPercent: Int
        /// A trim or write-zeroes is being passed down to the backing store: no batch may start.
        var discardPassingDown: Bool
        var blocksPerSegment: Int
        var tunables: CacheTunables
    }

    /// Target duration of one batch: short, so superseded blocks are skipped soon and the space
    /// the batch cleans comes back in small steps.
    static let batchTargetNs: UInt64 = 500_000_000
    static let batchBlocksMin = 16
    static let batchBlocksInitial = 256
    static let batchBlocksMax = 1 << 20

    /// Where the block-order sweep goes on.
    private(set) var cursor: UInt64 = 0
    /// Blocks the next batch takes (before the `nr_max_batched_writeback` cap).
    private(set) var batchBlocks = Self.batchBlocksInitial
    /// Blocks the next ring-tail batch takes: measured on its own, as the tail's oldest blocks are
    /// scattered (a backing request each) where a block-order sweep merges runs, and writers may
    /// be waiting for it. Sized like the others, to about ``batchTargetNs`` of the backing store.
    private(set) var tailBatchBlocks = Self.tailBatchBlocksInitial
    static let tailBatchBlocksInitial = 32
    /// No batch starts before this (a second after a failed one).
    private(set) var retryNotBeforeNs: UInt64 = 0
    /// No opportunistic batch starts before this: below the dirty target, writeback takes at most
    /// ``opportunisticDutyPercent`` of the backing store's time (and of the engine's effort),
    /// since data rewritten soon after is written back for nothing.
    private(set) var opportunisticNotBeforeNs: UInt64 = 0
    static let opportunisticDutyPercent: UInt64 = 25
    /// The last batch's trigger, for `status`.
    private(set) var lastTrigger: Trigger?

    /// Whether a batch should start now, why, and what it takes. The caller checked that none runs.
    mutating func next(_ situation: Situation) -> (trigger: Trigger, selection: Selection, maxBlocks: Int)? {
        guard situation.dirtyBlocks > 0, !situation.discardPassingDown, situation.nowNs >= retryNotBeforeNs else { return nil }
        let tunables = situation.tunables
        let cap = max(1, tunables.maxBatchedWritebackSegments) * situation.blocksPerSegment
        var trigger: Trigger?
        var selection = Selection.blockOrder(from: cursor)
        if situation.writeBackAll {
            trigger = .writeBackAll
        } else if situation.tailNeedsWriteback || situation.spaceIsShort {
            trigger = .ringTail
            selection = .oldest(openedBeforeNs: nil)
        } else if tunables.maxAgeSeconds > 0, let oldest = situation.oldestDirtyOpenedAtNs,
                  oldest < situation.nowNs, situation.nowNs - oldest > UInt64(tunables.maxAgeSeconds) * 1_000_000_000 {
            // Opened longer ago than max_age (strictly, as the selection takes segments opened
            // strictly before `openedBeforeNs`: the one that triggered is always among them).
            trigger = .maxAge
            selection = .oldest(openedBeforeNs: situation.nowNs - UInt64(tunables.maxAgeSeconds) * 1_000_000_000)
        } else if situation.dirtyBlocks * 100 > situation.cacheBlocks * tunables.dirtyTargetPercent {
            trigger = .dirtyTarget
        } else if tunables.writebackThresholdPercent > 0, situation.backingBusyPercent < tunables.writebackThresholdPercent,
                  situation.nowNs >= opportunisticNotBeforeNs {
            trigger = .backingIdle
        }
        guard let trigger else { return nil }
        lastTrigger = trigger
        return (trigger, selection, min(trigger == .ringTail ? tailBatchBlocks : batchBlocks, cap))
    }

    /// A block-order batch ended its sweep at `blockNumber` (the last block it took).
    mutating func sweptThrough(_ blockNumber: UInt64) {
        cursor = blockNumber &+ 1
    }

    /// The sweep reached the end of the dirty set: start again from block 0.
    mutating func sweepWrapped() {
        cursor = 0
    }

    /// A batch of `blocks` took `durationNs` from its first backing write to its sync: the next
    /// batch takes what the store managed per second times the target: after a full batch, at most
    /// twice as many blocks as this one and at least half; after a short one, no more than before
    /// and at least half as many as this one.
    mutating func finished(blocks: Int, durationNs: UInt64, nowNs: UInt64) {
        if lastTrigger == .backingIdle {
            opportunisticNotBeforeNs = nowNs + durationNs * (100 - Self.opportunisticDutyPercent) / Self.opportunisticDutyPercent
        }
        guard blocks > 0 else { return }
        if lastTrigger == .ringTail {
            if let next = Self.adjusted(tailBatchBlocks, blocks: blocks, durationNs: durationNs) { tailBatchBlocks = next }
        } else if let next = Self.adjusted(batchBlocks, blocks: blocks, durationNs: durationNs) {
            batchBlocks = next
        }
    }

    /// The next size after a batch of `blocks` (of `current` asked) that took `durationNs`, or nil
    /// to keep `current`.
    private static func adjusted(_ current: Int, blocks: Int, durationNs: UInt64) -> Int? {
        let perTarget = Double(blocks) * Double(Self.batchTargetNs) / Double(max(durationNs, 1_000_000))
        let next: Double
        if blocks >= current {
            next = min(Double(blocks) * 2, max(Double(blocks) / 2, perTarget))
        } else if perTarget < Double(current) {
            // Only a batch that was full says the store could have done more. A short one (the
            // dirty set, or the tail's oldest blocks, had fewer) can only say it did less: the size
            // goes down to what the store managed, if that is less. Twice the short batch is no
            // measure of the store: a fast ring-tail batch of 40 blocks would cut the size to 80.
            next = max(Double(blocks) / 2, perTarget)
        } else {
            return nil
        }
        return min(Self.batchBlocksMax, max(Self.batchBlocksMin, Int(next)))
    }

    mutating func failed(nowNs: UInt64) {
        retryNotBeforeNs = nowNs + 1_000_000_000
    }
}
