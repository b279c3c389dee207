/// Maps each cached 4 KiB block of the backing store (its block number) to the cache block that
/// holds its newest copy, in at most 14 bytes per cache block.
///
/// Two arrays, both allocated once for the cache's capacity:
/// - `residents`, one 8-byte word per cache block: the block number it holds and its sector mask
///   (bit *i*: sector *i* holds client data), or ``emptyResident``;
/// - `table`, an open-addressing hash table with linear probing and backward-shift deletion, one
///   4-byte cache-block position per slot and 1.5 slots per cache block. The key of a slot is read
///   from `residents`, so the table stores no keys.
///
/// dm-writeboost needs about 1% of the cache size for its metadata; this is 14 bytes per 4 KiB
/// block, 0.34%. The index holds only the newest copy of each block: a write that hits a block
/// already cached merges into a new copy and the old position is released.
public struct CacheIndex {
    /// A cache block position: segment slot × data blocks per segment + block within the segment.
    public typealias Position = UInt32

    /// The resident word of a cache block that holds nothing.
    public static let emptyResident = UInt64.max
    private static let emptySlot = Position.max

    public let capacity: Int
    private var residents: [UInt64]
    private var table: [Position]
    public private(set) var count = 0

    /// Creates an index for `capacity` cache blocks.
    public init(capacity: Int) {
        precondition(capacity > 0 && capacity < Int(Position.max), "cache block count out of range")
        self.capacity = capacity
        residents = [UInt64](repeating: Self.emptyResident, count: capacity)
        table = [Position](repeating: Self.emptySlot, count: capacity + capacity / 2 + 1)
    }

    /// Bytes of memory the index uses.
    public var memoryBytes: Int { residents.count * 8 + table.count * 4 }

    /// What a cache block holds, if anything.
    public func resident(at position: Position) -> (blockNumber: UInt64, sectorMask: UInt8)? {
        let word = residents[Int(position)]
        guard word != Self.emptyResident else { return nil }
        return (word >> 8, UInt8(truncatingIfNeeded: word))
    }

    /// Where the newest copy of `blockNumber` is, and which of its sectors it holds.
    public func lookup(_ blockNumber: UInt64) -> (position: Position, sectorMask: UInt8)? {
        var slot = home(of: blockNumber)
        // Bounded: the table always has empty slots (load ≤ 2/3), and a probe stops at one.
        for _ in 0..<table.count {
            let position = table[slot]
            if position == Self.emptySlot { return nil }
            let word = residents[Int(position)]
            if word >> 8 == blockNumber { return (position, UInt8(truncatingIfNeeded: word)) }
            slot = next(slot)
        }
        preconditionFailure("cache index probe found no empty slot")
    }

    /// Records that `position` now holds the newest copy of `blockNumber` with `sectorMask`.
    /// Returns the position of the copy it replaces, which the caller releases.
    @discardableResult
    public mutating func insert(_ blockNumber: UInt64, sectorMask: UInt8, at position: Position) -> Position? {
        precondition(blockNumber < (1 << 56), "block number beyond 2^56")
        precondition(sectorMask != 0, "an index entry must hold at least one sector")
        precondition(Int(position) < capacity, "cache position out of range")
        precondition(residents[Int(position)] == Self.emptyResident, "cache position \(position) is already in use")
        var slot = home(of: blockNumber)
        for _ in 0..<table.count {
            let current = table[slot]
            if current == Self.emptySlot {
                table[slot] = position
                residents[Int(position)] = blockNumber << 8 | UInt64(sectorMask)
                count += 1
                precondition(count <= capacity, "more entries than cache blocks")
                return nil
            }
            if residents[Int(current)] >> 8 == blockNumber {
                residents[Int(current)] = Self.emptyResident
                residents[Int(position)] = blockNumber << 8 | UInt64(sectorMask)
                table[slot] = position
                return current
            }
            slot = next(slot)
        }
        preconditionFailure("cache index is full")
    }

