import SluiceFormat

/// A snapshot of a cache's state and counters, as `sluice status` shows it. Encoded with
/// snake_case keys (`mode`, `dirty_blocks`, `partial_segments`, `user_bytes_written`, ...).
public struct CacheStatus: Codable, Sendable, Equatable {
    public var mode: String
    /// writeback, writethrough, writearound or passthrough (``CacheMode``).
    public var cacheMode: String = CacheMode.writeback.rawValue
    /// Writes sent straight to the backing store, their bytes and failures; whole blocks of
    /// writethrough writes cached clean.
    public var bypassWrites: UInt64 = 0
    public var bypassBytesWritten: UInt64 = 0
    public var bypassWriteErrors: UInt64 = 0
    public var writeThroughCopies: UInt64 = 0
    /// Why the cache serves as in passthrough although its mode says otherwise (the cache device
    /// exceeded `io_error_limit`); nil while healthy.
    public var degraded: String? = nil
    /// Cache-device errors the engine survived, in all and as the decayed count the limit is
    /// compared with; client-read blocks retried from the backing store after one.
    public var cacheDeviceErrors: UInt64 = 0
    public var cacheDeviceErrorsDecayed: Double = 0
    public var readsRetriedFromBacking: UInt64 = 0
    /// Cache-device reads of client reads served at once from the page cache.
    public var cacheReadsInline: UInt64 = 0
    /// Hot clean copies the cleaner moved to the head of the log instead of dropping them.
    public var relocatedCleanBlocks: UInt64 = 0
    public var cacheSizeBytes: UInt64
    public var backingSizeBytes: UInt64
    public var blockSizeBytes: Int
    public var segmentSizeBytes: Int
    public var segmentCount: Int
    /// Segments occupying a ring slot (reclaimed-not-retired, sealed or open), and free slots.
    public var liveSegments: Int
    public var freeSegments: Int
    /// Live segments as a share of the ring (percent), what the watermarks compare against
    /// (reclaimed segments waiting for their record not counted).
    public var occupancyPercent: Int
    /// The segment being filled (or the next to be opened).
    public var currentSegmentID: UInt64
    public var lastFlushedSegmentID: UInt64
    /// Every segment up to this one is retired (a durable record says so); up to the reclaimed
    /// one, the cleaner left no dirty block.
    public var lastRetiredSegmentID: UInt64
    public var lastReclaimedSegmentID: UInt64
    public var dirtyBlocks: Int
    /// Dirty blocks as a share of the cache's blocks (percent), what `dirty_target` compares against.
    public var dirtyPercent: Double
    /// Blocks the cache holds: dirty, and clean copies kept until their segment is retired.
    public var cachedBlocks: Int
    /// Blocks (copies and discard markers) in the open segment, in DRAM or persistent memory.
    public var bufferBlocks: Int
    /// Sealed segments whose cache-device write or sync is still to come (in pmem mode their areas
    /// hold them until then).
    public var bufferSegmentsUnsynced: Int
    public var indexMemoryBytes: Int
    public var writebackInProgress: Bool
    /// Why the last writeback batch ran (`dirty_target`, `backing idle`, `max_age`, `ring tail`,
    /// `write back everything`), and how many blocks the next one takes.
    public var writebackTrigger: String?
    public var writebackBatchBlocks: Int
    public var backingBusyPercent: Int
    /// The cleaner: `resting`, `cleaning`, `relocating segment N`, or `waiting for writeback of segment N`.
    public var cleaner: String
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
    /// Blocks batches took but skipped because something newer superseded them while they ran.
    public var writebackSkippedBlocks: UInt64
    /// Live blocks written back by the last batch, and on average per batch.
    public var lastBatchWrittenBackBlocks: UInt64
    public var writtenBackBlocksPerBatch: Double
    public var cacheSyncs: UInt64
    public var backingSyncs: UInt64
    public var recordWrites: UInt64
    public var mergeReads: UInt64
    public var writesThrottled: UInt64
    /// Live dirty blocks the cleaner relocated, and their share of the cache device's writes.
    public var relocatedBlocks: UInt64
    public var relocationShareOfCacheWrites: Double
    public var segmentsReclaimed: UInt64
    /// Segments reclaimed with no I/O but their record: every block dead or clean.
    public var segmentsReclaimedWithoutIO: UInt64
    public var segmentsRetired: UInt64
    public var cleanerWaitsForWriteback: UInt64
    /// Read caching: whole-block misses cached as clean copies, and those not cached (beyond the
    /// sequential cutoff, not yet promoted, raced by a write or discard, no room without waiting).
    public var readFills: UInt64
    public var readFillsSkippedSequential: UInt64
    public var readFillsSkippedNotPromoted: UInt64
    public var readFillsSkippedRaced: UInt64
    public var readFillsSkippedNoRoom: UInt64
    /// Block reads served from the cache, as a share of all block reads.
    public var readHitRatio: Double
    /// Times the queue of writes stalled for ring space or a buffer, the total and longest stall.
    public var writerStalls: UInt64
    public var writerStallSeconds: Double
    public var writerStallMaxMs: Double
    /// Relocations of a tail below the yield because writers had waited for space too long.
    public var relocationsForStalledWriters: UInt64 = 0
    /// Pmem mode: drains of persistent memory, replies they made durable, and drains per reply
    /// (below 1 when concurrent writes share a drain).
    public var pmemDrains: UInt64
    public var pmemPersistedReplies: UInt64
    public var drainsPerWrite: Double
    /// Cache-device bytes written (segments) per user byte written, not counting the clean copies of
    /// reads (a data block each).
    public var writeAmplification: Double
    /// dm-writeboost's sixteen counters by name (`write_hit_buffer_full`, ...).
    public var blockCounts: [String: UInt64]
    public var tunables: [String: Int]
    /// How writeback makes the backing store durable: "flush", or "none (durable on
    /// acknowledgement, …)". The volume knows it, not the engine: the control endpoint sets it.
    public var backingFlush: String? = nil
}

