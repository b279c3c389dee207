import ArgumentParser
import Foundation
import SluiceCache
import SluiceControl
import SluiceFormat
import SluiceIO
import SluiceVolume

/// The tunables as `serve` flags, with dm-writeboost's and dm-writecache's names.
struct TunableOptions: ParsableArguments {
    @Option(name: .customLong("high-watermark"), help: ArgumentHelp(
        "Start cleaning (reclaiming the ring's tail, relocating its live dirty blocks) when more of the ring than this is occupied (percent, default 50).",
        valueName: "percent"))
    var highWatermark: Int?

    @Option(name: .customLong("low-watermark"), help: ArgumentHelp("Stop cleaning once occupancy is down to this (percent, default 45).", valueName: "percent"))
    var lowWatermark: Int?

    @Option(name: .customLong("dirty-target"), help: ArgumentHelp(
        "Write back continuously, at the backing store's pace, while more of the cache than this is dirty (percent, default 50).",
        valueName: "percent"))
    var dirtyTarget: Int?

    @Option(name: .customLong("writeback-threshold"), help: ArgumentHelp(
        "Below the dirty target, write back only while the backing store is busy less than this share of the time (percent, default 70; 0 = never).",
        valueName: "percent"))
    var writebackThreshold: Int?

    @Option(name: .customLong("max-age"), help: ArgumentHelp("Write back blocks dirty longer than this (seconds; 0 = off, the default).", valueName: "seconds"))
    var maxAge: Int?

    @Option(name: .customLong("nr-max-batched-writeback"), help: ArgumentHelp(
        "The most blocks one writeback batch takes, in segments' worth (default 32); otherwise a batch takes what the backing store writes in about half a second.",
        valueName: "count"))
    var maxBatchedWriteback: Int?

    @Option(name: .customLong("update-sb-record-interval"), help: ArgumentHelp("Seconds between superblock record refreshes while idle.", valueName: "seconds"))
    var updateRecordInterval: Int?

    @Option(name: .customLong("sync-data-interval"), help: ArgumentHelp("Seconds between automatic barriers (0 = off).", valueName: "seconds"))
    var syncDataInterval: Int?

    @Option(name: .customLong("barrier-deadline-ms"), help: ArgumentHelp("How long FUA and FLUSH wait to share one partial segment.", valueName: "ms"))
    var barrierDeadline: Int?

    @Option(name: .customLong("sequential-cutoff"), help: ArgumentHelp(
        "Do not cache reads of a stream longer than this (bytes, default 4194304; 0 caches every read miss).", valueName: "bytes"))
    var sequentialCutoff: Int?

    @Option(name: .customLong("read-promote-hits"), help: ArgumentHelp(
        "Cache a block read from the backing store on its N-th miss (default 1: every miss; 0: no read caching).", valueName: "count"))
    var readPromoteHits: Int?

    @Option(name: .customLong("io-error-limit"), help: ArgumentHelp(
        "Cache-device errors (decayed) past which the cache stops caching and serves as in passthrough (default 16; 0: never).", valueName: "count"))
    var ioErrorLimit: Int?

    @Option(name: .customLong("io-error-halflife"), help: ArgumentHelp("Seconds in which the error count halves (default 60).", valueName: "seconds"))
    var ioErrorHalfLife: Int?

