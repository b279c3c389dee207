/// The first block of a cache device: what the cache is and what it belongs to. Written once, by
/// `sluice format` (and by an explicit mode switch); never rewritten in normal operation.
///
/// Layout (little-endian), one 4 KiB block, CRC-32C over bytes 0..<4092 stored in the last 4:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic `SLUICE\x00\x01` |
/// | 8 | 4 | format version (2; 1 had no clean copies in the log: `sluice-recover upgrade`) |
/// | 12 | 4 | block size (4096) |
/// | 16 | 16 | cache UUID |
/// | 32 | 4 | segment size in bytes |
/// | 36 | 4 | mode (1 volatile, 2 pmem) |
/// | 40 | 8 | segment count |
/// | 48 | 8 | byte offset of segment 0 |
/// | 56 | 8 | backing store size in bytes |
/// | 64 | 16 | pmem file UUID (zero in volatile mode) |
/// | 80 | 8 | creation time (seconds since 1970) |
/// | 88 | 2 | length of the backing identity |
/// | 90 | ≤1024 | backing identity (UTF-8) |
/// | 4092 | 4 | CRC-32C |
public struct SuperblockHeader: Hashable, Sendable {
    public static let magic: [UInt8] = Array("SLUICE".utf8) + [0x00, 0x01]
    public static let formatVersion: UInt32 = 2
    /// The version `sluice-recover upgrade` turns into this one.
    public static let upgradableVersion: UInt32 = 1
    public static let backingIdentityBytesMax = 1024

    /// How the write buffer is kept.
    public enum Mode: UInt32, Sendable, CustomStringConvertible {
        case volatile = 1
        case pmem = 2
        public var description: String { self == .volatile ? "volatile" : "pmem" }
    }

    public var uuid: [UInt8]
    public var segmentBytes: UInt32
    public var mode: Mode
    public var segmentCount: UInt64
    public var firstSegmentOffset: UInt64
    public var backingSizeBytes: UInt64
    public var pmemUUID: [UInt8]
    public var createdSeconds: UInt64
    /// What the backing store is (its canonical path or URI), so a cache is never used with another.
    public var backingIdentity: String

    public init(uuid: [UInt8], geometry: CacheGeometry, mode: Mode, backingSizeBytes: UInt64, backingIdentity: String,
                pmemUUID: [UInt8] = [UInt8](repeating: 0, count: 16), createdSeconds: UInt64) {
        precondition(uuid.count == 16 && pmemUUID.count == 16)
        self.uuid = uuid
        self.segmentBytes = UInt32(geometry.segmentBytes)
        self.mode = mode
        self.segmentCount = UInt64(geometry.segmentCount)
        self.firstSegmentOffset = geometry.firstSegmentOffset
        self.backingSizeBytes = backingSizeBytes
        self.pmemUUID = pmemUUID
        self.createdSeconds = createdSeconds
        self.backingIdentity = String(decoding: Array(backingIdentity.utf8.prefix(Self.backingIdentityBytesMax)), as: UTF8.self)
    }

    /// The header as one 4 KiB block.
    public func encoded() -> [UInt8] {
        var writer = LittleEndianWriter(count: CacheGeometry.blockBytes)
        writer.write(bytes: Self.magic)
        writer.write(Self.formatVersion)
        writer.write(UInt32(CacheGeometry.blockBytes))
        writer.write(bytes: uuid)
        writer.write(segmentBytes)
        writer.write(mode.rawValue)
        writer.write(segmentCount)
        writer.write(firstSegmentOffset)
        writer.write(backingSizeBytes)
        writer.write(bytes: pmemUUID)
        writer.write(createdSeconds)
        let identity = Array(backingIdentity.utf8)
        writer.write(UInt16(identity.count))
        writer.write(bytes: identity)
        var bytes = writer.bytes
        Self.seal(&bytes)
        return bytes
    }

    /// Stores the CRC-32C of bytes 0 ..< 4092 in the block's last 4 bytes.
    private static func seal(_ block: inout [UInt8]) {
        let crc = CRC32C.checksum(Array(block[0..<(CacheGeometry.blockBytes - 4)]))
        withUnsafeBytes(of: crc.littleEndian) { block.replaceSubrange((CacheGeometry.blockBytes - 4)..<CacheGeometry.blockBytes, with: $0) }
    }

    /// The format version a header block says it has (whether or not the rest is valid).
    public static func storedVersion(_ block: [UInt8]) -> UInt32 {
        precondition(block.count >= 12)
        return block.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt32.self)) }
    }

    /// The header block of a version-1 cache as version 2 (`sluice-recover upgrade`): the same
    /// bytes with the version field and the checksum rewritten. Refuses anything but an intact
    /// version-1 header; the result decodes as a current header.
    public static func upgradedFromVersion1(_ block: [UInt8]) throws -> [UInt8] {
        precondition(block.count == CacheGeometry.blockBytes)
        guard Array(block[0..<8]) == magic else { throw FormatError.notFormatted }
        let version = storedVersion(block)
        guard version == upgradableVersion else { throw FormatError.unsupportedVersion(found: version, supported: formatVersion) }
        let stored = block.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: CacheGeometry.blockBytes - 4, as: UInt32.self)) }
        guard stored == CRC32C.checksum(Array(block[0..<(CacheGeometry.blockBytes - 4)])) else {
            throw FormatError.corruptSuperblock("header checksum mismatch")
        }
        var upgraded = block
        withUnsafeBytes(of: formatVersion.littleEndian) { upgraded.replaceSubrange(8..<12, with: $0) }
        seal(&upgraded)
        _ = try upgraded.withUnsafeBytes { try SuperblockHeader(decoding: $0) }
        return upgraded
    }

    /// Decodes and checks a header block.
    public init(decoding bytes: UnsafeRawBufferPointer) throws {
        guard bytes.count >= CacheGeometry.blockBytes else { throw FormatError.notFormatted }
        var reader = LittleEndianReader(bytes)
        let magic = reader.read(count: 8)
        guard magic == Self.magic else {
            throw FormatError.notFormatted
        }
        let storedCRC = UInt32(littleEndian: bytes.load(fromByteOffset: CacheGeometry.blockBytes - 4, as: UInt32.self))
        let computed = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<(CacheGeometry.blockBytes - 4)]))
        let version: UInt32 = reader.read()
        guard version == Self.formatVersion else {
            throw FormatError.unsupportedVersion(found: version, supported: Self.formatVersion)
        }
        guard storedCRC == computed else { throw FormatError.corruptSuperblock("header checksum mismatch") }
        let blockBytes: UInt32 = reader.read()
        guard blockBytes == UInt32(CacheGeometry.blockBytes) else {
            throw FormatError.corruptSuperblock("block size \(blockBytes) is not 4096")
        }
        uuid = reader.read(count: 16)
        segmentBytes = reader.read()
        let modeValue: UInt32 = reader.read()
        guard let mode = Mode(rawValue: modeValue) else { throw FormatError.corruptSuperblock("unknown mode \(modeValue)") }
        self.mode = mode
        segmentCount = reader.read()
        firstSegmentOffset = reader.read()
        backingSizeBytes = reader.read()
        pmemUUID = reader.read(count: 16)
        createdSeconds = reader.read()
        let identityLength = Int(reader.read(UInt16.self))
        guard identityLength <= Self.backingIdentityBytesMax else {
            throw FormatError.corruptSuperblock("backing identity of \(identityLength) bytes")
        }
        backingIdentity = String(decoding: reader.read(count: identityLength), as: UTF8.self)
    }
}
