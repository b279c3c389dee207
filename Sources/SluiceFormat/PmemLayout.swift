/// The layout of a pmem file: the persistent-memory write buffer of a cache in pmem mode.
///
/// A pmem file starts with one 4 KiB header block and one 4 KiB log block, followed by
/// ``areaCount`` buffer areas of ``areaBytes(for:)`` bytes each. The log block's first word is the
/// id of the newest segment the cache device has synced (see ``syncedWordOffset``). Every area holds one segment while it is being filled (open)
/// and after it is sealed, until the cache device has synced it.
///
/// Header (little-endian), CRC-32C over bytes 0..<4092 stored in the last 4:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SLUICEPM` |
/// | 8 | 4 | layout version (1) |
/// | 12 | 4 | segment size in bytes |
/// | 16 | 16 | cache UUID (the cache device this file belongs to) |
/// | 32 | 16 | pmem file UUID (recorded in the cache device's superblock) |
/// | 48 | 4 | area count |
/// | 4092 | 4 | CRC-32C |
///
/// An area (offsets from its start, every field 8-byte aligned):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | control word: segment id << 8 \| state (0 free, 1 open, 2 sealed) |
/// | 4096 | 16 × n | entry table: word 0 = LBA << 8 \| sector mask; word 1 = low 32 bits of the segment id << 32 \| CRC-32C of word 0 and the masked sectors |
/// | after the table | segment bytes | the segment image: header blocks, then data blocks, exactly as on the cache device |
///
/// The control word is one aligned 8-byte store, so the hardware never tears it: an area is
/// always wholly free, open for one id, or sealed for one id. The crash argument is in
/// `docs/FORMAT.md`.
public struct PmemLayout: Hashable, Sendable {
    public static let magic: [UInt8] = Array("SLUICEPM".utf8)
    public static let layoutVersion: UInt32 = 1
    public static let headerBytes = 4096
    /// The header block, then the log block.
    public static let preambleBytes = 8192
    /// Where the synced-through word lives: the newest segment id the cache device has synced,
    /// stored (one atomic 8-byte store) after every cache-device sync in pmem mode. Recovery
    /// refuses a log that ends before it, which catches damage inside the log after a crash.
    public static let syncedWordOffset = 4096
    public static let controlBytes = 4096
    public static let entryBytes = 16
    /// Areas per pmem file: one open segment plus sealed ones on their way to the cache device.
    public static let areaCountDefault = 8

    public var cacheUUID: [UInt8]
    public var pmemUUID: [UInt8]
    public var segmentBytes: Int
    public var areaCount: Int

    public init(cacheUUID: [UInt8], pmemUUID: [UInt8], segmentBytes: Int, areaCount: Int = Self.areaCountDefault) {
        precondition(cacheUUID.count == 16 && pmemUUID.count == 16 && areaCount > 0)
        self.cacheUUID = cacheUUID
        self.pmemUUID = pmemUUID
        self.segmentBytes = segmentBytes
        self.areaCount = areaCount
    }

    /// Bytes one area takes for `geometry`.
    public static func areaBytes(for geometry: CacheGeometry) -> Int {
        let table = (geometry.dataBlocksPerSegment * entryBytes + 4095) / 4096 * 4096
        return controlBytes + table + geometry.segmentBytes
    }

    /// Bytes the whole file takes.
    public func fileBytes(for geometry: CacheGeometry) -> Int {
        Self.preambleBytes + areaCount * Self.areaBytes(for: geometry)
    }

    public func areaOffset(_ area: Int, geometry: CacheGeometry) -> Int {
        precondition(area >= 0 && area < areaCount)
        return Self.preambleBytes + area * Self.areaBytes(for: geometry)
    }

    /// The state of an area, from its control word.
    public enum AreaState: UInt64, Sendable, CustomStringConvertible {
        case free = 0
        case open = 1
        case sealed = 2
        public var description: String { self == .free ? "free" : self == .open ? "open" : "sealed" }
    }

    public static func controlWord(segmentID: UInt64, state: AreaState) -> UInt64 {
        precondition(segmentID < 1 << 56)
        return segmentID << 8 | state.rawValue
    }

    /// Word 1 of an entry: the segment it belongs to and the checksum of word 0 and the data
    /// (``entryChecksum(word0:block:)``).
    public static func entryWord1(segmentID: UInt64, entryChecksum: UInt32) -> UInt64 {
        (segmentID & 0xFFFF_FFFF) << 32 | UInt64(entryChecksum)
    }