    func tunables() throws -> CacheTunables {
        var tunables = CacheTunables()
        do {
            // The high watermark first: the low one may not exceed it.
            if let highWatermark { try tunables.set("high_watermark", to: max(highWatermark, tunables.lowWatermarkPercent)) }
            if let lowWatermark { try tunables.set("low_watermark", to: lowWatermark) }
            if let highWatermark { try tunables.set("high_watermark", to: highWatermark) }
            if let dirtyTarget { try tunables.set("dirty_target", to: dirtyTarget) }
            if let maxAge { try tunables.set("max_age", to: maxAge) }
            if let writebackThreshold { try tunables.set("writeback_threshold", to: writebackThreshold) }
            if let maxBatchedWriteback { try tunables.set("nr_max_batched_writeback", to: maxBatchedWriteback) }
            if let updateRecordInterval { try tunables.set("update_sb_record_interval", to: updateRecordInterval) }
            if let syncDataInterval { try tunables.set("sync_data_interval", to: syncDataInterval) }
            if let barrierDeadline { try tunables.set("barrier_deadline_ms", to: barrierDeadline) }
            if let sequentialCutoff { try tunables.set("sequential_cutoff", to: sequentialCutoff) }
            if let readPromoteHits { try tunables.set("read_promote_hits", to: readPromoteHits) }
            if let ioErrorLimit { try tunables.set("io_error_limit", to: ioErrorLimit) }
            if let ioErrorHalfLife { try tunables.set("io_error_halflife", to: ioErrorHalfLife) }
        } catch let invalid as CacheTunables.Invalid {
            throw ValidationError(invalid.description)
        }
        return tunables
    }
}

