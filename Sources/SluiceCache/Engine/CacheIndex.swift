/// Maps each cached 4 KiB block of the backing store (its block number) to the cache block that
/// holds its newest copy, in at most 14.2 bytes per cache block.
///
/// Two arrays, both allocated once for the cache's capacity:
/// - `residents`, one 8-byte word per cache block: the block number it holds and its sector mask
///   (bit *i*: sector *i* holds client data), or ``emptyResident``;
/// - `table`, an open-addressing hash table with linear probing and backward-shift deletion, one
///   4-byte cache-block position per slot and 1.5 slots per cache block. The key of a slot is read
///   from `residents`, so the table stores no keys.
///
/// Every entry is *dirty* (its data is newer than the backing store's) or *clean* (writeback
/// wrote it and synced the backing store; one bit per cache block). The index also counts, per
/// ring slot, the entries pointing into it and how many of them are dirty, which is what the
/// cleaner needs to decide how to reclaim the ring's tail.
///
/// dm-writeboost needs about 1% of the cache size for its metadata; this is about 14 bytes per
/// 4 KiB block, 0.35%. The index holds only the newest copy of each block: a write that hits a
/// block already cached merges into a new copy and the old position is released.
public struct CacheIndex {
    /// A cache block position: segment slot × data blocks per segment + block within the segment.
    public typealias Position = UInt32

    /// The resident word of a cache block that holds nothing.
    public static let emptyResident = UInt64.max
    private static let emptySlot = Position.max

    /// What a cache block holds: a block number, its sectors, and whether it is dirty.
    public struct Resident: Equatable, Sendable {
        public var blockNumber: UInt64
        public var sectorMask: UInt8
        public var isDirty: Bool
    }

    /// Where the newest copy of a block is, its sectors, and whether it is dirty.
    public struct Entry: Equatable, Sendable {
        public var position: Position
        public var sectorMask: UInt8
        public var isDirty: Bool
    }

    public let capacity: Int
    /// Cache blocks per ring slot (a segment's data blocks); positions of slot *s* are
    /// `s × positionsPerSlot ..< (s + 1) × positionsPerSlot`.
    public let positionsPerSlot: Int
    private var residents: [UInt64]
    private var table: [Position]
    /// One bit per cache block: set when the entry there is clean.
    private var cleanBits: [UInt64]
    /// Per position: read since it was cached or last moved (the cleaner keeps such clean copies:
    /// CLOCK's reference bit).
    private var hitBits: [UInt64]
    /// Per ring slot: entries pointing into it, and how many of them are dirty.
    private var liveBySlot: [UInt16]
    private var dirtyBySlot: [UInt16]
    public private(set) var count = 0
    public private(set) var dirtyCount = 0

    /// Creates an index for `capacity` cache blocks in ring slots of `positionsPerSlot` each (the
    /// engine's: a segment's data blocks; by default up to 4096).
    public init(capacity: Int, positionsPerSlot: Int? = nil) {
        precondition(capacity > 0 && capacity < Int(Position.max), "cache block count out of range")
        let perSlot = positionsPerSlot ?? min(capacity, 4096)
        precondition(perSlot > 0 && perSlot <= Int(UInt16.max), "positions per slot out of range")
        self.capacity = capacity
        self.positionsPerSlot = perSlot
        residents = [UInt64](repeating: Self.emptyResident, count: capacity)
        table = [Position](repeating: Self.emptySlot, count: capacity + capacity / 2 + 1)
        cleanBits = [UInt64](repeating: 0, count: (capacity + 63) / 64)
        hitBits = cleanBits
        liveBySlot = [UInt16](repeating: 0, count: (capacity + perSlot - 1) / perSlot)
        dirtyBySlot = liveBySlot
    }

    /// Bytes of memory the index uses.
    public var memoryBytes: Int { residents.count * 8 + table.count * 4 + cleanBits.count * 16 + liveBySlot.count * 4 }

    /// What a cache block holds, if anything.
    public func resident(at position: Position) -> Resident? {
        let word = residents[Int(position)]
        guard word != Self.emptyResident else { return nil }
        return Resident(blockNumber: word >> 8, sectorMask: UInt8(truncatingIfNeeded: word), isDirty: !isCleanBit(position))
    }

    /// Where the newest copy of `blockNumber` is, which of its sectors it holds, and whether it is dirty.
    public func lookup(_ blockNumber: UInt64) -> Entry? {
        var slot = home(of: blockNumber)
        // Bounded: the table always has empty slots (load ≤ 2/3), and a probe stops at one.
        for _ in 0..<table.count {
            let position = table[slot]
            if position == Self.emptySlot { return nil }
            let word = residents[Int(position)]
            if word >> 8 == blockNumber {
                return Entry(position: position, sectorMask: UInt8(truncatingIfNeeded: word), isDirty: !isCleanBit(position))
            }
            slot = next(slot)
        }
        preconditionFailure("cache index probe found no empty slot")
    }

