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
}

/// recover_cache: finds the log on a cache device and makes the device safe to append to.
///
/// The steps, each a row of the recovery table in `docs/FORMAT.md`:
/// 1. Walk the ring from the segment after the last written-back one, accepting only consecutive
///    ids whose checksums verify (headers only up to the last flushed id after a clean shutdown).
/// 2. After a crash, erase the header of every slot beyond the log that holds a segment of this
///    cache with an id past the log's end. New segments reuse those ids; without the erasure a
///    later crash could join an old segment to the new log and replay stale data.
/// Recovery writes nothing else, so a crash during it and a second run give the same result.
public enum RecoverCache {
    /// How many segments are read at once while scanning.
    public static let readAheadSegments = 8

    public static func recover(device: any RecoveryDevice, header: SuperblockHeader, geometry: CacheGeometry,
                               record: SuperblockRecord) throws -> RecoveryReport {
        var bytesRead: UInt64 = 0
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        let trustedThroughID = record.cleanShutdown ? record.lastFlushedSegmentID : 0
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
        let chain = try SegmentChain.scan(geometry: geometry, cacheUUID: header.uuid,
                                          lastWrittenBackSegmentID: record.lastWrittenBackSegmentID,
                                          trustedThroughID: trustedThroughID) { slot in
            defer { expectedID += 1 }
            return try readSegment(slot, id: expectedID)
        }
        if record.cleanShutdown {
            guard chain.lastSegmentID >= record.lastFlushedSegmentID else {
                throw FormatError.logShorterThanRecorded(lastFlushedID: record.lastFlushedSegmentID, foundID: chain.lastSegmentID)
            }
            return RecoveryReport(cleanShutdown: true, chain: chain, erasedSlots: [], bytesRead: bytesRead)
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
        return RecoveryReport(cleanShutdown: false, chain: chain, erasedSlots: erased, bytesRead: bytesRead)
    }
}
