import Logging
import NIOPosix
import RecoverCache
import SluiceCache
import SluiceFormat
import SluiceIO

/// Saves what can be saved from a damaged cache: the longest valid prefix of its log (with the
/// pmem segments that continue it) is written back to the backing store, and the blocks whose
/// newest data was in the segments beyond the damage are listed, so the operator knows exactly
/// what was lost.
///
/// The prefix is found by the server's own recovery, run as a dry run with the damage taken out
/// of its way (the record's claim of synced segments dropped, pmem areas past a gap ignored) until
/// it accepts the log. Only then is anything written: those pmem areas are freed, a record
/// without the claim is written, and the ordinary drain recovers and drains. Run again after an
/// interruption, salvage finds a consistent cache and just drains it.
public enum Salvage {
    /// A run of 4 KiB blocks whose newest data was lost, and the segments it was in.
    public struct LostRange: Sendable, Equatable {
        public var firstBlock: UInt64
        public var blockCount: UInt64
        public var segmentIDs: [UInt64]

        public var byteRange: Range<UInt64> { firstBlock * 4096..<((firstBlock + blockCount) * 4096) }
    }

    public struct Result: Sendable {
        /// The log segments applied (the valid prefix, pmem continuation included).
        public var appliedSegments: Int
        public var lastAppliedSegmentID: UInt64
        public var lost: [LostRange]
        /// Slots or pmem areas beyond the damage whose headers could not be read: their blocks
        /// are unknown.
        public var unreadable: [String]
        public var drain: OfflineDrain.Result
        public var wasDamaged: Bool
    }

