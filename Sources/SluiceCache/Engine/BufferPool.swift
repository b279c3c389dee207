/// The engine's segment buffers and where each one is: open (being filled), sealed and being
/// written, written and waiting for a device sync (pmem mode, where the area may hold the only
/// durable copy), or free. The engine owns a fixed number of them, so their count bounds the
/// sealed segments in flight.
struct BufferPool {
    /// The buffer writes go to; nil while none is open.
    var open: (any WriteBuffer)?
    /// Buffers not in use.
    var free: [any WriteBuffer]
    /// Sealed segments whose device write has not completed, by ring slot.
    private(set) var sealedBySlot: [Int: any WriteBuffer] = [:]
    /// Sealed segments not yet written, by slot: they wait for reads of the slot's previous
    /// segment to finish.
    private(set) var writesWaitingForReaders: [Int: UnsafeRawBufferPointer] = [:]
    /// Written segments whose buffer stays until the cache device has synced them.
    private(set) var awaitingSync: [any WriteBuffer] = []

    /// Buffers the engine owns.
    let total: Int

    init(free: [any WriteBuffer]) {
        precondition(free.count >= 2, "the engine needs an open buffer and at least one sealed one")
        self.free = free
        total = free.count
    }

    /// The buffer holding segment `segmentID` (in ring slot `slot`) in memory, if any: the open
    /// one, a sealed one in flight, or one waiting for a sync. Its data stays valid until the
    /// buffer is reset.
    func inMemory(slot: Int, segmentID: UInt64) -> (any WriteBuffer)? {
        if let open, open.segmentID == segmentID { return open }
        if let sealed = sealedBySlot[slot], sealed.segmentID == segmentID { return sealed }
        return awaitingSync.first { $0.segmentID == segmentID }
    }

    /// Sealed segments not yet on the device or not yet synced there.
    var unsyncedCount: Int { sealedBySlot.count + awaitingSync.count }

    mutating func sealed(_ buffer: any WriteBuffer, slot: Int, bytes: UnsafeRawBufferPointer) {
        precondition(sealedBySlot[slot] == nil, "slot \(slot) is still being written")
        sealedBySlot[slot] = buffer
        writesWaitingForReaders[slot] = bytes
    }

    /// The sealed segment of `slot` if its write may start (and takes its bytes).
    mutating func takeWriteReady(slot: Int) -> (buffer: any WriteBuffer, bytes: UnsafeRawBufferPointer)? {
        guard let buffer = sealedBySlot[slot], let bytes = writesWaitingForReaders.removeValue(forKey: slot) else { return nil }
        return (buffer, bytes)
    }

    /// Segment `id`'s write completed: its buffer is free again, or waits for a sync.
    mutating func written(slot: Int, segmentID id: UInt64, waitsForSync: Bool) {
        guard let buffer = sealedBySlot.removeValue(forKey: slot) else {
            preconditionFailure("segment \(id) was written but its buffer is gone")
        }
        precondition(buffer.segmentID == id, "slot \(slot) held segment \(buffer.segmentID), not \(id)")
        if waitsForSync {
            awaitingSync.append(buffer)
        } else {
            buffer.reset()
            free.append(buffer)
        }
    }

    /// Whether a buffer waits for a sync covering segments up to `writtenThroughID`.
    func needsSync(writtenThroughID: UInt64, syncedThroughID: UInt64) -> Bool {
        awaitingSync.contains { $0.segmentID <= writtenThroughID && $0.segmentID > syncedThroughID }
    }

    /// Frees the buffers of segments the device has synced; returns whether any was freed.
    mutating func releaseSynced(through id: UInt64) -> Bool {
        var released = false
        awaitingSync.removeAll { buffer in
            guard buffer.segmentID <= id else { return false }
            buffer.reset()
            free.append(buffer)
            released = true
            return true
        }
        return released
    }
}
