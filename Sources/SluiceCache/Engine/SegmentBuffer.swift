import NIOCore
import SluiceFormat

/// One segment being filled in memory: the blocks written since it was opened, laid out exactly as
/// the segment will be written to the cache device (header blocks, then data blocks), so sealing
/// it costs one header encode and no copy.
///
/// A block written again while it is still here is updated in place, sector by sector (its sector
/// mask grows); a new block takes the next free data block. This is the volatile (DRAM) buffer; the
/// persistent-memory buffer keeps the same layout in a mapped file behind the same ``WriteBuffer``
/// protocol.
public final class SegmentBuffer: WriteBuffer {
    public let geometry: CacheGeometry
    /// Header blocks followed by data blocks: the bytes of the segment on the device. Allocated
    /// once, 4 KiB-aligned so the cache device can be written with O_DIRECT straight from it, and
    /// reused for every segment this buffer holds.
    private let storage: UnsafeMutableRawBufferPointer
    public private(set) var entries: [SegmentHeader.Entry] = []
    /// Where each block number sits among the data blocks.
    private var dataIndexByBlock: [UInt64: Int] = [:]
    public private(set) var segmentID: UInt64 = 0

    public init(geometry: CacheGeometry) {
        self.geometry = geometry
        storage = .allocate(byteCount: geometry.segmentBytes, alignment: CacheGeometry.blockBytes)
        storage.initializeMemory(as: UInt8.self, repeating: 0)
        entries.reserveCapacity(geometry.dataBlocksPerSegment)
        dataIndexByBlock.reserveCapacity(geometry.dataBlocksPerSegment)
    }

    deinit {
        storage.deallocate()
    }

    public var isEmpty: Bool { entries.isEmpty }
    public var isFull: Bool { entries.count == geometry.dataBlocksPerSegment }
    public var blockCount: Int { entries.count }

    public func open(segmentID: UInt64) {
        precondition(entries.isEmpty && dataIndexByBlock.isEmpty, "opening a buffer that still holds a segment")
        self.segmentID = segmentID
    }

    /// Whether a write to `blockNumber` fits without sealing: it is here already or a block is free.
    public func canAccept(_ blockNumber: UInt64) -> Bool {
        dataIndexByBlock[blockNumber] != nil || !isFull
    }

    public func dataIndex(of blockNumber: UInt64) -> Int? { dataIndexByBlock[blockNumber] }

    public func sectorMask(at dataIndex: Int) -> UInt8 { entries[dataIndex].sectorMask }

    /// Writes the sectors of `blockNumber` selected by `sectorMask` from `sectors` (which holds
    /// exactly those sectors, in order). Returns the data-block index used.
    @discardableResult
    public func write(blockNumber: UInt64, sectorMask: UInt8, sectors: UnsafeRawBufferPointer) -> Int {
        precondition(sectorMask != 0)
        precondition(sectors.count == sectorMask.nonzeroBitCount * CacheGeometry.sectorBytes, "sector data does not match the mask")
        let index = claim(blockNumber, sectorMask: sectorMask)
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        var source = 0
        let destination = storage
        // Copy each run of consecutive sectors at once.
        forEachSectorRun(sectorMask) { sector, count in
            let length = count * CacheGeometry.sectorBytes
            (destination.baseAddress! + base + sector * CacheGeometry.sectorBytes)
                .copyMemory(from: sectors.baseAddress! + source, byteCount: length)
            source += length
        }
        return index
    }

    /// Writes the sectors selected by `sectorMask` from a whole 4 KiB `block` (sector *i* at byte
    /// 512 × *i*), for merged copies.
    @discardableResult
    public func write(blockNumber: UInt64, sectorMask: UInt8, block: UnsafeRawBufferPointer) -> Int {
        precondition(sectorMask != 0 && block.count == CacheGeometry.blockBytes)
        let index = claim(blockNumber, sectorMask: sectorMask)
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        let destination = storage
        forEachSectorRun(sectorMask) { sector, count in
            (destination.baseAddress! + base + sector * CacheGeometry.sectorBytes)
                .copyMemory(from: block.baseAddress! + sector * CacheGeometry.sectorBytes, byteCount: count * CacheGeometry.sectorBytes)
        }
        return index
    }

    /// Appends a clean copy of `blockNumber`: the whole 4 KiB `block` as read from the backing
    /// store. The block may be here only as a discard marker, which the copy replaces (both
    /// supersede the block's earlier copies). Returns the data-block index used.
    @discardableResult
    public func writeClean(blockNumber: UInt64, block: UnsafeRawBufferPointer) -> Int {
        precondition(block.count == CacheGeometry.blockBytes)
        precondition(dataIndexByBlock[blockNumber].map { entries[$0].sectorMask == 0 } ?? true,
                     "a clean copy over a copy with data in the open buffer")
        let index = claim(blockNumber, sectorMask: 0xFF)
        entries[index].isClean = true
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        (storage.baseAddress! + base).copyMemory(from: block.baseAddress!, byteCount: CacheGeometry.blockBytes)
        return index
    }

