import Dispatch
import SluiceFormat

/// What recovery reads and writes: the cache device, with blocking calls. The server runs
/// recovery before it serves, and the offline tool runs it without a server, on the same code.
///
/// Recovery reads from several threads at once (each read into its own buffer) but never writes
/// or syncs while a read is in flight.
public protocol RecoveryDevice: AnyObject {
    var sizeBytes: UInt64 { get }
    func readBytes(offset: UInt64, count: Int) throws -> [UInt8]
    /// Reads `buffer.count` bytes at `offset` into `buffer`, which is 4 KiB-aligned when recovery
    /// scans the ring. Devices that can read straight into it should (the default copies).
    func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    func writeBytes(offset: UInt64, bytes: [UInt8]) throws
    func synchronizeBytes() throws
}

extension RecoveryDevice {
    public func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let bytes = try readBytes(offset: offset, count: buffer.count)
        precondition(bytes.count == buffer.count, "a device read returned \(bytes.count) bytes of \(buffer.count)")
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
    }
}

/// What recovery found and did.
public struct RecoveryReport: Sendable, Equatable {
    /// The record said the cache was shut down cleanly, so only segment headers were read.
    public var cleanShutdown: Bool
    /// The accepted log and why it ends where it does.
    public var chain: SegmentChain
    /// Slots past the end of the log that held segments of this cache with larger ids, left by
    /// writes that completed after the one that tore; their headers were erased so that no later
    /// recovery can take them for a continuation of the new log.
    public var erasedSlots: [Int]
    /// Bytes read from the cache device (the walk, its read-ahead past the log's end, and the
    /// headers of the slots outside the log).
    public var bytesRead: UInt64
    /// Pmem mode: sealed segments the cache device lacked, written there from the pmem file.
    public var pmemSealedSegmentsWritten: [UInt64] = []
    /// Pmem mode: the open segment whose valid entries were written to the cache device, and how many.
    public var pmemOpenSegmentWritten: UInt64?
    public var pmemOpenEntries = 0
    /// Wall time of recover_cache, reads and writes included: with `bytesRead`, the scan rate.
    public var seconds: Double = 0

    /// The scan rate in GB/s (10⁹ bytes per second).
    public var gigabytesPerSecond: Double { seconds > 0 ? Double(bytesRead) / seconds / 1e9 : 0 }
}

/// A pmem file's bytes, for recovery: its checked layout and the mapped file (read only).
public struct PmemImage {
    public var layout: PmemLayout
    public var bytes: UnsafeRawBufferPointer
    public var path: String

    public init(layout: PmemLayout, bytes: UnsafeRawBufferPointer, path: String) {
        self.layout = layout
        self.bytes = bytes
        self.path = path
    }
}

/// recover_cache: finds the log on a cache device and makes the device safe to append to.
///
/// It runs as five labelled steps, each a function that asserts its postconditions (with
/// `precondition`, kept in release builds: a failed one is a bug in recovery, and serving on
/// after it could replay stale data). The rows are those of the recovery tables in `docs/FORMAT.md`.
/// 1. `readPmemAreas` (pmem mode): the sealed areas by id and the open area, ignoring those at or
///    below the last retired id.
/// 2. `walkChain`: walks the ring from the segment after the last retired one, accepting only
///    consecutive ids whose checksums verify (headers only up to the last flushed id after a clean
///    shutdown): the ring-walk table, and pmem rows P1 (the device's copy verifies) and P2 (it does
///    not, and the sealed pmem copy is written to the slot; the walk goes on). Reads run ahead of
///    the walk into reused buffers (`ReadAhead`), so checksums are verified while the next
///    segments are read.
/// 3. `checkSyncedThrough`: row P7, a log that ends before the record's last flushed id or the pmem
///    file's synced-through id is refused as damaged.
/// 4. `replayOpenArea` (pmem mode): row P5 (an area past the log's end plus one is refused), P3
///    (the open area's valid entries become the next segment, partial), P4 (an open area at or
///    below the log's end is stale). Then the device is synced if anything was written.
/// 5. `eraseStaleSegments` (after a crash): the header of every slot beyond the log that holds a
///    segment of this cache with an id past the log's end is erased and synced. New segments
///    reuse those ids; without the erasure a later crash could join an old segment to the new
///    log and replay stale data (the "after the walk" table).
/// Recovery never writes the pmem file, and what it writes to the cache device is the same on
/// every run, so a crash during it and a second run give the same result (row P6).
public enum RecoverCache {
    /// How many segment reads the walk keeps in flight (each into its own reused buffer).
    public static let readAheadSegments = 32
    /// Threads issuing those reads: a blocking read is one request, and a device reaches its
    /// sequential rate only with several in its queue.
    public static let readerThreads = 8

