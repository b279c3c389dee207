/// The header at the start of every segment on the cache device.
///
/// A segment is written in one sequential write: header blocks, then `blockCount` data blocks. The
/// CRC-32C covers the header (with the CRC field zero) and exactly `blockCount` data blocks, so a
/// segment whose write was torn anywhere fails verification as a whole. The header also carries the
/// cache's UUID, so a segment left by an earlier format of the same device is never taken for a
/// current one.
///
/// Layout (little-endian):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SLSEG\x00\x00\x01` |
/// | 8 | 8 | segment id (1, 2, 3, ... forever; slot = (id - 1) mod segment count) |
/// | 16 | 16 | cache UUID |
/// | 32 | 4 | block count |
/// | 36 | 4 | flags (bit 0: written partial, for a FUA or FLUSH) |
/// | 40 | 4 | CRC-32C over header and data |
/// | 44 | 20 | reserved, zero |
/// | 64 | 8 × n | per block: clean flag (bit 63, format version 2), LBA in 4 KiB blocks (bits 8...62) and sector mask (bits 0...7) |
///
/// An entry whose sector mask is zero is a *discard marker*: the block was trimmed or zeroed after
/// the copies in earlier segments were written, and replay forgets them. Its data block is unused.
/// An entry with the clean flag is a *clean copy* (a read-cached block, equal to the backing store
/// when it was read): it supersedes earlier copies like a marker, and replay keeps it out of the
/// index too (see the recovery table in docs/FORMAT.md). Version 1 never set bit 63 (its block
/// numbers were below 2^55 on every volume it could serve), so a version-1 log reads unchanged.
public struct SegmentHeader: Hashable, Sendable {
    public static let magic: [UInt8] = Array("SLSEG".utf8) + [0x00, 0x00, 0x01]
    static let crcOffset = 40

    /// One cached block: where it belongs on the backing store and which of its 512-byte sectors
    /// hold data (bit i set: sector i is valid in the cache).
    public struct Entry: Hashable, Sendable {
        /// Block numbers stay below this, so the top bit of a packed entry is free for the flag.
        public static let blockNumberLimit: UInt64 = 1 << 55
        static let cleanBit: UInt64 = 1 << 63

        public var blockNumber: UInt64
        public var sectorMask: UInt8
        /// A clean copy: its data equals the backing store's (it never needs writeback).
        public var isClean: Bool

        public init(blockNumber: UInt64, sectorMask: UInt8, isClean: Bool = false) {
            precondition(blockNumber < Self.blockNumberLimit, "block number beyond 2^55")
            precondition(!isClean || sectorMask != 0, "a discard marker cannot be clean")
            self.blockNumber = blockNumber
            self.sectorMask = sectorMask
            self.isClean = isClean
        }

        /// The entry as it is stored, in a segment header and in a pmem entry's first word.
        public var packed: UInt64 { (isClean ? Self.cleanBit : 0) | blockNumber << 8 | UInt64(sectorMask) }
        public init(packed: UInt64) {
            isClean = packed & Self.cleanBit != 0
            blockNumber = (packed & ~Self.cleanBit) >> 8
            sectorMask = UInt8(truncatingIfNeeded: packed)
        }

        /// A discard marker or a clean copy: replay forgets the block's earlier copies and indexes
        /// nothing for it.
        public var supersedesWithoutData: Bool { sectorMask == 0 || isClean }
    }

    public var segmentID: UInt64
    public var cacheUUID: [UInt8]
    public var isPartial: Bool
    public var entries: [Entry]

    public init(segmentID: UInt64, cacheUUID: [UInt8], isPartial: Bool, entries: [Entry]) {
        precondition(segmentID > 0 && cacheUUID.count == 16)
        self.segmentID = segmentID
        self.cacheUUID = cacheUUID
        self.isPartial = isPartial
        self.entries = entries
    }

    /// Writes the header into `header` (the segment's header blocks) and seals it with the CRC of the
    /// header and the data blocks that follow it in `data`.
    public func encode(into header: UnsafeMutableRawBufferPointer, data: UnsafeRawBufferPointer, geometry: CacheGeometry) {
        precondition(data.count >= entries.count * CacheGeometry.blockBytes)
        encode(into: header, geometry: geometry) { headerCRC in
            CRC32C.checksum(UnsafeRawBufferPointer(rebasing: data[0..<(entries.count * CacheGeometry.blockBytes)]), continuing: headerCRC)
        }
    }

