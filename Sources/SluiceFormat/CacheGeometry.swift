/// Where everything lives on a cache device, derived from the segment size and the device size.
///
/// ```
/// 0        4 KiB     8 KiB     12 KiB          1 MiB (first segment, aligned to the segment size)
/// +--------+---------+---------+----- ... -----+------------+------------+-- ... --+
/// | header | record  | record  |    unused     | segment 0  | segment 1  |         |
/// |        | slot A  | slot B  |               | hdr | data | hdr | data |         |
/// +--------+---------+---------+----- ... -----+------------+------------+-- ... --+
/// ```
public struct CacheGeometry: Hashable, Sendable {
    /// Every block in the cache (data, headers, superblock parts) is this big.
    public static let blockBytes = 4096
    /// The unit of a client's I/O, and of a block's sector mask.
    public static let sectorBytes = 512
    public static let sectorsPerBlock = blockBytes / sectorBytes
    /// Bytes of the fixed part of a segment header, before the per-block entries.
    public static let segmentHeaderFixedBytes = 64
    /// Bytes per block entry in a segment header.
    public static let segmentEntryBytes = 8
    /// The smallest and largest segment sizes accepted.
    public static let segmentBytesMin = 64 * 1024
    public static let segmentBytesMax = 64 * 1024 * 1024
    /// The default segment size: one 4 KiB header and 255 data blocks.
    public static let segmentBytesDefault = 1024 * 1024

    public let segmentBytes: Int
    public let segmentCount: Int
    /// Byte offset of segment 0 on the device.
    public let firstSegmentOffset: UInt64
    /// Blocks at the start of each segment that hold its header.
    public let headerBlocks: Int
    /// Data blocks in each segment.
    public let dataBlocksPerSegment: Int

    /// Lays out a device of `deviceBytes` with segments of `segmentBytes`.
    public init(segmentBytes: Int, deviceBytes: UInt64) throws {
        guard segmentBytes >= Self.segmentBytesMin, segmentBytes <= Self.segmentBytesMax,
            segmentBytes.nonzeroBitCount == 1
        else {
            throw FormatError.invalidSegmentSize(segmentBytes)
        }
        let blocks = segmentBytes / Self.blockBytes
        var headerBlocks = 1
        while Self.segmentHeaderFixedBytes + (blocks - headerBlocks) * Self.segmentEntryBytes > headerBlocks * Self.blockBytes {
            headerBlocks += 1
        }
        // The superblock region takes at least 12 KiB; segments start at the first segment-aligned
        // offset after it, so segment writes are aligned for O_DIRECT and for the device.
        let first = UInt64(max(segmentBytes, 3 * Self.blockBytes))
        let firstAligned = (first + UInt64(segmentBytes) - 1) / UInt64(segmentBytes) * UInt64(segmentBytes)
        guard deviceBytes > firstAligned else { throw FormatError.deviceTooSmall(deviceBytes: deviceBytes, neededBytes: firstAligned + 2 * UInt64(segmentBytes)) }
        let count = Int((deviceBytes - firstAligned) / UInt64(segmentBytes))
        guard count >= 2 else {
            throw FormatError.deviceTooSmall(deviceBytes: deviceBytes, neededBytes: firstAligned + 2 * UInt64(segmentBytes))
        }
        self.segmentBytes = segmentBytes
        self.segmentCount = count
        self.firstSegmentOffset = firstAligned
        self.headerBlocks = headerBlocks
        self.dataBlocksPerSegment = blocks - headerBlocks
    }

    /// Rebuilds the geometry recorded in a superblock header.
    public init(header: SuperblockHeader) throws {
        try self.init(segmentBytes: Int(header.segmentBytes),
                      deviceBytes: header.firstSegmentOffset + header.segmentCount * UInt64(header.segmentBytes))
        guard segmentCount == Int(header.segmentCount), firstSegmentOffset == header.firstSegmentOffset else {
            throw FormatError.corruptSuperblock("the recorded layout is inconsistent")
        }
    }

    /// The ring slot that segment `id` occupies. Ids start at 1 and grow forever.
    public func slot(ofSegment id: UInt64) -> Int {
        precondition(id > 0, "segment ids start at 1")
        return Int((id - 1) % UInt64(segmentCount))
    }

    /// Byte offset of a ring slot on the device.
    public func offset(ofSlot slot: Int) -> UInt64 {
        precondition(slot >= 0 && slot < segmentCount)
        return firstSegmentOffset + UInt64(slot) * UInt64(segmentBytes)
    }

    /// Byte offset of data block `index` of a ring slot.
    public func offset(ofDataBlock index: Int, inSlot slot: Int) -> UInt64 {
        precondition(index >= 0 && index < dataBlocksPerSegment)
        return offset(ofSlot: slot) + UInt64((headerBlocks + index) * Self.blockBytes)
    }

    /// Total data blocks the cache can hold.
    public var cacheBlocks: Int { segmentCount * dataBlocksPerSegment }

    /// Bytes the device must have for this layout.
    public var deviceBytesNeeded: UInt64 { firstSegmentOffset + UInt64(segmentCount) * UInt64(segmentBytes) }
}
