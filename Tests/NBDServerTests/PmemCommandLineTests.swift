import Foundation
import NBDClient
import XCTest

/// Pmem mode as a user runs it: `sluice format --pmem`, `sluice serve --pmem`, `sluice mode`,
/// with the built binary, python3-libnbd as the client, kill -9 and the files on disk checked
/// byte for byte. Pmem files live in /dev/shm under unique names and are removed in tearDown.
final class PmemCommandLineTests: XCTestCase {
    var directory = ""
    /// Every pmem path a test named (created or not), removed in tearDown.
    private var pmemPaths: [String] = []
    /// Every server a test started, killed in tearDown if a failing test left one running.
    private var servers: [Process] = []
    private let unique = UUID().uuidString.prefix(8)

    override func setUpWithError() throws {
        directory = try TestServer.makeTemporaryDirectory(base: "/tmp")
        try Self.writerScript.write(toFile: writerPath, atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        for server in servers where server.isRunning {
            kill(server.processIdentifier, SIGKILL)
            server.waitUntilExit()
        }
        for path in pmemPaths { try? FileManager.default.removeItem(atPath: path) }
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: - Helpers

    var writerPath: String { directory + "/writer.py" }

    func file(_ name: String, sizeBytes: Int) throws -> String {
        try SluiceBinary.makeFile(directory + "/" + name, sizeBytes: sizeBytes)
    }

    /// A unique pmem path in /dev/shm (not created).
    func pmemPath(_ name: String) -> String {
        let path = "/dev/shm/sluice-test-\(getpid())-\(unique)-\(name).pmem"
        pmemPaths.append(path)
        return path
    }

    @discardableResult
    func sluice(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String, errors: String) {
        try SluiceBinary.run(arguments, file: file, line: line)
    }

    /// Runs sluice and asserts exit status 0.
    @discardableResult
    func succeed(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let result = try sluice(arguments, file: file, line: line)
        XCTAssertEqual(result.status, 0, "sluice \(arguments.joined(separator: " ")) failed: \(result.errors)", file: file, line: line)
        return result.output
    }

    /// Runs sluice, asserts it exits with `status` and says every one of `phrases` on standard
    /// error, and that no server came up on `socket`.
    func refuse(_ arguments: [String], status: Int32 = 1, saying phrases: [String], socket: String? = nil,
                        file: StaticString = #filePath, line: UInt = #line) throws {
        let result = try sluice(arguments, file: file, line: line)
        XCTAssertEqual(result.status, status, "sluice \(arguments.joined(separator: " ")): \(result.errors)", file: file, line: line)
        for phrase in phrases {
            XCTAssertTrue(result.errors.contains(phrase), "sluice \(arguments.joined(separator: " ")) should say '\(phrase)'; it said: \(result.errors)",
                          file: file, line: line)
        }
        if let socket {
            XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "nothing may be served after a refusal", file: file, line: line)
        }
    }

    func serve(cache: String, backing: String, buffer: [String], socket: String, extra: [String] = [],
                       file: StaticString = #filePath, line: UInt = #line) throws -> Process {
        let log = directory + "/server-\(servers.count).log"
        let server = try SluiceBinary.startServer(["serve", "--cache", cache, "--backing", backing] + buffer
                                                  + ["--socket", socket, "--log-level", "warning"] + extra,
                                                  socket: socket, log: log, file: file, line: line)
        servers.append(server)
        return server
    }

    /// Stops a server with SIGTERM and asserts it exited 0 (a clean shutdown), or kills it with SIGKILL.
    func stop(_ server: Process, signal: Int32 = SIGTERM, file: StaticString = #filePath, line: UInt = #line) {
        let status = SluiceBinary.stop(server, signal: signal, file: file, line: line)
        if signal == SIGTERM {
            XCTAssertEqual(server.terminationReason, .exit, file: file, line: line)
            XCTAssertEqual(status, 0, "a SIGTERM stops the server cleanly", file: file, line: line)
        } else {
            XCTAssertEqual(server.terminationReason, .uncaughtSignal, file: file, line: line)
        }
        // The socket file stays behind after kill -9; the next server replaces it, but the tests
        // wait for it to appear, so remove it.
        if let arguments = server.arguments, let index = arguments.firstIndex(of: "--socket") {
            try? FileManager.default.removeItem(atPath: arguments[index + 1])
        }
    }

    /// Writes through python3-libnbd: `count` plain writes (no FUA, no flush), up to 64 in
    /// flight, every reply waited for; `kind` "aligned" = 4 KiB-aligned 4 KiB writes only,
    /// "mixed" = those and sub-4 KiB writes at any sector (512 B within a block, or a few sectors
    /// that may cross a block boundary), in flight together where their sectors do not overlap.
    /// `image` (the expected volume) is updated with every acknowledged write.
    @discardableResult
    func write(socket: String, image: String, seed: Int, count: Int, kind: String,
                       file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let result = try SluiceBinary.runProgram("/usr/bin/python3", [writerPath, "nbd+unix:///?socket=\(socket)", image, "\(seed)", "\(count)", kind],
                                                 file: file, line: line)
        XCTAssertEqual(result.status, 0, "the python3-libnbd writer failed: \(result.errors)", file: file, line: line)
        let summary = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any], result.output, file: file, line: line)
        XCTAssertEqual(summary["writes"] as? Int, count, file: file, line: line)
        return summary
    }

    /// Reads the whole volume and asserts that every sector holds what `image` says (the last
    /// acknowledged write to it); names the first wrong sectors with the tags found and expected.
    func verify(socket: String, image: String, _ context: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let expected = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertEqual(Int(client.sizeBytes), expected.count, file: file, line: line)
        let chunk = 4 << 20
        var wrong: [String] = []
        var wrongCount = 0
        for offset in stride(from: 0, to: expected.count, by: chunk) {
            let length = min(chunk, expected.count - offset)
            let found = try client.read(length: length, offset: UInt64(offset))
            let want = Array(expected[offset..<(offset + length)])
            if sameBytes(found, want) { continue }
            for sector in 0..<(length / 512) where found[(sector * 512)..<(sector * 512 + 512)] != want[(sector * 512)..<(sector * 512 + 512)] {
                wrongCount += 1
                if wrong.count < 8 {
                    func tag(_ bytes: [UInt8]) -> String {
                        let words = bytes[(sector * 512)..<(sector * 512 + 16)].withUnsafeBytes { ($0.load(as: UInt64.self), $0.load(fromByteOffset: 8, as: UInt64.self)) }
                        return "write \(words.0 >> 32):\(words.0 & 0xFFFF_FFFF) for sector \(words.1)"
                    }
                    wrong.append("sector \(offset / 512 + sector): found \(tag(found)), expected \(tag(want))")
                }
            }
        }
        XCTAssertEqual(wrongCount, 0, "\(context): \(wrongCount) sectors do not hold their last acknowledged write: \(wrong.joined(separator: "; "))",
                       file: file, line: line)
    }

    /// The files of one pmem-mode test stack: backing file, cache device, expected image (all
    /// `name-…`), socket and pmem file.
    struct PmemStack {
        var backing: String
        var cache: String
        var image: String
        var socket: String
        var pmem: String
    }

    /// Creates a stack's files and formats its cache in pmem mode.
    func formattedStack(_ name: String, volumeBytes: Int, cacheBytes: Int, segmentSize: String = "64K",
                        file: StaticString = #filePath, line: UInt = #line) throws -> PmemStack {
        let stack = PmemStack(backing: try self.file("\(name)-backing.img", sizeBytes: volumeBytes),
                              cache: try self.file("\(name)-cache.img", sizeBytes: cacheBytes),
                              image: try self.file("\(name)-expected.img", sizeBytes: volumeBytes),
                              socket: directory + "/\(name).sock", pmem: pmemPath(name))
        try succeed(["format", "--cache", stack.cache, "--backing", stack.backing, "--segment-size", segmentSize, "--pmem", stack.pmem],
                    file: file, line: line)
        return stack
    }

    func status(socket: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let output = try succeed(["status", "--json", "--socket", socket], file: file, line: line)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(output.utf8)) as? [String: Any], output, file: file, line: line)
    }

    func bytes(_ path: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: path))
    }

    func copy(_ source: String, to destination: String) throws {
        try? FileManager.default.removeItem(atPath: destination)
        try FileManager.default.copyItem(atPath: source, toPath: destination)
    }

    // MARK: - Tests

    /// Every wrong way to serve or format a pmem-mode cache is refused with a message naming the
    /// problem and the fix, and leaves the cache device and its pmem file byte for byte as they
    /// were: afterwards the cache serves every acknowledged write.
    func testEveryWrongPmemSetupIsRefusedAndLeavesTheCacheIntact() throws {
        let backing = try file("backing.img", sizeBytes: 8 << 20)
        let cache = try file("cache.img", sizeBytes: 8 << 20)
        let image = try file("expected.img", sizeBytes: 8 << 20)
        let socket = directory + "/s.sock"
        let pmem = pmemPath("main")
        let formatted = try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", pmem])
        XCTAssertTrue(formatted.contains("write buffer in pmem file \(pmem)"), formatted)

        // Acknowledged plain writes, some in sealed segments, the last in the open pmem area; kill -9.
        var server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try write(socket: socket, image: image, seed: 11, count: 300, kind: "mixed")
        let before = try status(socket: socket)
        XCTAssertEqual(before["mode"] as? String, "pmem")
        XCTAssertGreaterThan(before["buffer_blocks"] as? Int ?? 0, 0, "the open pmem segment holds acknowledged writes at the kill")
        stop(server, signal: SIGKILL)
        let cacheBytes = try bytes(cache)
        let pmemBytes = try bytes(pmem)

        // A pmem-mode cache served with the DRAM buffer.
        try refuse(["serve", "--cache", cache, "--backing", backing, "--volatile", "--socket", socket],
                   saying: ["keeps its write buffer in a pmem file", "--pmem PATH", "sluice mode --volatile --pmem PATH"], socket: socket)
        // A pmem file that does not exist (and is not created by the attempt).
        let missing = pmemPath("missing")
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", missing, "--socket", socket],
                   saying: ["the pmem file \(missing) cannot be opened", "No such file", "give the pmem file this cache was formatted with"], socket: socket)
        XCTAssertFalse(FileManager.default.fileExists(atPath: missing), "serving never creates a pmem file")

        // Another cache's pmem file.
        let otherBacking = try file("other-backing.img", sizeBytes: 8 << 20)
        let otherCache = try file("other-cache.img", sizeBytes: 8 << 20)
        let otherPmem = pmemPath("other")
        try succeed(["format", "--cache", otherCache, "--backing", otherBacking, "--segment-size", "64K", "--pmem", otherPmem])
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", otherPmem, "--socket", socket],
                   saying: ["the pmem file \(otherPmem) belongs to another cache", "give this cache's pmem file"], socket: socket)

        // A volatile-mode cache served with a pmem file (its own would not exist; give a real one).
        let volatileBacking = try file("volatile-backing.img", sizeBytes: 8 << 20)
        let volatileCache = try file("volatile-cache.img", sizeBytes: 8 << 20)
        try succeed(["format", "--cache", volatileCache, "--backing", volatileBacking, "--segment-size", "64K"])
        try refuse(["serve", "--cache", volatileCache, "--backing", volatileBacking, "--pmem", pmem, "--socket", socket],
                   saying: ["this cache was formatted in volatile mode, and pmem mode was asked for", "serve it without --pmem"], socket: socket)

        // A truncated copy of the right pmem file.
        let truncated = pmemPath("truncated")
        try copy(pmem, to: truncated)
        XCTAssertEqual(Foundation.truncate(truncated, 8192), 0)
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", truncated, "--socket", socket],
                   saying: ["the pmem file \(truncated) holds 8192 bytes but needs \(pmemBytes.count)", "truncated"], socket: socket)

        // A copy with one header byte changed (inside the cache UUID): the checksum catches it.
        let corrupted = pmemPath("corrupted")
        try copy(pmem, to: corrupted)
        var header = try bytes(corrupted)
        header[20] ^= 0x5A
        try header.write(to: URL(fileURLWithPath: corrupted))
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", corrupted, "--socket", socket],
                   saying: ["the pmem file \(corrupted) is damaged (header checksum mismatch)"], socket: socket)
        // And one with its magic changed: not a pmem file at all.
        header[20] ^= 0x5A
        header[0] ^= 0xFF
        try header.write(to: URL(fileURLWithPath: corrupted))
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", corrupted, "--socket", socket],
                   saying: ["\(corrupted) is not a Sluice pmem file"], socket: socket)

        // Both buffers at once: a usage error (ArgumentParser's validation failure, exit 64).
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", pmem, "--volatile", "--socket", socket], status: 64,
                   saying: ["say which buffer the cache uses", "not both"], socket: socket)

        XCTAssertEqual(try bytes(cache), cacheBytes, "the refusals left the cache device as it was")
        XCTAssertEqual(try bytes(pmem), pmemBytes, "the refusals left the pmem file as it was")

        // The cache, served correctly, recovers every acknowledged write.
        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "after the refusals")
        stop(server)

        // format --pmem onto another cache's pmem file: refused without --force, and neither the
        // new cache device nor that pmem file is touched.
        let newBacking = try file("new-backing.img", sizeBytes: 8 << 20)
        let newCache = try file("new-cache.img", sizeBytes: 8 << 20)
        let otherPmemBytes = try bytes(otherPmem)
        try refuse(["format", "--cache", newCache, "--backing", newBacking, "--segment-size", "64K", "--pmem", otherPmem],
                   saying: ["the pmem file \(otherPmem) already holds a Sluice write buffer", "--force"])
        XCTAssertEqual(try bytes(otherPmem), otherPmemBytes, "a refused format leaves the pmem file alone")
        XCTAssertTrue(try bytes(newCache).allSatisfy { $0 == 0 }, "a refused format writes no superblock")
        let otherSocket = directory + "/o.sock"
        server = try serve(cache: otherCache, backing: otherBacking, buffer: ["--pmem", otherPmem], socket: otherSocket)
        stop(server)

        // With --force it is replaced: the new cache serves with it, the old one is refused.
        let forced = try succeed(["format", "--cache", newCache, "--backing", newBacking, "--segment-size", "64K", "--pmem", otherPmem, "--force"])
        XCTAssertTrue(forced.contains("write buffer in pmem file \(otherPmem)"), forced)
        server = try serve(cache: newCache, backing: newBacking, buffer: ["--pmem", otherPmem], socket: otherSocket)
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(otherSocket)")
        try client.write([UInt8](repeating: 0xA7, count: 4096), offset: 4096)
        XCTAssertEqual(try client.read(length: 4096, offset: 4096), [UInt8](repeating: 0xA7, count: 4096))
        stop(server)
        try refuse(["serve", "--cache", otherCache, "--backing", otherBacking, "--pmem", otherPmem, "--socket", otherSocket],
                   saying: ["the pmem file \(otherPmem) belongs to another cache"], socket: otherSocket)

        // A backing store whose canonical path is longer than the superblock records whole: once
        // formatted, the cache could never be served (the shortened identity never matches), so
        // format refuses it before it creates the pmem file.
        var deep = directory
        for level in 0..<5 { deep += "/" + String(repeating: Character(String(level)), count: 240) }
        try FileManager.default.createDirectory(atPath: deep, withIntermediateDirectories: true)
        let deepBacking = try SluiceBinary.makeFile(deep + "/backing.img", sizeBytes: 8 << 20)
        let deepCache = try file("deep-cache.img", sizeBytes: 8 << 20)
        let deepPmem = pmemPath("deep")
        try refuse(["format", "--cache", deepCache, "--backing", deepBacking, "--segment-size", "64K", "--pmem", deepPmem],
                   saying: ["the backing store's canonical path or URI is \(deepBacking.utf8.count) bytes long", "at most 1024"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: deepPmem), "a refused format creates no pmem file")
        XCTAssertTrue(try bytes(deepCache).allSatisfy { $0 == 0 }, "a refused format writes no superblock")

        // The first cache is still whole.
        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "at the end")
        stop(server)
    }

    /// Three rounds of plain writes (no FUA, no flush) on one pmem-mode cache, each ended by
    /// kill -9 once every reply has come: after each restart every sector holds its last
    /// acknowledged write. The ring (63 segments of 1 MiB) wraps over the rounds, the last two
    /// with writeback only when urged. Then a round ended by SIGTERM and one more kill -9. Status before each kill: pmem mode, no partial segment,
    /// drains done, and for 4 KiB-aligned writes a write amplification of at most 1.01.
    func testKillNineInPmemModeKeepsEveryAcknowledgedPlainWrite() throws {
        let volumeBytes = 32 << 20
        let backing = try file("backing.img", sizeBytes: volumeBytes)
        let cache = try file("cache.img", sizeBytes: 64 << 20)
        let image = try file("expected.img", sizeBytes: volumeBytes)
        let socket = directory + "/s.sock"
        let pmem = pmemPath("durability")
        // 1 MiB segments (255 data blocks and one header block): full segments alone cost
        // 256/255 = 1.004 bytes per byte. (256 KiB segments cost 64/63 = 1.016, over 1.01.)
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "1M", "--pmem", pmem])

        // Three rounds ended by kill -9 in a row; then one ended cleanly (its open segment is
        // written as a partial one and the next start trusts the log without a scan), and a last
        // kill -9 after that start.
        let rounds: [(kind: String, count: Int, extra: [String], signal: Int32)] = [
            ("aligned", 6000, [], SIGKILL),
            ("mixed", 8000, ["--writeback-threshold", "0", "--dirty-target", "100"], SIGKILL),
            ("mixed", 8000, ["--writeback-threshold", "0", "--dirty-target", "100"], SIGKILL),
            ("mixed", 2000, [], SIGTERM),
            ("mixed", 2000, ["--writeback-threshold", "0", "--dirty-target", "100"], SIGKILL),
        ]
        var segmentsWritten = 0
        for (round, plan) in rounds.enumerated() {
            let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket, extra: plan.extra)
            try verify(socket: socket, image: image, "round \(round), after the restart")
            let summary = try write(socket: socket, image: image, seed: 100 + round, count: plan.count, kind: plan.kind)
            let state = try status(socket: socket)
            XCTAssertEqual(state["mode"] as? String, "pmem")
            XCTAssertEqual(state["partial_segments"] as? Int, 0, "round \(round): no partial segment in pmem mode without a shutdown or drain")
            XCTAssertGreaterThan(state["pmem_drains"] as? Int ?? 0, 0, "round \(round)")
            XCTAssertEqual(state["user_bytes_written"] as? Int, summary["bytes"] as? Int, "round \(round)")
            XCTAssertEqual(state["failure"] as? String, nil, "round \(round)")
            let written = state["segments_written"] as? Int ?? 0
            XCTAssertGreaterThanOrEqual(written, plan.count / 400, "round \(round): sealed segments reach the cache device")
            segmentsWritten += written
            if plan.kind == "aligned" {
                let amplification = try XCTUnwrap(state["write_amplification"] as? Double)
                XCTAssertLessThanOrEqual(amplification, 1.01, "round \(round): 4 KiB-aligned writes fill whole blocks of full segments")
                XCTAssertGreaterThan(amplification, 0.9, "round \(round): \(written) segments for \(summary["bytes"] ?? 0) bytes")
            }
            stop(server, signal: plan.signal)
        }

        // Recovery once more: everything is there, the ring has wrapped, and a drain leaves the
        // backing file alone equal to the expected image.
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "after the last restart")
        let state = try status(socket: socket)
        let segmentCount = try XCTUnwrap(state["segment_count"] as? Int)
        XCTAssertGreaterThan(state["current_segment_id"] as? Int ?? 0, segmentCount,
                             "the ring wrapped (\(segmentsWritten) segments written by the engine over \(segmentCount) slots)")
        let drained = try succeed(["drain", "--socket", socket])
        XCTAssertTrue(drained.contains("drained: 0 dirty blocks"), drained)
        stop(server)
        XCTAssertTrue(sameBytes([UInt8](try bytes(backing)), [UInt8](try bytes(image))), "after a drain the backing file holds every acknowledged write")
    }

    /// pmem → volatile → pmem with acknowledged plain writes in the open pmem segment at a kill -9:
    /// nothing is lost on the way, the left pmem file is invalidated, switching to the current mode
    /// is refused, and a final drain (after one more kill -9) leaves the backing file equal to every
    /// write.
    func testModeSwitchRoundTripKeepsEveryWrite() throws {
        let volumeBytes = 16 << 20
        let backing = try file("backing.img", sizeBytes: volumeBytes)
        let cache = try file("cache.img", sizeBytes: 16 << 20)
        let image = try file("expected.img", sizeBytes: volumeBytes)
        let socket = directory + "/s.sock"
        let first = pmemPath("first")
        let second = pmemPath("second")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", first])

        var server = try serve(cache: cache, backing: backing, buffer: ["--pmem", first], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try write(socket: socket, image: image, seed: 7, count: 1500, kind: "mixed")
        let before = try status(socket: socket)
        let openBlocks = try XCTUnwrap(before["buffer_blocks"] as? Int)
        XCTAssertGreaterThan(openBlocks, 0, "the open pmem segment holds acknowledged writes at the kill")
        stop(server, signal: SIGKILL)

        // Leave pmem mode: the open segment's blocks are moved to the cache device.
        let left = try succeed(["mode", "--cache", cache, "--backing", backing, "--volatile", "--pmem", first])
        XCTAssertTrue(left.contains("from pmem to volatile mode"), left)
        XCTAssertTrue(left.contains("and \(openBlocks) open-segment blocks moved from pmem"), "expected \(openBlocks) open-segment blocks: \(left)")
        XCTAssertTrue(try bytes(first).prefix(4096).allSatisfy { $0 == 0 }, "the pmem file's header is invalidated")
        try refuse(["mode", "--cache", cache, "--backing", backing, "--volatile", "--pmem", first],
                   saying: ["the cache is already in volatile mode; nothing to do"])
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", first, "--socket", socket],
                   saying: ["this cache was formatted in volatile mode"], socket: socket)

        server = try serve(cache: cache, backing: backing, buffer: ["--volatile"], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        XCTAssertEqual(try status(socket: socket)["mode"] as? String, "volatile")
        try verify(socket: socket, image: image, "in volatile mode")
        try write(socket: socket, image: image, seed: 8, count: 300, kind: "mixed")
        stop(server)

        // Entering pmem mode onto another cache's pmem file is refused without --force.
        let otherCache = try file("other-cache.img", sizeBytes: 8 << 20)
        let otherPmem = pmemPath("other")
        try succeed(["format", "--cache", otherCache, "--backing", try file("other-backing.img", sizeBytes: 8 << 20),
                     "--segment-size", "64K", "--pmem", otherPmem])
        try refuse(["mode", "--cache", cache, "--backing", backing, "--pmem", otherPmem],
                   saying: ["the pmem file \(otherPmem) already holds a Sluice write buffer", "repeat the command with --force"])

        // Enter pmem mode with a new file; the old, invalidated one is refused.
        let entered = try succeed(["mode", "--cache", cache, "--backing", backing, "--pmem", second])
        XCTAssertTrue(entered.contains("from volatile to pmem mode"), entered)
        let third = pmemPath("third")
        try refuse(["mode", "--cache", cache, "--backing", backing, "--pmem", third],
                   saying: ["the cache is already in pmem mode; nothing to do"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: third), "a refused mode switch creates no pmem file")
        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", first, "--socket", socket],
                   saying: ["\(first) is not a Sluice pmem file"], socket: socket)

        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", second], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        XCTAssertEqual(try status(socket: socket)["mode"] as? String, "pmem")
        try verify(socket: socket, image: image, "back in pmem mode")
        try write(socket: socket, image: image, seed: 9, count: 500, kind: "mixed")
        XCTAssertGreaterThan(try status(socket: socket)["dirty_blocks"] as? Int ?? 0, 0, "there is something to drain")
        var drained = try succeed(["drain", "--socket", socket])
        XCTAssertTrue(drained.contains("drained: 0 dirty blocks"), drained)
        try verify(socket: socket, image: image, "after the drain")
        // Writes after the drain's partial segment, then kill -9: the new pmem file recovers them.
        try write(socket: socket, image: image, seed: 10, count: 500, kind: "mixed")
        stop(server, signal: SIGKILL)
        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", second], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try verify(socket: socket, image: image, "after a kill -9 in the new pmem file")
        drained = try succeed(["drain", "--socket", socket])
        XCTAssertTrue(drained.contains("drained: 0 dirty blocks"), drained)
        stop(server)
        XCTAssertTrue(sameBytes([UInt8](try bytes(backing)), [UInt8](try bytes(image))), "after a drain the backing file holds every acknowledged write")
    }

    /// `sluice mode` (and `format --force`) while a server holds the cache open are refused, name
    /// the locked file, change nothing, and the server goes on serving.
    func testModeIsRefusedWhileAServerHoldsTheCache() throws {
        let backing = try file("backing.img", sizeBytes: 8 << 20)
        let cache = try file("cache.img", sizeBytes: 8 << 20)
        let image = try file("expected.img", sizeBytes: 8 << 20)
        let socket = directory + "/s.sock"
        let pmem = pmemPath("held")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", pmem])
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try write(socket: socket, image: image, seed: 3, count: 200, kind: "mixed")

        try refuse(["mode", "--cache", cache, "--backing", backing, "--volatile", "--pmem", pmem],
                   saying: ["\(cache) is already in use by another process", "stop that first"])
        let other = pmemPath("other")
        try refuse(["mode", "--cache", cache, "--backing", backing, "--pmem", other],
                   saying: ["\(cache) is already in use by another process"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: other))
        try refuse(["format", "--cache", cache, "--backing", backing, "--pmem", pmem, "--force"],
                   saying: ["\(cache) is already in use by another process"])
        XCTAssertTrue(try bytes(pmem).prefix(8) == Data("SLUICEPM".utf8), "the pmem file is untouched")

        try verify(socket: socket, image: image, "while the refusals ran")
        try write(socket: socket, image: image, seed: 4, count: 200, kind: "mixed")
        XCTAssertEqual(try status(socket: socket)["mode"] as? String, "pmem")
        stop(server)
        let again = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "after a clean restart")
        stop(again)
    }

    // MARK: - The python3-libnbd writer

    private static let writerScript = #"""
    # Plain NBD writes (no FUA, no flush) through python3-libnbd; prints a JSON summary.
    # usage: writer.py URI IMAGE SEED COUNT aligned|mixed
    # IMAGE is the expected volume: it is updated with every acknowledged write and rewritten.
    import json, os, random, struct, sys
    import nbd

    uri, image_path, seed, count, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    assert kind in ("aligned", "mixed")
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    with open(image_path, "rb") as f:
        image = bytearray(f.read())
    assert len(image) == size, (len(image), size)
    rng = random.Random(seed)
    sectors, blocks = size // 512, size // 4096
    QUEUE = 64
    summary = {"writes": 0, "aligned": 0, "sub_block": 0, "bytes": 0}

    def next_write(number):
        if kind == "aligned" or rng.random() < 0.6:
            first, n = rng.randrange(blocks) * 8, 8
        elif rng.random() < 0.5:
            # 512 bytes at a sector that does not start a block.
            first, n = rng.randrange(blocks) * 8 + rng.randrange(1, 8), 1
        else:
            # 1 to 7 sectors anywhere, crossing a block boundary or not.
            n = rng.randrange(1, 8)
            first = rng.randrange(sectors - n + 1)
        data = bytearray(rng.randbytes(n * 512))
        tag = seed << 32 | number
        for i in range(n):
            struct.pack_into("<QQ", data, i * 512, tag, first + i)
        return first, n, data

    number = 0
    carried = None
    while number < count or carried is not None:
        batch, busy = [], set()
        while len(batch) < QUEUE and (number < count or carried is not None):
            if carried is None:
                number += 1
                carried = next_write(number)
            first, n, data = carried
            if any(s in busy for s in range(first, first + n)):
                break  # overlaps a write in flight: it goes first in the next batch
            busy.update(range(first, first + n))
            buffer = nbd.Buffer.from_bytearray(data)
            batch.append((h.aio_pwrite(buffer, first * 512), buffer, first, n, data))
            carried = None
        for cookie, _, _, _, _ in batch:
            while not h.aio_command_completed(cookie):  # raises if the write failed
                h.poll(-1)
        for _, _, first, n, data in batch:
            image[first * 512:(first + n) * 512] = data
            summary["writes"] += 1
            summary["bytes"] += n * 512
            summary["aligned" if n == 8 and first % 8 == 0 else "sub_block"] += 1

    with open(image_path + ".new", "wb") as f:
        f.write(image)
    os.replace(image_path + ".new", image_path)
    print(json.dumps(summary))
    """#
}