    /// Records that `position` now holds the newest copy of `blockNumber` with `sectorMask`, dirty.
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
                setHitBit(position, false)
                residents[Int(position)] = blockNumber << 8 | UInt64(sectorMask)
                count += 1
                precondition(count <= capacity, "more entries than cache blocks")
                counted(position, live: 1, dirty: 1)
                return nil
            }
            if residents[Int(current)] >> 8 == blockNumber {
                counted(current, live: -1, dirty: isCleanBit(current) ? 0 : -1)
                setCleanBit(current, false)
                setHitBit(current, false)
                setHitBit(position, false)
                residents[Int(current)] = Self.emptyResident
                residents[Int(position)] = blockNumber << 8 | UInt64(sectorMask)
                table[slot] = position
                counted(position, live: 1, dirty: 1)
                return current
            }
            slot = next(slot)
        }
        preconditionFailure("cache index is full")
    }

    /// Grows the sector mask of the copy at `position`, which must be the newest copy of its block
    /// (a block rewritten while it is still in the open buffer). The copy is dirty again.
    public mutating func updateMask(at position: Position, to sectorMask: UInt8) {
        let word = residents[Int(position)]
        precondition(word != Self.emptyResident, "updating the mask of an empty cache position")
        precondition(sectorMask != 0 && UInt8(truncatingIfNeeded: word) & ~sectorMask == 0, "a mask may only grow")
        residents[Int(position)] = word & ~0xFF | UInt64(sectorMask)
        if isCleanBit(position) {
            setCleanBit(position, false)
            counted(position, live: 0, dirty: 1)
        }
    }

    /// Marks the copy at `position` clean: its data is on the backing store, synced. Returns
    /// whether it was dirty.
    @discardableResult
    public mutating func markClean(at position: Position) -> Bool {
        precondition(residents[Int(position)] != Self.emptyResident, "marking an empty cache position clean")
        guard !isCleanBit(position) else { return false }
        setCleanBit(position, true)
        counted(position, live: 0, dirty: -1)
        return true
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
                counted(position, live: -1, dirty: isCleanBit(position) ? 0 : -1)
                setCleanBit(position, false)
                setHitBit(position, false)
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
        guard let entry = lookup(blockNumber) else { return nil }
        remove(at: entry.position)
        return entry.position
    }

    /// Entries pointing into ring slot `slot`, and how many of them are dirty.
    public func liveBlocks(inSlot slot: Int) -> Int { Int(liveBySlot[slot]) }
    public func dirtyBlocks(inSlot slot: Int) -> Int { Int(dirtyBySlot[slot]) }

    /// The positions of ring slot `slot`.
    public func positions(ofSlot slot: Int) -> Range<Position> {
        Position(slot * positionsPerSlot)..<Position(min(capacity, (slot + 1) * positionsPerSlot))
    }

    /// Every entry, in no particular order. For recovery checks and tests.
    public func entries() -> [(blockNumber: UInt64, position: Position, sectorMask: UInt8)] {
        table.compactMap { position in
            guard position != Self.emptySlot else { return nil }
            let word = residents[Int(position)]
            return (word >> 8, position, UInt8(truncatingIfNeeded: word))
        }
    }

    /// Calls `body` with every dirty entry's block number and position, in position order, for
    /// the positions `positions` selects (writeback's candidates).
    public func forEachDirty(in positions: Range<Position>, _ body: (UInt64, Position) -> Void) {
        for position in positions {
            let word = residents[Int(position)]
            if word != Self.emptyResident && !isCleanBit(position) { body(word >> 8, position) }
        }
    }

    /// Checks the per-slot counts against the entries (a full scan: tests and recovery checks).
    public func countsAreConsistent() -> Bool {
        var live = [Int](repeating: 0, count: liveBySlot.count)
        var dirty = live
        for position in 0..<capacity where residents[position] != Self.emptyResident {
            live[position / positionsPerSlot] += 1
            if !isCleanBit(Position(position)) { dirty[position / positionsPerSlot] += 1 }
        }
        return live == liveBySlot.map(Int.init) && dirty == dirtyBySlot.map(Int.init)
            && live.reduce(0, +) == count && dirty.reduce(0, +) == dirtyCount
    }

    // MARK: - Clean bits and counts

    /// A read was served from the copy at `position`. Dirty copies are marked too: the cleaner
    /// keeps only clean copies whose bit is set, and writeback makes a dirty copy clean in place,
    /// so a block read while dirty must not look cold the moment it is written back (the hot set
    /// of a read/write mix would be dropped by the cleaner and miss, at 8 ms each on a slow disk).
    @inline(__always)
    public mutating func noteHit(at position: Position) {
        setHitBit(position, true)
    }

    /// Whether the copy at `position` was read since it was cached or moved there.
    @inline(__always)
    public func wasHit(at position: Position) -> Bool { Self.bit(position, in: hitBits) }

    @inline(__always)
    private mutating func setHitBit(_ position: Position, _ hit: Bool) { Self.setBit(position, hit, in: &hitBits) }

    @inline(__always)
    private func isCleanBit(_ position: Position) -> Bool { Self.bit(position, in: cleanBits) }

    @inline(__always)
    private mutating func setCleanBit(_ position: Position, _ clean: Bool) { Self.setBit(position, clean, in: &cleanBits) }

    /// One bit per position in a bitset of 64-bit words.
    @inline(__always)
    private static func bit(_ position: Position, in words: [UInt64]) -> Bool {
        words[Int(position) >> 6] & (1 << (UInt64(position) & 63)) != 0
    }

    @inline(__always)
    private static func setBit(_ position: Position, _ value: Bool, in words: inout [UInt64]) {
        let bit: UInt64 = 1 << (UInt64(position) & 63)
        if value { words[Int(position) >> 6] |= bit } else { words[Int(position) >> 6] &= ~bit }
    }

    @inline(__always)
    private mutating func counted(_ position: Position, live: Int, dirty: Int) {
        let slot = Int(position) / positionsPerSlot
        liveBySlot[slot] = UInt16(Int(liveBySlot[slot]) + live)
        dirtyBySlot[slot] = UInt16(Int(dirtyBySlot[slot]) + dirty)
        dirtyCount += dirty
        precondition(dirtyBySlot[slot] <= liveBySlot[slot] && dirtyCount <= count, "dirty blocks outnumber live ones")
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