    /// Grows the sector mask of the copy at `position`, which must be the newest copy of its block
    /// (a block rewritten while it is still in the open buffer).
    public mutating func updateMask(at position: Position, to sectorMask: UInt8) {
        let word = residents[Int(position)]
        precondition(word != Self.emptyResident, "updating the mask of an empty cache position")
        precondition(sectorMask != 0 && UInt8(truncatingIfNeeded: word) & ~sectorMask == 0, "a mask may only grow")
        residents[Int(position)] = word & ~0xFF | UInt64(sectorMask)
    }

    /// Forgets the copy at `position`, if it is still the newest copy of its block (a superseded
    /// position is not in the table). Returns whether an entry was removed.
    @discardableResult
    public mutating func remove(at position: Position) -> Bool {
        let word = residents[Int(position)]
        guard word != Self.emptyResident else { return false }
        let blockNumber = word >> 8
        var slot = home(of: blockNumber)
        for _ in 0..<table.count {
            let current = table[slot]
            precondition(current != Self.emptySlot, "resident block \(blockNumber) is missing from the table")
            if current == position {
                residents[Int(position)] = Self.emptyResident
                deleteSlot(slot)
                count -= 1
                return true
            }
            slot = next(slot)
        }
        preconditionFailure("cache index probe found no empty slot")
    }

    /// Removes the entry of `blockNumber`, if cached; returns the position it occupied.
    @discardableResult
    public mutating func remove(blockNumber: UInt64) -> Position? {
        guard let (position, _) = lookup(blockNumber) else { return nil }
        remove(at: position)
        return position
    }

    /// Every (block number, position, mask) entry, in no particular order. For recovery checks and tests.
    public func entries() -> [(blockNumber: UInt64, position: Position, sectorMask: UInt8)] {
        table.compactMap { position in
            guard position != Self.emptySlot else { return nil }
            let word = residents[Int(position)]
            return (word >> 8, position, UInt8(truncatingIfNeeded: word))
        }
    }

    /// The longest distance of any entry from its home slot: a degenerate hash shows up here long
    /// before it shows up as a wrong answer.
    func longestProbe() -> Int {
        var longest = 0
        for (slot, position) in table.enumerated() where position != Self.emptySlot {
            let wanted = home(of: residents[Int(position)] >> 8)
            longest = max(longest, (slot - wanted + table.count) % table.count)
        }
        return longest
    }

    // MARK: - Hashing

    private func home(of blockNumber: UInt64) -> Int {
        // A 64-bit mix (the finaliser of MurmurHash3), then Lemire's multiply-shift range
        // reduction, which needs no power-of-two table size.
        var x = blockNumber
        x ^= x >> 33
        x &*= 0xff51_afd7_ed55_8ccd
        x ^= x >> 33
        x &*= 0xc4ce_b9fe_1a85_ec53
        x ^= x >> 33
        // Parenthesised: in Swift a shift binds tighter than a multiplication.
        return Int(((x >> 32) &* UInt64(table.count)) >> 32)
    }

    private func next(_ slot: Int) -> Int {
        slot + 1 == table.count ? 0 : slot + 1
    }

    /// Backward-shift deletion: moves later members of the probe run into the hole so lookups never
    /// need tombstones.
    private mutating func deleteSlot(_ slot: Int) {
        var hole = slot
        var probe = next(slot)
        for _ in 0..<table.count {
            let position = table[probe]
            if position == Self.emptySlot { break }
            let wanted = home(of: residents[Int(position)] >> 8)
            // Move the entry if its home is not within (hole, probe] cyclically.
            let distanceToHole = (hole - wanted + table.count) % table.count
            let distanceToProbe = (probe - wanted + table.count) % table.count
            if distanceToHole < distanceToProbe {
                table[hole] = position
                hole = probe
            }
            probe = next(probe)
        }
        table[hole] = Self.emptySlot
    }
}