extension CacheEngine {
    /// The engine's state now, from its one set of counters. Call on the engine's loop.
    public func status() -> CacheStatus {
        eventLoop.preconditionInEventLoop()
        var counts: [String: UInt64] = [:]
        for (name, value) in counters.namedBlockCounts { counts[name] = value }
        var tunableValues: [String: Int] = [:]
        for key in CacheTunables.keys { tunableValues[key] = tunables.value(of: key) }
        let c = counters
        func ratio(_ a: UInt64, _ b: UInt64) -> Double { b == 0 ? 0 : Double(a) / Double(b) }
        var status = CacheStatus(
            mode: "\(superblock.mode)", cacheSizeBytes: cacheDevice.sizeBytes, backingSizeBytes: volumeSizeBytes,
            blockSizeBytes: CacheGeometry.blockBytes, segmentSizeBytes: geometry.segmentBytes, segmentCount: geometry.segmentCount,
            liveSegments: ring.liveSegments, freeSegments: ring.freeSegments,
            occupancyPercent: (ring.liveSegments - ring.reclaimedNotRetired) * 100 / ring.segmentCount,
            currentSegmentID: buffers.open?.segmentID ?? ring.nextSegmentID, lastFlushedSegmentID: ring.syncedThroughID,
            lastRetiredSegmentID: ring.retiredThroughID, lastReclaimedSegmentID: ring.reclaimedThroughID,
            dirtyBlocks: index.dirtyCount, dirtyPercent: Double(index.dirtyCount) * 100 / Double(geometry.cacheBlocks),
            cachedBlocks: index.count, bufferBlocks: buffers.open?.blockCount ?? 0, bufferSegmentsUnsynced: buffers.unsyncedCount,
            indexMemoryBytes: index.memoryBytes, writebackInProgress: batch != nil,
            writebackTrigger: (batch?.trigger ?? writeback.lastTrigger)?.rawValue, writebackBatchBlocks: writeback.batchBlocks,
            backingBusyPercent: backingLoad.busyPercent(nowNs: clock.nowNs), cleaner: cleanerDescription,
            failure: failure.map { "\($0)" },
            partialSegments: c.partialSegments, segmentsWritten: c.segmentsWritten,
            userBytesWritten: c.userBytesWritten, userBytesRead: c.userBytesRead,
            cacheBytesWritten: c.cacheBytesWritten, cacheBytesRead: c.cacheBytesRead,
            backingBytesWritten: c.backingBytesWritten, backingBytesRead: c.backingBytesRead,
            backingWriteRequests: c.backingWriteRequests, writtenBackBlocks: c.writtenBackBlocks,
            writebackBatches: c.writebackBatches, writebackErrors: c.writebackErrors, writebackSkippedBlocks: c.writebackSkippedBlocks,
            lastBatchWrittenBackBlocks: c.lastBatchWrittenBackBlocks, writtenBackBlocksPerBatch: ratio(c.writtenBackBlocks, c.writebackBatches),
            cacheSyncs: c.cacheSyncs, backingSyncs: c.backingSyncs, recordWrites: c.recordWrites, mergeReads: c.mergeReads,
            writesThrottled: c.writesThrottled, relocatedBlocks: c.relocatedBlocks,
            relocationShareOfCacheWrites: ratio(c.relocatedBlocks * UInt64(CacheGeometry.blockBytes), c.cacheBytesWritten),
            segmentsReclaimed: c.segmentsReclaimed, segmentsReclaimedWithoutIO: c.segmentsReclaimedWithoutIO,
            segmentsRetired: c.segmentsRetired, cleanerWaitsForWriteback: c.cleanerWaitsForWriteback,
            readFills: c.readFills, readFillsSkippedSequential: c.readFillsSkippedSequential,
            readFillsSkippedNotPromoted: c.readFillsSkippedNotPromoted, readFillsSkippedRaced: c.readFillsSkippedRaced,
            readFillsSkippedNoRoom: c.readFillsSkippedNoRoom, readHitRatio: c.readHitRatio,
            writerStalls: c.writerStalls, writerStallSeconds: Double(c.writerStallNs) / 1e9, writerStallMaxMs: Double(c.writerStallMaxNs) / 1e6,
            pmemDrains: c.pmemDrains, pmemPersistedReplies: c.pmemPersistedReplies,
            drainsPerWrite: ratio(c.pmemDrains, c.pmemPersistedReplies),
            // Clean copies of reads are cache-device writes no user write caused: left out.
            writeAmplification: ratio(c.cacheBytesWritten - min(c.cacheBytesWritten, c.readFills * UInt64(CacheGeometry.blockBytes)),
                                      c.userBytesWritten),
            blockCounts: counts, tunables: tunableValues)
        status.cacheMode = cacheMode.rawValue
        status.relocationsForStalledWriters = c.relocationsForStalledWriters
        status.bypassWrites = c.bypassWrites
        status.bypassBytesWritten = c.bypassBytesWritten
        status.bypassWriteErrors = c.bypassWriteErrors
        status.writeThroughCopies = c.writeThroughCopies
        status.degraded = degradedReason
        var meter = cacheDeviceErrors
        meter.decay(nowNs: clock.nowNs, halfLifeSeconds: tunables.ioErrorHalfLifeSeconds)
        status.cacheDeviceErrors = meter.total
        status.cacheDeviceErrorsDecayed = meter.count
        status.readsRetriedFromBacking = c.readsRetriedFromBacking
        status.cacheReadsInline = c.cacheReadsInline
        status.relocatedCleanBlocks = c.relocatedCleanBlocks
        return status
    }

