import Foundation
import NBDClient
import XCTest

/// `sluice serve --ramdisk` as a user runs it: data round-trips over NBD, the export says it is not
/// durable, and `sluice set` resizes and locks it while it is served.
final class RAMDiskCommandLineTests: XCTestCase {
    private var directory = ""
    private var socket: String { directory + "/ram.sock" }

    override func setUpWithError() throws {
        directory = try TestServer.makeTemporaryDirectory(base: "/tmp")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: directory)
    }

    func testRAMDiskServesResizesLocksAndSaysItIsNotDurable() throws {
        let log = directory + "/serve.log"
        let server = try SluiceBinary.startServer(["serve", "--ramdisk", "1M", "--socket", socket, "--description", "scratch"], socket: socket, log: log)
        defer { SluiceBinary.stop(server) }
        var client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertEqual(client.sizeBytes, 1 << 20)
        XCTAssertTrue(client.canFlush && client.canTrim && client.canZero && client.canMultiConnection)
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try client.write(pattern, offset: 65536 - 4096)
        try client.flush()
        XCTAssertEqual(try client.read(length: 8192, offset: 65536 - 4096), pattern)
        XCTAssertEqual(try client.read(length: 4096, offset: 512 << 10), [UInt8](repeating: 0, count: 4096), "never written: zeros")
        XCTAssertTrue(try String(contentsOfFile: log, encoding: .utf8).contains("not durable"), "the log at start says it")

        // nbdinfo shows the description, with what the disk promises.
        let info = try SluiceBinary.runProgram("/usr/bin/nbdinfo", ["--json", "nbd+unix:///?socket=\(socket)"])
        XCTAssertEqual(info.status, 0, info.errors)
        XCTAssertTrue(info.output.contains("scratch") && info.output.contains("not durable"), info.output)

        // Status, as JSON and for people.
        let status = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try SluiceBinary.run(["status", "--json", "--socket", socket]).output.utf8)) as? [String: Any])
        XCTAssertEqual(status["kind"] as? String, "ramdisk")
        XCTAssertEqual(status["durable"] as? Bool, false)
        XCTAssertEqual(status["allocated_bytes"] as? Int, 128 << 10, "the two 64 KiB chunks written, no more")
        let human = try SluiceBinary.run(["status", "--socket", socket])
        XCTAssertTrue(human.output.contains("size_bytes") && human.output.contains("1048576"), human.output)

        // Grow: new connections see the new size; a shrink over written data is refused with the fix.
        let grown = try SluiceBinary.run(["set", "--socket", socket, "size", "4M"])
        XCTAssertEqual(grown.status, 0, grown.errors)
        client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertEqual(client.sizeBytes, 4 << 20)
        try client.write([UInt8](repeating: 0xAB, count: 4096), offset: 3 << 20)
        let shrink = try SluiceBinary.run(["set", "--socket", socket, "size", "1M"])
        XCTAssertEqual(shrink.status, 1)
        XCTAssertTrue(shrink.errors.contains("trim it first"), shrink.errors)
        let badValue = try SluiceBinary.run(["set", "--socket", socket, "size", "huge"])
        XCTAssertEqual(badValue.status, 1)
        XCTAssertTrue(badValue.errors.contains("size takes a size"), badValue.errors)

        // Locked: new connections are read-only, and writes on an open one fail.
        XCTAssertEqual(try SluiceBinary.run(["set", "--socket", socket, "locked", "1"]).status, 0)
        XCTAssertThrowsError(try client.write([UInt8](repeating: 1, count: 512), offset: 0), "a write on an open connection fails while locked")
        let readOnly = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertTrue(readOnly.isReadOnly)
        XCTAssertEqual(try readOnly.read(length: 4096, offset: 3 << 20), [UInt8](repeating: 0xAB, count: 4096))
        XCTAssertEqual(try SluiceBinary.run(["set", "--socket", socket, "locked", "0"]).status, 0)
        try client.write([UInt8](repeating: 2, count: 512), offset: 0)
    }

    func testBadRAMDiskArgumentsAreRefusedWithTheFix() throws {
        for (arguments, expected) in [(["--ramdisk", "1000"], "multiple of 512"), (["--ramdisk", "lots"], "multiple of 512"),
                                      (["--ramdisk", "1M", "--backing", "/tmp/x"], "leave out --backing"),
                                      (["--ramdisk", "1M", "--ramdisk-limit", "x"], "--ramdisk-limit takes a size"),
                                      (["--ramdisk-limit", "1M", "--backing", "/tmp/x"], "applies to a RAM disk")] {
            let result = try SluiceBinary.run(["serve"] + arguments + ["--socket", socket])
            XCTAssertEqual(result.status, 64, "\(arguments): \(result.errors)")
            XCTAssertTrue(result.errors.contains(expected), "\(arguments): \(result.errors)")
        }
    }
}