    public static func recover(device: any RecoveryDevice, header: SuperblockHeader, geometry: CacheGeometry,
                               record: SuperblockRecord, pmem: PmemImage? = nil, verifyAll: Bool = false) throws -> RecoveryReport {
        let started = DispatchTime.now()
        let areas = readPmemAreas(pmem, geometry: geometry, lastRetiredSegmentID: record.lastRetiredSegmentID)
        // After a clean shutdown the segments up to the last flushed one are taken from their
        // headers alone, unless every checksum is wanted (`sluice-recover check`).
        let trustedThroughID = record.cleanShutdown && !verifyAll ? record.lastFlushedSegmentID : 0
        let walk = try walkChain(device: device, cacheUUID: header.uuid, geometry: geometry, record: record,
                                 trustedThroughID: trustedThroughID, areas: areas, pmem: pmem)
        var chain = walk.chain
        try checkSyncedThrough(chain, record: record, pmem: pmem)
        let open = try replayOpenArea(areas, chain: &chain, device: device, cacheUUID: header.uuid, geometry: geometry, pmem: pmem)
        if !walk.sealedWritten.isEmpty || open != nil { try device.synchronizeBytes() }
        var erasure = Erasure(slots: [], bytesRead: 0)
        if !record.cleanShutdown {
            erasure = try eraseStaleSegments(device: device, cacheUUID: header.uuid, geometry: geometry, chain: chain)
        }
        let report = RecoveryReport(cleanShutdown: record.cleanShutdown, chain: chain, erasedSlots: erasure.slots,
                                    bytesRead: walk.bytesRead + erasure.bytesRead, pmemSealedSegmentsWritten: walk.sealedWritten,
                                    pmemOpenSegmentWritten: open?.segmentID, pmemOpenEntries: open?.entries ?? 0,
                                    seconds: Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9)
        checkReport(report, geometry: geometry, record: record)
        return report
    }

    // MARK: Step 1: read the pmem areas

    /// The pmem file's areas that recovery may need: sealed segments by id, and the open one.
    struct PmemAreas {
        var sealed: [UInt64: Int] = [:]
        var open: PmemLayout.Area?
    }

    /// Step 1. Areas whose segment was written back already are stale and left out.
    static func readPmemAreas(_ pmem: PmemImage?, geometry: CacheGeometry, lastRetiredSegmentID: UInt64) -> PmemAreas {
        var areas = PmemAreas()
        guard let pmem else { return areas }
        for area in 0..<pmem.layout.areaCount {
            let decoded = pmem.layout.decodeArea(area, in: pmem.bytes, geometry: geometry)
            switch decoded.state {
            case .sealed where decoded.segmentID > lastRetiredSegmentID:
                areas.sealed[decoded.segmentID] = area
            case .open where decoded.segmentID > lastRetiredSegmentID:
                precondition(areas.open?.segmentID != decoded.segmentID, "two open pmem areas with one id")
                if areas.open == nil || decoded.segmentID > areas.open!.segmentID { areas.open = decoded }
            default:
                break
            }
        }
        precondition(areas.sealed.keys.allSatisfy { $0 > lastRetiredSegmentID }
                     && (areas.open.map { $0.segmentID > lastRetiredSegmentID && $0.state == .open } ?? true),
                     "readPmemAreas kept an area at or below the last retired segment")
        return areas
    }

    // MARK: Step 2: walk the chain (rows P1, P2)

    struct Walked {
        var chain: SegmentChain
        var sealedWritten: [UInt64]
        var bytesRead: UInt64
    }