    var cleanerDescription: String {
        if let job = relocation { return "relocating segment \(job.segmentID)" }
        if case .waitForWriteback(let id) = cleaner.lastDecision { return "waiting for writeback of segment \(id)" }
        return cleaner.phase == .cleaning ? "cleaning" : "resting"
    }

    /// Changes a tunable at run time. Call on the engine's loop.
    public func setTunable(_ key: String, to value: Int) throws {
        eventLoop.preconditionInEventLoop()
        try tunables.set(key, to: value)
        drive()
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
    /// `segmentId`, so the acronyms of Swift names (`ID`, `IO`) are restored by hand.
    public static func jsonDecoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .custom { path in
            let key = path.last!.stringValue
            let parts = key.split(separator: "_")
            guard parts.count > 1 else { return path.last! }
            var camel = String(parts[0])
            for part in parts.dropFirst() {
                camel += part == "id" || part == "io" ? part.uppercased() : part.prefix(1).uppercased() + part.dropFirst()
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

extension CacheEngine {
    /// What the engine waits for, in one line: for a test that finds it stuck, and for logs.
    public func stuckReport() -> String {
        let head = updates.waiting.first.map { "\($0.kind) at \($0.offset), applied \($0.appliedBytes)" } ?? "none"
        return "queue \(updates.waiting.count) (head: \(head), waits \(updates.headWait), merge \(updates.mergeRead.isInFlight)); "
            + "ring retired \(ring.retiredThroughID) reclaimed \(ring.reclaimedThroughID) written \(ring.writtenThroughID) "
            + "synced \(ring.syncedThroughID) next \(ring.nextSegmentID) free \(ring.freeSegments); "
            + "open \(buffers.open.map { "\($0.segmentID) (\($0.blockCount) blocks)" } ?? "none"), free buffers \(buffers.free.count), "
            + "unsynced \(buffers.unsyncedCount); cleaner \(cleanerDescription) \(cleaner.lastDecision), fences \(cleaner.fences.count); "
            + "relocation \(relocation.map { "\($0.segmentID) at \($0.next)/\($0.items.count), reads \($0.readsOutstanding)" } ?? "none"); "
            + "batch \(batch.map { "\($0.phase) \($0.nextItem)/\($0.items.count)" } ?? "none"), dirty \(index.dirtyCount) of \(index.count); "
            + "records idle \(records.isIdle), syncs idle \(syncs.isIdle) (\(syncs.segmentWaiters.map(\.throughID)) \(syncs.writeWaiters.count)), "
            + "barrier gathering \(barriers.isGathering), persist waiters \(persists.waiters.count), write-back-all waiters \(writeBackAllWaiters.count), "
            + "lifecycle \(lifecycle), failure \(String(describing: failure))"
    }
}
