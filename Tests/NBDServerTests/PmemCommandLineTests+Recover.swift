import Foundation
import NBDClient
import SluiceFormat
import XCTest

/// `sluice-recover`, the offline tool, on caches left by kill -9 and on media damaged on purpose.
extension PmemCommandLineTests {
    /// Runs the built sluice-recover.
    func recoverTool(_ arguments: [String], file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String, errors: String) {
        let path = URL(fileURLWithPath: SluiceBinary.path).deletingLastPathComponent().appendingPathComponent("sluice-recover").path
        return try SluiceBinary.runProgram(path, arguments, file: file, line: line)
    }

    /// After a kill -9, in either mode, `sluice-recover drain` alone (no server) leaves the backing
    /// file equal, byte for byte, to every write the clients had made durable; `check` says dirty
    /// before and clean after; a second drain has nothing to do.
    func testOfflineDrainAfterKillNineLeavesTheBackingEqualToEveryWrite() throws {
        for mode in ["pmem", "volatile"] {
            let volumeBytes = 32 << 20
            let backing = try file("drain-\(mode)-backing.img", sizeBytes: volumeBytes)
            let cache = try file("drain-\(mode)-cache.img", sizeBytes: 64 << 20)
            let image = try file("drain-\(mode)-expected.img", sizeBytes: volumeBytes)
            let socket = directory + "/drain-\(mode).sock"
            let pmem = pmemPath("drain")
            let buffer = mode == "pmem" ? ["--pmem", pmem] : ["--volatile"]
            try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "256K"] + (mode == "pmem" ? ["--pmem", pmem] : []))
            let server = try serve(cache: cache, backing: backing, buffer: buffer, socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
            try write(socket: socket, image: image, seed: 7, count: 6000, kind: "mixed")
            if mode == "volatile" {
                // Plain writes are durable in volatile mode only once a flush covers them.
                try NBDClient(uri: "nbd+unix:///?socket=\(socket)").flush()
            }
            stop(server, signal: SIGKILL)

            let pmemArguments = mode == "pmem" ? ["--pmem", pmem] : []
            let before = try recoverTool(["check", "--cache", cache] + pmemArguments)
            XCTAssertEqual(before.status, 1, "\(mode): a cache left by kill -9 is dirty but consistent: \(before.output) \(before.errors)")
            XCTAssertTrue(before.output.contains("dirty but consistent"), before.output)
            XCTAssertFalse(sameBytes([UInt8](try bytes(backing)), [UInt8](try bytes(image))), "\(mode): the writes are still only in the cache")

            let drained = try recoverTool(["drain", "--cache", cache, "--backing", backing] + pmemArguments)
            XCTAssertEqual(drained.status, 0, "\(mode): \(drained.errors)")
            XCTAssertTrue(drained.output.contains("the cache is clean"), drained.output)
            XCTAssertTrue(drained.errors.contains("written back (100%)"), "progress lines on a non-terminal: \(drained.errors)")
            XCTAssertTrue(sameBytes([UInt8](try bytes(backing)), [UInt8](try bytes(image))),
                          "\(mode): after an offline drain the backing file holds every durable write")

            let after = try recoverTool(["check", "--cache", cache] + pmemArguments)
            XCTAssertEqual(after.status, 0, "\(mode): \(after.output) \(after.errors)")
            XCTAssertTrue(after.output.contains("dirty blocks: 0"), after.output)
            let again = try recoverTool(["drain", "--cache", cache, "--backing", backing] + pmemArguments)
            XCTAssertEqual(again.status, 0, again.errors)
            XCTAssertTrue(again.output.contains(": 0 dirty blocks written back"), again.output)

            // The cache serves again, with everything.
            let restarted = try serve(cache: cache, backing: backing, buffer: buffer, socket: socket)
            try verify(socket: socket, image: image, "\(mode): served after the offline drain")
            stop(restarted)
        }
    }

    /// `check` tells clean, dirty and damaged apart, on media damaged on purpose; `dump` shows
    /// the log and the pmem entries; every command refuses a cache a server holds.
    func testCheckTellsCleanDirtyAndDamagedApart() throws {
        let volumeBytes = 16 << 20
        let backing = try file("check-backing.img", sizeBytes: volumeBytes)
        let cache = try file("check-cache.img", sizeBytes: 16 << 20)
        let image = try file("check-expected.img", sizeBytes: volumeBytes)
        let socket = directory + "/check.sock"
        let pmem = pmemPath("check")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", pmem])
        func check(_ cachePath: String, pmem pmemPath: String? = pmem) throws -> (status: Int32, output: String, errors: String) {
            try recoverTool(["check", "--cache", cachePath] + (pmemPath.map { ["--pmem", $0] } ?? []))
        }
        XCTAssertEqual(try check(cache).status, 0, "a new cache is clean")

        // A server holds the cache: every command refuses it.
        var server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        let held = try check(cache)
        XCTAssertEqual(held.status, 3, held.output)
        XCTAssertTrue(held.errors.contains("already in use"), held.errors)
        let heldDrain = try recoverTool(["drain", "--cache", cache, "--backing", backing, "--pmem", pmem])
        XCTAssertNotEqual(heldDrain.status, 0)
        XCTAssertTrue(heldDrain.errors.contains("already in use"), heldDrain.errors)

        try write(socket: socket, image: image, seed: 3, count: 1507, kind: "aligned")
        stop(server, signal: SIGKILL)
        let dirty = try check(cache)
        XCTAssertEqual(dirty.status, 1, dirty.output)
        XCTAssertTrue(dirty.output.contains("recovery would write the open pmem segment"), dirty.output)
        let dump = try recoverTool(["dump", "--cache", cache, "--pmem", pmem, "--json"])
        XCTAssertEqual(dump.status, 0, dump.errors)
        let parsed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(dump.output.utf8)) as? [String: Any])
        let areas = try XCTUnwrap(parsed["pmem_areas"] as? [[String: Any]])
        XCTAssertTrue(areas.contains { $0["state"] as? String == "open" && (($0["valid_entries"] as? [Any])?.count ?? 0) > 0 }, "\(areas)")
        XCTAssertGreaterThan((parsed["segments"] as? [Any])?.count ?? 0, 5)
        XCTAssertEqual(parsed["verdict"] as? String, "dirty but consistent")
        // Damage inside the log of a crashed cache is told apart from a tear at its end: the pmem
        // file records how far the cache device had synced.
        do {
            var crashed = [UInt8](try bytes(cache))
            crashed[64 * 1024 + 2 * 64 * 1024 + 7000] ^= 0x10
            let path = directory + "/crashed-bad-crc.img"
            try Data(crashed).write(to: URL(fileURLWithPath: path))
            let result = try check(path)
            XCTAssertEqual(result.status, 2, result.output)
            XCTAssertTrue(result.output.contains("were synced, but the log ends at 2"), result.output)
        }

        // A clean shutdown: clean. Then damage copies of the media on purpose.
        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try verify(socket: socket, image: image, "before the damage")
        stop(server)
        let cleanAgain = try check(cache)
        XCTAssertEqual(cleanAgain.status, 0, cleanAgain.output)
        let text = try recoverTool(["dump", "--cache", cache, "--pmem", pmem, "--segment", "2"])
        XCTAssertTrue(text.output.contains("segment 2  slot 1"), text.output)
        XCTAssertTrue(text.output.contains("xxxxxxxx"), text.output)

        let segmentBytes = 64 * 1024
        let firstSegment = try XCTUnwrap((parsed["superblock"] as? [String: Any])?["first_segment_offset"] as? Int)
        func damagedCopy(_ name: String, _ damage: (inout [UInt8]) -> Void) throws -> String {
            var bytes = [UInt8](try self.bytes(cache))
            damage(&bytes)
            let path = directory + "/" + name
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            return path
        }
        let badCRC = try damagedCopy("bad-crc.img") { bytes in bytes[firstSegment + 2 * segmentBytes + 5000] ^= 0x40 }
        let torn = try damagedCopy("torn.img") { bytes in
            for index in (firstSegment + 3 * segmentBytes + segmentBytes / 2)..<(firstSegment + 4 * segmentBytes) { bytes[index] = 0 }
        }
        let truncated = try damagedCopy("truncated.img") { bytes in bytes.removeLast(bytes.count / 2) }
        for (what, path, phrase) in [("a bad CRC", badCRC, "log ends at 2"), ("a torn segment", torn, "log ends at 3"),
                                     ("a truncated device", truncated, "truncated")] {
            let result = try check(path)
            XCTAssertEqual(result.status, 2, "\(what): \(result.output)")
            XCTAssertTrue(result.output.contains("damaged") && result.output.contains(phrase), "\(what): \(result.output) \(result.errors)")
        }
        // Another cache's pmem file.
        let otherCache = try file("other-cache.img", sizeBytes: 16 << 20)
        let otherPmem = pmemPath("other")
        try succeed(["format", "--cache", otherCache, "--backing", try file("other-backing.img", sizeBytes: volumeBytes), "--pmem", otherPmem])
        let wrongPmem = try check(cache, pmem: otherPmem)
        XCTAssertEqual(wrongPmem.status, 2, wrongPmem.output)
        XCTAssertTrue(wrongPmem.output.contains("belongs to another cache"), wrongPmem.output)
        // The undamaged original is still clean.
        XCTAssertEqual(try check(cache).status, 0)
    }

    /// A damaged cache: `salvage` writes back the longest valid prefix and lists exactly the blocks
    /// whose newest data was beyond the damage. Every block not listed holds its last write; every
    /// block that does not is listed. Afterwards the cache is clean and serves again.
    func testSalvageAppliesTheValidPrefixAndListsExactlyWhatWasLost() throws {
        let volumeBytes = 16 << 20
        let backing = try file("salvage-backing.img", sizeBytes: volumeBytes)
        let cache = try file("salvage-cache.img", sizeBytes: 16 << 20)
        let image = try file("salvage-expected.img", sizeBytes: volumeBytes)
        let socket = directory + "/salvage.sock"
        let pmem = pmemPath("salvage")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", pmem])
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try write(socket: socket, image: image, seed: 11, count: 1200, kind: "aligned")
        stop(server)

        // A bad CRC in segment 40 of about 80: the log's valid prefix is 1...39.
        let firstSegment = 64 * 1024
        var bytes = [UInt8](try self.bytes(cache))
        bytes[firstSegment + 39 * 64 * 1024 + 9000] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: cache))
        // (A server started now would take the log from its headers alone, as after every clean
        // shutdown; `check` verifies every checksum.)
        let checked = try recoverTool(["check", "--cache", cache, "--pmem", pmem])
        XCTAssertEqual(checked.status, 2, checked.output)
        XCTAssertTrue(checked.output.contains("the log ends at 39"), checked.output)

        // A backing store the final drain would refuse is refused before anything is repaired, so
        // the damage, and the list of what it lost, are still there for the right one.
        let other = try file("salvage-other.img", sizeBytes: volumeBytes)
        let refused = try recoverTool(["salvage", "--cache", cache, "--backing", other, "--pmem", pmem])
        XCTAssertEqual(refused.status, 1, refused.output)
        XCTAssertTrue(refused.errors.contains("belongs to backing store"), refused.errors)
        XCTAssertEqual(try recoverTool(["check", "--cache", cache, "--pmem", pmem]).status, 2, "the refused salvage repaired nothing")

        let salvaged = try recoverTool(["salvage", "--cache", cache, "--backing", backing, "--pmem", pmem])
        XCTAssertEqual(salvaged.status, 0, salvaged.errors)
        XCTAssertTrue(salvaged.output.contains("through segment 39"), salvaged.output)
        var listed = Set<Int>()
        for line in salvaged.output.split(separator: "\n") where line.hasPrefix("lost: ") {
            // "lost: bytes A-B (blocks FIRST+COUNT) ..."
            let blocks = line.split(separator: "(")[1].split(separator: " ")[1].split(separator: "+")
            let first = Int(blocks[0])!, count = Int(blocks[1].prefix { $0.isNumber })!
            for block in first..<(first + count) { listed.insert(block) }
        }
        XCTAssertFalse(listed.isEmpty, salvaged.output)
        let expected = [UInt8](try self.bytes(image))
        let found = [UInt8](try self.bytes(backing))
        var wrongUnlisted: [Int] = []
        var listedAndWrong = 0
        for block in 0..<(volumeBytes / 4096) {
            let same = sameBytes(Array(found[(block * 4096)..<((block + 1) * 4096)]), Array(expected[(block * 4096)..<((block + 1) * 4096)]))
            if !same && !listed.contains(block) { wrongUnlisted.append(block) }
            if !same && listed.contains(block) { listedAndWrong += 1 }
        }
        XCTAssertEqual(wrongUnlisted, [], "blocks that lost their newest data without being listed")
        XCTAssertGreaterThan(listedAndWrong, 0, "the damage lost data, and it is listed")
        XCTAssertEqual(try recoverTool(["check", "--cache", cache, "--pmem", pmem]).status, 0, "salvage leaves a clean cache")
        let restarted = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        stop(restarted)
    }

    /// `sluice-recover drain` killed with -9 part way (over a slow remote backing store) and run
    /// again finishes the job: the backing store ends byte-exact.
    func testAnInterruptedOfflineDrainResumes() throws {
        let volumeBytes = 16 << 20
        let backingImage = try file("resume-backing.img", sizeBytes: volumeBytes)
        let remoteSocket = directory + "/resume-remote.sock"
        let nbdkit = Process()
        nbdkit.executableURL = URL(fileURLWithPath: "/usr/bin/nbdkit")
        // 3 ms per write, one at a time: the drain takes seconds, so the kill lands in the middle of it.
        nbdkit.arguments = ["-f", "-U", remoteSocket, "--filter=noparallel", "--filter=delay", "file", backingImage, "serialize=all-requests", "wdelay=3ms"]
        nbdkit.standardError = FileHandle.nullDevice
        try nbdkit.run()
        defer {
            nbdkit.terminate()
            nbdkit.waitUntilExit()
        }
        for _ in 0..<500 where !FileManager.default.fileExists(atPath: remoteSocket) { usleep(20_000) }
        let backing = "nbd+unix:///?socket=\(remoteSocket)"
        let cache = try file("resume-cache.img", sizeBytes: 32 << 20)
        let image = try file("resume-expected.img", sizeBytes: volumeBytes)
        let socket = directory + "/resume.sock"
        let pmem = pmemPath("resume")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "256K", "--pmem", pmem])
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket, extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try write(socket: socket, image: image, seed: 21, count: 3000, kind: "mixed")
        stop(server, signal: SIGKILL)

        let toolPath = URL(fileURLWithPath: SluiceBinary.path).deletingLastPathComponent().appendingPathComponent("sluice-recover").path
        let interrupted = Process()
        interrupted.executableURL = URL(fileURLWithPath: toolPath)
        interrupted.arguments = ["drain", "--cache", cache, "--backing", backing, "--pmem", pmem]
        interrupted.standardOutput = FileHandle.nullDevice
        interrupted.standardError = FileHandle.nullDevice
        try interrupted.run()
        usleep(1_500_000)
        XCTAssertTrue(interrupted.isRunning, "the drain should still be running when it is killed")
        kill(interrupted.processIdentifier, SIGKILL)
        interrupted.waitUntilExit()
        let between = try recoverTool(["check", "--cache", cache, "--pmem", pmem])
        XCTAssertEqual(between.status, 1, "an interrupted drain leaves a dirty but consistent cache: \(between.output)")

        let resumed = try recoverTool(["drain", "--cache", cache, "--backing", backing, "--pmem", pmem])
        XCTAssertEqual(resumed.status, 0, resumed.errors)
        XCTAssertTrue(sameBytes([UInt8](try bytes(backingImage)), [UInt8](try bytes(image))),
                      "after the resumed drain the backing store holds every write")
        XCTAssertEqual(try recoverTool(["check", "--cache", cache, "--pmem", pmem]).status, 0)
    }

    /// A pmem file a server is using is locked: formatting another cache onto it, even with
    /// --force, is refused, and the server goes on with its buffer intact.
    func testAPmemFileAServerUsesIsNeverReplaced() throws {
        let backing = try file("locked-backing.img", sizeBytes: 8 << 20)
        let cache = try file("locked-cache.img", sizeBytes: 8 << 20)
        let image = try file("locked-expected.img", sizeBytes: 8 << 20)
        let socket = directory + "/locked.sock"
        let pmem = pmemPath("locked")
        try succeed(["format", "--cache", cache, "--backing", backing, "--segment-size", "64K", "--pmem", pmem])
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try write(socket: socket, image: image, seed: 5, count: 200, kind: "mixed")
        // The header (its UUIDs) is what a format would replace; the rest may still change as
        // the server syncs segments.
        let before = try bytes(pmem).prefix(4096)
        let other = try file("locked-other.img", sizeBytes: 8 << 20)
        try refuse(["format", "--cache", other, "--backing", try file("locked-other-backing.img", sizeBytes: 8 << 20), "--pmem", pmem, "--force"],
                   saying: ["the pmem file \(pmem) is already in use by another process"])
        XCTAssertEqual(try bytes(pmem).prefix(4096), before, "the refused format left the pmem file alone")
        stop(server, signal: SIGKILL)
        let restarted = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "after the refused format and a kill -9")
        stop(restarted)
    }
    /// A cache whose cleaner has relocated live blocks (copies forward in the log, the older copies
    /// superseded but still on the device) and is then killed with -9: `check` finds it dirty but
    /// consistent, `dump` shows the log, and `drain` leaves the backing file equal to every write,
    /// so recovery and the offline tool take the relocated copy, never the stale one it replaced.
    func testOfflineToolsAfterRelocationsAndKillNine() throws {
        let stack = try formattedStack("relocated", volumeBytes: 16 << 20, cacheBytes: 16 << 20)
        let (backing, cache, image, socket, pmem) = (stack.backing, stack.cache, stack.image, stack.socket, stack.pmem)
        // No writeback but what the cleaner asks for: the ring fills with live dirty blocks and
        // the cleaner must relocate them to keep space.
        let server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket,
                               extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        try write(socket: socket, image: image, seed: 31, count: 9000, kind: "mixed")
        let state = try status(socket: socket)
        XCTAssertGreaterThan(state["relocated_blocks"] as? Int ?? 0, 0, "the cleaner relocated blocks: \(state)")
        stop(server, signal: SIGKILL)

        let checked = try recoverTool(["check", "--cache", cache, "--pmem", pmem])
        XCTAssertEqual(checked.status, 1, "\(checked.output) \(checked.errors)")
        XCTAssertTrue(checked.output.contains("dirty but consistent"), checked.output)
        let dump = try recoverTool(["dump", "--cache", cache, "--pmem", pmem, "--json"])
        XCTAssertEqual(dump.status, 0, dump.errors)
        let parsed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(dump.output.utf8)) as? [String: Any])
        XCTAssertEqual(parsed["verdict"] as? String, "dirty but consistent")
        XCTAssertGreaterThan((parsed["segments"] as? [Any])?.count ?? 0, 100, "the log fills most of the ring")

        let drained = try recoverTool(["drain", "--cache", cache, "--backing", backing, "--pmem", pmem])
        XCTAssertEqual(drained.status, 0, drained.errors)
        XCTAssertTrue(sameBytes([UInt8](try bytes(backing)), [UInt8](try bytes(image))),
                      "after the offline drain the backing file holds every write, relocated ones included")
        XCTAssertEqual(try recoverTool(["check", "--cache", cache, "--pmem", pmem]).status, 0)
    }
    /// A dirty cache whose superblock says format version 1 (as an earlier Sluice wrote it) is
    /// refused by `serve` with a message naming the upgrade; `sluice-recover upgrade` refuses it
    /// while a server holds it, upgrades it in place, and the cache then serves every write it held.
    func testAVersionOneCacheIsRefusedThenUpgradedInPlace() throws {
        let stack = try formattedStack("upgrade", volumeBytes: 8 << 20, cacheBytes: 8 << 20)
        let (backing, cache, image, socket, pmem) = (stack.backing, stack.cache, stack.image, stack.socket, stack.pmem)
        var server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket,
                               extra: ["--writeback-threshold", "0", "--dirty-target", "100"])
        let held = try recoverTool(["upgrade", "--cache", cache])
        XCTAssertNotEqual(held.status, 0)
        XCTAssertTrue(held.errors.contains("already in use"), held.errors)
        try write(socket: socket, image: image, seed: 41, count: 800, kind: "mixed")
        stop(server, signal: SIGKILL)

        // The header as version 1 wrote it: the same fields, version 1, its checksum.
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: cache))
        var block = [UInt8](handle.readData(ofLength: 4096))
        block[8] = 1
        let crc = CRC32C.checksum(Array(block[0..<4092]))
        withUnsafeBytes(of: crc.littleEndian) { block.replaceSubrange(4092..<4096, with: $0) }
        handle.seek(toFileOffset: 0)
        handle.write(Data(block))
        handle.closeFile()

        try refuse(["serve", "--cache", cache, "--backing", backing, "--pmem", pmem, "--socket", socket],
                   saying: ["format version 1", "sluice-recover upgrade --cache PATH"], socket: socket)
        let upgraded = try recoverTool(["upgrade", "--cache", cache])
        XCTAssertEqual(upgraded.status, 0, upgraded.errors)
        XCTAssertTrue(upgraded.output.contains("from format version 1 to 2"), upgraded.output)
        let again = try recoverTool(["upgrade", "--cache", cache])
        XCTAssertEqual(again.status, 0, again.errors)
        XCTAssertTrue(again.output.contains("already has format version 2"), again.output)
        XCTAssertEqual(try recoverTool(["check", "--cache", cache, "--pmem", pmem]).status, 1, "dirty but consistent, as the kill left it")
        server = try serve(cache: cache, backing: backing, buffer: ["--pmem", pmem], socket: socket)
        try verify(socket: socket, image: image, "after the upgrade")
        stop(server)
    }
}
