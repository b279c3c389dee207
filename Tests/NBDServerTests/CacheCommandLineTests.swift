import Foundation
import NBDClient
import SluiceCache
import SluiceControl
import XCTest
import SluiceTesting

/// `sluice format`, `sluice serve --cache` and the control commands, as a user runs them: refusals
/// with their messages, kill -9 in the middle of a workload, recovery, status, set and drain.
final class CacheCommandLineTests: XCTestCase {
    private var directory = ""

    override func setUpWithError() throws {
        directory = try TestServer.makeTemporaryDirectory(base: "/tmp")
    }

    /// Processes a test started beside the server (nbdkit), stopped after it.
    private var helpers: [Process] = []

    override func tearDown() {
        for process in helpers { stop(process) }
        helpers.removeAll()
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func makeFile(_ name: String, sizeBytes: Int) throws -> String {
        try SluiceBinary.makeFile(directory + "/" + name, sizeBytes: sizeBytes)
    }

    @discardableResult
    private func run(_ arguments: [String]) throws -> (status: Int32, output: String, errors: String) {
        try SluiceBinary.run(arguments)
    }

    private func startServer(cache: String, backing: String, socket: String, extra: [String] = []) throws -> Process {
        try SluiceBinary.startServer(["serve", "--cache", cache, "--backing", backing, "--volatile", "--socket", socket, "--log-level", "warning"] + extra,
                                     socket: socket)
    }

    private func stop(_ process: Process, signal: Int32 = SIGTERM) {
        SluiceBinary.stop(process, signal: signal)
    }

    /// Starts nbdkit serving `arguments` on a Unix socket (stopped in tearDown); returns its URI.
    private func startNBDKit(_ arguments: [String], socket: String) throws -> String {
        let nbdkit = Process()
        nbdkit.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        nbdkit.arguments = ["-f", "-U", socket] + arguments
        nbdkit.standardError = FileHandle.nullDevice
        try nbdkit.run()
        helpers.append(nbdkit)
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: socket) { usleep(20_000) }
        return "nbd+unix:///?socket=\(socket)"
    }

    func testEveryWrongCacheIsRefusedWithItsReasonAndNothingIsFormattedImplicitly() throws {
        let backing = try makeFile("backing.img", sizeBytes: 8 << 20)
        let other = try makeFile("other.img", sizeBytes: 8 << 20)
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"

        var result = try run(["serve", "--cache", cache, "--backing", backing, "--volatile", "--socket", socket])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("not formatted") && result.errors.contains("sluice format"), result.errors)

        result = try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K"])
        XCTAssertEqual(result.status, 0, result.errors)
        XCTAssertTrue(result.output.contains("formatted"), result.output)
        result = try run(["format", "--cache", cache, "--backing", backing])
        XCTAssertEqual(result.status, 1, "a second format without --force is refused")
        XCTAssertTrue(result.errors.contains("already holds a Sluice cache"), result.errors)