/// `sluice format`: writes a new cache superblock bound to one backing store.
struct FormatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "format",
        abstract: "Format a cache device for a backing store.",
        discussion: """
            Writes a new superblock on the cache device, bound to the backing store's identity and \
            size, so the cache is never used in front of another one. A device that already holds \
            a Sluice cache is refused unless --force is given: drain it first (`sluice drain`).

            Example:
              sluice format --cache /var/lib/sluice/ssd.img --backing /dev/sdb
            """
    )

    @Option(name: .long, help: ArgumentHelp("The cache device (file or block device) to format.", valueName: "path"))
    var cache: String

    @Option(name: .long, help: ArgumentHelp("The backing store: a file, a block device, or nbd://… / nbd+unix://….", valueName: "path|uri"))
    var backing: String

    @Option(name: .long, help: ArgumentHelp("Segment size, a power of two from 64K to 64M (default 1M).", valueName: "size"))
    var segmentSize: String = "1M"

    @Option(name: .long, help: ArgumentHelp(
        "Pmem mode: create this pmem file (a DAX file on persistent memory, or a file on /dev/shm for emulation) for the write buffer.",
        valueName: "path"))
    var pmem: String?

    @Option(name: .customLong("cache-mode"), help: ArgumentHelp(
        "writeback (default), writethrough, writearound or passthrough; `sluice set cache_mode` changes it while serving.",
        valueName: "mode"))
    var cacheMode: CacheMode = .writeback

    @Flag(name: .long, help: "Erase a device (or pmem file) that already holds a Sluice cache.")
    var force = false

    @Flag(name: .customLong("backing-durable-on-ack"), help: ArgumentHelp(BackingLocation.durableOnAcknowledgementHelp))
    var backingDurableOnAck = false

    func validate() throws {
        _ = try parseSize(segmentSize)
        try validateDurableOnAck(backingDurableOnAck, backing: backing)
    }

    func run() throws {
        let segmentBytes = try parseSize(segmentSize)
        let location = BackingLocation(backing)
        do {
            let (cacheFile, expectation) = try openOffline(cachePath: cache, backing: location, durableOnAck: backingDurableOnAck,
                                                           mode: pmem == nil ? .volatile : .pmem)
            defer { cacheFile.close() }
            let opened = try CacheStartup.format(cacheFile: cacheFile, segmentBytes: segmentBytes, expectation: expectation,
                                                 force: force, pmemPath: pmem, cacheMode: cacheMode)
            print("formatted \(cache): \(opened.geometry.segmentCount) segments of \(opened.geometry.segmentBytes) bytes, \(cacheMode.rawValue) mode "
                  + "(\(opened.geometry.cacheBlocks) cache blocks) for \(location.identity) (\(expectation.backingSizeBytes) bytes)"
                  + (pmem.map { ", write buffer in pmem file \($0)" } ?? ", volatile write buffer"))
        } catch let error as ValidationError {
            throw error
        } catch {
            FileHandle.standardError.write("sluice format: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
    }
}

/// Opens a cache device for an offline command, and what it must match: the backing store's
/// identity and size, and `mode`. The cache device is opened first: while a server holds it, the
/// refusal names the cache (the file the command changes), not the backing store the server also
/// holds.
func openOffline(cachePath: String, backing location: BackingLocation, durableOnAck: Bool,
                 mode: SuperblockHeader.Mode) throws -> (BlockFile, CacheSuperblock.Expectation) {
    let cacheFile = try BlockFile(path: cachePath, readOnly: false)
    do {
        let size = try backingSizeBytes(location, durableOnAck: durableOnAck)
        let expectation = CacheSuperblock.Expectation(backingIdentity: location.identity, backingSizeBytes: size, mode: mode)
        return (cacheFile, expectation)
    } catch {
        cacheFile.close()
        throw error
    }
}

/// The size of a backing store, opened (and locked) only to learn it and prove it is usable: an
/// export that cannot flush is refused here, before anything is written, unless `durableOnAck`.
func backingSizeBytes(_ location: BackingLocation, durableOnAck: Bool) throws -> UInt64 {
    switch location {
    case .file(let path):
        // Open (and lock) the backing store only to learn its size and prove it is usable.
        let file = try BlockFile(path: path, readOnly: false)
        defer { file.close() }
        return file.sizeBytes
    case .nbd:
        let group = MultiThreadedEventLoopGroupShim()
        defer { group.shutdown() }
        let opened = try OpenedBacking(location, eventLoop: group.loop, durableOnAcknowledgement: durableOnAck)
        defer { opened.close() }
        return opened.sizeBytes
    }
}

/// Refuses `--backing-durable-on-ack` where it cannot apply (a file or block device is always synced).
func validateDurableOnAck(_ flag: Bool, backing: String) throws {
    if flag, let misuse = BackingLocation(backing).durableOnAcknowledgementMisuse() { throw ValidationError(misuse) }
}

/// `sluice mode`: switches a cache between volatile and pmem mode, offline.
struct ModeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mode",
        abstract: "Switch a cache between volatile and pmem mode, or change its cache mode (offline).",
        discussion: """
            Run it while no server uses the cache. --cache-mode MODE records a new cache mode \
            (\(CacheMode.names)) in the superblock; dirty blocks stay and are written back once \
            a server runs in a mode other than writeback. To leave pmem mode, give --volatile and the \
            cache's pmem file: recovery first writes everything the pmem file holds to the cache \
            device and syncs it; only then does the superblock say volatile, and the pmem file is \
            invalidated. To enter pmem mode, give --pmem with a new pmem file: the cache is \
            recovered, the file is created, and the superblock then names it.

            Examples:
              sluice mode --cache ssd.img --backing disk.img --pmem /dev/shm/sluice.pmem
              sluice mode --cache ssd.img --backing disk.img --volatile --pmem /dev/shm/sluice.pmem
              sluice mode --cache ssd.img --backing disk.img --cache-mode writethrough
            """
    )

    @Option(name: .long, help: ArgumentHelp("The cache device.", valueName: "path"))
    var cache: String

    @Option(name: .long, help: ArgumentHelp("The cache's backing store (checked against the superblock).", valueName: "path|uri"))
    var backing: String

    @Option(name: .long, help: ArgumentHelp("The pmem file: the new one when entering pmem mode, the cache's own when leaving it.", valueName: "path"))
    var pmem: String?

    @Flag(name: .long, help: "Switch to volatile mode (DRAM buffer).")
    var volatile = false

    @Option(name: .customLong("cache-mode"), help: ArgumentHelp("Record this cache mode instead: \(CacheMode.names).", valueName: "mode"))
    var cacheMode: CacheMode?

    @Flag(name: .long, help: "Replace a file at the --pmem path that already holds a Sluice write buffer; or leave pmem mode without the pmem file after a crash, losing what only it held.")
    var force = false

    @Flag(name: .customLong("backing-durable-on-ack"), help: ArgumentHelp(BackingLocation.durableOnAcknowledgementHelp))
    var backingDurableOnAck = false

    func validate() throws {
        if cacheMode != nil {
            guard pmem == nil, !volatile else { throw ValidationError("--cache-mode changes only the cache mode; switch the write buffer (--pmem, --volatile) in a command of its own") }
            return try validateDurableOnAck(backingDurableOnAck, backing: backing)
        }
        guard pmem != nil else {
            throw ValidationError("give the pmem file: --pmem PATH (a new one to enter pmem mode, or the cache's own with --volatile to leave it)")
        }
        try validateDurableOnAck(backingDurableOnAck, backing: backing)
    }

    func run() throws {
        let location = BackingLocation(backing)
        do {
            if let cacheMode {
                let (cacheFile, expectation) = try openOffline(cachePath: cache, backing: location, durableOnAck: backingDurableOnAck,
                                                               mode: .volatile)
                defer { cacheFile.close() }
                let result = try CacheStartup.setCacheMode(cacheFile: cacheFile, backingIdentity: expectation.backingIdentity,
                                                           backingSizeBytes: expectation.backingSizeBytes, to: cacheMode)
                return print("switched \(cache) from \(result.from.rawValue) to \(result.to.rawValue) cache mode")
            }
            let (cacheFile, expectation) = try openOffline(cachePath: cache, backing: location, durableOnAck: backingDurableOnAck,
                                                           mode: volatile ? .pmem : .volatile)
            defer { cacheFile.close() }
            let result = try CacheStartup.switchMode(cacheFile: cacheFile, expectation: expectation, to: volatile ? .volatile : .pmem,
                                                     pmemPath: pmem, force: force)
            let report = result.report
            print("switched \(cache) from \(result.from) to \(result.to) mode; \(report.chain.segments.count) segments in the log"
                  + (report.pmemSealedSegmentsWritten.isEmpty && report.pmemOpenSegmentWritten == nil ? ""
                     : ", \(report.pmemSealedSegmentsWritten.count) sealed and \(report.pmemOpenEntries) open-segment blocks moved from pmem"))
        } catch let error as ValidationError {
            throw error
        } catch {
            FileHandle.standardError.write("sluice mode: \(error)\n".data(using: .utf8)!)
            throw ExitCode(1)
        }
    }
}

