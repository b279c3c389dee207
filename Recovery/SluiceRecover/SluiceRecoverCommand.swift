import ArgumentParser
import CacheRepair
import Foundation
import Logging
import SluiceCache
import SluiceFormat

/// `sluice-recover`: checks, dumps, drains and detaches a cache without a server, on the same
/// recovery code `sluice serve` runs. Each command refuses a cache a running server holds.
@main
struct SluiceRecoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sluice-recover",
        abstract: "Check, dump, drain, detach or salvage a Sluice cache offline (no server running).",
        discussion: """
            After a crash: `check` says whether the cache is clean, dirty but consistent, or \
            damaged; `drain` writes every dirty block back to the backing store without a server. \
            To remove a cache: `detach` drains it and erases its superblock. Every command refuses \
            a cache that a running server holds. A damaged cache: `salvage` writes back the longest \
            valid prefix of its log and lists the blocks whose newest data was lost.
            """,
        subcommands: [CheckCommand.self, DumpCommand.self, DrainCommand.self, DetachCommand.self, SalvageCommand.self, UpgradeCommand.self]
    )
}

struct CacheLocation: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The cache device.", valueName: "path"))
    var cache: String

    @Option(name: .long, help: ArgumentHelp("The cache's pmem file (pmem mode).", valueName: "path"))
    var pmem: String?
}

/// Prints `error` as the tool's message and exits with `code`.
func fail(_ command: String, _ error: Error, code: Int32 = 2) -> ExitCode {
    FileHandle.standardError.write("sluice-recover \(command): \(error)\n".data(using: .utf8)!)
    return ExitCode(code)
}

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Verify the superblock, the pmem buffers and the ring; exit 0 clean, 1 dirty but consistent, 2 damaged, 3 could not check (in use, missing file).")

    @OptionGroup var location: CacheLocation

    func run() throws {
        let inspection: CacheInspection
        do {
            inspection = try CacheInspection.inspect(cachePath: location.cache, pmemPath: location.pmem)
        } catch {
            throw fail("check", error, code: 3)
        }
        var lines = ["\(location.cache): \(inspection.verdict)"]
        if let report = inspection.report {
            let chain = report.chain
            let range = chain.segments.isEmpty ? "none" : "segments \(chain.segments.first!.segmentID)...\(chain.lastSegmentID)"
            lines.append("  log: \(chain.segments.count) segments (\(range)) after last retired segment \(chain.lastRetiredSegmentID); ends: \(chain.end)")
            lines.append("  shutdown: \(report.cleanShutdown ? "clean" : "not clean (crashed, or still in use)")")
            lines.append("  dirty blocks: \(inspection.dirtyBlocks) (\(inspection.dirtyBlocks * 4096) bytes)")
            lines.append("  scan: \(report.bytesRead) bytes read and verified in \(String(format: "%.3f", report.seconds)) s (\(String(format: "%.2f", report.gigabytesPerSecond)) GB/s)")
        }
        if let header = inspection.header {
            lines.append("  mode: \(header.mode); backing: \(header.backingIdentity) (\(header.backingSizeBytes) bytes)")
        }
        for note in inspection.notes { lines.append("  note: \(note)") }
        for problem in inspection.problems { lines.append("  PROBLEM: \(problem)") }
        print(lines.joined(separator: "\n"))
        throw ExitCode(inspection.verdict.rawValue)
    }
}

struct DumpCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dump",
        abstract: "Show the superblock, records, segments, per-block metadata and pmem entries.")

    @OptionGroup var location: CacheLocation

    @Option(name: .long, help: ArgumentHelp("Only this segment, with its blocks.", valueName: "id"))
    var segment: UInt64?

    @Flag(name: .long, help: "List every segment's blocks.")
    var entries = false

    @Flag(name: .long, help: "JSON output (snake_case keys).")
    var json = false

    func run() throws {
        let inspection: CacheInspection
        do {
            inspection = try CacheInspection.inspect(cachePath: location.cache, pmemPath: location.pmem)
        } catch {
            throw fail("dump", error, code: 3)
        }
        let dump = CacheDump(inspection, segmentID: segment, entries: entries)
        if json {
            let encoder = JSONEncoder()
            encoder.keyEncodingStrategy = .convertToSnakeCase
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(dump), as: UTF8.self))
        } else {
            print(dump.rendered())
        }
    }
}

struct DrainOptions: ParsableArguments {
    @OptionGroup var location: CacheLocation

    @Option(name: .long, help: ArgumentHelp("The backing store the cache was formatted for.", valueName: "path|uri"))
    var backing: String

    @Flag(name: .customLong("backing-durable-on-ack"), help: ArgumentHelp(BackingLocation.durableOnAcknowledgementHelp))
    var backingDurableOnAck = false

    func validate() throws {
        if backingDurableOnAck, let misuse = BackingLocation(backing).durableOnAcknowledgementMisuse() { throw ValidationError(misuse) }
    }
}

/// Progress of a drain: a bar on a terminal, a plain line otherwise.
final class ProgressPrinter {
    let isTerminal = isatty(STDERR_FILENO) != 0
    private var printedLine = false

