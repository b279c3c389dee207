/// Which read misses become clean copies in the cache: a value type the engine asks once per read
/// (no I/O, no clock), after bcache's sequential cutoff and Open CAS's promotion after N hits.
///
/// - A read that continues one of the last ``streamCount`` streams (it starts where one ended) adds
///   to that stream's length; once a stream is longer than the cutoff its reads are not cached, so a
///   backup or a scan streams through without flushing the hot set out. A read that continues no
///   stream starts one, replacing one not used since the clock hand last passed it (CLOCK, as
///   least recently used but O(1): a random read, which starts a stream every time, must cost
///   little).
/// - With `promoteHits` above 1, a block is cached only on its `promoteHits`-th miss; misses are
///   counted in a table of at most ``missTableCapacity`` blocks, emptied when it fills (a block
///   whose count is lost starts again: it is cached later, never wrongly).
struct ReadAdmission {
    static let streamCount = 128
    static let missTableCapacity = 1 << 16

    /// Where each stream's next read would start (kept apart so the search is one pass over
    /// contiguous words), its length so far, and whether it was used since the hand last passed.
    private var nextOffsets: [UInt64] = []
    private var lengthsBytes: [UInt64] = []
    private var referenced: [Bool] = []
    private var hand = 0
    private var misses: [UInt64: UInt8] = [:]

    /// Records a read of `lengthBytes` at `offset`; returns whether it belongs to a stream longer
    /// than `cutoffBytes` (0: no cutoff).
    mutating func isSequential(offset: UInt64, lengthBytes: UInt64, cutoffBytes: UInt64) -> Bool {
        if let index = nextOffsets.firstIndex(of: offset) {
            nextOffsets[index] = offset + lengthBytes
            lengthsBytes[index] += lengthBytes
            referenced[index] = true
            return cutoffBytes > 0 && lengthsBytes[index] > cutoffBytes
        }
        let index: Int
        if nextOffsets.count < Self.streamCount {
            index = nextOffsets.count
            nextOffsets.append(0)
            lengthsBytes.append(0)
            referenced.append(false)
        } else {
            // Bounded: one lap clears every bit, so the second finds an unreferenced stream.
            while referenced[hand] {
                referenced[hand] = false
                hand = (hand + 1) % Self.streamCount
            }
            index = hand
            hand = (hand + 1) % Self.streamCount
        }
        nextOffsets[index] = offset + lengthBytes
        lengthsBytes[index] = lengthBytes
        referenced[index] = false
        return cutoffBytes > 0 && lengthBytes > cutoffBytes
    }

    /// Counts a miss of `blockNumber`; returns whether it is promoted into the cache (`promoteHits`
    /// misses so far; 0 never promotes, 1 promotes every miss).
    mutating func promotes(_ blockNumber: UInt64, promoteHits: Int) -> Bool {
        guard promoteHits > 1 else { return promoteHits == 1 }
        let seen = Int(misses[blockNumber] ?? 0) + 1
        if seen >= promoteHits {
            misses[blockNumber] = nil
            return true
        }
        if misses.count >= Self.missTableCapacity { misses.removeAll(keepingCapacity: true) }
        misses[blockNumber] = UInt8(seen)
        return false
    }
}

/// Read misses whose backing-store reads are in flight and that may become clean copies. A write
/// or discard applied to such a block *poisons* it: the data being read may be older than what
/// the cache or the backing store now holds, so it must not be cached (the race that made
/// dm-writeboost's read cache return stale data). Bounded by the blocks of the reads in flight.
struct PendingFills {
    private var readers: [UInt64: (count: Int, poisoned: Bool)] = [:]

    var isEmpty: Bool { readers.isEmpty }
    var count: Int { readers.count }

    mutating func begin(_ blockNumber: UInt64) {
        readers[blockNumber, default: (0, false)].count += 1
    }

    /// A write or discard was applied to `blockNumber`.
    mutating func poison(_ blockNumber: UInt64) {
        if readers[blockNumber] != nil { readers[blockNumber]!.poisoned = true }
    }

    /// A write or discard was applied to the blocks `blocks`.
    mutating func poison(_ blocks: Range<UInt64>) {
        guard !readers.isEmpty else { return }
        if UInt64(readers.count) < UInt64(blocks.count) {
            for key in readers.keys where blocks.contains(key) { readers[key]!.poisoned = true }
        } else {
            for block in blocks { poison(block) }
        }
    }

    /// The read of `blockNumber` finished; returns whether its data may be cached.
    mutating func end(_ blockNumber: UInt64) -> Bool {
        guard let state = readers[blockNumber] else { preconditionFailure("a fill of block \(blockNumber) that never began") }
        if state.count == 1 {
            readers[blockNumber] = nil
        } else {
            readers[blockNumber]!.count -= 1
        }
        return !state.poisoned
    }
}