    /// Step 2. The chain from the segment after the last retired one, with every sealed pmem
    /// segment the device lacks written to its slot (P2) on the way.
    static func walkChain(device: any RecoveryDevice, cacheUUID: [UInt8], geometry: CacheGeometry, record: SuperblockRecord,
                          trustedThroughID: UInt64, areas: PmemAreas, pmem: PmemImage?) throws -> Walked {
        let firstID = record.lastRetiredSegmentID + 1
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        // After a clean shutdown the log normally ends right after the trusted segments: whole
        // segments past the first untrusted one are read only once the walk has got that far.
        let trustedCount = Int(trustedThroughID > record.lastRetiredSegmentID ? trustedThroughID - record.lastRetiredSegmentID : 0)
        let reader = ReadAhead(device: device, depth: min(readAheadSegments, geometry.segmentCount), threads: readerThreads,
                               bufferBytes: geometry.segmentBytes,
                               horizon: { taken in trustedCount > 0 && taken <= trustedCount + 1 ? trustedCount + 1 : .max }) { sequence in
            // One lap at most; trusted segments are read as headers only.
            guard sequence < geometry.segmentCount else { return nil }
            let id = firstID + UInt64(sequence)
            return (geometry.offset(ofSlot: geometry.slot(ofSegment: id)), id <= trustedThroughID ? headerBytes : geometry.segmentBytes)
        }
        defer { reader.finish() }
        var walk = SegmentChain.Walk(geometry: geometry, cacheUUID: cacheUUID, lastRetiredSegmentID: record.lastRetiredSegmentID,
                                     trustedThroughID: trustedThroughID)
        var sealedWritten: [UInt64] = []
        var takenFromPmem: [UInt64] = []
        while let slot = walk.nextSlot {
            let id = walk.expectedID
            let bytes = try reader.take(Int(id - firstID))
            guard let pmem, let area = areas.sealed[id], id > trustedThroughID,
                  let image = try sealedImage(replacing: bytes, id: id, area: area, pmem: pmem, cacheUUID: cacheUUID, geometry: geometry) else {
                walk.take(bytes)
                continue
            }
            // Row P2. No read is in flight while recovery writes (see `RecoveryDevice`).
            reader.quiesce()
            try device.writeBytes(offset: geometry.offset(ofSlot: slot), bytes: image)
            sealedWritten.append(id)
            image.withUnsafeBytes { walk.take($0) }
            if walk.expectedID == id + 1 { takenFromPmem.append(id) }
        }
        reader.finish()
        let chain = walk.chain!
        precondition(chain.segments.map(\.segmentID) == Array(firstID..<(firstID + UInt64(chain.segments.count))),
                     "walkChain: the chain's ids do not run consecutively from \(firstID)")
        precondition(chain.segments.count <= geometry.segmentCount, "walkChain: the chain is longer than the ring")
        precondition(sealedWritten == takenFromPmem, "walkChain: wrote pmem segments \(sealedWritten), took \(takenFromPmem) from pmem")
        precondition(sealedWritten.allSatisfy { areas.sealed[$0] != nil && $0 > trustedThroughID },
                     "walkChain: wrote a segment no sealed pmem area holds")
        return Walked(chain: chain, sealedWritten: sealedWritten, bytesRead: reader.bytesRead)
    }