    func show(_ progress: OfflineDrain.Progress) {
        let percent = progress.totalBytes == 0 ? 100 : Int(progress.doneBytes * 100 / progress.totalBytes)
        let mib = { (bytes: UInt64) in String(format: "%.1f MiB", Double(bytes) / 1_048_576) }
        let rate = String(format: "%.1f MiB/s", progress.bytesPerSecond / 1_048_576)
        let eta = progress.etaSeconds.map { String(format: "ETA %.0f s", $0) } ?? "ETA -"
        let text = "\(mib(progress.doneBytes)) of \(mib(progress.totalBytes)) written back (\(percent)%), \(rate), \(eta)"
        if isTerminal {
            let filled = percent * 30 / 100
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: 30 - filled)
            FileHandle.standardError.write("\r[\(bar)] \(text)   ".data(using: .utf8)!)
            printedLine = true
        } else {
            FileHandle.standardError.write("drain: \(text)\n".data(using: .utf8)!)
        }
    }

    /// Ends the progress line (once).
    func finish() {
        if printedLine { FileHandle.standardError.write("\n".data(using: .utf8)!) }
        printedLine = false
    }
}

func quietLogger() -> Logger {
    var logger = Logger(label: "sluice-recover")
    logger.logLevel = .warning
    return logger
}

extension DrainOptions {
    /// Runs one of the commands that drain (`drain`, `detach`, `salvage`) with a progress
    /// printer; a failure ends the progress line, prints the error and exits 1.
    func runDraining<Result>(_ command: String,
                             _ body: (_ cache: String, _ backing: BackingLocation, _ durableOnAck: Bool, _ pmem: String?, _ logger: Logger,
                                      _ progress: @escaping (OfflineDrain.Progress) -> Void) throws -> Result) throws -> Result {
        let printer = ProgressPrinter()
        defer { printer.finish() }
        do {
            return try body(location.cache, BackingLocation(backing), backingDurableOnAck, location.pmem, quietLogger(), printer.show)
        } catch {
            printer.finish()
            throw fail(command, error, code: 1)
        }
    }
}

struct DrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drain",
        abstract: "Recover the cache and write every dirty block back to the backing store, then mark it clean.",
        discussion: "Safe to interrupt: run it again and it recovers and goes on.")

    @OptionGroup var options: DrainOptions

    func run() throws {
        let result = try options.runDraining("drain") {
            try OfflineDrain.drain(cachePath: $0, backing: $1, backingDurableOnAcknowledgement: $2, pmemPath: $3, logger: $4, progress: $5)
        }
        print("drained \(options.location.cache): \(result.dirtyBlocksAtStart) dirty blocks written back to \(options.backing) "
              + "with \(result.backingWriteRequests) writes in \(String(format: "%.1f", result.seconds)) s; the cache is clean")
    }
}

struct DetachCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "detach",
        abstract: "Drain the cache, then erase its superblock so the backing store stands alone.",
        discussion: "Afterwards the backing store holds every write, and the cache device is no longer a Sluice cache (format it to use it again).")

    @OptionGroup var options: DrainOptions

    func run() throws {
        let result = try options.runDraining("detach") {
            try OfflineDrain.detach(cachePath: $0, backing: $1, backingDurableOnAcknowledgement: $2, pmemPath: $3, logger: $4, progress: $5)
        }
        print("detached \(options.location.cache) from \(options.backing): \(result.dirtyBlocksAtStart) dirty blocks written back; "
              + "the backing store is complete on its own and the cache device no longer holds a cache")
    }
}

struct SalvageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "salvage",
        abstract: "For a damaged cache: write back the longest valid prefix of the log, and list the blocks whose newest data was lost.",
        discussion: """
            Each lost range is printed as `lost: bytes START-END (blocks FIRST+COUNT) newest data was in segments [...]`: \
            those blocks now hold what the backing store or an older segment had. A cache that is not damaged is simply drained.
            """)

    @OptionGroup var options: DrainOptions

    func run() throws {
        let result = try options.runDraining("salvage") {
            try Salvage.salvage(cachePath: $0, backing: $1, backingDurableOnAcknowledgement: $2, pmemPath: $3, logger: $4, progress: $5)
        }
        guard result.wasDamaged else {
            print("\(options.location.cache) is not damaged: drained \(result.drain.dirtyBlocksAtStart) dirty blocks; nothing was lost")
            return
        }
        print("salvaged \(options.location.cache): applied \(result.appliedSegments) segments of the log (through segment \(result.lastAppliedSegmentID)), "
              + "wrote back \(result.drain.dirtyBlocksAtStart) dirty blocks to \(options.backing)")
        for range in result.lost {
            print("lost: bytes \(range.byteRange.lowerBound)-\(range.byteRange.upperBound - 1) (blocks \(range.firstBlock)+\(range.blockCount)) "
                  + "newest data was in segments \(range.segmentIDs)")
        }
        for what in result.unreadable { print("unreadable: \(what); the blocks it held are unknown") }
        let lostBlocks = result.lost.reduce(0) { $0 + $1.blockCount }
        print("\(lostBlocks) blocks in \(result.lost.count) ranges lost their newest data\(result.unreadable.isEmpty ? "" : ", plus the unreadable places above")")
    }
}

struct UpgradeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "upgrade",
        abstract: "Upgrade a cache written by an earlier Sluice (format version 1) to the current format, in place.",
        discussion: """
            Only the superblock header's version field changes: the log, its records and the pmem file stay as they \
            are, and the cache keeps its dirty data. An earlier Sluice refuses the upgraded cache. A cache a server \
            holds is refused; stop the server first.
            """)

    @Option(name: .long, help: ArgumentHelp("The cache device.", valueName: "path"))
    var cache: String

    func run() throws {
        do {
            switch try CacheUpgrade.upgrade(cachePath: cache) {
            case .upgraded(let from, let to): print("upgraded \(cache) from format version \(from) to \(to)")
            case .alreadyCurrent(let version): print("\(cache) already has format version \(version); nothing to do")
            }
        } catch {
            throw fail("upgrade", error)
        }
    }
}