        result = try run(["serve", "--cache", cache, "--backing", other, "--volatile", "--socket", socket])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("belongs to backing store"), result.errors)

        result = try run(["serve", "--cache", cache, "--backing", backing, "--socket", socket])
        XCTAssertNotEqual(result.status, 0, "the buffer mode must be named")
        XCTAssertTrue(result.errors.contains("--volatile"), result.errors)

        // A damaged superblock header.
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: cache))
        try handle.seek(toOffset: 40)
        try handle.write(contentsOf: Data([0xFF, 0xEE]))
        try handle.close()
        result = try run(["serve", "--cache", cache, "--backing", backing, "--volatile", "--socket", socket])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("damaged") || result.errors.contains("checksum") || result.errors.contains("corrupt"), result.errors)

        // A truncated cache device.
        result = try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--force"])
        XCTAssertEqual(result.status, 0, result.errors)
        XCTAssertEqual(truncate(cache, 1 << 20), 0)
        result = try run(["serve", "--cache", cache, "--backing", backing, "--volatile", "--socket", socket])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("truncated"), result.errors)
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "nothing was served")

        // A remote backing export that does not answer.
        let nowhere = "nbd+unix:///?socket=\(directory)/nobody-listens.sock"
        result = try run(["format", "--cache", cache, "--backing", nowhere, "--force"])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("cannot connect to the backing export"), result.errors)
        result = try run(["serve", "--cache", cache, "--backing", nowhere, "--volatile", "--socket", socket])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.errors.contains("cannot connect to the backing export"), result.errors)
    }

    /// Random writes with FUA and flushes on a small cache whose ring wraps; kill -9; restart;
    /// every write acknowledged with FUA or before an acknowledged flush is there, and every
    /// sector holds a value that was written to it. Then a drain leaves the backing file alone
    /// equal to what the clients wrote.
    func testKillNineKeepsEveryDurableWriteAndDrainLeavesTheBackingStoreComplete() throws {
        let volumeBytes = 4 << 20
        let backing = try makeFile("backing.img", sizeBytes: volumeBytes)
        let cache = try makeFile("cache.img", sizeBytes: 2 << 20)
        let socket = directory + "/s.sock"
        XCTAssertEqual(try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K"]).status, 0)

        let sectors = volumeBytes / 512
        // Per sector: the tags written to it in order (0 = the initial zeros), and how many of them
        // are known durable.
        var history = [[UInt32]](repeating: [0], count: sectors)
        var durableCount = [Int](repeating: 1, count: sectors)
        var generator = SplitMix64(seed: 2026)
        var tag: UInt32 = 0
        func sectorBytes(_ tag: UInt32) -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: 512)
            withUnsafeBytes(of: tag.littleEndian) { bytes.replaceSubrange(0..<4, with: $0) }
            for i in 4..<512 { bytes[i] = UInt8(truncatingIfNeeded: tag &* 31 &+ UInt32(i)) }
            return bytes
        }

        for cycle in 0..<3 {
            let server = try startServer(cache: cache, backing: backing, socket: socket)
            let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
            // Everything durable so far must be there.
            let image = try client.read(length: volumeBytes, offset: 0)
            for sector in 0..<sectors {
                let found = image[(sector * 512)..<(sector * 512 + 512)]
                let candidates = history[sector][(durableCount[sector] - 1)...]
                let match = candidates.last { tag in tag == 0 ? found.allSatisfy { $0 == 0 } : Array(found) == sectorBytes(tag) }
                XCTAssertNotNil(match, "cycle \(cycle): sector \(sector) holds a value never written there or older than a durable one")
                if let match {
                    // What the sector holds now is its only value from here on.
                    history[sector] = [match]
                    durableCount[sector] = 1
                }
            }
            for _ in 0..<300 {
                let sectorCount = Int.random(in: 1...24, using: &generator)
                let first = Int.random(in: 0...(sectors - sectorCount), using: &generator)
                tag += 1
                var bytes: [UInt8] = []
                for _ in 0..<sectorCount { bytes += sectorBytes(tag) }
                let fua = Int.random(in: 0..<10, using: &generator) == 0
                try client.write(bytes, offset: UInt64(first * 512), flags: fua ? NBDFlag.fua : 0)
                for sector in first..<(first + sectorCount) {
                    history[sector].append(tag)
                    if fua { durableCount[sector] = history[sector].count }
                }
                if Int.random(in: 0..<25, using: &generator) == 0 {
                    try client.flush()
                    for sector in 0..<sectors { durableCount[sector] = history[sector].count }
                }
            }
            stop(server, signal: SIGKILL)
        }

        // Recover once more, drain, stop cleanly: the backing file alone holds the image.
        let server = try startServer(cache: cache, backing: backing, socket: socket)
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        let image = try client.read(length: volumeBytes, offset: 0)
        let drained = try run(["drain", "--socket", socket])
        XCTAssertEqual(drained.status, 0, drained.errors)
        XCTAssertTrue(drained.output.contains("0 dirty blocks"), drained.output)
        stop(server)
        let backingImage = try Data(contentsOf: URL(fileURLWithPath: backing))
        XCTAssertEqual(Array(backingImage), image, "after a drain the backing file equals what the server served")
    }

    /// A formatted 4 MiB cache (64 KiB segments) over an 8 MiB sparse backing file, served with no
    /// writeback but what is asked for.
    private func startIdleWritebackServer() throws -> (socket: String, server: Process) {
        let backing = try makeFile("backing.img", sizeBytes: 8 << 20)
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"
        XCTAssertEqual(try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K"]).status, 0)
        let server = try startServer(cache: cache, backing: backing, socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        return (socket, server)
    }

    /// Malformed control requests, sent as a script would (past the CLI's own checks): each is
    /// answered with its status and the fix, nothing changes, and the server keeps serving.
    func testMalformedControlRequestsAreRefusedAndChangeNothing() throws {
        let (socket, server) = try startIdleWritebackServer()
        defer { stop(server) }
        let control = ControlClient(socketPath: socket + ".control")
        func refusal(_ method: String, _ path: String) -> (Int, String)? {
            do {
                _ = try control.request(method: method, path: path)
                return nil
            } catch ControlError.failed(let status, let message) {
                return (status, message)
            } catch {
                return (-1, "\(error)")
            }
        }
        let badMode = refusal("POST", "/set?key=cache_mode&value=sideways")
        XCTAssertEqual(badMode?.0, 400)
        XCTAssertTrue(badMode?.1.contains("writeback, writethrough, writearound, passthrough") ?? false, "\(String(describing: badMode))")
        XCTAssertEqual(refusal("POST", "/set?key=cache_mode")?.0, 400, "no value")
        XCTAssertEqual(refusal("POST", "/set?key=high_watermark&value=high")?.0, 400, "not an integer")
        XCTAssertEqual(refusal("POST", "/set?key=no_such_tunable&value=1")?.0, 400)
        XCTAssertEqual(refusal("GET", "/nowhere")?.0, 404)
        let status = try XCTUnwrap(JSONSerialization.jsonObject(with: try control.request(method: "GET", path: "/status")) as? [String: Any])
        XCTAssertEqual(status["cache_mode"] as? String, "writeback", "the refused requests changed nothing")
        XCTAssertEqual((status["tunables"] as? [String: Int])?["high_watermark"], 50)
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        try client.write([UInt8](repeating: 3, count: 4096), offset: 0)
        XCTAssertEqual(try client.read(length: 4096, offset: 0), [UInt8](repeating: 3, count: 4096), "the server still serves")
    }

    func testStatusSetAndDrainTalkToTheRunningServer() throws {
        let (socket, server) = try startIdleWritebackServer()
        defer { stop(server) }
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        try client.write([UInt8](repeating: 0xAB, count: 3 * 4096), offset: 0)
        try client.write([UInt8](repeating: 0xCD, count: 512), offset: 1 << 20, flags: NBDFlag.fua)

        let status = try run(["status", "--json", "--socket", socket])
        XCTAssertEqual(status.status, 0, status.errors)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(status.output.utf8)) as? [String: Any])
        XCTAssertEqual(json["mode"] as? String, "volatile")
        XCTAssertEqual(json["dirty_blocks"] as? Int, 4)
        XCTAssertEqual(json["partial_segments"] as? Int, 1)
        XCTAssertEqual(json["user_bytes_written"] as? Int, 3 * 4096 + 512)
        XCTAssertNotNil(json["cache_bytes_written"])
        XCTAssertEqual(json["backing_bytes_written"] as? Int, 0, "writeback_threshold 0: nothing written back yet")
        XCTAssertEqual((json["tunables"] as? [String: Int])?["writeback_threshold"], 0)
        XCTAssertEqual(json["backing_flush"] as? String, "flush", "a backing file is synced with fdatasync")

        let human = try run(["status", "--socket", socket])
        XCTAssertTrue(human.output.contains("dirty") && human.output.contains("write_miss_buffer_full"), human.output)

        XCTAssertEqual(try run(["set", "--socket", socket, "barrier_deadline_ms", "3"]).status, 0)
        let bad = try run(["set", "--socket", socket, "no_such_tunable", "1"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.errors.contains("unknown tunable"), bad.errors)
        let outOfRange = try run(["set", "--control", socket + ".control", "writeback_threshold", "101"])
        XCTAssertEqual(outOfRange.status, 1)
        XCTAssertTrue(outOfRange.errors.contains("between 0 and 100"), outOfRange.errors)

        let drained = try run(["drain", "--socket", socket])
        XCTAssertEqual(drained.status, 0, drained.errors)
        let after = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(after["dirty_blocks"] as? Int, 0)
        XCTAssertEqual(after["backing_bytes_written"] as? Int, 3 * 4096 + 512)
        XCTAssertEqual(after["backing_write_requests"] as? Int, 2, "two contiguous dirty runs, two backing writes")
        XCTAssertEqual((after["tunables"] as? [String: Int])?["barrier_deadline_ms"], 3)
        let nowhere = try run(["status", "--socket", directory + "/nothing.sock"])
        XCTAssertEqual(nowhere.status, 1)
        XCTAssertTrue(nowhere.errors.contains("cannot reach"), nowhere.errors)
    }

    /// Read caching through the built binary: a read miss is cached, so reading it again costs the
    /// backing store nothing and status counts the fill and the hit; `set read_promote_hits 0`
    /// turns read caching off for the next misses; a bad value is refused.
    func testReadMissesAreCachedAndReadCachingCanBeTurnedOff() throws {
        let (socket, server) = try startIdleWritebackServer()
        defer { stop(server) }
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        func status() throws -> [String: Any] {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        }
        _ = try client.read(length: 64 * 1024, offset: 1 << 20)
        let first = try status()
        XCTAssertEqual(first["read_fills"] as? Int, 16, "sixteen whole-block misses cached")
        XCTAssertEqual(first["backing_bytes_read"] as? Int, 64 * 1024)
        _ = try client.read(length: 64 * 1024, offset: 1 << 20)
        let second = try status()
        XCTAssertEqual(second["backing_bytes_read"] as? Int, 64 * 1024, "the second read hit the cache")
        // 64 KiB segments hold 15 data blocks: 15 hits come from the cache device, one from the buffer.
        let hits = (second["block_counts"] as? [String: Int] ?? [:]).filter { $0.key.hasPrefix("read_hit") }.values.reduce(0, +)
        XCTAssertEqual(hits, 16)
        XCTAssertEqual(second["read_hit_ratio"] as? Double, 0.5)

        XCTAssertEqual(try run(["set", "--socket", socket, "read_promote_hits", "0"]).status, 0)
        let refused = try run(["set", "--socket", socket, "read_promote_hits", "256"])
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.errors.contains("between 0 and 255"), refused.errors)
        _ = try client.read(length: 4096, offset: 2 << 20)
        let off = try status()
        XCTAssertEqual(off["read_fills"] as? Int, 16, "read_promote_hits 0: nothing more cached")
        XCTAssertEqual((off["tunables"] as? [String: Int])?["read_promote_hits"], 0)
    }

    /// Cache modes as a user meets them: a cache formatted writethrough keeps every acknowledged
    /// write on the backing store, so after kill -9 the backing file alone is complete (the cache
    /// device is deleted); `set cache_mode` switches a running cache and status shows it; `sluice
    /// mode --cache-mode` switches offline and the next server keeps it; pmem mode takes them too.
    func testWritethroughLosesNothingWithTheCacheDeviceAndModesSwitchOnlineAndOffline() throws {
        let backing = try makeFile("backing.img", sizeBytes: 8 << 20)
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"
        var result = try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--cache-mode", "writethrough"])
        XCTAssertEqual(result.status, 0, result.errors)
        XCTAssertTrue(result.output.contains("writethrough mode"), result.output)
        var server = try startServer(cache: cache, backing: backing, socket: socket)
        var client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for index in 0..<64 {
            let offset = (index * 7919 % 250) * 4096
            let bytes = [UInt8](repeating: UInt8(index + 1), count: 4096)
            try client.write(bytes, offset: UInt64(offset))
            expected.replaceSubrange(offset..<(offset + 4096), with: bytes)
        }
        try client.flush()
        XCTAssertEqual(try client.read(length: 1 << 20, offset: 0), expected, "reads before the crash")
        let status = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(status["cache_mode"] as? String, "writethrough")
        XCTAssertEqual(status["dirty_blocks"] as? Int, 0, "writethrough leaves nothing dirty")
        XCTAssertEqual(status["bypass_writes"] as? Int, 64)
        XCTAssertGreaterThan(status["write_through_copies"] as? Int ?? 0, 0, "written blocks are cached clean")
        stop(server, signal: SIGKILL)
        try FileManager.default.removeItem(atPath: cache)
        let onBacking = try XCTUnwrap(FileManager.default.contents(atPath: backing))
        XCTAssertEqual(Array(onBacking[0..<(1 << 20)]), expected, "the backing store alone holds every acknowledged write")

        // A new cache in writeback mode, switched while serving.
        _ = try makeFile("cache.img", sizeBytes: 4 << 20)
        XCTAssertEqual(try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K"]).status, 0)
        server = try startServer(cache: cache, backing: backing, socket: socket)
        client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        try client.write([UInt8](repeating: 0xEE, count: 8192), offset: 2 << 20)
        // The volume checks the value (the client parses no setting), and its message names the modes.
        let refused = try run(["set", "--socket", socket, "cache_mode", "sideways"])
        XCTAssertEqual(refused.status, 1, refused.errors)
        XCTAssertTrue(refused.errors.contains("writeback, writethrough, writearound, passthrough"), refused.errors)
        result = try run(["set", "--socket", socket, "cache_mode", "passthrough"])
        XCTAssertEqual(result.status, 0, result.errors)
        try client.write([UInt8](repeating: 0xDD, count: 4096), offset: 3 << 20)
        XCTAssertEqual(try client.read(length: 8192, offset: 2 << 20), [UInt8](repeating: 0xEE, count: 8192), "dirty data is still served")
        XCTAssertEqual(try run(["drain", "--socket", socket]).status, 0)
        let switched = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(switched["cache_mode"] as? String, "passthrough")
        XCTAssertEqual(switched["bypass_writes"] as? Int, 1)
        XCTAssertEqual(switched["dirty_blocks"] as? Int, 0)
        stop(server)

        // Offline: the next server keeps the recorded mode.
        result = try run(["mode", "--cache", cache, "--backing", backing, "--cache-mode", "writearound"])
        XCTAssertEqual(result.status, 0, result.errors)
        XCTAssertTrue(result.output.contains("from passthrough to writearound"), result.output)
        server = try startServer(cache: cache, backing: backing, socket: socket)
        let restarted = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(restarted["cache_mode"] as? String, "writearound")
        stop(server)
        let onDisk = try XCTUnwrap(FileManager.default.contents(atPath: backing))
        XCTAssertEqual(Array(onDisk[(2 << 20)..<((2 << 20) + 8192)]), [UInt8](repeating: 0xEE, count: 8192))
        XCTAssertEqual(Array(onDisk[(3 << 20)..<((3 << 20) + 4096)]), [UInt8](repeating: 0xDD, count: 4096))

        // Pmem mode takes the modes too, and the status says so.
        let pmemCache = try makeFile("pmem-cache.img", sizeBytes: 4 << 20)
        let pmemBacking = try makeFile("b2.img", sizeBytes: 8 << 20)
        let pmem = directory + "/buffer.pmem"
        result = try run(["format", "--cache", pmemCache, "--backing", pmemBacking, "--segment-size", "64K",
                          "--pmem", pmem, "--cache-mode", "writearound"])
        XCTAssertEqual(result.status, 0, result.errors)
        let pmemSocket = directory + "/p.sock"
        server = try SluiceBinary.startServer(["serve", "--cache", pmemCache, "--backing", pmemBacking, "--pmem", pmem, "--socket", pmemSocket,
                                               "--log-level", "warning"], socket: pmemSocket)
        defer { stop(server) }
        let pmemClient = try NBDClient(uri: "nbd+unix:///?socket=\(pmemSocket)")
        try pmemClient.write([UInt8](repeating: 0x5A, count: 4096), offset: 0, flags: 1)
        let pmemStatus = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", pmemSocket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(pmemStatus["cache_mode"] as? String, "writearound")
        XCTAssertEqual(pmemStatus["mode"] as? String, "pmem")
        XCTAssertEqual(pmemStatus["bypass_writes"] as? Int, 1)
        let written = try XCTUnwrap(FileManager.default.contents(atPath: pmemBacking))
        XCTAssertEqual(Array(written[0..<4096]), [UInt8](repeating: 0x5A, count: 4096), "a FUA writearound write is on the backing store")
    }

    /// A backing store that fails (nbdkit's error filter, switched on by a file): in writeback mode
    /// writeback keeps the data dirty and retries, reads and writes go on, and once the errors stop
    /// a drain leaves the export complete; in writethrough mode a write the backing store fails is
    /// answered EIO and the server keeps serving every other request.
    func testAFailingBackingStoreLosesNothingAndEveryRequestIsAnswered() throws {
        let image = try makeFile("remote.img", sizeBytes: 8 << 20)
        let remoteSocket = directory + "/remote.sock"
        let inject = directory + "/inject"
        let uri = try startNBDKit(["--filter=error", "file", image, "error-pwrite-rate=100%", "error-pwrite-file=\(inject)", "error=EIO"],
                                  socket: remoteSocket)
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"
        XCTAssertEqual(try run(["format", "--cache", cache, "--backing", uri, "--segment-size", "64K"]).status, 0)
        let server = try startServer(cache: cache, backing: uri, socket: socket, extra: ["--writeback-threshold", "100"])
        defer { stop(server) }
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        func status() throws -> [String: Any] {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        }
        XCTAssertTrue(FileManager.default.createFile(atPath: inject, contents: nil))
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for block in stride(from: 0, to: 128, by: 2) {
            let bytes = [UInt8](repeating: UInt8(block + 1), count: 4096)
            try client.write(bytes, offset: UInt64(block * 4096))
            expected.replaceSubrange((block * 4096)..<((block + 1) * 4096), with: bytes)
        }
        try client.flush()
        var failing = try status()
        for _ in 0..<100 where (failing["writeback_errors"] as? Int ?? 0) == 0 {
            usleep(50_000)
            failing = try status()
        }
        XCTAssertGreaterThan(failing["writeback_errors"] as? Int ?? 0, 0, "writeback met the errors")
        XCTAssertEqual(failing["dirty_blocks"] as? Int, 64, "nothing was marked clean")
        XCTAssertEqual(try client.read(length: 1 << 20, offset: 0), expected, "reads are served while writeback fails")

        // Writethrough: the failed write is answered, the server goes on.
        XCTAssertEqual(try run(["set", "--socket", socket, "cache_mode", "writethrough"]).status, 0)
        XCTAssertThrowsError(try client.write([UInt8](repeating: 0xAA, count: 4096), offset: UInt64(201 * 4096)),
                             "a writethrough write the backing store fails is not acknowledged")
        XCTAssertEqual(try client.read(length: 8192, offset: 0), Array(expected[0..<8192]), "the connection still serves")
        XCTAssertEqual(try run(["set", "--socket", socket, "cache_mode", "writeback"]).status, 0)

        try FileManager.default.removeItem(atPath: inject)
        let drained = try run(["drain", "--socket", socket])
        XCTAssertEqual(drained.status, 0, drained.errors)
        XCTAssertEqual(try status()["dirty_blocks"] as? Int, 0)
        let remote = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(Array(remote[0..<(1 << 20)]), expected, "every write reached the export once it stopped failing")
    }

    /// A failing cache device: the cache device is an nbdkit export with its error filter (switched
    /// on by a file), mounted as a file with nbdfuse. Reads of clean copies are served from the
    /// backing store; past `--io-error-limit` the cache degrades to passthrough (status says why,
    /// new writes go to the backing store), and every request is answered.
    func testCacheDeviceErrorsPastTheLimitDegradeTheRunningServerToPassthrough() throws {
        let image = try makeFile("cache-image.img", sizeBytes: 4 << 20)
        let backing = try makeFile("backing.img", sizeBytes: 8 << 20)
        try Data(repeating: 7, count: 1 << 20).write(to: URL(fileURLWithPath: backing))
        try FileHandle(forWritingAtPath: backing).map { handle in handle.truncateFile(atOffset: 8 << 20); handle.closeFile() }
        let mountPoint = directory + "/mnt"
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        let inject = directory + "/inject"
        let fuse = Process()
        fuse.executableURL = URL(fileURLWithPath: "/usr/bin/nbdfuse")
        fuse.arguments = [mountPoint + "/dev", "--command", "nbdkit", "-s", "--filter=error", "file", image,
                          "error-pread-rate=100%", "error-pread-file=\(inject)", "error=EIO"]
        fuse.standardError = FileHandle.nullDevice
        try fuse.run()
        defer {
            _ = try? SluiceBinary.runProgram("/usr/bin/umount", [mountPoint])
            fuse.waitUntilExit()
        }
        let cache = mountPoint + "/dev"
        for _ in 0..<250 where (try? FileManager.default.attributesOfItem(atPath: cache)[.size] as? Int) != 4 << 20 { usleep(20_000) }
        XCTAssertEqual(try run(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K"]).status, 0)
        let socket = directory + "/s.sock"
        let server = try startServer(cache: cache, backing: backing, socket: socket, extra: ["--io-error-limit", "2"])
        defer { stop(server) }
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        func status() throws -> [String: Any] {
            try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        }
        _ = try client.read(length: 32 * 4096, offset: 0)
        for block in 100..<220 { try client.write([UInt8](repeating: UInt8(block % 250 + 1), count: 4096), offset: UInt64(block * 4096)) }
        try client.flush()
        XCTAssertEqual(try status()["read_fills"] as? Int, 32, "the first read cached its misses")
        XCTAssertTrue(FileManager.default.createFile(atPath: inject, contents: nil))
        XCTAssertEqual(try client.read(length: 32 * 4096, offset: 0), [UInt8](repeating: 7, count: 32 * 4096),
                       "clean copies the cache device cannot read come from the backing store")
        let degraded = try status()
        XCTAssertGreaterThan(degraded["reads_retried_from_backing"] as? Int ?? 0, 0)
        XCTAssertGreaterThan(degraded["cache_device_errors"] as? Int ?? 0, 2)
        XCTAssertTrue((degraded["degraded"] as? String ?? "").contains("io_error_limit"), "\(degraded["degraded"] ?? "not degraded")")
        try client.write([UInt8](repeating: 0x55, count: 4096), offset: UInt64(600 * 4096))
        XCTAssertEqual(try status()["bypass_writes"] as? Int, 1, "degraded: a new write goes to the backing store")
        let text = try run(["status", "--socket", socket]).output
        XCTAssertTrue(text.contains("DEGRADED"), text)
        try FileManager.default.removeItem(atPath: inject)
        XCTAssertEqual(try run(["drain", "--socket", socket]).status, 0, "once reads work again, what is dirty is written back")
        let onBacking = try Data(contentsOf: URL(fileURLWithPath: backing))
        XCTAssertEqual(Array(onBacking[(600 * 4096)..<(601 * 4096)]), [UInt8](repeating: 0x55, count: 4096))
        XCTAssertEqual(Array(onBacking[(219 * 4096)..<(220 * 4096)]), [UInt8](repeating: UInt8(219 % 250 + 1), count: 4096))
    }

    /// BLOCK_STATUS on a cache over a sparse backing file: blocks the cache holds dirty are data
    /// although the backing file has holes there; after a drain the backing file has the data.
    func testBlockStatusReportsDirtyBlocksAsData() throws {
        let (socket, server) = try startIdleWritebackServer()
        defer { stop(server) }
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertTrue(client.canBlockStatus)
        let hole: UInt32 = 3
        func map() throws -> [[UInt32]] { try client.blockStatus(length: 8 << 20, offset: 0).map { [$0.0, $0.1] } }
        XCTAssertEqual(try map(), [[8 << 20, hole]], "an empty cache over a sparse file")
        try client.write([UInt8](repeating: 0xAB, count: 3 * 4096), offset: 0)
        try client.write([UInt8](repeating: 0xCD, count: 512), offset: 1 << 20)
        let expected: [[UInt32]] = [[3 * 4096, 0], [(1 << 20) - 3 * 4096, hole], [4096, 0], [(7 << 20) - 4096, hole]]
        XCTAssertEqual(try map(), expected, "dirty blocks over holes")
        XCTAssertEqual(try run(["drain", "--socket", socket]).status, 0)
        XCTAssertEqual(try map(), expected, "written back: the backing file holds them")
    }

    /// A remote NBD export (nbdkit) as the backing store, through libnbd.
    func testARemoteExportCanBeTheBackingStore() throws {
        let image = try makeFile("remote.img", sizeBytes: 8 << 20)
        let remoteSocket = directory + "/remote.sock"
        let uri = try startNBDKit(["file", image], socket: remoteSocket)
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"
        let formatted = try run(["format", "--cache", cache, "--backing", uri, "--segment-size", "64K"])
        XCTAssertEqual(formatted.status, 0, formatted.errors)
        let server = try startServer(cache: cache, backing: uri, socket: socket)
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        var expected = [UInt8](repeating: 0, count: 1 << 20)
        for block in stride(from: 0, to: 256, by: 3) {
            let bytes = [UInt8](repeating: UInt8(block % 251 + 1), count: 4096)
            try client.write(bytes, offset: UInt64(block * 4096))
            expected.replaceSubrange((block * 4096)..<((block + 1) * 4096), with: bytes)
        }
        try client.zero(length: 8192, offset: 0)
        expected.replaceSubrange(0..<8192, with: [UInt8](repeating: 0, count: 8192))
        XCTAssertEqual(try client.read(length: 1 << 20, offset: 0), expected)
        XCTAssertEqual(try run(["drain", "--socket", socket]).status, 0)
        stop(server)
        let remote = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(Array(remote[0..<(1 << 20)]), expected, "the remote export holds the written-back data")
    }

    /// A remote export that does not advertise flush (nbdkit's eval plugin over a file) could not
    /// make written-back data durable: format, serve, mode and sluice-recover drain refuse it with
    /// the reason and the fix. With --backing-durable-on-ack they accept it, status says syncing
    /// it is a no-op, and a drain leaves the data in the export.
    func testARemoteExportWithoutFlushIsRefusedUnlessDeclaredDurableOnAcknowledgement() throws {
        let image = try makeFile("noflush.img", sizeBytes: 8 << 20)
        let remoteSocket = directory + "/noflush.sock"
        let uri = try startNBDKit(["eval", "get_size=echo \(8 << 20)",
                                   "pread=dd if='\(image)' skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
                                   "pwrite=dd of='\(image)' seek=$4 conv=notrunc oflag=seek_bytes status=none",
                                   "can_write=exit 0", "can_flush=exit 3"], socket: remoteSocket)
        XCTAssertEqual(try SluiceBinary.runProgram("/usr/bin/nbdinfo", ["--can", "flush", uri]).status, 2,
                       "the export must not advertise flush (nbdinfo --can flush exits 2)")
        let cache = try makeFile("cache.img", sizeBytes: 4 << 20)
        let socket = directory + "/s.sock"
        func assertRefused(_ result: (status: Int32, output: String, errors: String), _ what: String, line: UInt = #line) {
            XCTAssertEqual(result.status, 1, what, line: line)
            XCTAssertTrue(result.errors.contains("does not advertise flush") && result.errors.contains("--backing-durable-on-ack"),
                          "\(what): \(result.errors)", line: line)
        }

        assertRefused(try run(["format", "--cache", cache, "--backing", uri, "--segment-size", "64K"]), "format")
        let durable = ["--backing-durable-on-ack"]
        let formatted = try run(["format", "--cache", cache, "--backing", uri, "--segment-size", "64K"] + durable)
        XCTAssertEqual(formatted.status, 0, formatted.errors)
        assertRefused(try run(["serve", "--cache", cache, "--backing", uri, "--volatile", "--socket", socket]), "serve")
        XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "nothing was served")
        let onAFile = try run(["serve", "--cache", cache, "--backing", image, "--volatile", "--socket", socket] + durable)
        XCTAssertEqual(onAFile.status, 64, "the flag means nothing for a file")
        XCTAssertTrue(onAFile.errors.contains("leave the flag out"), onAFile.errors)

        let server = try startServer(cache: cache, backing: uri, socket: socket, extra: durable + ["--writeback-threshold", "0", "--dirty-target", "100"])
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        let bytes = [UInt8](repeating: 0x5A, count: 2 * 4096)
        try client.write(bytes, offset: 64 << 10, flags: NBDFlag.fua)
        let status = try run(["status", "--json", "--socket", socket])
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(status.output.utf8)) as? [String: Any], status.errors)
        XCTAssertEqual(json["backing_flush"] as? String, "none (durable on acknowledgement, by --backing-durable-on-ack)")
        XCTAssertTrue(try run(["status", "--socket", socket]).output.contains("backing flush       none (durable on acknowledgement"))
        XCTAssertEqual(try run(["drain", "--socket", socket]).status, 0)
        XCTAssertEqual(SluiceBinary.stop(server), 0, "a clean shutdown syncs the backing store as a no-op")
        let remote = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(Array(remote[(64 << 10)..<((64 << 10) + bytes.count)]), bytes, "the export holds the written-back data")

        assertRefused(try run(["mode", "--cache", cache, "--backing", uri, "--pmem", directory + "/noflush.pmem"]), "mode")
        let recover = { (arguments: [String]) in try SluiceBinary.runProgram(SluiceBinary.recoverPath, arguments) }
        assertRefused(try recover(["drain", "--cache", cache, "--backing", uri]), "sluice-recover drain")
        let drained = try recover(["drain", "--cache", cache, "--backing", uri] + durable)
        XCTAssertEqual(drained.status, 0, drained.errors)
    }
}
