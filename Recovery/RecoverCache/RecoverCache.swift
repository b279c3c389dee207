import Dispatch
import SluiceFormat

/// What recovery reads and writes: the cache device, with blocking calls. The server runs
/// recovery before it serves, and the offline tool runs it without a server, on the same code.
public protocol RecoveryDevice: AnyObject {
    var sizeBytes: UInt64 { get }
    func readBytes(offset: UInt64, count: Int) throws -> [UInt8]
    func writeBytes(offset: UInt64, bytes: [UInt8]) throws
    func synchronizeBytes() throws
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
    public var bytesRead: UInt64
    /// Pmem mode: sealed segments the cache device lacked, written there from the pmem file.
    public var pmemSealedSegmentsWritten: [UInt64] = []
    /// Pmem mode: the open segment whose valid entries were written to the cache device, and how many.
    public var pmemOpenSegmentWritten: UInt64?
    public var pmemOpenEntries = 0
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
/// The steps, each a row of the recovery table in `docs/FORMAT.md`:
/// 1. Walk the ring from the segment after the last written-back one, accepting only consecutive
///    ids whose checksums verify (headers only up to the last flushed id after a clean shutdown).
/// 2. After a crash, erase the header of every slot beyond the log that holds a segment of this
///    cache with an id past the log's end. New segments reuse those ids; without the erasure a
///    later crash could join an old segment to the new log and replay stale data.
/// In pmem mode, two more steps reconcile the pmem file with the log (rows P1–P6 of the table):
/// 3. While walking, a slot that does not hold the expected segment is written from the pmem
///    area holding that segment sealed, if there is one, and the walk goes on.
/// 4. The open area's valid entries are written as the next segment (a partial one).
/// Recovery never writes the pmem file, and what it writes to the cache device is the same on
/// every run, so a crash during it and a second run give the same result.
public enum RecoverCache {
    /// How many segments are read at once while scanning.
    public static let readAheadSegments = 8

    public static func recover(device: any RecoveryDevice, header: SuperblockHeader, geometry: CacheGeometry,
                               record: SuperblockRecord, pmem: PmemImage? = nil, verifyAll: Bool = false) throws -> RecoveryReport {
        var bytesRead: UInt64 = 0
        // Pmem areas: sealed segments by id (those already written back are stale), and the open one.
        var sealedAreas: [UInt64: Int] = [:]
        var openArea: PmemLayout.Area?
        if let pmem {
            for area in 0..<pmem.layout.areaCount {
                let decoded = pmem.layout.decodeArea(area, in: pmem.bytes, geometry: geometry)
                switch decoded.state {
                case .sealed where decoded.segmentID > record.lastWrittenBackSegmentID:
                    sealedAreas[decoded.segmentID] = area
                case .open where decoded.segmentID > record.lastWrittenBackSegmentID:
                    precondition(openArea == nil || openArea!.segmentID != decoded.segmentID, "two open pmem areas with one id")
                    if openArea == nil || decoded.segmentID > openArea!.segmentID { openArea = decoded }
                default:
                    break
                }
            }
        }
        var sealedWritten: [UInt64] = []
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        // After a clean shutdown the segments up to the last flushed one are taken from their
        // headers alone, unless every checksum is wanted (`sluice-recover check`).
        let trustedThroughID = record.cleanShutdown && !verifyAll ? record.lastFlushedSegmentID : 0
        var prefetched: [Int: Result<[UInt8], Error>] = [:]

        // Reads the slot a scan asks for, together with the next few, in parallel.
        func readSegment(_ slot: Int, id: UInt64) throws -> [UInt8] {
            if let ready = prefetched.removeValue(forKey: slot) { return try ready.get() }
            let count = min(readAheadSegments, geometry.segmentCount)
            var results = [Result<[UInt8], Error>?](repeating: nil, count: count)
            let headersOnly = id <= trustedThroughID
            results.withUnsafeMutableBufferPointer { output in
                let output = output
                DispatchQueue.concurrentPerform(iterations: count) { step in
                    let target = (slot + step) % geometry.segmentCount
                    let length = headersOnly ? headerBytes : geometry.segmentBytes
                    output[step] = Result { try device.readBytes(offset: geometry.offset(ofSlot: target), count: length) }
                }
            }
            for step in 1..<max(count, 1) {
                prefetched[(slot + step) % geometry.segmentCount] = results[step]!
            }
            let bytes = try results[0]!.get()
            bytesRead += UInt64(bytes.count) * UInt64(count)
            return bytes
        }

