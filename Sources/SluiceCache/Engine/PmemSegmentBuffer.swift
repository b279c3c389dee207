import SluiceFormat

/// One segment buffer in persistent memory (pmem mode, issue 4; not yet used by the engine): the
/// same segment image as ``SegmentBuffer``, plus a control word and a per-block entry table that
/// make every write recoverable after a power failure.
///
/// Layout of a buffer area (offsets from the area's start, all 8-byte aligned):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | segment id (0: free) |
/// | 8 | 8 | state: 0 free, 1 open, 2 sealed |
/// | 4096 | 16 × n | entries: word 0 = LBA << 8 \| sector mask; word 1 = low 32 bits of the segment id << 32 \| CRC-32C of word 0 and the masked sectors |
/// | after the table | segment bytes | the segment image: header blocks, then data blocks |
///
/// The persistence protocol, safe at every instant:
/// - Writes only append: a rewrite of a block takes a new data block (merged with the older
///   copy's sectors), so a persisted block is never overwritten while it may be the only durable
///   copy, and a torn write can only damage a block that no valid entry describes yet.
/// - An entry is valid only if word 1 carries this segment's id and the CRC of word 0 and the data.
///   A torn entry, a stale entry from the segment this buffer held before, or an entry whose data
///   did not fully reach persistence fails that check. Data and entry are flushed together and
///   one drain (``persist()``) makes a whole group of writes durable: group commit.
/// - Sealing writes the segment header into the image, persists it, then the state word.
public final class PmemSegmentBuffer {
    public let geometry: CacheGeometry
    public let memory: any PersistentMemory
    public let areaOffset: Int
    public private(set) var segmentID: UInt64 = 0
    public private(set) var entries: [SegmentHeader.Entry] = []
    private var latest: [UInt64: Int] = [:]

    static let controlBytes = 4096
    static let entryBytes = 16

    /// Bytes one buffer area takes for `geometry`.
    public static func areaBytes(for geometry: CacheGeometry) -> Int {
        let table = (geometry.dataBlocksPerSegment * entryBytes + 4095) / 4096 * 4096
        return controlBytes + table + geometry.segmentBytes
    }

    private var tableOffset: Int { areaOffset + Self.controlBytes }
    private var imageOffset: Int { areaOffset + Self.areaBytes(for: geometry) - geometry.segmentBytes }
    private func dataOffset(_ index: Int) -> Int { imageOffset + (geometry.headerBlocks + index) * CacheGeometry.blockBytes }

    public init(memory: any PersistentMemory, areaOffset: Int, geometry: CacheGeometry) {
        precondition(areaOffset % 4096 == 0 && areaOffset + Self.areaBytes(for: geometry) <= memory.sizeBytes, "pmem area out of range")
        self.memory = memory
        self.areaOffset = areaOffset
        self.geometry = geometry
    }

    public var isFull: Bool { entries.count == geometry.dataBlocksPerSegment }
    public var isEmpty: Bool { entries.isEmpty }
    public func dataIndex(of blockNumber: UInt64) -> Int? { latest[blockNumber] }

    /// Opens the buffer for segment `id` and persists that.
    public func open(segmentID id: UInt64) {
        precondition(id > 0 && entries.isEmpty)
        segmentID = id
        memory.storeWord(id, at: areaOffset)
        memory.storeWord(1, at: areaOffset + 8)
        memory.flush(offset: areaOffset, count: 16)
        memory.drain()
    }

    /// Appends a copy of `blockNumber` holding the sectors of `sectorMask` from `block` (a whole
    /// 4 KiB image, sector *i* at 512 × *i*). Flushed, not yet drained: call ``persist()`` before
    /// acknowledging. Returns the data-block index used.
    @discardableResult
    public func append(blockNumber: UInt64, sectorMask: UInt8, block: UnsafeRawBufferPointer) -> Int {
        precondition(!isFull && block.count == CacheGeometry.blockBytes)
        let index = entries.count
        memory.copyAndFlush(to: dataOffset(index), from: block)
        commitEntry(index: index, blockNumber: blockNumber, sectorMask: sectorMask)
        return index
    }

    /// Appends a discard marker for `blockNumber`.
    @discardableResult
    public func appendDiscardMarker(blockNumber: UInt64) -> Int {
        precondition(!isFull)
        let index = entries.count
        commitEntry(index: index, blockNumber: blockNumber, sectorMask: 0)
        return index
    }

    private func commitEntry(index: Int, blockNumber: UInt64, sectorMask: UInt8) {
        let word0 = blockNumber << 8 | UInt64(sectorMask)
        let crc = Self.entryChecksum(word0: word0, data: UnsafeRawBufferPointer(start: memory.baseAddress + dataOffset(index), count: CacheGeometry.blockBytes))
        let word1 = (segmentID & 0xFFFF_FFFF) << 32 | UInt64(crc)
        let entryOffset = tableOffset + index * Self.entryBytes
        memory.storeWord(word0, at: entryOffset)
        memory.storeWord(word1, at: entryOffset + 8)
        memory.flush(offset: entryOffset, count: Self.entryBytes)
        entries.append(SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: sectorMask))
        latest[blockNumber] = index
    }

    /// Makes every append so far durable (one drain for the whole group).
    public func persist() {
        memory.drain()
    }

    static func entryChecksum(word0: UInt64, data: UnsafeRawBufferPointer) -> UInt32 {
        var crc = withUnsafeBytes(of: word0.littleEndian) { CRC32C.checksum($0) }
        let mask = UInt8(truncatingIfNeeded: word0)
        for sector in 0..<8 where mask & (1 << sector) != 0 {
            crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: data[(sector * 512)..<((sector + 1) * 512)]), continuing: crc)
        }
        return crc
    }

    /// What a buffer area holds after a power failure: its state and segment id, and every entry
    /// whose check passes, in order (a later valid entry of a block replaces an earlier one).
    public struct Recovered: Equatable {
        public var state: UInt64
        public var segmentID: UInt64
        public var validEntries: [(index: Int, entry: SegmentHeader.Entry)]

        public static func == (left: Recovered, right: Recovered) -> Bool {
            left.state == right.state && left.segmentID == right.segmentID
                && left.validEntries.map(\.index) == right.validEntries.map(\.index)
                && left.validEntries.map(\.entry) == right.validEntries.map(\.entry)
        }
    }

    public static func recover(memory: any PersistentMemory, areaOffset: Int, geometry: CacheGeometry) -> Recovered {
        let buffer = PmemSegmentBuffer(memory: memory, areaOffset: areaOffset, geometry: geometry)
        let id = memory.loadWord(at: areaOffset)
        let state = memory.loadWord(at: areaOffset + 8)
        var valid: [(Int, SegmentHeader.Entry)] = []
        guard id > 0, state != 0 else { return Recovered(state: state, segmentID: id, validEntries: []) }
        for index in 0..<geometry.dataBlocksPerSegment {
            let entryOffset = buffer.tableOffset + index * entryBytes
            let word0 = memory.loadWord(at: entryOffset)
            let word1 = memory.loadWord(at: entryOffset + 8)
            guard word1 >> 32 == id & 0xFFFF_FFFF else { continue }
            let data = UnsafeRawBufferPointer(start: memory.baseAddress + buffer.dataOffset(index), count: CacheGeometry.blockBytes)
            guard UInt32(truncatingIfNeeded: word1) == entryChecksum(word0: word0, data: data) else { continue }
            valid.append((index, SegmentHeader.Entry(blockNumber: word0 >> 8, sectorMask: UInt8(truncatingIfNeeded: word0))))
        }
        return Recovered(state: state, segmentID: id, validEntries: valid)
    }
}
