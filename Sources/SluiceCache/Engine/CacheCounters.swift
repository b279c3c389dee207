/// What the engine has done, counted exactly. The sixteen `blockCounts` follow dm-writeboost's
/// statistics: every 4 KiB block a request touches is counted once, by whether it was a write,
/// whether the cache held the block (hit), whether that copy was in the open buffer, and whether
/// the request covered the whole block.
public struct CacheCounters: Codable, Sendable, Equatable {
    /// Indexed by ``index(write:hit:inBuffer:fullBlock:)``.
    public var blockCounts = [UInt64](repeating: 0, count: 16)
    public var partialSegments: UInt64 = 0
    public var segmentsWritten: UInt64 = 0
    public var userBytesWritten: UInt64 = 0
    public var userBytesRead: UInt64 = 0
    public var cacheBytesWritten: UInt64 = 0
    public var cacheBytesRead: UInt64 = 0
    public var backingBytesWritten: UInt64 = 0
    public var backingBytesRead: UInt64 = 0
    public var backingWriteRequests: UInt64 = 0
    public var writtenBackBlocks: UInt64 = 0
    public var writebackBatches: UInt64 = 0
    public var cacheSyncs: UInt64 = 0
    public var backingSyncs: UInt64 = 0
    /// Old copies read back from the cache device to merge a partial rewrite.
    public var mergeReads: UInt64 = 0
    /// Writes that had to wait for writeback to free a segment.
    public var writesThrottled: UInt64 = 0
    /// Writeback batches that failed and were retried.
    public var writebackErrors: UInt64 = 0
    /// Pmem mode: drains of persistent memory (each one a group commit), and the replies they
    /// made durable (writes, discards and flushes).
    public var pmemDrains: UInt64 = 0
    public var pmemPersistedReplies: UInt64 = 0

    // MARK: Cache modes
    /// Writes sent straight to the backing store (writethrough, writearound, passthrough), their
    /// bytes, and those the backing store failed.
    public var bypassWrites: UInt64 = 0
    public var bypassBytesWritten: UInt64 = 0
    public var bypassWriteErrors: UInt64 = 0
    /// Whole blocks of writethrough writes cached as clean copies.
    public var writeThroughCopies: UInt64 = 0
    /// Hot clean copies (read since cached) the cleaner moved to the head instead of dropping.
    public var relocatedCleanBlocks: UInt64 = 0
    /// Cache-device fetches of client reads served at once from the page cache (no io_uring).
    public var cacheReadsInline: UInt64 = 0
    /// Blocks of client reads whose cache-device read failed and that were read from the backing
    /// store instead (clean copies).
    public var readsRetriedFromBacking: UInt64 = 0

    // MARK: Read caching
    /// Read misses of whole blocks cached as clean copies.
    public var readFills: UInt64 = 0
    /// Whole-block misses not cached: part of a stream beyond the sequential cutoff, not yet
    /// promoted, raced by a write or discard while being read, or no room without waiting.
    public var readFillsSkippedSequential: UInt64 = 0
    public var readFillsSkippedNotPromoted: UInt64 = 0
    public var readFillsSkippedRaced: UInt64 = 0
    public var readFillsSkippedNoRoom: UInt64 = 0

    // MARK: Cleaning
    /// Live dirty blocks the cleaner copied forward to the head of the log.
    public var relocatedBlocks: UInt64 = 0
    /// Segments reclaimed, and how many of them needed no I/O (every block dead or clean).
    public var segmentsReclaimed: UInt64 = 0
    public var segmentsReclaimedWithoutIO: UInt64 = 0
    /// Segments retired by a durable record (their slots free).
    public var segmentsRetired: UInt64 = 0
    public var recordWrites: UInt64 = 0
    public var recordWriteErrors: UInt64 = 0
    /// Times occupancy crossed the high watermark and the cleaner started a round.
    public var cleaningRounds: UInt64 = 0
    /// Times the cleaner found the tail too dirty to relocate and asked writeback for it.
    public var cleanerWaitsForWriteback: UInt64 = 0
    /// Relocations of a tail below the yield, because writers had waited for space too long.
    public var relocationsForStalledWriters: UInt64 = 0

    // MARK: Writers waiting for space
    /// Writes and discards that waited for ring space or a buffer, the total and the longest wait.
    public var writerStalls: UInt64 = 0
    public var writerStallNs: UInt64 = 0
    public var writerStallMaxNs: UInt64 = 0

    // MARK: Writeback
    /// Blocks a batch took but skipped because a newer write, trim or relocation superseded them.
    public var writebackSkippedBlocks: UInt64 = 0
    /// Blocks the last batch wrote back.
    public var lastBatchWrittenBackBlocks: UInt64 = 0

    public init() {}

    /// Block reads that hit the cache (buffer or device), as a share of all block reads.
    public var readHitRatio: Double {
        var hits: UInt64 = 0
        var all: UInt64 = 0
        for inBuffer in [false, true] {
            for fullBlock in [false, true] {
                hits += blockCounts[Self.index(write: false, hit: true, inBuffer: inBuffer, fullBlock: fullBlock)]
                all += blockCounts[Self.index(write: false, hit: true, inBuffer: inBuffer, fullBlock: fullBlock)]
                all += blockCounts[Self.index(write: false, hit: false, inBuffer: inBuffer, fullBlock: fullBlock)]
            }
        }
        return all == 0 ? 0 : Double(hits) / Double(all)
    }

    public static func index(write: Bool, hit: Bool, inBuffer: Bool, fullBlock: Bool) -> Int {
        (write ? 8 : 0) | (hit ? 4 : 0) | (inBuffer ? 2 : 0) | (fullBlock ? 1 : 0)
    }

    mutating func count(write: Bool, hit: Bool, inBuffer: Bool, fullBlock: Bool) {
        blockCounts[Self.index(write: write, hit: hit, inBuffer: inBuffer, fullBlock: fullBlock)] &+= 1
    }

    /// The counters by name, as `sluice status` shows them (`write_hit_buffer_full`, ...).
    public var namedBlockCounts: [(String, UInt64)] {
        var result: [(String, UInt64)] = []
        for write in [false, true] {
            for hit in [true, false] {
                for inBuffer in [true, false] {
                    for full in [true, false] {
                        let name = "\(write ? "write" : "read")_\(hit ? "hit" : "miss")_\(inBuffer ? "buffer" : "device")_\(full ? "full" : "partial")"
                        result.append((name, blockCounts[Self.index(write: write, hit: hit, inBuffer: inBuffer, fullBlock: full)]))
                    }
                }
            }
        }
        return result
    }
}
