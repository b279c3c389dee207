import Foundation
import XCTest

/// The real server against the clients people use: nbdinfo, qemu-io, qemu-img, fio and nbdcopy.
final class ExternalClientTests: XCTestCase {
    private struct Output {
        var status: Int32
        var standardOutput: String
        var standardError: String
    }

    /// Runs a command to completion with a time limit, so a hung client fails the test instead of CI.
    @discardableResult
    private func run(_ arguments: [String], timeoutSeconds: Double = 120, file: StaticString = #filePath, line: UInt = #line) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let outputPipe = Pipe()
        let errorPipe = Pipe()
        process.standardOutput = outputPipe
        process.standardError = errorPipe
        try process.run()
        // Drain both pipes while the process runs so a chatty client cannot block on a full pipe.
        let collected = CollectedOutput()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { collected.setOutput(outputPipe.fileHandleForReading.readDataToEndOfFile()); group.leave() }
        group.enter()
        DispatchQueue.global().async { collected.setError(errorPipe.fileHandleForReading.readDataToEndOfFile()); group.leave() }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning {
            process.terminate()
            XCTFail("\(arguments.joined(separator: " ")) timed out", file: file, line: line)
        }
        process.waitUntilExit()
        group.wait()
        return Output(status: process.terminationStatus,
                      standardOutput: String(decoding: collected.output, as: UTF8.self),
                      standardError: String(decoding: collected.error, as: UTF8.self))
    }

    private func requireSuccess(_ output: Output, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(output.status, 0, "\(what) failed:\n\(output.standardOutput)\n\(output.standardError)", file: file, line: line)
    }

