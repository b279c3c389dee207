import SluiceFormat

/// A snapshot of a cache's state and counters, as `sluice status` shows it. Encoded with
/// snake_case keys (`mode`, `dirty_blocks`, `partial_segments`, `user_bytes_written`, ...).
public struct CacheStatus: Codable, Sendable, Equatable {
    public var mode: String
    public var cacheSizeBytes: UInt64
    public var backingSizeBytes: UInt64
    public var blockSizeBytes: Int
    public var segmentSizeBytes: Int
    public var segmentCount: Int
    public var liveSegments: Int
    public var freeSegments: Int
    /// The segment being filled (or the next to be opened).
    public var currentSegmentID: UInt64
    public var lastFlushedSegmentID: UInt64
    public var lastWrittenBackSegmentID: UInt64
    public var dirtyBlocks: Int
    /// Blocks (copies and discard markers) in the open segment, in DRAM or persistent memory.
    public var bufferBlocks: Int
    /// Sealed segments whose cache-device write or sync is still to come (in pmem mode their areas
    /// hold them until then).
    public var bufferSegmentsUnsynced: Int
    public var indexMemoryBytes: Int
    public var writebackInProgress: Bool
    public var backingBusyPercent: Int
    public var failure: String?
    public var partialSegments: UInt64
    public var segmentsWritten: UInt64
    public var userBytesWritten: UInt64
    public var userBytesRead: UInt64
    public var cacheBytesWritten: UInt64
    public var cacheBytesRead: UInt64
    public var backingBytesWritten: UInt64
    public var backingBytesRead: UInt64
    public var backingWriteRequests: UInt64
    public var writtenBackBlocks: UInt64
    public var writebackBatches: UInt64
    public var writebackErrors: UInt64
    public var cacheSyncs: UInt64
    public var backingSyncs: UInt64
    public var mergeReads: UInt64
    public var writesThrottled: UInt64
    /// Pmem mode: drains of persistent memory, replies they made durable, and drains per reply
    /// (below 1 when concurrent writes share a drain).
    public var pmemDrains: UInt64
    public var pmemPersistedReplies: UInt64
    public var drainsPerWrite: Double
    /// Cache-device bytes written (segments) per user byte written.
    public var writeAmplification: Double
    /// dm-writeboost's sixteen counters by name (`write_hit_buffer_full`, ...).
    public var blockCounts: [String: UInt64]
    public var tunables: [String: Int]
    /// How writeback makes the backing store durable: "flush", or "none (durable on
    /// acknowledgement, …)". The volume knows it, not the engine: the control endpoint sets it.
    public var backingFlush: String? = nil
}

extension CacheEngine {
    /// The engine's state now. Call on the engine's loop.
    public func status() -> CacheStatus {
        eventLoop.preconditionInEventLoop()
        var counts: [String: UInt64] = [:]
        for (name, value) in counters.namedBlockCounts { counts[name] = value }
        var tunableValues: [String: Int] = [:]
        for key in CacheTunables.keys { tunableValues[key] = tunables.value(of: key) }
        return CacheStatus(
            mode: "\(superblock.mode)", cacheSizeBytes: cacheDevice.sizeBytes, backingSizeBytes: volumeSizeBytes,
            blockSizeBytes: CacheGeometry.blockBytes, segmentSizeBytes: geometry.segmentBytes, segmentCount: geometry.segmentCount,
            liveSegments: liveSegments, freeSegments: freeSegments,
            currentSegmentID: openBuffer?.segmentID ?? nextSegmentID, lastFlushedSegmentID: syncedThroughID,
            lastWrittenBackSegmentID: lastWrittenBackID, dirtyBlocks: dirtyBlocks,
            bufferBlocks: openBuffer?.blockCount ?? 0, bufferSegmentsUnsynced: sealedBySlot.count + buffersAwaitingSync.count,
            indexMemoryBytes: index.memoryBytes,
            writebackInProgress: writeback != nil, backingBusyPercent: backingLoad.busyPercent(nowNs: uptimeNs()),
            failure: failure.map { "\($0)" },
            partialSegments: counters.partialSegments, segmentsWritten: counters.segmentsWritten,
            userBytesWritten: counters.userBytesWritten, userBytesRead: counters.userBytesRead,
            cacheBytesWritten: counters.cacheBytesWritten, cacheBytesRead: counters.cacheBytesRead,
            backingBytesWritten: counters.backingBytesWritten, backingBytesRead: counters.backingBytesRead,
            backingWriteRequests: counters.backingWriteRequests, writtenBackBlocks: counters.writtenBackBlocks,
            writebackBatches: counters.writebackBatches, writebackErrors: counters.writebackErrors,
            cacheSyncs: counters.cacheSyncs, backingSyncs: counters.backingSyncs, mergeReads: counters.mergeReads,
            writesThrottled: counters.writesThrottled,
            pmemDrains: counters.pmemDrains, pmemPersistedReplies: counters.pmemPersistedReplies,
            drainsPerWrite: counters.pmemPersistedReplies == 0 ? 0 : Double(counters.pmemDrains) / Double(counters.pmemPersistedReplies),
            writeAmplification: counters.userBytesWritten == 0 ? 0 : Double(counters.cacheBytesWritten) / Double(counters.userBytesWritten),
            blockCounts: counts, tunables: tunableValues)
    }

    /// Changes a tunable at run time. Call on the engine's loop.
    public func setTunable(_ key: String, to value: Int) throws {
        eventLoop.preconditionInEventLoop()
        try tunables.set(key, to: value)
        kickWriteback()
    }
}

import Foundation

extension CacheStatus {
    /// The encoder for the control endpoint: snake_case keys (`dirty_blocks`, `current_segment_id`).
    public static func jsonEncoder() -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return encoder
    }

    /// The matching decoder. Foundation's snake-case conversion turns `segment_id` into
    /// `segmentId`, so the `ID` suffix of Swift names is restored by hand.
    public static func jsonDecoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .custom { path in
            let key = path.last!.stringValue
            let parts = key.split(separator: "_")
            guard parts.count > 1 else { return path.last! }
            var camel = String(parts[0])
            for part in parts.dropFirst() {
                camel += part == "id" ? "ID" : part.prefix(1).uppercased() + part.dropFirst()
            }
            return AnyKey(camel)
        }
        return decoder
    }
}

private struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ string: String) { stringValue = string }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}