/// Finds a running server's control endpoint.
struct ControlLocation: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The server's NBD Unix socket; its control endpoint is beside it.", valueName: "path"))
    var socket: String?

    @Option(name: .long, help: ArgumentHelp("The server's control socket.", valueName: "path"))
    var control: String?

    func validate() throws {
        guard socket != nil || control != nil else {
            throw ValidationError("say which server: --socket PATH (its NBD socket) or --control PATH")
        }
    }

    var client: ControlClient {
        ControlClient(socketPath: control ?? URL(fileURLWithPath: socket!).path + ".control")
    }
}

/// Runs a control request, turning failures into a message and exit code 1.
func runControl(_ body: () throws -> Data) throws -> Data {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write("sluice: \(error)\n".data(using: .utf8)!)
        throw ExitCode(1)
    }
}

/// `sluice status`: what a running cache holds and has done.
struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Show a running cache's state and counters.")

    @OptionGroup var location: ControlLocation

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    func run() throws {
        let body = try runControl { try location.client.request(method: "GET", path: "/status") }
        if json {
            FileHandle.standardOutput.write(body)
            print("")
            return
        }
        // A volume of another kind (a RAM disk) answers with its own fields: shown as they are.
        if let object = try? JSONSerialization.jsonObject(with: body) as? [String: Any], let kind = object["kind"] as? String, kind != "cache" {
            print(object.keys.sorted().map { key in "\(key.padding(toLength: 20, withPad: " ", startingAt: 0))\(object[key]!)" }.joined(separator: "\n"))
            return
        }
        let decoder = CacheStatus.jsonDecoder()
        let status = try decoder.decode(CacheStatus.self, from: body)
        print(Self.render(status))
    }

    static func render(_ status: CacheStatus) -> String {
        func mib(_ bytes: UInt64) -> String { String(format: "%.1f MiB", Double(bytes) / 1_048_576) }
        func seconds(_ value: Double) -> String { String(format: "%.3f s", value) }
        var lines = [
            "mode                \(status.mode)",
            "cache mode          \(status.cacheMode)\(status.cacheMode != "writeback" && status.dirtyBlocks > 0 ? " (switching: \(status.dirtyBlocks) dirty blocks still to write back)" : ""); \(status.bypassWrites) writes to the backing store directly (\(mib(status.bypassBytesWritten)), \(status.bypassWriteErrors) failed), \(status.writeThroughCopies) blocks of them cached clean",
            "cache               \(mib(status.cacheSizeBytes)), \(status.segmentCount) segments of \(status.segmentSizeBytes / 1024) KiB",
            "backing             \(mib(status.backingSizeBytes))",
            "segments            current \(status.currentSegmentID), last flushed \(status.lastFlushedSegmentID), last reclaimed \(status.lastReclaimedSegmentID), last retired \(status.lastRetiredSegmentID)",
            "ring                \(status.liveSegments) live, \(status.freeSegments) free, \(status.occupancyPercent)% occupied",
            "dirty               \(status.dirtyBlocks) blocks (\(mib(UInt64(status.dirtyBlocks) * 4096)), \(String(format: "%.1f", status.dirtyPercent))% of the cache); \(status.cachedBlocks) blocks cached",
            "cleaner             \(status.cleaner); \(status.segmentsReclaimed) segments reclaimed (\(status.segmentsReclaimedWithoutIO) without I/O), \(status.segmentsRetired) retired, \(status.relocatedBlocks) blocks relocated (\(status.relocationsForStalledWriters) segments below the yield for stalled writers; \(String(format: "%.1f", status.relocationShareOfCacheWrites * 100))% of cache-device writes)",
            "read cache          \(String(format: "%.1f", status.readHitRatio * 100))% of block reads hit; \(status.readFills) misses cached, not cached: \(status.readFillsSkippedSequential) sequential, \(status.readFillsSkippedNotPromoted) not yet promoted, \(status.readFillsSkippedRaced) raced by a write, \(status.readFillsSkippedNoRoom) no room",
            "writers stalled     \(status.writerStalls) times for ring space or a buffer, \(seconds(status.writerStallSeconds)) in all, longest \(String(format: "%.1f", status.writerStallMaxMs)) ms",
            "writeback           \(status.writebackInProgress ? "running" : "idle")\(status.writebackTrigger.map { " (\($0))" } ?? ""), next batch \(status.writebackBatchBlocks) blocks; \(status.writebackBatches) batches, \(status.writtenBackBlocks) blocks (\(String(format: "%.1f", status.writtenBackBlocksPerBatch)) per batch, \(status.lastBatchWrittenBackBlocks) in the last), \(status.writebackSkippedBlocks) skipped as superseded, \(status.backingWriteRequests) backing writes, \(status.writebackErrors) errors",
            "write buffer        \(status.bufferBlocks) blocks in the open segment\(status.mode == "pmem" ? " (persistent memory)" : " (DRAM)"), \(status.bufferSegmentsUnsynced) sealed segments not yet synced on the cache device",
            "partial segments    \(status.partialSegments) of \(status.segmentsWritten) written",
            "write amplification \(String(format: "%.4f", status.writeAmplification)) (cache-device bytes per user byte written; clean copies of reads not counted)",
            "bytes written       user \(mib(status.userBytesWritten)), cache device \(mib(status.cacheBytesWritten)), backing \(mib(status.backingBytesWritten))",
            "bytes read          user \(mib(status.userBytesRead)), cache device \(mib(status.cacheBytesRead)), backing \(mib(status.backingBytesRead))",
            "syncs               cache device \(status.cacheSyncs), backing \(status.backingSyncs); \(status.recordWrites) superblock records",
            "index memory        \(mib(UInt64(status.indexMemoryBytes)))",
        ]
        if status.mode == "pmem" {
            lines.append("pmem                \(status.pmemDrains) drains for \(status.pmemPersistedReplies) replies (\(String(format: "%.3f", status.drainsPerWrite)) drains per write)")
        }
        lines.append("backing flush       \(status.backingFlush ?? "unknown")")
        if let failure = status.failure { lines.append("FAILED              \(failure)") }
        if let degraded = status.degraded { lines.append("DEGRADED            \(degraded)") }
        if status.cacheDeviceErrors > 0 {
            lines.append("cache device errors \(status.cacheDeviceErrors) (\(String(format: "%.1f", status.cacheDeviceErrorsDecayed)) decayed, limit \(status.tunables["io_error_limit"] ?? 0)); \(status.readsRetriedFromBacking) block reads retried from the backing store")
        }
        lines.append("counters")
        for (name, value) in status.blockCounts.sorted(by: { $0.key < $1.key }) {
            lines.append("  \(name.padding(toLength: 28, withPad: " ", startingAt: 0)) \(value)")
        }
        lines.append("tunables")
        for (name, value) in status.tunables.sorted(by: { $0.key < $1.key }) {
            lines.append("  \(name.padding(toLength: 28, withPad: " ", startingAt: 0)) \(value)")
        }
        return lines.joined(separator: "\n")
    }
}