    public static func salvage(cachePath: String, backing: BackingLocation, backingDurableOnAcknowledgement: Bool = false,
                               pmemPath: String?, logger: Logger,
                               progress: @escaping (OfflineDrain.Progress) -> Void) throws -> Result {
        let inspection = try CacheInspection.inspect(cachePath: cachePath, pmemPath: pmemPath)
        func drain() throws -> OfflineDrain.Result {
            try OfflineDrain.drain(cachePath: cachePath, backing: backing, backingDurableOnAcknowledgement: backingDurableOnAcknowledgement,
                                   pmemPath: pmemPath, logger: logger, progress: progress)
        }
        guard inspection.verdict == .damaged else {
            let drained = try drain()
            let chain = inspection.report?.chain
            return Result(appliedSegments: chain?.segments.count ?? 0, lastAppliedSegmentID: chain?.lastSegmentID ?? 0,
                          lost: [], unreadable: [], drain: drained, wasDamaged: false)
        }
        guard let header = inspection.header, let geometry = inspection.geometry, let record = inspection.record else {
            throw SalvageError.nothingToSalvage(inspection.problems.joined(separator: "; "))
        }
        try checkBacking(backing, durableOnAcknowledgement: backingDurableOnAcknowledgement, against: header)

        let file = try BlockFile(path: cachePath, readOnly: false)
        var fileIsOpen = true
        defer { if fileIsOpen { file.close() } }
        let device = FileMedium(file: file)
        var memory: MappedPersistentMemory?
        var pmemCopy: [UInt8]?
        var layout: PmemLayout?
        if header.mode == .pmem, let pmemPath {
            let mapped = try PmemFile.open(path: pmemPath)
            memory = mapped
            layout = inspection.pmemLayout
            pmemCopy = Array(UnsafeRawBufferPointer(start: mapped.baseAddress, count: mapped.sizeBytes))
            // The pmem file's claim of synced segments is set aside like the record's.
            pmemCopy!.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(0), toByteOffset: PmemLayout.syncedWordOffset, as: UInt64.self) }
        }

        // The dry run, with the damage taken out of recovery's way one piece at a time.
        let lenient = SuperblockRecord(sequence: record.sequence, lastRetiredSegmentID: record.lastRetiredSegmentID,
                                       lastFlushedSegmentID: record.lastRetiredSegmentID, cleanShutdown: false, cacheMode: record.cacheMode)
        var ignoredAreas: [Int] = []
        var report: RecoveryReport?
        for _ in 0...(layout?.areaCount ?? 0) {
            func dryRun(_ image: PmemImage?) throws -> RecoveryReport {
                try RecoverCache.recover(device: DryRunRecoveryDevice(device), header: header, geometry: geometry,
                                         record: lenient, pmem: image, verifyAll: true)
            }
            do {
                if let copy = pmemCopy, let layout, let pmemPath {
                    report = try copy.withUnsafeBytes { try dryRun(PmemImage(layout: layout, bytes: $0, path: pmemPath)) }
                } else {
                    report = try dryRun(nil)
                }
                break
            } catch let error as PmemError {
                // A pmem area past a gap, or a damaged sealed one: set aside, and try again.
                guard let layout, let area = areaNamed(by: error, in: pmemCopy!, layout: layout, geometry: geometry) else { throw error }
                ignoredAreas.append(area)
                pmemCopy!.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(0), toByteOffset: layout.areaOffset(area, geometry: geometry), as: UInt64.self) }
            }
        }
        guard let report else { throw SalvageError.nothingToSalvage("recovery does not accept any prefix of the log") }
        let end = report.chain.lastSegmentID

        // What lies beyond the prefix: segments on the device, and the pmem areas set aside.
        var lostBlocks: [UInt64: Set<UInt64>] = [:]
        var unreadable: [String] = []
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        for slot in 0..<geometry.segmentCount {
            let bytes = try device.readBytes(offset: geometry.offset(ofSlot: slot), count: headerBytes)
            do {
                let found = try bytes.withUnsafeBytes { try SegmentHeader(decodingHeader: $0, geometry: geometry, cacheUUID: header.uuid) }
                guard found.segmentID > end else { continue }
                for entry in found.entries { lostBlocks[entry.blockNumber, default: []].insert(found.segmentID) }
            } catch SegmentHeader.Invalid.noHeader {
                continue
            } catch SegmentHeader.Invalid.foreign {
                continue
            } catch {
                // A damaged header where the log would have gone on is worth naming.
                if slot == geometry.slot(ofSegment: end + 1) { unreadable.append("slot \(slot) (where segment \(end + 1) belongs): \(error)") }
            }
        }
        if let memory, let layout {
            let bytes = UnsafeRawBufferPointer(start: memory.baseAddress, count: memory.sizeBytes)
            for area in ignoredAreas {
                let decoded = layout.decodeArea(area, in: bytes, geometry: geometry)
                if decoded.state == .open {
                    for valid in decoded.validEntries { lostBlocks[valid.entry.blockNumber, default: []].insert(decoded.segmentID) }
                } else {
                    let offset = layout.imageOffset(area, geometry: geometry)
                    let image = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + headerBytes)])
                    if let found = try? SegmentHeader(decodingHeader: image, geometry: geometry, cacheUUID: header.uuid) {
                        for entry in found.entries { lostBlocks[entry.blockNumber, default: []].insert(found.segmentID) }
                    } else {
                        unreadable.append("pmem area \(area) (segment \(decoded.segmentID)): its segment header does not decode")
                    }
                }
            }
        }

        // Now repair: free the pmem areas set aside, drop the record's claim, and drain.
        if let memory, let layout {
            for area in ignoredAreas {
                memory.storeWord(0, at: layout.areaOffset(area, geometry: geometry))
                memory.flush(offset: layout.areaOffset(area, geometry: geometry), count: 8)
            }
            memory.storeWord(0, at: PmemLayout.syncedWordOffset)
            memory.flush(offset: PmemLayout.syncedWordOffset, count: 8)
            memory.drain()
        }
        let next = SuperblockRecord(sequence: record.sequence + 1, lastRetiredSegmentID: record.lastRetiredSegmentID,
                                    lastFlushedSegmentID: record.lastRetiredSegmentID, cleanShutdown: false, cacheMode: record.cacheMode)
        try device.writeBytes(offset: next.blockOffset, bytes: next.encoded())
        try device.synchronizeBytes()
        // The drain opens both files again and takes their locks.
        memory = nil
        file.close()
        fileIsOpen = false
        let drained = try drain()
        return Result(appliedSegments: report.chain.segments.count, lastAppliedSegmentID: end, lost: ranges(lostBlocks),
                      unreadable: unreadable, drain: drained, wasDamaged: true)
    }

    /// Proves, before anything is repaired, that the drain at the end will accept the backing
    /// store (reachable, writable, able to flush or declared durable on acknowledgement, the one
    /// the cache was formatted for): refused only after the repair, salvage run again would find
    /// a consistent cache and just drain it, and the list of lost blocks would be gone.
    private static func checkBacking(_ backing: BackingLocation, durableOnAcknowledgement: Bool, against header: SuperblockHeader) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let opened = try OpenedBacking(backing, eventLoop: group.next(), durableOnAcknowledgement: durableOnAcknowledgement)
        defer { opened.close() }
        guard header.backingIdentity == backing.identity else {
            throw FormatError.wrongBacking(expected: header.backingIdentity, found: backing.identity)
        }
        guard header.backingSizeBytes == opened.sizeBytes else {
            throw FormatError.backingSizeChanged(expected: header.backingSizeBytes, found: opened.sizeBytes)
        }
    }

    /// The pmem area a recovery error is about.
    private static func areaNamed(by error: PmemError, in bytes: [UInt8], layout: PmemLayout, geometry: CacheGeometry) -> Int? {
        let id: UInt64
        switch error {
        case .logGap(_, _, let found): id = found
        case .sealedSegmentDamaged(_, let segmentID): id = segmentID
        default: return nil
        }
        return bytes.withUnsafeBytes { raw in
            (0..<layout.areaCount).first { area in
                let decoded = layout.decodeArea(area, in: raw, geometry: geometry)
                return decoded.state != .free && decoded.segmentID == id
            }
        }
    }

    /// Lost blocks as runs of consecutive block numbers.
    static func ranges(_ blocks: [UInt64: Set<UInt64>]) -> [LostRange] {
        var result: [LostRange] = []
        for block in blocks.keys.sorted() {
            let segments = blocks[block]!
            if var last = result.last, last.firstBlock + last.blockCount == block {
                last.blockCount += 1
                last.segmentIDs = Array(Set(last.segmentIDs).union(segments)).sorted()
                result[result.count - 1] = last
            } else {
                result.append(LostRange(firstBlock: block, blockCount: 1, segmentIDs: segments.sorted()))
            }
        }
        return result
    }
}

public enum SalvageError: Error, CustomStringConvertible {
    case nothingToSalvage(String)

    public var description: String {
        switch self {
        case .nothingToSalvage(let why):
            return "nothing can be salvaged from this cache automatically: \(why)"
        }
    }
}