        var expectedID = record.lastWrittenBackSegmentID + 1
        var chain = try SegmentChain.scan(geometry: geometry, cacheUUID: header.uuid,
                                          lastWrittenBackSegmentID: record.lastWrittenBackSegmentID,
                                          trustedThroughID: trustedThroughID) { slot in
            defer { expectedID += 1 }
            let bytes = try readSegment(slot, id: expectedID)
            guard let pmem, let area = sealedAreas[expectedID], expectedID > trustedThroughID else { return bytes }
            // Row P2: the device's copy verifies, and is taken. Row P3: it does not (the write never
            // happened, or tore), so the sealed copy in pmem is written there.
            let onDevice = bytes.withUnsafeBytes { try? SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: header.uuid) }
            if let onDevice, onDevice.segmentID == expectedID { return bytes }
            let imageOffset = pmem.layout.imageOffset(area, geometry: geometry)
            let image = Array(UnsafeRawBufferPointer(rebasing: pmem.bytes[imageOffset..<(imageOffset + geometry.segmentBytes)]))
            let inPmem = image.withUnsafeBytes { try? SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: header.uuid) }
            guard let inPmem, inPmem.segmentID == expectedID else {
                throw PmemError.sealedSegmentDamaged(path: pmem.path, segmentID: expectedID)
            }
            try device.writeBytes(offset: geometry.offset(ofSlot: slot), bytes: image)
            sealedWritten.append(expectedID)
            return image
        }
        // Segments up to the recorded last flushed id were synced: a log that ends before it is
        // damaged, not torn by a crash, and recovering it would silently lose synced writes.
        // In pmem mode the pmem file says, more recently than the record, how far the device synced.
        let syncedThroughID = max(record.lastFlushedSegmentID, pmem.map { PmemLayout.syncedThroughID(in: $0.bytes) } ?? 0)
        guard chain.lastSegmentID >= syncedThroughID else {
            throw FormatError.logShorterThanRecorded(lastFlushedID: syncedThroughID, foundID: chain.lastSegmentID,
                                                     reason: "\(chain.end)")
        }
        var openWritten: UInt64?
        var openEntries = 0
        if let pmem {
            // Row P5: a sealed segment past the end of the log means segments in between are lost.
            if let stray = sealedAreas.keys.filter({ $0 > chain.lastSegmentID }).min() {
                throw PmemError.logGap(path: pmem.path, expectedID: chain.lastSegmentID + 1, foundID: stray)
            }
            if let open = openArea, open.segmentID > chain.lastSegmentID {
                guard open.segmentID == chain.lastSegmentID + 1 else {
                    throw PmemError.logGap(path: pmem.path, expectedID: chain.lastSegmentID + 1, foundID: open.segmentID)
                }
                if !open.validEntries.isEmpty {
                    // Row P4: the open segment's valid entries become the next segment.
                    let segment = openSegmentImage(open, pmem: pmem, geometry: geometry, cacheUUID: header.uuid)
                    let slot = geometry.slot(ofSegment: open.segmentID)
                    try device.writeBytes(offset: geometry.offset(ofSlot: slot), bytes: segment.bytes)
                    chain.segments.append(segment.header)
                    openWritten = open.segmentID
                    openEntries = open.validEntries.count
                }
            }
            // Row P6: an open area at or below the end of the log is stale; it was sealed and
            // written before, or its segment was recovered into the log by an earlier run.
            if !sealedWritten.isEmpty || openWritten != nil { try device.synchronizeBytes() }
        }
        if record.cleanShutdown {
            return RecoveryReport(cleanShutdown: true, chain: chain, erasedSlots: [], bytesRead: bytesRead,
                                  pmemSealedSegmentsWritten: sealedWritten, pmemOpenSegmentWritten: openWritten, pmemOpenEntries: openEntries)
        }

        // Erase stale segments beyond the log's end.
        let chainSlots = Set(chain.segments.map { geometry.slot(ofSegment: $0.segmentID) })
        var erased: [Int] = []
        for slot in 0..<geometry.segmentCount where !chainSlots.contains(slot) {
            let bytes = try device.readBytes(offset: geometry.offset(ofSlot: slot), count: headerBytes)
            bytesRead += UInt64(headerBytes)
            let found = bytes.withUnsafeBytes { try? SegmentHeader(decodingHeader: $0, geometry: geometry, cacheUUID: header.uuid) }
            guard let found, found.segmentID > chain.lastSegmentID else { continue }
            try device.writeBytes(offset: geometry.offset(ofSlot: slot), bytes: [UInt8](repeating: 0, count: CacheGeometry.blockBytes))
            erased.append(slot)
        }
        if !erased.isEmpty { try device.synchronizeBytes() }
        return RecoveryReport(cleanShutdown: false, chain: chain, erasedSlots: erased, bytesRead: bytesRead,
                              pmemSealedSegmentsWritten: sealedWritten, pmemOpenSegmentWritten: openWritten, pmemOpenEntries: openEntries)
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
}
