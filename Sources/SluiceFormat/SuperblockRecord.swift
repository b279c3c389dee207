/// The mutable part of the superblock: where the log starts (every segment up to the last retired
/// one is no longer needed) and whether the last shutdown was clean. Two 4 KiB record blocks (at
/// 4 KiB and 8 KiB) are written alternately, each with a sequence number and a CRC-32C, so a write
/// torn by a crash leaves the other, older block intact; the valid block with the higher sequence
/// number is the current record.
///
/// Layout (little-endian): magic `SLREC\x00\x00\x01` (8), sequence (8), last retired segment id
/// (8), last segment id known to be on the device (8), flags (4; bit 0: clean shutdown; bits 1–2: the
/// cache mode, 0 writeback, 1 writethrough, 2 writearound, 3 passthrough), CRC-32C over the
/// preceding 36 bytes (4); the rest of the block is zero.
public struct SuperblockRecord: Hashable, Sendable {
    public static let magic: [UInt8] = Array("SLREC".utf8) + [0x00, 0x00, 0x01]
    public static let blockOffsets: [UInt64] = [4096, 8192]
    static let encodedBytes = 40

    /// Grows by one with every record written; picks the newer record block.
    public var sequence: UInt64
    /// Every segment with an id up to this one is retired: each block it held is on the backing
    /// store, synced, or has a newer copy (or discard marker) that was durable in a later segment
    /// before this record was written. Recovery starts the log after it.
    public var lastRetiredSegmentID: UInt64
    /// A hint: segments up to this id were on the device when the record was written. Recovery
    /// never trusts it over the segments themselves.
    public var lastFlushedSegmentID: UInt64
    /// The server stopped cleanly after writing every buffered segment: restart needs no scan
    /// beyond the hint.
    public var cleanShutdown: Bool
    /// The cache mode the cache serves in.
    public var cacheMode: CacheMode

    public init(sequence: UInt64, lastRetiredSegmentID: UInt64, lastFlushedSegmentID: UInt64, cleanShutdown: Bool,
                cacheMode: CacheMode = .writeback) {
        self.sequence = sequence
        self.lastRetiredSegmentID = lastRetiredSegmentID
        self.lastFlushedSegmentID = lastFlushedSegmentID
        self.cleanShutdown = cleanShutdown
        self.cacheMode = cacheMode
    }

    /// The record block this record goes to: sequences alternate between the two.
    public var blockOffset: UInt64 { Self.blockOffsets[Int(sequence % 2)] }

    public func encoded() -> [UInt8] {
        var writer = LittleEndianWriter(count: CacheGeometry.blockBytes)
        writer.write(bytes: Self.magic)
        writer.write(sequence)
        writer.write(lastRetiredSegmentID)
        writer.write(lastFlushedSegmentID)
        writer.write(UInt32(cleanShutdown ? 1 : 0) | cacheMode.code << 1)
        let crc = CRC32C.checksum(Array(writer.bytes[0..<36]))
        writer.write(crc)
        return writer.bytes
    }

    /// Decodes one record block; nil if it holds no valid record (never written, torn, or corrupt).
    public init?(decoding bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Self.encodedBytes else { return nil }
        var reader = LittleEndianReader(bytes)
        guard reader.read(count: 8) == Self.magic else { return nil }
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<36]))
        sequence = reader.read()
        lastRetiredSegmentID = reader.read()
        lastFlushedSegmentID = reader.read()
        let flags: UInt32 = reader.read()
        let stored: UInt32 = reader.read()
        guard stored == computed, flags & ~7 == 0, let mode = CacheMode(code: (flags >> 1) & 3) else { return nil }
        cleanShutdown = flags & 1 != 0
        cacheMode = mode
    }

    /// The current record of the two slots, if either is valid.
    public static func current(slotA: UnsafeRawBufferPointer, slotB: UnsafeRawBufferPointer) -> SuperblockRecord? {
        let candidates = [SuperblockRecord(decoding: slotA), SuperblockRecord(decoding: slotB)].compactMap { $0 }
        return candidates.max { $0.sequence < $1.sequence }
    }
}
