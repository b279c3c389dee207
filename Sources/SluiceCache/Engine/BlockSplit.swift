import SluiceFormat

/// Splits a 512-byte-aligned byte range into the 4 KiB blocks it touches, each with the mask of
/// sectors it covers and where its bytes sit in the request. Writes smaller than a block keep their
/// sector mask, so a sub-4 KiB write never needs the rest of its block.
public struct BlockSplit: Sequence {
    public struct Piece: Equatable, Sendable {
        /// The 4 KiB block of the volume.
        public var blockNumber: UInt64
        /// Bit *i* set: sector *i* of the block is in the range.
        public var sectorMask: UInt8
        /// Where the piece's bytes start within the request.
        public var requestOffset: Int
        /// How many bytes of the request the piece covers (its sectors, contiguous).
        public var lengthBytes: Int
    }

    static let blockBytes = UInt64(CacheGeometry.blockBytes)
    static let sectorBytes = UInt64(CacheGeometry.sectorBytes)

    public let offset: UInt64
    public let lengthBytes: UInt64

    /// `offset` and `lengthBytes` must be multiples of 512 (the server refuses anything else).
    public init(offset: UInt64, lengthBytes: UInt64) {
        precondition(offset % Self.sectorBytes == 0 && lengthBytes % Self.sectorBytes == 0, "unaligned range")
        self.offset = offset
        self.lengthBytes = lengthBytes
    }

    public func makeIterator() -> Iterator {
        Iterator(position: offset, end: offset + lengthBytes, start: offset)
    }

    public struct Iterator: IteratorProtocol {
        var position: UInt64
        let end: UInt64
        let start: UInt64

        public mutating func next() -> Piece? {
            guard position < end else { return nil }
            let blockNumber = position / BlockSplit.blockBytes
            let blockEnd = Swift.min((blockNumber + 1) * BlockSplit.blockBytes, end)
            let firstSector = Int((position % BlockSplit.blockBytes) / BlockSplit.sectorBytes)
            let sectorCount = Int((blockEnd - position) / BlockSplit.sectorBytes)
            let mask = UInt8(truncatingIfNeeded: ((1 << sectorCount) - 1) << firstSector)
            let piece = Piece(blockNumber: blockNumber, sectorMask: mask, requestOffset: Int(position - start),
                              lengthBytes: Int(blockEnd - position))
            position = blockEnd
            return piece
        }
    }
}
