import SluiceVolume

/// Sparse RAM: the bytes of a volume in 64 KiB chunks, each taken on its first write and given
/// back when a trim or write-zeroes covers it whole. A chunk never written reads as zeros.
///
/// Not thread-safe: its owner (``RAMDiskVolume``, or an EPRD's RAM image) holds a lock around
/// every call. Callers pass ranges they have checked.
public final class SparseMemory {
    public static let chunkBytes = 64 * 1024

    private var chunks: [UInt64: UnsafeMutableRawPointer] = [:]

    /// Memory taken for data, in bytes.
    public var allocatedBytes: UInt64 { UInt64(chunks.count * Self.chunkBytes) }

    public init() {}

    deinit { freeAll() }

    /// Gives every chunk back.
    public func freeAll() {
        for chunk in chunks.values { chunk.deallocate() }
        chunks.removeAll()
    }

    /// Calls `body` for each chunk-sized piece of the range: the chunk's number, where the piece
    /// starts in the chunk, its length, and where it starts in the range.
    public static func forEachPiece(offset: UInt64, lengthBytes: Int, _ body: (_ chunk: UInt64, _ inChunk: Int, _ length: Int, _ inRange: Int) throws -> Void) rethrows {
        var done = 0
        while done < lengthBytes {
            let position = offset + UInt64(done)
            let chunk = position / UInt64(Self.chunkBytes)
            let inChunk = Int(position % UInt64(Self.chunkBytes))
            let length = min(Self.chunkBytes - inChunk, lengthBytes - done)
            try body(chunk, inChunk, length, done)
            done += length
        }
    }

    public func read(offset: UInt64, into target: UnsafeMutableRawBufferPointer) {
        Self.forEachPiece(offset: offset, lengthBytes: target.count) { chunk, inChunk, length, inRange in
            let destination = target.baseAddress! + inRange
            if let memory = chunks[chunk] {
                destination.copyMemory(from: memory + inChunk, byteCount: length)
            } else {
                destination.initializeMemory(as: UInt8.self, repeating: 0, count: length)
            }
        }
    }

    /// Writes `source` at `offset`. Fails with ``VolumeError/noSpace`` before changing anything if
    /// the chunks it needs would take the memory in use past `limitBytes`.
    public func write(offset: UInt64, from source: UnsafeRawBufferPointer, limitBytes: UInt64) throws {
        try reserveChunks(offset: offset, lengthBytes: source.count, limitBytes: limitBytes)
        Self.forEachPiece(offset: offset, lengthBytes: source.count) { chunk, inChunk, length, inRange in
            (chunks[chunk]! + inChunk).copyMemory(from: source.baseAddress! + inRange, byteCount: length)
        }
    }

    /// Makes the range read as zeros. Chunks it covers whole are given back, unless
    /// `keepAllocated` (write-zeroes with NO_HOLE), which zeroes them in place and takes the ones
    /// missing.
    public func zero(offset: UInt64, lengthBytes: Int, keepAllocated: Bool, limitBytes: UInt64) throws {
        if keepAllocated { try reserveChunks(offset: offset, lengthBytes: lengthBytes, limitBytes: limitBytes) }
        Self.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, inChunk, length, _ in
            guard let memory = chunks[chunk] else { return }
            if length == Self.chunkBytes && !keepAllocated {
                memory.deallocate()
                chunks[chunk] = nil
            } else {
                (memory + inChunk).initializeMemory(as: UInt8.self, repeating: 0, count: length)
            }
        }
    }

    /// Takes, zeroed, every chunk of the range not yet taken, or none if that would pass the limit.
    private func reserveChunks(offset: UInt64, lengthBytes: Int, limitBytes: UInt64) throws {
        var missing = 0
        Self.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, _, _, _ in
            if chunks[chunk] == nil { missing += 1 }
        }
        guard missing > 0 else { return }
        guard allocatedBytes + UInt64(missing * Self.chunkBytes) <= limitBytes else { throw VolumeError.noSpace }
        Self.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, _, _, _ in
            guard chunks[chunk] == nil else { return }
            let memory = UnsafeMutableRawPointer.allocate(byteCount: Self.chunkBytes, alignment: 4096)
            memory.initializeMemory(as: UInt8.self, repeating: 0, count: Self.chunkBytes)
            chunks[chunk] = memory
        }
    }

    /// Whether any byte at or after `offset` is non-zero: what a shrink to `offset` would lose.
    func holdsData(atOrAfter offset: UInt64) -> Bool {
        for (chunk, memory) in chunks {
            let start = chunk * UInt64(Self.chunkBytes)
            guard start + UInt64(Self.chunkBytes) > offset else { continue }
            let from = Int(offset > start ? offset - start : 0)
            let bytes = UnsafeRawBufferPointer(start: memory + from, count: Self.chunkBytes - from)
            if bytes.contains(where: { $0 != 0 }) { return true }
        }
        return false
    }

    /// Gives back every chunk wholly at or after `offset` (after a shrink that lost no data).
    func dropChunks(atOrAfter offset: UInt64) {
        for (chunk, memory) in chunks where chunk * UInt64(Self.chunkBytes) >= offset {
            memory.deallocate()
            chunks[chunk] = nil
        }
    }

    /// The range as extents of allocated chunks (no flags) and holes (hole and zero), at most
    /// `maximumExtents` of them; they cover the range from its start, perhaps not to its end.
    func extents(offset: UInt64, lengthBytes: Int, maximumExtents: Int) -> [BlockStatusExtent] {
        var extents: [BlockStatusExtent] = []
        var isFull = false
        Self.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, _, length, _ in
            guard !isFull else { return }
            let flags: BlockStatusFlags = chunks[chunk] == nil ? [.hole, .zero] : []
            if let last = extents.last, last.flags == flags, UInt64(last.lengthBytes) + UInt64(length) <= UInt64(UInt32.max) {
                extents[extents.count - 1].lengthBytes += UInt32(length)
            } else if extents.count < maximumExtents {
                extents.append(BlockStatusExtent(lengthBytes: UInt32(length), flags: flags))
            } else {
                isFull = true
            }
        }
        return extents
    }

    /// Whether chunk `index` is held in memory.
    public func holdsChunk(_ index: UInt64) -> Bool {
        chunks[index] != nil
    }

    /// Takes chunk `index` with the contents `bytes` (a whole chunk) unless it is held already;
    /// returns whether it was taken. What is held stays: it may be newer than `bytes`.
    @discardableResult
    public func installChunk(_ index: UInt64, from bytes: UnsafeRawBufferPointer) -> Bool {
        precondition(bytes.count == Self.chunkBytes, "a chunk is installed whole")
        guard chunks[index] == nil else { return false }
        let memory = UnsafeMutableRawPointer.allocate(byteCount: Self.chunkBytes, alignment: 4096)
        memory.copyMemory(from: bytes.baseAddress!, byteCount: Self.chunkBytes)
        chunks[index] = memory
        return true
    }
}