/// `sluice set KEY VALUE`: changes a tunable of a running cache.
struct SetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "set", abstract: "Change a setting of a running volume: a cache's tunable or mode, a RAM disk's size, lock or limit.",
        discussion: """
            A cache's tunables (integers): \(CacheTunables.keys.joined(separator: ", ")).
            cache_mode: \(CacheMode.names); recorded in the superblock, so a restart keeps it. \
            Blocks still dirty are served from the cache and written back until none is left.
            A RAM disk's settings: size (512M, 8G, ...), locked (1 or 0), limit (a size; 0 = its size).
            The volume checks the value and says what it accepts.
            """)

    @OptionGroup var location: ControlLocation

    @Argument(help: "The tunable.")
    var key: String

    @Argument(help: "Its new value (an integer for a tunable, a mode name for cache_mode, a size for a RAM disk's size).")
    var value: String

    func run() throws {
        let query = "key=\(key.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? key)&value=\(value.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? value)"
        _ = try runControl { try location.client.request(method: "POST", path: "/set?\(query)") }
        print("\(key) = \(value)")
    }
}

/// `sluice drain`: writes every dirty block back and waits until nothing is dirty.
struct DrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain", abstract: "Write every dirty block back to the backing store and wait until nothing is dirty.")

    @OptionGroup var location: ControlLocation

    func run() throws {
        let body = try runControl { try location.client.request(method: "POST", path: "/drain") }
        let decoder = CacheStatus.jsonDecoder()
        let status = try decoder.decode(CacheStatus.self, from: body)
        print("drained: \(status.dirtyBlocks) dirty blocks, every segment up to \(status.lastRetiredSegmentID) retired")
    }
}

/// Parses sizes like 1M, 512K, 1048576 (``ByteCount``).
func parseSize(_ text: String) throws -> Int {
    guard let bytes = ByteCount.parse(text), bytes <= UInt64(Int.max) else { throw ValidationError("bad size '\(text)'; use for example 1M or 512K") }
    return Int(bytes)
}

import NIOPosix
import NIOCore

/// One event loop for commands that connect to an NBD export briefly.
struct MultiThreadedEventLoopGroupShim {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: any EventLoop { group.next() }
    func shutdown() { try? group.syncShutdownGracefully() }
}

extension CacheMode: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument) }
    public static var allValueStrings: [String] { allCases.map(\.rawValue) }
}
