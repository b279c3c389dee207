import Foundation
import NIOCore
import XCTest

@testable import SluiceCache

// MARK: - Self-describing sector contents

/// Every sector a test writes says which write put it there and where it belongs: word 0 is
/// `tag << 32 | lba`, the other 63 words are derived from word 0. A sector that reads back as a mix
/// of two writes, or as data from another place, does not decode. Tag 0 is the all-zero sector.
enum SectorCodec {
    static let sectorBytes = 512

    @inline(__always)
    static func word(_ first: UInt64, _ index: Int) -> UInt64 {
        (first &* 0x9E37_79B9_7F4A_7C15) ^ (UInt64(index) &* 0xBF58_476D_1CE4_E5B9) ^ (first >> 17)
    }

    /// `sectors` sectors for write `tag` starting at sector `firstLBA`.
    static func bytes(tag: UInt32, firstLBA: Int, sectors: Int) -> [UInt8] {
        var result = [UInt8](repeating: 0, count: sectors * sectorBytes)
        guard tag != 0 else { return result }
        result.withUnsafeMutableBytes { raw in
            let words = raw.bindMemory(to: UInt64.self)
            for sector in 0..<sectors {
                let first = UInt64(tag) << 32 | UInt64(UInt32(truncatingIfNeeded: firstLBA + sector))
                let base = sector * 64
                words[base] = first.littleEndian
                for index in 1..<64 { words[base + index] = word(first, index).littleEndian }
            }
        }
        return result
    }

    /// The tag of the sector at `offset` in `bytes`, which should hold sector `lba`; nil when the
    /// sector is torn, mixed or belongs elsewhere.
    static func decode(_ bytes: UnsafeRawBufferPointer, offset: Int, lba: Int) -> UInt32? {
        let first = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        if first == 0 {
            for index in 1..<64 where bytes.loadUnaligned(fromByteOffset: offset + index * 8, as: UInt64.self) != 0 { return nil }
            return 0
        }
        guard UInt32(truncatingIfNeeded: first) == UInt32(truncatingIfNeeded: lba) else { return nil }
        for index in 1..<64 where UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset + index * 8, as: UInt64.self)) != word(first, index) {
            return nil
        }
        return UInt32(truncatingIfNeeded: first >> 32)
    }

    /// Tags of every sector of `bytes` (which starts at sector `firstLBA`); nil entries are garbage.
    static func decodeAll(_ bytes: [UInt8], firstLBA: Int) -> [UInt32?] {
        bytes.withUnsafeBytes { raw in
            (0..<(bytes.count / sectorBytes)).map { decode(raw, offset: $0 * sectorBytes, lba: firstLBA + $0) }
        }
    }
}

// MARK: - What each sector may hold

/// The values a sector may show: every write, write-zeroes and trim that reached it, in the order
/// the engine applies them (arrival order), and which of them are durable.
struct SectorHistory {
    enum Value: Equatable {
        case data(UInt32)
        /// A trim: zeros, or what the sector held before.
        case trimmed
    }

    struct Entry {
        var value: Value
        var operation: Int
        var durable: Bool
    }

    /// Per sector, oldest first. Entry 0 is the value the sector held when tracking began.
    var sectors: [[Entry]]

    init(sectorCount: Int) {
        sectors = Array(repeating: [Entry(value: .data(0), operation: -1, durable: true)], count: sectorCount)
    }

    mutating func record(_ value: Value, sectors range: Range<Int>, operation: Int) {
        for sector in range { sectors[sector].append(Entry(value: value, operation: operation, durable: false)) }
    }

    mutating func markDurable(operations: Set<Int>) {
        guard !operations.isEmpty else { return }
        for sector in sectors.indices {
            for index in sectors[sector].indices where operations.contains(sectors[sector][index].operation) {
                sectors[sector][index].durable = true
            }
        }
    }

    /// Tags one entry may show: a trim shows zeros or whatever the entry before it may show.
    private func tags(_ entries: [Entry], _ index: Int) -> [UInt32] {
        switch entries[index].value {
        case .data(let tag): return [tag]
        case .trimmed: return [0] + (index > 0 ? tags(entries, index - 1) : [])
        }
    }

    /// What `sector` may show after a power failure: a value at or after its newest durable one.
    /// A trim may leave a sector as it was (it is advisory; one that covers part of a block does
    /// nothing), so a durable trim keeps the values before it possible, back to the newest
    /// durable value that is not a trim.
    func allowedAfterCrash(_ sector: Int) -> [UInt32] {
        let entries = sectors[sector]
        var lastDurable = entries.lastIndex { $0.durable } ?? 0
        var allowed: [UInt32] = []
        while lastDurable > 0, entries[lastDurable].value == .trimmed {
            allowed.append(0)
            lastDurable = entries[..<lastDurable].lastIndex { $0.durable } ?? 0
        }
        return allowed + (lastDurable..<entries.count).flatMap { tags(entries, $0) }
    }