    /// Marks `blockNumber` discarded in this segment: an entry with an empty mask, which replay
    /// takes as "forget every earlier copy". Returns the data-block index used.
    @discardableResult
    public func markDiscarded(blockNumber: UInt64) -> Int {
        if let index = dataIndexByBlock[blockNumber] {
            entries[index].sectorMask = 0
            entries[index].isClean = false
            return index
        }
        precondition(!isFull, "discard marker in a full segment buffer")
        let index = entries.count
        entries.append(SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: 0))
        dataIndexByBlock[blockNumber] = index
        return index
    }

    private func claim(_ blockNumber: UInt64, sectorMask: UInt8) -> Int {
        if let existing = dataIndexByBlock[blockNumber] {
            // A write over a clean copy here makes the whole block dirty: the copy's other sectors
            // are the backing store's, and they go back with it.
            entries[existing].sectorMask |= sectorMask
            entries[existing].isClean = false
            return existing
        }
        precondition(!isFull, "write to a full segment buffer")
        let index = entries.count
        entries.append(SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: sectorMask))
        dataIndexByBlock[blockNumber] = index
        return index
    }

    /// Calls `body` with the 4 KiB of data block `dataIndex`. Sectors outside its mask are not meaningful.
    public func withBlock<Result>(at dataIndex: Int, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        precondition(dataIndex < geometry.dataBlocksPerSegment)
        let base = (geometry.headerBlocks + dataIndex) * CacheGeometry.blockBytes
        return try body(UnsafeRawBufferPointer(rebasing: storage[base..<(base + CacheGeometry.blockBytes)]))
    }

    /// The sector mask and the 4 KiB of data of `blockNumber`, if it is here (for tests).
    public func read(blockNumber: UInt64) -> (sectorMask: UInt8, block: [UInt8])? {
        guard let index = dataIndexByBlock[blockNumber] else { return nil }
        return (entries[index].sectorMask, withBlock(at: index) { Array($0) })
    }

    /// Writes the header and returns the bytes to put on the device: the header and the used data
    /// blocks (a partial segment is shorter than a full one). They are this buffer's own memory:
    /// valid, and unchanged, until ``reset()``.
    public func seal(cacheUUID: [UInt8], isPartial: Bool) -> UnsafeRawBufferPointer {
        precondition(segmentID > 0, "sealing a buffer that was never opened")
        let header = SegmentHeader(segmentID: segmentID, cacheUUID: cacheUUID, isPartial: isPartial, entries: entries)
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        let usedBytes = headerBytes + entries.count * CacheGeometry.blockBytes
        header.encode(into: UnsafeMutableRawBufferPointer(rebasing: storage[0..<headerBytes]),
                      data: UnsafeRawBufferPointer(rebasing: storage[headerBytes...]), geometry: geometry)
        return UnsafeRawBufferPointer(rebasing: storage[0..<usedBytes])
    }

    /// Empties the buffer for the next segment. The memory is kept.
    public func reset() {
        entries.removeAll(keepingCapacity: true)
        dataIndexByBlock.removeAll(keepingCapacity: true)
        segmentID = 0
    }
}

/// The seam between the engine and the memory that holds the open segment: DRAM here
/// (``SegmentBuffer``), persistent memory in pmem mode. The engine uses nothing else of a buffer.
public protocol WriteBuffer: AnyObject {
    var geometry: CacheGeometry { get }
    var segmentID: UInt64 { get }
    var entries: [SegmentHeader.Entry] { get }
    var isEmpty: Bool { get }
    var isFull: Bool { get }
    var blockCount: Int { get }
    func open(segmentID: UInt64)
    /// Whether a write to `blockNumber` fits without sealing.
    func canAccept(_ blockNumber: UInt64) -> Bool
    func dataIndex(of blockNumber: UInt64) -> Int?
    func sectorMask(at dataIndex: Int) -> UInt8
    @discardableResult func write(blockNumber: UInt64, sectorMask: UInt8, sectors: UnsafeRawBufferPointer) -> Int
    @discardableResult func write(blockNumber: UInt64, sectorMask: UInt8, block: UnsafeRawBufferPointer) -> Int
    @discardableResult func markDiscarded(blockNumber: UInt64) -> Int
    /// Appends a clean copy (a whole block read from the backing store). It needs no persist.
    @discardableResult func writeClean(blockNumber: UInt64, block: UnsafeRawBufferPointer) -> Int
    func withBlock<Result>(at dataIndex: Int, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result
    func seal(cacheUUID: [UInt8], isPartial: Bool) -> UnsafeRawBufferPointer
    func reset()
}