    /// CRC-32C of word 0 followed by the sectors its mask selects from the 4 KiB `block`.
    public static func entryChecksum(word0: UInt64, block: UnsafeRawBufferPointer) -> UInt32 {
        entryChecksums(word0: word0, block: block).entry
    }

    /// The entry's checksum, and when the entry holds the whole block (mask 0xFF) the CRC-32C of
    /// the block alone, derived from it at the cost of a few table lookups (the segment's
    /// checksum is folded from its blocks' ones at seal, so the block is read once, not twice).
    public static func entryChecksums(word0: UInt64, block: UnsafeRawBufferPointer) -> (entry: UInt32, wholeBlock: UInt32?) {
        precondition(block.count == CacheGeometry.blockBytes)
        let crcOfWord0 = withUnsafeBytes(of: word0.littleEndian) { CRC32C.checksum($0) }
        var crc = crcOfWord0
        // One call per run of selected sectors: the checksum of a run is that of its sectors in
        // turn, and a whole block is one call.
        forEachSectorRun(UInt8(truncatingIfNeeded: word0)) { sector, count in
            crc = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: block[(sector * CacheGeometry.sectorBytes)..<((sector + count) * CacheGeometry.sectorBytes)]), continuing: crc)
        }
        guard UInt8(truncatingIfNeeded: word0) == 0xFF else { return (crc, nil) }
        // checksum(word0 + block) = shift(checksum(word0)) ^ checksum(block).
        return (crc, crc ^ CRC32C.shiftedOneBlock(crcOfWord0))
    }

    /// The header as one 4 KiB block.
    public func encodedHeader() -> [UInt8] {
        var writer = LittleEndianWriter(count: Self.headerBytes)
        writer.write(bytes: Self.magic)
        writer.write(Self.layoutVersion)
        writer.write(UInt32(segmentBytes))
        writer.write(bytes: cacheUUID)
        writer.write(bytes: pmemUUID)
        writer.write(UInt32(areaCount))
        var bytes = writer.bytes
        let crc = CRC32C.checksum(Array(bytes[0..<(Self.headerBytes - 4)]))
        withUnsafeBytes(of: crc.littleEndian) { bytes.replaceSubrange((Self.headerBytes - 4)..<Self.headerBytes, with: $0) }
        return bytes
    }

    /// Decodes and checks the header at the start of a pmem file of `fileBytes` bytes.
    public init(decodingHeader bytes: UnsafeRawBufferPointer, path: String) throws {
        guard bytes.count >= Self.headerBytes, Array(bytes[0..<8]) == Self.magic else {
            throw PmemError.notFormatted(path: path)
        }
        var reader = LittleEndianReader(bytes)
        _ = reader.read(count: 8)
        let version: UInt32 = reader.read()
        guard version == Self.layoutVersion else { throw PmemError.damaged(path: path, detail: "layout version \(version)") }
        let storedCRC = UInt32(littleEndian: bytes.load(fromByteOffset: Self.headerBytes - 4, as: UInt32.self))
        guard storedCRC == CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<(Self.headerBytes - 4)])) else {
            throw PmemError.damaged(path: path, detail: "header checksum mismatch")
        }
        segmentBytes = Int(reader.read(UInt32.self))
        cacheUUID = reader.read(count: 16)
        pmemUUID = reader.read(count: 16)
        areaCount = Int(reader.read(UInt32.self))
        guard areaCount > 0 && areaCount <= 64 else { throw PmemError.damaged(path: path, detail: "\(areaCount) areas") }
    }

    /// Checks that this pmem file belongs to the cache whose superblock is `header`.
    public func check(belongsTo header: SuperblockHeader, geometry: CacheGeometry, fileBytes: Int, path: String) throws {
        guard cacheUUID == header.uuid, pmemUUID == header.pmemUUID else {
            throw PmemError.foreign(path: path, expected: UUIDText.format(header.pmemUUID), found: UUIDText.format(pmemUUID))
        }
        guard segmentBytes == geometry.segmentBytes else {
            throw PmemError.damaged(path: path, detail: "segment size \(segmentBytes), the cache has \(geometry.segmentBytes)")
        }
        guard fileBytes >= self.fileBytes(for: geometry) else {
            throw PmemError.truncated(path: path, fileBytes: fileBytes, neededBytes: self.fileBytes(for: geometry))
        }
    }

    /// What one area holds, read from persistent memory (after a power failure, or at start).
    public struct Area: Sendable {
        public var area: Int
        public var state: AreaState
        public var segmentID: UInt64
        /// Every entry whose check passes, by data-block index, in index order.
        public var validEntries: [(index: Int, entry: SegmentHeader.Entry)]
    }

    /// The synced-through word of a mapped pmem file.
    public static func syncedThroughID(in file: UnsafeRawBufferPointer) -> UInt64 {
        guard file.count >= preambleBytes else { return 0 }
        return UInt64(littleEndian: file.load(fromByteOffset: syncedWordOffset, as: UInt64.self))
    }

    /// Decodes area `area` of a mapped pmem file. Entries are checked only for open areas; a sealed
    /// area's segment image carries its own header and checksum.
    public func decodeArea(_ area: Int, in file: UnsafeRawBufferPointer, geometry: CacheGeometry) -> Area {
        let base = areaOffset(area, geometry: geometry)
        let control = UInt64(littleEndian: file.load(fromByteOffset: base, as: UInt64.self))
        let id = control >> 8
        guard let state = AreaState(rawValue: control & 0xFF), id > 0 else {
            return Area(area: area, state: .free, segmentID: 0, validEntries: [])
        }
        guard state == .open else { return Area(area: area, state: state, segmentID: id, validEntries: []) }
        var valid: [(Int, SegmentHeader.Entry)] = []
        let table = base + Self.controlBytes
        for index in 0..<geometry.dataBlocksPerSegment {
            let entryOffset = table + index * Self.entryBytes
            let word0 = UInt64(littleEndian: file.load(fromByteOffset: entryOffset, as: UInt64.self))
            let word1 = UInt64(littleEndian: file.load(fromByteOffset: entryOffset + 8, as: UInt64.self))
            guard word1 >> 32 == id & 0xFFFF_FFFF else { continue }
            let block = UnsafeRawBufferPointer(rebasing: file[dataOffset(area, index: index, geometry: geometry)...]
                .prefix(CacheGeometry.blockBytes))
            guard UInt32(truncatingIfNeeded: word1) == Self.entryChecksum(word0: word0, block: block) else { continue }
            valid.append((index, SegmentHeader.Entry(packed: word0)))
        }
        return Area(area: area, state: state, segmentID: id, validEntries: valid)
    }

    /// Where area `area`'s entry table starts.
    public func tableOffset(_ area: Int, geometry: CacheGeometry) -> Int {
        areaOffset(area, geometry: geometry) + Self.controlBytes
    }

    /// Where area `area`'s segment image starts (4 KiB-aligned, so it can be written with O_DIRECT).
    public func imageOffset(_ area: Int, geometry: CacheGeometry) -> Int {
        areaOffset(area, geometry: geometry) + Self.areaBytes(for: geometry) - geometry.segmentBytes
    }

    public func dataOffset(_ area: Int, index: Int, geometry: CacheGeometry) -> Int {
        imageOffset(area, geometry: geometry) + (geometry.headerBlocks + index) * CacheGeometry.blockBytes
    }
}

