/// The run-time tunables of a cache, with dm-writeboost's and dm-writecache's names. Each is a
/// flag of `sluice serve` and can be changed while serving with `sluice set KEY VALUE`.
public struct CacheTunables: Codable, Sendable, Equatable {
    /// Cleaning starts when more of the ring than this is occupied (percent, as dm-writecache's
    /// high watermark)...
    public var highWatermarkPercent = 50
    /// ... and stops once occupancy is down to this (percent).
    public var lowWatermarkPercent = 45
    /// Write back continuously, at the pace the backing store sustains, while more of the cache
    /// than this is dirty (percent), whatever the backing store's foreground load. Below it,
    /// writeback is opportunistic (`writeback_threshold`): the cleaner relocates what is still
    /// dirty at the ring's tail, which costs a sequential cache-device write instead.
    public var dirtyTargetPercent = 50
    /// Below `dirty_target`, write back only while the backing store is busy with foreground work
    /// less than this share of the time (percent, measured over the last second). 0 stops
    /// opportunistic writeback; 100 writes back whenever there is work.
    public var writebackThresholdPercent = 70
    /// Write back blocks dirty longer than this (seconds), whatever the other triggers say; 0 = off.
    public var maxAgeSeconds = 0
    /// The most blocks one writeback batch takes, in segments' worth (a batch's size otherwise
    /// follows what the backing store writes in about half a second).
    public var maxBatchedWritebackSegments = 32
    /// Seconds between refreshes of the superblock record while writeback is idle (0: only when a
    /// batch completes, which is always done).
    public var updateSuperblockRecordIntervalSeconds = 60
    /// Seconds between automatic barriers (seal, write and sync the open segment) while writes come
    /// in without FUA or FLUSH; 0 turns them off.
    public var syncDataIntervalSeconds = 0
    /// How long a FUA write or FLUSH waits for others to share its partial segment, in
    /// milliseconds. 0 still gathers the requests that arrive in the same burst.
    public var barrierDeadlineMs = 0
    /// Reads of a stream longer than this are not cached (bytes; bcache's sequential cutoff, over
    /// the last 128 streams); 0 caches every read miss.
    public var sequentialCutoffBytes = 4 << 20
    /// A block read from the backing store is cached on its N-th miss (Open CAS's promotion after N
    /// hits): 1 caches every miss, 0 caches no reads.
    public var readPromoteHits = 1
    /// Cache-device errors (decayed, see `io_error_halflife`) past which the cache stops caching and
    /// serves as in passthrough (bcache's `io_error_limit`); 0 never degrades.
    public var ioErrorLimit = 16
    /// Seconds in which the error count halves.
    public var ioErrorHalfLifeSeconds = 60

    public init() {}

    enum CodingKeys: String, CodingKey {
        case highWatermarkPercent = "high_watermark"
        case lowWatermarkPercent = "low_watermark"
        case dirtyTargetPercent = "dirty_target"
        case maxAgeSeconds = "max_age"
        case writebackThresholdPercent = "writeback_threshold"
        case maxBatchedWritebackSegments = "nr_max_batched_writeback"
        case updateSuperblockRecordIntervalSeconds = "update_sb_record_interval"
        case syncDataIntervalSeconds = "sync_data_interval"
        case barrierDeadlineMs = "barrier_deadline_ms"
        case sequentialCutoffBytes = "sequential_cutoff"
        case readPromoteHits = "read_promote_hits"
        case ioErrorLimit = "io_error_limit"
        case ioErrorHalfLifeSeconds = "io_error_halflife"
    }

    /// Every key `set` accepts.
    public static let keys = ["high_watermark", "low_watermark", "dirty_target", "writeback_threshold", "max_age",
                              "nr_max_batched_writeback", "update_sb_record_interval", "sync_data_interval", "barrier_deadline_ms",
                              "sequential_cutoff", "read_promote_hits", "io_error_limit", "io_error_halflife"]

    /// A tunable was given a name or value it does not take.
    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    /// Sets `key` to `value`, checking the range.
    public mutating func set(_ key: String, to value: Int) throws {
        func check(_ range: ClosedRange<Int>) throws {
            guard range.contains(value) else {
                throw Invalid(description: "\(key) must be between \(range.lowerBound) and \(range.upperBound), not \(value)")
            }
        }
        switch key {
        case "high_watermark":
            try check(1...100)
            guard value >= lowWatermarkPercent else {
                throw Invalid(description: "high_watermark must be at least low_watermark (\(lowWatermarkPercent)), not \(value)")
            }
            highWatermarkPercent = value
        case "low_watermark":
            try check(0...99)
            guard value <= highWatermarkPercent else {
                throw Invalid(description: "low_watermark must be at most high_watermark (\(highWatermarkPercent)), not \(value)")
            }
            lowWatermarkPercent = value
        case "dirty_target": try check(0...100); dirtyTargetPercent = value
        case "max_age": try check(0...86_400 * 30); maxAgeSeconds = value
        case "writeback_threshold": try check(0...100); writebackThresholdPercent = value
        case "nr_max_batched_writeback": try check(1...1024); maxBatchedWritebackSegments = value
        case "update_sb_record_interval": try check(0...86_400); updateSuperblockRecordIntervalSeconds = value
        case "sync_data_interval": try check(0...86_400); syncDataIntervalSeconds = value
        case "barrier_deadline_ms": try check(0...10_000); barrierDeadlineMs = value
        case "sequential_cutoff": try check(0...(1 << 40)); sequentialCutoffBytes = value
        case "read_promote_hits": try check(0...255); readPromoteHits = value
        case "io_error_limit": try check(0...1_000_000); ioErrorLimit = value
        case "io_error_halflife": try check(0...86_400); ioErrorHalfLifeSeconds = value
        default:
            throw Invalid(description: "unknown tunable \"\(key)\"; the tunables are \(Self.keys.joined(separator: ", "))")
        }
    }

    public func value(of key: String) -> Int? {
        switch key {
        case "high_watermark": return highWatermarkPercent
        case "low_watermark": return lowWatermarkPercent
        case "dirty_target": return dirtyTargetPercent
        case "max_age": return maxAgeSeconds
        case "writeback_threshold": return writebackThresholdPercent
        case "nr_max_batched_writeback": return maxBatchedWritebackSegments
        case "update_sb_record_interval": return updateSuperblockRecordIntervalSeconds
        case "sync_data_interval": return syncDataIntervalSeconds
        case "barrier_deadline_ms": return barrierDeadlineMs
        case "sequential_cutoff": return sequentialCutoffBytes
        case "read_promote_hits": return readPromoteHits
        case "io_error_limit": return ioErrorLimit
        case "io_error_halflife": return ioErrorHalfLifeSeconds
        default: return nil
        }
    }
}

extension CacheTunables {
    /// Every tunable as `key=value`, for logs and test failure messages.
    public var summary: String {
        Self.keys.map { "\($0)=\(value(of: $0)!)" }.joined(separator: " ")
    }
}
