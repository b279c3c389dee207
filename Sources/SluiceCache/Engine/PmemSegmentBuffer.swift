import SluiceFormat

/// One segment buffer in persistent memory (pmem mode): an area of the pmem file (see
/// ``PmemLayout``) holding the segment image exactly as it will be written to the cache device,
/// plus a control word and a per-block entry table that make every write recoverable after a
/// power failure.
///
/// The persistence protocol, safe at every instant:
/// - Writes only append: a rewrite of a block takes a new data block (merged with the older
///   copy's sectors), so a persisted block is never overwritten while it may be the only durable
///   copy, and a torn write can only damage a block that no valid entry describes yet.
/// - An entry is valid only if word 1 carries this segment's id and the CRC of word 0 and the data.
///   A torn entry, a stale entry from the segment this area held before, or an entry whose data
///   did not fully reach persistence fails that check. Data and entry are flushed together, and
///   one drain (``persist()``) makes a whole group of writes durable: group commit.
/// - Opening and sealing store the control word (one atomic 8-byte store) and drain. Sealing
///   first writes and persists the segment header in the image, so a sealed area always holds a
///   complete, verifiable segment.
public final class PmemSegmentBuffer: WriteBuffer {
    public let geometry: CacheGeometry
    public let memory: any PersistentMemory
    public let layout: PmemLayout
    public let area: Int
    public private(set) var segmentID: UInt64 = 0
    public private(set) var entries: [SegmentHeader.Entry] = []
    /// The CRC-32C of each data block, where its entry's checksum gave it for free (a whole block);
    /// nil where the seal must read the block (a partial copy or a discard marker).
    private var blockChecksums: [UInt32?] = []
    /// The data-block index of the newest copy (or discard marker) of each block.
    private var latest: [UInt64: Int] = [:]
    private let areaOffset: Int
    private let tableOffset: Int
    private let imageOffset: Int

    public init(memory: any PersistentMemory, layout: PmemLayout, area: Int, geometry: CacheGeometry) {
        precondition(layout.fileBytes(for: geometry) <= memory.sizeBytes, "the pmem mapping is smaller than its layout")
        self.memory = memory
        self.layout = layout
        self.area = area
        self.geometry = geometry
        areaOffset = layout.areaOffset(area, geometry: geometry)
        tableOffset = layout.tableOffset(area, geometry: geometry)
        imageOffset = layout.imageOffset(area, geometry: geometry)
        precondition(imageOffset % CacheGeometry.blockBytes == 0, "a pmem segment image must be 4 KiB-aligned")
        entries.reserveCapacity(geometry.dataBlocksPerSegment)
        blockChecksums.reserveCapacity(geometry.dataBlocksPerSegment)
        latest.reserveCapacity(geometry.dataBlocksPerSegment)
    }

    private func dataOffset(_ index: Int) -> Int { imageOffset + (geometry.headerBlocks + index) * CacheGeometry.blockBytes }

    public var isFull: Bool { entries.count == geometry.dataBlocksPerSegment }
    public var isEmpty: Bool { entries.isEmpty }
    public var blockCount: Int { entries.count }
    public func dataIndex(of blockNumber: UInt64) -> Int? { latest[blockNumber] }
    public func sectorMask(at dataIndex: Int) -> UInt8 { entries[dataIndex].sectorMask }
    /// A rewrite appends too, so only a free data block makes room.
    public func canAccept(_ blockNumber: UInt64) -> Bool { !isFull }

    /// Opens the area for segment `id` and persists that.
    public func open(segmentID id: UInt64) {
        precondition(id > 0 && entries.isEmpty, "opening a pmem buffer that still holds a segment")
        segmentID = id
        memory.storeWord(PmemLayout.controlWord(segmentID: id, state: .open), at: areaOffset)
        memory.flush(offset: areaOffset, count: 8)
        memory.drain()
    }

    /// Appends a copy of `blockNumber` holding the sectors of `sectorMask` from `block` (a whole
    /// 4 KiB image, sector *i* at 512 × *i*). Flushed, not yet drained: call ``persist()`` before
    /// acknowledging. Returns the data-block index used.
    @discardableResult
    public func append(blockNumber: UInt64, sectorMask: UInt8, block: UnsafeRawBufferPointer) -> Int {
        precondition(!isFull && block.count == CacheGeometry.blockBytes && segmentID > 0)
        let index = entries.count
        memory.copyAndFlush(to: dataOffset(index), from: block)
        commitEntry(index: index, blockNumber: blockNumber, sectorMask: sectorMask)
        return index
    }

    /// Writes the sectors of `sectorMask` from `sectors` (exactly those sectors, in order) as a new
    /// copy, merged over the sectors of the block's previous copy in this buffer.
    @discardableResult
    public func write(blockNumber: UInt64, sectorMask: UInt8, sectors: UnsafeRawBufferPointer) -> Int {
        precondition(sectorMask != 0 && sectors.count == sectorMask.nonzeroBitCount * CacheGeometry.sectorBytes,
                     "sector data does not match the mask")
        precondition(!isFull && segmentID > 0, "write to a full or closed pmem buffer")
        let index = entries.count
        let target = dataOffset(index)
        var mask = sectorMask
        if let previous = latest[blockNumber], entries[previous].sectorMask & ~sectorMask != 0 {
            // Carry the sectors this write does not cover from the previous copy.
            let previousMask = entries[previous].sectorMask
            let source = UnsafeRawBufferPointer(start: memory.baseAddress + dataOffset(previous), count: CacheGeometry.blockBytes)
            forEachSectorRun(previousMask & ~sectorMask) { first, count in
                memory.copyAndFlush(to: target + first * CacheGeometry.sectorBytes,
                                    from: UnsafeRawBufferPointer(rebasing: source[(first * CacheGeometry.sectorBytes)...].prefix(count * CacheGeometry.sectorBytes)))
            }
            mask |= previousMask
        }
        var consumed = 0
        forEachSectorRun(sectorMask) { first, count in
            let length = count * CacheGeometry.sectorBytes
            memory.copyAndFlush(to: target + first * CacheGeometry.sectorBytes,
                                from: UnsafeRawBufferPointer(rebasing: sectors[consumed..<(consumed + length)]))
            consumed += length
        }
        commitEntry(index: index, blockNumber: blockNumber, sectorMask: mask)
        return index
    }