    /// Row P1 or P2 for segment `id`, which a sealed pmem area holds: nil when the device's copy
    /// verifies (P1), else the pmem image to write in its place (P2), which must verify.
    static func sealedImage(replacing onDevice: UnsafeRawBufferPointer, id: UInt64, area: Int, pmem: PmemImage,
                            cacheUUID: [UInt8], geometry: CacheGeometry) throws -> [UInt8]? {
        let found = try? SegmentHeader(verifying: onDevice, geometry: geometry, cacheUUID: cacheUUID)
        if let found, found.segmentID == id { return nil }
        let imageOffset = pmem.layout.imageOffset(area, geometry: geometry)
        let image = Array(UnsafeRawBufferPointer(rebasing: pmem.bytes[imageOffset..<(imageOffset + geometry.segmentBytes)]))
        let inPmem = image.withUnsafeBytes { try? SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: cacheUUID) }
        guard let inPmem, inPmem.segmentID == id else {
            throw PmemError.sealedSegmentDamaged(path: pmem.path, segmentID: id)
        }
        return image
    }

    // MARK: Step 3: check the log against the synced-through ids (row P7)

    /// Step 3. Segments up to the recorded last flushed id were synced: a log that ends before it
    /// is damaged, not torn by a crash, and recovering it would silently lose synced writes. In
    /// pmem mode the pmem file says, more recently than the record, how far the device synced.
    static func checkSyncedThrough(_ chain: SegmentChain, record: SuperblockRecord, pmem: PmemImage?) throws {
        let syncedThroughID = max(record.lastFlushedSegmentID, pmem.map { PmemLayout.syncedThroughID(in: $0.bytes) } ?? 0)
        guard chain.lastSegmentID >= syncedThroughID else {
            throw FormatError.logShorterThanRecorded(lastFlushedID: syncedThroughID, foundID: chain.lastSegmentID,
                                                     reason: "\(chain.end)")
        }
    }

    // MARK: Step 4: replay the open pmem area (rows P5, P3, P4)

    /// Step 4. Appends the open area's valid entries to the log as its next segment when the open
    /// area continues it; returns that segment's id and entry count, or nil when nothing was written.
    static func replayOpenArea(_ areas: PmemAreas, chain: inout SegmentChain, device: any RecoveryDevice, cacheUUID: [UInt8],
                               geometry: CacheGeometry, pmem: PmemImage?) throws -> (segmentID: UInt64, entries: Int)? {
        guard let pmem else { return nil }
        let endID = chain.lastSegmentID
        // Row P5: a sealed segment past the end of the log means segments in between are lost.
        if let stray = areas.sealed.keys.filter({ $0 > endID }).min() {
            throw PmemError.logGap(path: pmem.path, expectedID: endID + 1, foundID: stray)
        }
        // Row P4: an open area at or below the end of the log is stale; it was sealed and written
        // before, or its segment was recovered into the log by an earlier run.
        guard let open = areas.open, open.segmentID > endID else { return nil }
        guard open.segmentID == endID + 1 else {
            throw PmemError.logGap(path: pmem.path, expectedID: endID + 1, foundID: open.segmentID)
        }
        guard !open.validEntries.isEmpty else { return nil }
        // Row P3: the open segment's valid entries become the next segment.
        let segment = openSegmentImage(open, pmem: pmem, geometry: geometry, cacheUUID: cacheUUID)
        try device.writeBytes(offset: geometry.offset(ofSlot: geometry.slot(ofSegment: open.segmentID)), bytes: segment.bytes)
        chain.segments.append(segment.header)
        precondition(chain.lastSegmentID == endID + 1 && chain.segments.count <= geometry.segmentCount
                     && chain.segments.last!.entries.count == open.validEntries.count,
                     "replayOpenArea: the open segment did not become the log's next segment")
        return (open.segmentID, open.validEntries.count)
    }

    /// The open area's valid entries as a segment: the entries in order, each data block copied
    /// from its place in the area, with a header. The same pmem contents give the same bytes.
    static func openSegmentImage(_ open: PmemLayout.Area, pmem: PmemImage, geometry: CacheGeometry,
                                 cacheUUID: [UInt8]) -> (header: SegmentHeader, bytes: [UInt8]) {
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        var bytes = [UInt8](repeating: 0, count: headerBytes + open.validEntries.count * CacheGeometry.blockBytes)
        bytes.withUnsafeMutableBytes { target in
            for (position, valid) in open.validEntries.enumerated() {
                let source = pmem.layout.dataOffset(open.area, index: valid.index, geometry: geometry)
                (target.baseAddress! + headerBytes + position * CacheGeometry.blockBytes)
                    .copyMemory(from: pmem.bytes.baseAddress! + source, byteCount: CacheGeometry.blockBytes)
            }
        }
        let header = SegmentHeader(segmentID: open.segmentID, cacheUUID: cacheUUID, isPartial: true, entries: open.validEntries.map(\.entry))
        bytes.withUnsafeMutableBytes { raw in
            header.encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<headerBytes]),
                          data: UnsafeRawBufferPointer(rebasing: raw[headerBytes...]), geometry: geometry)
        }
        return (header, bytes)
    }

    // MARK: Step 5: erase stale segments beyond the log

    struct Erasure {
        var slots: [Int]
        var bytesRead: UInt64
    }

    /// Step 5. Reads the header of every slot outside the chain (ahead, in parallel), then erases
    /// those holding a segment of this cache with an id past the log's end, in slot order, and syncs.
    static func eraseStaleSegments(device: any RecoveryDevice, cacheUUID: [UInt8], geometry: CacheGeometry,
                                   chain: SegmentChain) throws -> Erasure {
        let chainSlots = Set(chain.segments.map { geometry.slot(ofSegment: $0.segmentID) })
        let outside = (0..<geometry.segmentCount).filter { !chainSlots.contains($0) }
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        let reader = ReadAhead(device: device, depth: min(readAheadSegments, max(outside.count, 1)), threads: readerThreads,
                               bufferBytes: headerBytes) { sequence in
            sequence < outside.count ? (geometry.offset(ofSlot: outside[sequence]), headerBytes) : nil
        }
        defer { reader.finish() }
        // What each slot outside the chain holds of this cache, before and after the erasure.
        var foundIDs: [Int: UInt64] = [:]
        for (sequence, slot) in outside.enumerated() {
            let bytes = try reader.take(sequence)
            if let found = try? SegmentHeader(decodingHeader: bytes, geometry: geometry, cacheUUID: cacheUUID) {
                foundIDs[slot] = found.segmentID
            }
        }
        reader.finish()
        let stale = outside.filter { (foundIDs[$0] ?? 0) > chain.lastSegmentID }
        for slot in stale {
            try device.writeBytes(offset: geometry.offset(ofSlot: slot), bytes: [UInt8](repeating: 0, count: CacheGeometry.blockBytes))
            foundIDs[slot] = nil
        }
        if !stale.isEmpty { try device.synchronizeBytes() }
        precondition(chainSlots.count == chain.segments.count && chainSlots.count + outside.count == geometry.segmentCount,
                     "eraseStaleSegments: the chain and the slots outside it do not partition the ring")
        precondition(stale.allSatisfy { !chainSlots.contains($0) }, "eraseStaleSegments: erased a slot of the chain")
        precondition(foundIDs.values.allSatisfy { $0 <= chain.lastSegmentID },
                     "eraseStaleSegments: a slot outside the chain still holds a segment past the log's end")
        return Erasure(slots: stale, bytesRead: reader.bytesRead)
    }

    // MARK: The report

    /// The report's parts agree with each other and with the record.
    static func checkReport(_ report: RecoveryReport, geometry: CacheGeometry, record: SuperblockRecord) {
        let chain = report.chain
        let ids = chain.segments.map(\.segmentID)
        let firstID = record.lastRetiredSegmentID + 1
        precondition(chain.lastRetiredSegmentID == record.lastRetiredSegmentID
                     && ids == Array(firstID..<(firstID + UInt64(ids.count))) && ids.count <= geometry.segmentCount,
                     "recovery report: the chain does not run consecutively from the last retired segment")
        precondition(report.cleanShutdown == record.cleanShutdown && (!report.cleanShutdown || report.erasedSlots.isEmpty),
                     "recovery report: a clean shutdown erased slots")
        let chainSlots = Set(ids.map { geometry.slot(ofSegment: $0) })
        precondition(report.erasedSlots == report.erasedSlots.sorted() && Set(report.erasedSlots).count == report.erasedSlots.count
                     && report.erasedSlots.allSatisfy { (0..<geometry.segmentCount).contains($0) && !chainSlots.contains($0) },
                     "recovery report: erased slots \(report.erasedSlots) are not distinct slots outside the chain")
        let openID = report.pmemOpenSegmentWritten
        precondition((openID == nil) == (report.pmemOpenEntries == 0)
                     && openID.map { $0 == chain.lastSegmentID && chain.segments.last!.entries.count == report.pmemOpenEntries } ?? true,
                     "recovery report: the open pmem segment is not the log's last segment with its entries")
        let sealed = report.pmemSealedSegmentsWritten
        precondition(sealed == sealed.sorted() && Set(sealed).count == sealed.count
                     && sealed.allSatisfy { ids.contains($0) && $0 != openID },
                     "recovery report: pmem segments written \(sealed) are not distinct segments of the log")
        let readSegments = ids.count - (openID == nil ? 0 : 1)
        precondition(report.bytesRead >= UInt64(readSegments * geometry.headerBlocks * CacheGeometry.blockBytes),
                     "recovery report: fewer bytes read than the log's headers")
    }
}