    /// The same, from the CRC-32C of each data block (one per entry, in order) instead of the data:
    /// the checksum is the one ``encode(into:data:geometry:)`` computes for the same bytes.
    public func encode(into header: UnsafeMutableRawBufferPointer, blockChecksums: UnsafeBufferPointer<UInt32>, geometry: CacheGeometry) {
        precondition(blockChecksums.count == entries.count, "one checksum per data block")
        encode(into: header, geometry: geometry) { headerCRC in
            blockChecksums.reduce(headerCRC) { CRC32C.combine($0, withBlock: $1) }
        }
    }

    private func encode(into header: UnsafeMutableRawBufferPointer, geometry: CacheGeometry, sealing: (_ headerCRC: UInt32) -> UInt32) {
        precondition(header.count == geometry.headerBlocks * CacheGeometry.blockBytes)
        precondition(entries.count <= geometry.dataBlocksPerSegment)
        var writer = LittleEndianWriter(count: header.count)
        writer.write(bytes: Self.magic)
        writer.write(segmentID)
        writer.write(bytes: cacheUUID)
        writer.write(UInt32(entries.count))
        writer.write(UInt32(isPartial ? 1 : 0))
        writer.write(UInt32(0))  // CRC, filled below
        writer.seek(to: CacheGeometry.segmentHeaderFixedBytes)
        for entry in entries {
            writer.write(entry.packed)
        }
        let crc = sealing(writer.bytes.withUnsafeBytes { CRC32C.checksum($0) })
        writer.set(crc, at: Self.crcOffset)
        writer.bytes.withUnsafeBytes { header.copyMemory(from: $0) }
    }

    /// Why a segment slot does not hold a valid segment.
    public enum Invalid: Error, Equatable {
        /// No segment header (never written, or overwritten by something else).
        case noHeader
        /// A header from another cache (an earlier format of the device).
        case foreign
        /// The header is not self-consistent.
        case malformed
        /// The checksum does not match: the write was torn or the medium is damaged.
        case checksumMismatch
    }

    /// Decodes the header blocks of a segment without checking the data (cheap: for scans).
    public init(decodingHeader header: UnsafeRawBufferPointer, geometry: CacheGeometry, cacheUUID: [UInt8]) throws {
        guard header.count >= geometry.headerBlocks * CacheGeometry.blockBytes else { throw Invalid.malformed }
        var reader = LittleEndianReader(header)
        guard reader.read(count: 8) == Self.magic else { throw Invalid.noHeader }
        segmentID = reader.read()
        let uuid = reader.read(count: 16)
        guard uuid == cacheUUID else { throw Invalid.foreign }
        self.cacheUUID = uuid
        let count = Int(reader.read(UInt32.self))
        let flags: UInt32 = reader.read()
        guard segmentID > 0, count <= geometry.dataBlocksPerSegment, flags & ~1 == 0 else { throw Invalid.malformed }
        isPartial = flags & 1 != 0
        reader.seek(to: CacheGeometry.segmentHeaderFixedBytes)
        var entries: [Entry] = []
        entries.reserveCapacity(count)
        for _ in 0..<count {
            entries.append(Entry(packed: reader.read()))
        }
        self.entries = entries
    }

    /// Decodes a whole segment (header blocks followed by data blocks) and verifies its checksum.
    public init(verifying segment: UnsafeRawBufferPointer, geometry: CacheGeometry, cacheUUID: [UInt8]) throws {
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        guard segment.count >= headerBytes else { throw Invalid.malformed }
        try self.init(decodingHeader: UnsafeRawBufferPointer(rebasing: segment[0..<headerBytes]), geometry: geometry, cacheUUID: cacheUUID)
        let dataBytes = entries.count * CacheGeometry.blockBytes
        guard segment.count >= headerBytes + dataBytes else { throw Invalid.checksumMismatch }
        let stored = UInt32(littleEndian: segment.loadUnaligned(fromByteOffset: Self.crcOffset, as: UInt32.self))
        var headerCopy = Array(segment[0..<headerBytes])
        headerCopy.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(0), toByteOffset: Self.crcOffset, as: UInt32.self) }
        var crc = headerCopy.withUnsafeBytes { CRC32C.checksum($0) }
        crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: segment[headerBytes..<(headerBytes + dataBytes)]), continuing: crc)
        guard crc == stored else { throw Invalid.checksumMismatch }
    }
}