    /// Writes a merged copy: the sectors of `sectorMask` from the whole 4 KiB `block`.
    @discardableResult
    public func write(blockNumber: UInt64, sectorMask: UInt8, block: UnsafeRawBufferPointer) -> Int {
        append(blockNumber: blockNumber, sectorMask: sectorMask, block: block)
    }

    /// Appends a clean copy of `blockNumber` (a whole block read from the backing store). Flushed,
    /// never waited for: losing it loses nothing.
    @discardableResult
    public func writeClean(blockNumber: UInt64, block: UnsafeRawBufferPointer) -> Int {
        precondition(!isFull && block.count == CacheGeometry.blockBytes && segmentID > 0)
        let index = entries.count
        memory.copyAndFlush(to: dataOffset(index), from: block)
        commitEntry(index: index, entry: SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: 0xFF, isClean: true))
        return index
    }

    /// Appends a discard marker for `blockNumber`.
    @discardableResult
    public func markDiscarded(blockNumber: UInt64) -> Int {
        precondition(!isFull && segmentID > 0, "discard marker in a full or closed pmem buffer")
        let index = entries.count
        commitEntry(index: index, blockNumber: blockNumber, sectorMask: 0)
        return index
    }

    private func commitEntry(index: Int, blockNumber: UInt64, sectorMask: UInt8) {
        commitEntry(index: index, entry: SegmentHeader.Entry(blockNumber: blockNumber, sectorMask: sectorMask))
    }

    private func commitEntry(index: Int, entry: SegmentHeader.Entry) {
        let blockNumber = entry.blockNumber
        let word0 = entry.packed
        let block = UnsafeRawBufferPointer(start: memory.baseAddress + dataOffset(index), count: CacheGeometry.blockBytes)
        let checksums = PmemLayout.entryChecksums(word0: word0, block: block)
        let word1 = PmemLayout.entryWord1(segmentID: segmentID, entryChecksum: checksums.entry)
        let entryOffset = tableOffset + index * PmemLayout.entryBytes
        memory.storeWord(word0, at: entryOffset)
        memory.storeWord(word1, at: entryOffset + 8)
        memory.flush(offset: entryOffset, count: PmemLayout.entryBytes)
        entries.append(entry)
        blockChecksums.append(checksums.wholeBlock)
        latest[blockNumber] = index
    }

    /// Makes every append so far durable (one drain for the whole group).
    public func persist() {
        memory.drain()
    }

    public func withBlock<Result>(at dataIndex: Int, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        precondition(dataIndex < geometry.dataBlocksPerSegment)
        return try body(UnsafeRawBufferPointer(start: memory.baseAddress + dataOffset(dataIndex), count: CacheGeometry.blockBytes))
    }

    /// Writes the segment header into the image and persists it, then marks the area sealed.
    /// Returns the segment's bytes (header and used data blocks), which stay untouched in
    /// persistent memory until ``reset()``.
    public func seal(cacheUUID: [UInt8], isPartial: Bool) -> UnsafeRawBufferPointer {
        precondition(segmentID > 0, "sealing a pmem buffer that was never opened")
        let header = SegmentHeader(segmentID: segmentID, cacheUUID: cacheUUID, isPartial: isPartial, entries: entries)
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        let usedBytes = headerBytes + entries.count * CacheGeometry.blockBytes
        let image = memory.baseAddress + imageOffset
        // Data blocks are never written again once their entry is committed, so the checksums
        // taken then still hold; the rest are read now.
        var checksums = [UInt32](repeating: 0, count: entries.count)
        for index in entries.indices {
            checksums[index] = blockChecksums[index] ?? CRC32C.checksum(UnsafeRawBufferPointer(start: memory.baseAddress + dataOffset(index), count: CacheGeometry.blockBytes))
        }
        checksums.withUnsafeBufferPointer {
            header.encode(into: UnsafeMutableRawBufferPointer(start: image, count: headerBytes), blockChecksums: $0, geometry: geometry)
        }
        memory.flush(offset: imageOffset, count: headerBytes)
        memory.drain()
        memory.storeWord(PmemLayout.controlWord(segmentID: segmentID, state: .sealed), at: areaOffset)
        memory.flush(offset: areaOffset, count: 8)
        memory.drain()
        return UnsafeRawBufferPointer(start: image, count: usedBytes)
    }

    /// Empties the buffer for the next segment. The area's control word is left as it is: a sealed
    /// segment the cache device has synced is found there by recovery too, and never taken.
    public func reset() {
        entries.removeAll(keepingCapacity: true)
        blockChecksums.removeAll(keepingCapacity: true)
        latest.removeAll(keepingCapacity: true)
        segmentID = 0
    }
}
