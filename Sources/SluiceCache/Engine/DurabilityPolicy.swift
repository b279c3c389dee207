import SluiceFormat

/// What a reply waits for before it goes out.
enum DurabilityWait: Equatable {
    /// Nothing: the reply is due now (volatile mode, a write without FUA).
    case none
    /// A barrier: the open buffer sealed as a partial segment and written, the cache device synced.
    case barrier
    /// The next pmem drain, shared by every reply due in the same turn (group commit).
    case persist
}

/// How acknowledged data becomes durable: the one place where volatile mode and pmem mode differ.
/// The engine asks, the policy decides, and the engine carries the decision out (barriers,
/// syncs, replies); the policy itself does only what needs its persistent memory.
///
/// What survives a power failure: in volatile mode, segments the cache device has synced; in pmem
/// mode, also everything a pmem drain covered (the open area's entries and sealed areas whose
/// segments the device has not synced yet).
protocol DurabilityPolicy: AnyObject {
    var mode: SuperblockHeader.Mode { get }
    /// The engine's segment buffers (DRAM buffers, or the areas of the pmem file).
    func makeBuffers(geometry: CacheGeometry) -> [any WriteBuffer]
    /// What the reply of an applied write, trim or write-zeroes waits for.
    func replyWait(fua: Bool) -> DurabilityWait
    /// What a FLUSH waits for; `repliesAwaitingPersist` says whether some reply waits for a drain.
    func flushWait(repliesAwaitingPersist: Bool) -> DurabilityWait
    /// Whether a sealed segment's buffer may hold its only durable copy, so it is reused only once
    /// the cache device has synced the segment (pmem), not as soon as the write completed.
    var buffersWaitForSync: Bool { get }
    /// Whether replies of one connection's burst share one drain at the burst's end.
    var groupsRepliesPerBurst: Bool { get }
    /// Whether ``persistAppended()`` makes appends durable by itself (pmem), so nothing needs a
    /// partial segment to become durable.
    var persistsAppends: Bool { get }
    /// Makes everything appended to the buffers so far durable, if the buffers can do that alone
    /// (pmem: one drain). Returns false when only a barrier can (volatile).
    func persistAppended() -> Bool
    /// The cache device has synced every segment up to `id`. Returns whether a pmem drain ran.
    func cacheDeviceSynced(through id: UInt64) -> Bool
    /// Recovery is over and its writes (and every segment it took from the device) are synced:
    /// whatever the buffers still hold from before is stale. Returns whether a pmem drain ran.
    func forgetStaleBuffers(geometry: CacheGeometry) -> Bool
}

/// Volatile mode: the buffers are DRAM, so only a synced segment on the cache device is durable.
/// A FUA write or FLUSH waits for a barrier.
final class VolatileDurability: DurabilityPolicy {
    var mode: SuperblockHeader.Mode { .volatile }
    var buffersWaitForSync: Bool { false }
    var groupsRepliesPerBurst: Bool { false }
    var persistsAppends: Bool { false }

    func makeBuffers(geometry: CacheGeometry) -> [any WriteBuffer] {
        (0..<CacheEngine.volatileBufferCount).map { _ in SegmentBuffer(geometry: geometry) }
    }

    func replyWait(fua: Bool) -> DurabilityWait { fua ? .barrier : .none }
    func flushWait(repliesAwaitingPersist: Bool) -> DurabilityWait { .barrier }
    func persistAppended() -> Bool { false }
    func cacheDeviceSynced(through id: UInt64) -> Bool { false }
    func forgetStaleBuffers(geometry: CacheGeometry) -> Bool { false }
}

/// Pmem mode: every write is persisted in the pmem file before its reply, so a FUA write needs
/// nothing more and a FLUSH only waits for replies still waiting for their drain.
final class PmemDurability: DurabilityPolicy {
    let memory: any PersistentMemory
    let layout: PmemLayout

    init(memory: any PersistentMemory, layout: PmemLayout) {
        precondition(layout.areaCount >= 2, "pmem mode needs an open area and at least one sealed one")
        self.memory = memory
        self.layout = layout
    }

    var mode: SuperblockHeader.Mode { .pmem }
    var buffersWaitForSync: Bool { true }
    var groupsRepliesPerBurst: Bool { true }
    var persistsAppends: Bool { true }

    func makeBuffers(geometry: CacheGeometry) -> [any WriteBuffer] {
        // Popped from the end: area 0 is used first, which keeps tests easy to follow.
        (0..<layout.areaCount).reversed().map {
            PmemSegmentBuffer(memory: memory, layout: layout, area: $0, geometry: geometry)
        }
    }

    func replyWait(fua: Bool) -> DurabilityWait { .persist }

    func flushWait(repliesAwaitingPersist: Bool) -> DurabilityWait {
        // Every write acknowledged so far was persisted before its reply, so a flush (which covers
        // only acknowledged writes) waits only for replies still waiting for their drain.
        repliesAwaitingPersist ? .persist : .none
    }

    func persistAppended() -> Bool {
        memory.drain()
        return true
    }

    /// Marks every area free in the pmem file. Recovery leaves the control words as it found
    /// them (it never writes the pmem file); an open area with no valid entry, say, keeps its id,
    /// which the next segment then gets too: left alone, a later crash would find two open areas
    /// with one id.
    func forgetStaleBuffers(geometry: CacheGeometry) -> Bool {
        for area in 0..<layout.areaCount {
            let offset = layout.areaOffset(area, geometry: geometry)
            memory.storeWord(PmemLayout.controlWord(segmentID: 0, state: .free), at: offset)
            memory.flush(offset: offset, count: 8)
        }
        memory.drain()
        return true
    }

    /// Persists how far the cache device has synced, so recovery can tell a log damaged inside
    /// from one torn at its end after a crash. A sync that synced no new segment changes nothing.
    func cacheDeviceSynced(through id: UInt64) -> Bool {
        guard id > memory.loadWord(at: PmemLayout.syncedWordOffset) else { return false }
        memory.storeWord(id, at: PmemLayout.syncedWordOffset)
        memory.flush(offset: PmemLayout.syncedWordOffset, count: 8)
        memory.drain()
        return true
    }
}