/// Why a pmem file cannot be used. Every message names the file and the fix.
public enum PmemError: Error, Equatable, CustomStringConvertible {
    case notFormatted(path: String)
    case damaged(path: String, detail: String)
    case foreign(path: String, expected: String, found: String)
    case truncated(path: String, fileBytes: Int, neededBytes: Int)
    case sealedSegmentDamaged(path: String, segmentID: UInt64)
    case logGap(path: String, expectedID: UInt64, foundID: UInt64)

    public var description: String {
        switch self {
        case .notFormatted(let path):
            return "\(path) is not a Sluice pmem file; give the pmem file this cache was formatted with"
        case .damaged(let path, let detail):
            return "the pmem file \(path) is damaged (\(detail)); check it with `sluice-recover check`"
        case .foreign(let path, let expected, let found):
            return "the pmem file \(path) belongs to another cache (pmem UUID \(found); this cache's is \(expected)); give this cache's pmem file"
        case .truncated(let path, let fileBytes, let neededBytes):
            return "the pmem file \(path) holds \(fileBytes) bytes but needs \(neededBytes); it was truncated or is the wrong file"
        case .sealedSegmentDamaged(let path, let id):
            return "the pmem file \(path) holds sealed segment \(id), which the cache device lacks, and it fails its checksum; check the cache with `sluice-recover check`"
        case .logGap(let path, let expected, let found):
            return "the log ends before segment \(expected), but the pmem file \(path) holds segment \(found): segments between are missing; check the cache with `sluice-recover check`"
        }
    }
}

/// UUIDs as text, for messages.
public enum UUIDText {
    public static func format(_ bytes: [UInt8]) -> String {
        let hex = bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }
        guard hex.count == 16 else { return hex.joined() }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]].map { $0.joined() }.joined(separator: "-")
    }
}