    func testNbdinfoReportsSizeFlagsAndBlockSizes() throws {
        let server = try TestServer(exports: [.init(name: "", sizeBytes: 64 << 20)])
        defer { server.stop() }
        let info = try run(["nbdinfo", "--json", server.uri()])
        requireSuccess(info, "nbdinfo --json")
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(info.standardOutput.utf8)) as? [String: Any])
        XCTAssertEqual(json["protocol"] as? String, "newstyle-fixed")
        XCTAssertEqual(json["structured"] as? Bool, true)
        let export = try XCTUnwrap((json["exports"] as? [[String: Any]])?.first)
        XCTAssertEqual(export["export-size"] as? Int, 64 << 20)
        XCTAssertEqual(export["block_size_minimum"] as? Int, 512)
        XCTAssertEqual(export["block_size_preferred"] as? Int, 4096)
        XCTAssertEqual(export["block_size_maximum"] as? Int, 32 << 20)
        for key in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache", "can_df", "can_fast_zero"] {
            XCTAssertEqual(export[key] as? Bool, true, key)
        }
        XCTAssertEqual(export["is_read_only"] as? Bool, false)
        XCTAssertEqual(export["contexts"] as? [String], ["base:allocation"])
        for feature in ["flush", "fua", "trim", "zero", "multi-conn"] {
            XCTAssertEqual(try run(["nbdinfo", "--can", feature, server.uri()]).status, 0, "nbdinfo --can \(feature)")
        }
        XCTAssertEqual(try run(["nbdinfo", "--is", "read-only", server.uri()]).status, 2)
        let map = try run(["nbdinfo", "--map", server.uri()])
        requireSuccess(map, "nbdinfo --map")
        XCTAssertTrue(map.standardOutput.contains("hole,zero"), map.standardOutput)
    }

    func testNbdinfoListsExportsAndSeesReadOnly() throws {
        let server = try TestServer(exports: [.init(name: "alpha", sizeBytes: 1 << 20), .init(name: "beta", sizeBytes: 1 << 20, readOnly: true)])
        defer { server.stop() }
        let list = try run(["nbdinfo", "--list", "--json", server.uri()])
        requireSuccess(list, "nbdinfo --list")
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(list.standardOutput.utf8)) as? [String: Any])
        let names = (json["exports"] as? [[String: Any]])?.compactMap { $0["export-name"] as? String }
        XCTAssertEqual(names, ["alpha", "beta"])
        XCTAssertEqual(try run(["nbdinfo", "--is", "read-only", server.uri(export: "beta")]).status, 0)
        XCTAssertEqual(try run(["nbdinfo", "--can", "trim", server.uri(export: "beta")]).status, 2)
    }

    func testQemuIoPatternsWithFUAAndVectors() throws {
        for medium in TestServer.Medium.allCases {
            let server = try TestServer(medium: medium, exports: [.init(name: "", sizeBytes: 64 << 20)])
            defer { server.stop() }
            let output = try run([
                "qemu-io", "-f", "raw", server.uri(),
                "-c", "write -P 0xab 0 4k",
                "-c", "write -f -P 0xcd 64k 64k",
                "-c", "writev -P 0x11 1M 4k 8k 512",
                "-c", "flush",
                "-c", "read -P 0xab 0 4k",
                "-c", "read -P 0xcd 64k 64k",
                "-c", "readv -P 0x11 1M 4k 8k 512",
                "-c", "write -z 64k 32k",
                "-c", "read -P 0 64k 32k",
                "-c", "read -P 0xcd 96k 32k",
                "-c", "discard 0 4k",
                "-c", "read -P 0 0 4k",
            ])
            requireSuccess(output, "qemu-io on \(medium)")
            XCTAssertFalse(output.standardOutput.contains("Pattern verification failed"), output.standardOutput)
            XCTAssertFalse(output.standardOutput.lowercased().contains("error"), output.standardOutput)
            // A pattern that is not there must be reported, or the checks above prove nothing.
            let wrong = try run(["qemu-io", "-f", "raw", server.uri(), "-c", "read -P 0x77 0 4k"])
            XCTAssertTrue(wrong.standardOutput.contains("Pattern verification failed"), wrong.standardOutput)
        }
    }

    func testFioVerifiedRandomWritesAtDepth32AndOverFourConnections() throws {
        let server = try TestServer(medium: .disk, exports: [.init(name: "", sizeBytes: 128 << 20)])
        defer { server.stop() }
        let deep = try run([
            "fio", "--name=deep", "--ioengine=nbd", "--uri=\(server.uri())", "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--size=32M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json",
        ], timeoutSeconds: 300)
        requireSuccess(deep, "fio iodepth 32 with verify")
        XCTAssertTrue(deep.standardOutput.contains("\"error\" : 0"), deep.standardOutput)
        let wide = try run([
            "fio", "--name=wide", "--ioengine=nbd", "--uri=\(server.uri())", "--rw=randwrite", "--bs=4k",
            "--iodepth=8", "--numjobs=4", "--size=16M", "--offset_increment=16M", "--verify=crc32c",
            "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", "--output-format=json",
        ], timeoutSeconds: 300)
        requireSuccess(wide, "fio numjobs 4 with verify")
        XCTAssertTrue(wide.standardOutput.contains("\"error\" : 0"), wide.standardOutput)
    }

    func testNbdcopyRoundTripOfAKnownImage() throws {
        let server = try TestServer(medium: .disk, exports: [.init(name: "", sizeBytes: 64 << 20)])
        defer { server.stop() }
        let target = server.uri()
        requireSuccess(try run(["nbdkit", "-U", "-", "sparse-random", "64M", "seed=42", "--run",
                                "nbdcopy --flush \"$uri\" '\(target)'"], timeoutSeconds: 300), "nbdcopy in")
        requireSuccess(try run(["nbdkit", "-U", "-", "sparse-random", "64M", "seed=42", "--run",
                                "qemu-img compare -f raw -F raw '\(target)' \"$uri\""], timeoutSeconds: 300), "qemu-img compare")
        // And back out to a file, compared once more.
        let copy = server.directory + "/copy.img"
        requireSuccess(try run(["nbdcopy", target, copy], timeoutSeconds: 300), "nbdcopy out")
        requireSuccess(try run(["nbdkit", "-U", "-", "sparse-random", "64M", "seed=42", "--run",
                                "qemu-img compare -f raw -F raw '\(copy)' \"$uri\""], timeoutSeconds: 300), "compare the copy")
        // A different image must not compare equal, or the comparison proves nothing.
        let different = try run(["nbdkit", "-U", "-", "sparse-random", "64M", "seed=43", "--run",
                                 "qemu-img compare -f raw -F raw '\(target)' \"$uri\""], timeoutSeconds: 300)
        XCTAssertNotEqual(different.status, 0)
    }
}

/// Output gathered by the pipe readers, handed over under a lock.
private final class CollectedOutput: @unchecked Sendable {
    private let lock = NSLock()
    private var outputData = Data()
    private var errorData = Data()
    func setOutput(_ data: Data) { lock.lock(); outputData = data; lock.unlock() }
    func setError(_ data: Data) { lock.lock(); errorData = data; lock.unlock() }
    var output: Data { lock.lock(); defer { lock.unlock() }; return outputData }
    var error: Data { lock.lock(); defer { lock.unlock() }; return errorData }
}