    /// What `sector` may show while the engine runs with every operation completed: its newest value.
    func allowedNow(_ sector: Int) -> [UInt32] {
        tags(sectors[sector], sectors[sector].count - 1)
    }

    /// Forgets history: each sector now holds `tags[sector]`, durably.
    mutating func reset(to tags: [UInt32]) {
        for sector in sectors.indices {
            sectors[sector] = [Entry(value: .data(tags[sector]), operation: -1, durable: true)]
        }
    }

    /// Drops entries older than the newest durable one (keeps the checks fast in long runs). A
    /// durable trim keeps what it may still show: the entries back to the newest durable value
    /// that is not a trim (see ``allowedAfterCrash(_:)``).
    mutating func compact() {
        for sector in sectors.indices {
            let entries = sectors[sector]
            guard var first = entries.lastIndex(where: { $0.durable }), first > 0 else { continue }
            while first > 0, entries[first].value == .trimmed { first = entries[..<first].lastIndex { $0.durable } ?? 0 }
            if first > 0 { sectors[sector].removeFirst(first) }
        }
    }
}

/// Describes a tag for failure messages.
func describe(_ tag: UInt32?) -> String {
    guard let tag else { return "garbage (torn, mixed or misplaced)" }
    return tag == 0 ? "zeros" : "write #\(tag)"
}

// MARK: - Tests that may bring the process down

/// Runs `body` in a child process (this test binary, running only `test`), so that an engine
/// precondition failure fails this one test instead of ending the whole test run. In the child,
/// `body` runs directly.
func runInChildProcess(_ test: String, file: StaticString = #filePath, line: UInt = #line, _ body: () throws -> Void) throws {
    guard let child = try childProcessRun(test, body) else { return }
    let interesting = child.output.split(separator: "\n").filter {
        $0.contains("error:") || $0.contains("Fatal error") || $0.contains("Precondition failed") || $0.contains("precondition")
            || $0.contains("Index out of range")
    }
    if child.crashed {
        XCTFail("the engine crashed the process (signal \(child.status)) in \(test):\n"
                + interesting.prefix(6).joined(separator: "\n"), file: file, line: line)
    } else if child.status != 0 {
        XCTFail("\(test) failed in its child process:\n" + interesting.prefix(10).joined(separator: "\n"), file: file, line: line)
    }
}

/// Runs `body` in a child process and passes only if the child dies of a precondition failure
/// whose message contains `message`: the part refuses the illegal event it describes (and not
/// for some other reason, which would say nothing). A body that returns fails the test.
func assertRefused(_ test: String, message: String, file: StaticString = #filePath, line: UInt = #line,
                   _ body: () throws -> Void) throws {
    guard let child = try childProcessRun(test, body) else { return }
    guard child.crashed else {
        return XCTFail("\(test): the illegal event was accepted (the child ended with status \(child.status))", file: file, line: line)
    }
    let failure = child.output.split(separator: "\n").first { $0.contains("Precondition failed") || $0.contains("Fatal error") }
    XCTAssertTrue(failure?.contains(message) ?? false,
                  "\(test): expected a precondition failure saying \"\(message)\", got: \(failure.map(String.init) ?? child.output.suffix(400).description)",
                  file: file, line: line)
}

extension XCTestCase {
    /// The name `runInChildProcess` and `assertRefused` run a test method of this class by.
    func childTestName(_ function: String = #function) -> String {
        let method = function.hasSuffix("()") ? String(function.dropLast(2)) : function
        return "SluiceCacheTests.\(String(describing: type(of: self)))/\(method)"
    }
}

/// In the child (the environment names `test`), runs `body` and returns nil; in the parent, runs
/// `test` in a child process and returns how it ended and what it printed.
private func childProcessRun(_ test: String, _ body: () throws -> Void) throws -> (crashed: Bool, status: Int32, output: String)? {
    let marker = "SLUICE_TEST_CHILD"
    if ProcessInfo.processInfo.environment[marker] == test {
        try body()
        return nil
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0])
    process.arguments = [test]
    var environment = ProcessInfo.processInfo.environment
    environment[marker] = test
    environment["SWIFT_BACKTRACE"] = "enable=no"
    process.environment = environment
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let data = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationReason == .uncaughtSignal, process.terminationStatus, String(decoding: data, as: UTF8.self))
}

extension CacheCounters {
    /// Adds the cleaner's and writeback's counters of another engine (for test statistics).
    mutating func add(_ other: CacheCounters) {
        relocatedBlocks += other.relocatedBlocks
        segmentsReclaimed += other.segmentsReclaimed
        segmentsReclaimedWithoutIO += other.segmentsReclaimedWithoutIO
        segmentsRetired += other.segmentsRetired
        cleaningRounds += other.cleaningRounds
        writtenBackBlocks += other.writtenBackBlocks
        writerStalls += other.writerStalls
        cleanerWaitsForWriteback += other.cleanerWaitsForWriteback
        bypassWrites += other.bypassWrites
        writeThroughCopies += other.writeThroughCopies
    }
}
