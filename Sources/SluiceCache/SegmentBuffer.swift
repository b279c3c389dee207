import SluiceFormat

/// One segment being filled in memory: the blocks written since it was opened, laid out exactly as
/// the segment will be written to the cache device (header blocks, then data blocks), so sealing
/// it costs one header encode and no copy.
///
/// A block written again while it is still here is updated in place, sector by sector (its sector
/// mask grows); a new block takes the next free data block. This is the volatile (DRAM) buffer; the
/// persistent-memory buffer keeps the same layout in a mapped file.
public struct SegmentBuffer {
    public let geometry: CacheGeometry
    /// Header blocks followed by data blocks: the bytes of the segment on the device.
    public private(set) var bytes: [UInt8]
    public private(set) var entries: [SegmentHeader.Entry] = []
    /// Where each block number sits among the data blocks.
    private var slots: [UInt64: Int] = [:]

    public static let sectorBytes = 512
    public static let sectorsPerBlock = CacheGeometry.blockBytes / sectorBytes

    public init(geometry: CacheGeometry) {
        self.geometry = geometry
        bytes = [UInt8](repeating: 0, count: geometry.segmentBytes)
        entries.reserveCapacity(geometry.dataBlocksPerSegment)
        slots.reserveCapacity(geometry.dataBlocksPerSegment)
    }

    public var isEmpty: Bool { entries.isEmpty }
    public var isFull: Bool { entries.count == geometry.dataBlocksPerSegment }
    public var blockCount: Int { entries.count }

    /// Whether a write to `blockNumber` fits without sealing: it is here already or a block is free.
    public func canAccept(_ blockNumber: UInt64) -> Bool {
        slots[blockNumber] != nil || !isFull
    }

    /// The data-block index of `blockNumber`, if it is here.
    public func dataIndex(of blockNumber: UInt64) -> Int? { slots[blockNumber] }

    /// Writes the sectors of `blockNumber` selected by `sectorMask` from `sectors` (which holds
    /// exactly those sectors, in order). Returns the data-block index used.
    @discardableResult
    public mutating func write(blockNumber: UInt64, sectorMask: UInt8, sectors: UnsafeRawBufferPointer) -> Int {
        precondition(sectorMask != 0)
        precondition(sectors.count == sectorMask.nonzeroBitCount * Self.sectorBytes, "sector data does not match the mask")
        let index: Int
        if let existing = slots[blockNumber] {
            index = existing
            entries[index].sectorMask |= sectorMask
        } else {
            precondition(!isFull, "write to a full segment buffer")
            index = entries.count
            entries.append(SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: sectorMask))
            slots[blockNumber] = index
        }
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        var source = 0
        bytes.withUnsafeMutableBytes { destination in
            for sector in 0..<Self.sectorsPerBlock where sectorMask & (1 << sector) != 0 {
                let target = destination.baseAddress! + base + sector * Self.sectorBytes
                target.copyMemory(from: sectors.baseAddress! + source, byteCount: Self.sectorBytes)
                source += Self.sectorBytes
            }
        }
        return index
    }

    /// The sector mask and the 4 KiB of data of `blockNumber`, if it is here. Sectors outside the
    /// mask are not meaningful.
    public func read(blockNumber: UInt64) -> (sectorMask: UInt8, block: ArraySlice<UInt8>)? {
        guard let index = slots[blockNumber] else { return nil }
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        return (entries[index].sectorMask, bytes[base..<(base + CacheGeometry.blockBytes)])
    }

    /// Writes the header for segment `segmentID` and returns the bytes to put on the device: the
    /// header and the used data blocks (a partial segment is shorter than a full one).
    public mutating func seal(segmentID: UInt64, cacheUUID: [UInt8], isPartial: Bool) -> ArraySlice<UInt8> {
        let header = SegmentHeader(segmentID: segmentID, cacheUUID: cacheUUID, isPartial: isPartial, entries: entries)
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        let usedBytes = headerBytes + entries.count * CacheGeometry.blockBytes
        bytes.withUnsafeMutableBytes { raw in
            header.encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<headerBytes]),
                          data: UnsafeRawBufferPointer(rebasing: raw[headerBytes...]), geometry: geometry)
        }
        return bytes[0..<usedBytes]
    }

    /// Empties the buffer for the next segment. The memory is kept.
    public mutating func reset() {
        entries.removeAll(keepingCapacity: true)
        slots.removeAll(keepingCapacity: true)
    }
}
