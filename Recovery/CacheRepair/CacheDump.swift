import RecoverCache
import SluiceCache
import SluiceFormat

/// Everything `sluice-recover dump` shows: the superblock, both records, the segments of the log
/// with their per-block metadata, and the pmem areas with their valid entries. Encodes to JSON
/// with snake_case keys, or renders as text.
public struct CacheDump: Codable, Sendable {
    public struct Superblock: Codable, Sendable {
        public var cacheUUID: String
        public var mode: String
        public var segmentSizeBytes: Int
        public var segmentCount: Int
        public var firstSegmentOffset: UInt64
        public var backingSizeBytes: UInt64
        public var backingIdentity: String
        public var pmemUUID: String
        public var createdSeconds: UInt64
    }

    public struct Record: Codable, Sendable {
        public var slot: Int
        public var valid: Bool
        public var sequence: UInt64?
        public var lastRetiredSegmentID: UInt64?
        public var lastFlushedSegmentID: UInt64?
        public var cleanShutdown: Bool?
        public var current: Bool
    }

    public struct Block: Codable, Sendable {
        public var index: Int
        public var lba4k: UInt64
        /// Sectors held, as 8 characters (sector 0 first): `x` held, `.` not, then ` clean` for a clean copy; a discard marker is `discarded`.
        public var sectors: String
    }

    public struct Segment: Codable, Sendable {
        public var id: UInt64
        public var slot: Int
        public var blocks: Int
        public var partial: Bool
        public var entries: [Block]?
    }

    public struct PmemArea: Codable, Sendable {
        public var area: Int
        public var state: String
        public var segmentID: UInt64
        public var validEntries: [Block]?
    }

    public var verdict: String
    public var superblock: Superblock?
    public var records: [Record]
    public var logEnd: String?
    public var dirtyBlocks: Int
    public var segments: [Segment]
    public var pmemAreas: [PmemArea]
    public var problems: [String]

    static func sectors(_ entry: SegmentHeader.Entry) -> String {
        if entry.sectorMask == 0 { return "discarded" }
        return String((0..<8).map { entry.sectorMask & (1 << $0) != 0 ? "x" : "." }) + (entry.isClean ? " clean" : "")
    }

    /// The dump of an inspection. With `segmentID`, only that segment (and its entries); with
    /// `entries`, every segment's entries.
    public init(_ inspection: CacheInspection, segmentID: UInt64? = nil, entries: Bool = false) {
        verdict = "\(inspection.verdict)"
        problems = inspection.problems
        dirtyBlocks = inspection.dirtyBlocks
        if let header = inspection.header {
            superblock = Superblock(cacheUUID: UUIDText.format(header.uuid), mode: "\(header.mode)", segmentSizeBytes: Int(header.segmentBytes),
                                    segmentCount: Int(header.segmentCount), firstSegmentOffset: header.firstSegmentOffset,
                                    backingSizeBytes: header.backingSizeBytes, backingIdentity: header.backingIdentity,
                                    pmemUUID: UUIDText.format(header.pmemUUID), createdSeconds: header.createdSeconds)
        }
        records = inspection.recordSlots.enumerated().map { slot, record in
            Record(slot: slot, valid: record != nil, sequence: record?.sequence, lastRetiredSegmentID: record?.lastRetiredSegmentID,
                   lastFlushedSegmentID: record?.lastFlushedSegmentID, cleanShutdown: record?.cleanShutdown,
                   current: record != nil && record == inspection.record)
        }
        logEnd = inspection.report.map { "\($0.chain.end)" }
        let geometry = inspection.geometry
        segments = (inspection.report?.chain.segments ?? []).compactMap { segment in
            guard segmentID == nil || segment.segmentID == segmentID, let geometry else { return nil }
            let showEntries = entries || segmentID != nil
            return Segment(id: segment.segmentID, slot: geometry.slot(ofSegment: segment.segmentID), blocks: segment.entries.count,
                           partial: segment.isPartial,
                           entries: showEntries ? segment.entries.enumerated().map {
                               Block(index: $0.offset, lba4k: $0.element.blockNumber, sectors: Self.sectors($0.element))
                           } : nil)
        }
        pmemAreas = inspection.pmemAreas.map { area in
            PmemArea(area: area.area, state: "\(area.state)", segmentID: area.segmentID,
                     validEntries: area.state == .open ? area.validEntries.map {
                         Block(index: $0.index, lba4k: $0.entry.blockNumber, sectors: Self.sectors($0.entry))
                     } : nil)
        }
    }

    /// The dump as text.
    public func rendered() -> String {
        var lines: [String] = ["verdict             \(verdict)"]
        if let superblock {
            lines += [
                "cache UUID          \(superblock.cacheUUID)",
                "mode                \(superblock.mode)\(superblock.mode == "pmem" ? " (pmem file UUID \(superblock.pmemUUID))" : "")",
                "segments            \(superblock.segmentCount) of \(superblock.segmentSizeBytes) bytes from byte \(superblock.firstSegmentOffset)",
                "backing             \(superblock.backingIdentity) (\(superblock.backingSizeBytes) bytes)",
                "created             \(superblock.createdSeconds) (seconds since 1970)",
            ]
        }
        for record in records {
            if record.valid {
                lines.append("record slot \(record.slot)       sequence \(record.sequence!), last retired \(record.lastRetiredSegmentID!), "
                             + "last flushed \(record.lastFlushedSegmentID!), \(record.cleanShutdown! ? "clean shutdown" : "in use or crashed")"
                             + (record.current ? " (current)" : ""))
            } else {
                lines.append("record slot \(record.slot)       not valid")
            }
        }
        if let logEnd { lines.append("log end             \(logEnd)") }
        lines.append("dirty blocks        \(dirtyBlocks)")
        lines.append("segments in the log \(segments.count)")
        for segment in segments {
            lines.append("  segment \(segment.id)  slot \(segment.slot)  \(segment.blocks) blocks\(segment.partial ? "  partial" : "")")
            for block in segment.entries ?? [] {
                lines.append("    [\(block.index)] block \(block.lba4k) (byte \(block.lba4k * 4096))  \(block.sectors)")
            }
        }
        for area in pmemAreas {
            lines.append("pmem area \(area.area)         \(area.state)\(area.segmentID > 0 ? " segment \(area.segmentID)" : "")"
                         + (area.validEntries.map { ", \($0.count) valid entries" } ?? ""))
            for block in area.validEntries ?? [] {
                lines.append("    [\(block.index)] block \(block.lba4k) (byte \(block.lba4k * 4096))  \(block.sectors)")
            }
        }
        for problem in problems { lines.append("PROBLEM             \(problem)") }
        return lines.joined(separator: "\n")
    }
}
