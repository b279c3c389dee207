import Foundation
import NBDClient
import XCTest

/// The `sluice` executable as a user runs it: arguments, messages, signals and exit codes.
final class CommandLineTests: XCTestCase {
    private var binary: String {
        // Tests/NBDServerTests/CommandLineTests.swift → the package root → .build/debug/sluice
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/sluice").path
    }

    private func start(_ arguments: [String]) throws -> (Process, Pipe) {
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: binary), "build the sluice binary first (swift build)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        return (process, errors)
    }

    private func finish(_ process: Process, timeoutSeconds: Double = 30) -> Int32 {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning {
            process.interrupt()
            kill(process.processIdentifier, SIGKILL)
            XCTFail("sluice did not exit in time")
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    private func waitForSocket(_ path: String, process: Process) throws {
        for _ in 0..<500 {
            if FileManager.default.fileExists(atPath: path), (try? NBDClient(uri: "nbd+unix:///?socket=\(path)")) != nil { return }
            if !process.isRunning { break }
            usleep(20_000)
        }
        XCTFail("sluice never listened on \(path)")
    }

    private func makeBacking(sizeBytes: Int) throws -> (directory: String, image: String, socket: String) {
        let directory = try TestServer.makeTemporaryDirectory(base: "/tmp")
        let image = directory + "/disk.img"
        FileManager.default.createFile(atPath: image, contents: nil)
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: image))
        try handle.truncate(atOffset: UInt64(sizeBytes))
        try handle.close()
        return (directory, image, directory + "/s.sock")
    }

    func testSigtermFinishesFlushesAndExitsZero() throws {
        for signal in [SIGTERM, SIGINT] {
            let (directory, image, socket) = try makeBacking(sizeBytes: 16 << 20)
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let (process, _) = try start(["serve", "--backing", image, "--socket", socket, "--log-level", "warning"])
            try waitForSocket(socket, process: process)
            let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
            let data = pattern(seed: 42, count: 1 << 20)
            var cookies: [Int64] = []
            try data.withUnsafeBytes { bytes in
                for index in 0..<8 {
                    cookies.append(try client.startWrite(UnsafeRawBufferPointer(rebasing: bytes[(index << 17)..<((index + 1) << 17)]),
                                                         offset: UInt64(index) << 17))
                }
                try client.waitForAll(cookies)
            }
            kill(process.processIdentifier, signal)
            XCTAssertEqual(finish(process), 0, "sluice must exit 0 on signal \(signal)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: socket), "the socket file is removed")
            let contents = try Data(contentsOf: URL(fileURLWithPath: image))
            XCTAssertEqual(Array(contents.prefix(1 << 20)), data)
        }
    }

    func testRefusesWhatItCannotServeWithAClearMessage() throws {
        let (directory, image, socket) = try makeBacking(sizeBytes: 1 << 20)
        defer { try? FileManager.default.removeItem(atPath: directory) }

        let (missingArguments, missingErrors) = try start(["serve"])
        XCTAssertNotEqual(finish(missingArguments), 0)
        XCTAssertTrue(String(decoding: missingErrors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).contains("--backing"))

        let (missingFile, missingFileErrors) = try start(["serve", "--backing", directory + "/nope.img", "--socket", socket])
        XCTAssertEqual(finish(missingFile), 1)
        XCTAssertTrue(String(decoding: missingFileErrors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .contains("No such file or directory"))

        // A second server on the same backing file is refused while the first holds it.
        let (first, _) = try start(["serve", "--backing", image, "--socket", socket])
        try waitForSocket(socket, process: first)
        let (second, secondErrors) = try start(["serve", "--backing", image, "--socket", socket + "2"])
        XCTAssertEqual(finish(second), 1)
        XCTAssertTrue(String(decoding: secondErrors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).contains("already in use"))
        // And a second server on the same socket is refused too.
        let otherImage = directory + "/other.img"
        FileManager.default.createFile(atPath: otherImage, contents: Data(count: 4096))
        let (third, thirdErrors) = try start(["serve", "--backing", otherImage, "--socket", socket])
        XCTAssertEqual(finish(third), 1)
        XCTAssertTrue(String(decoding: thirdErrors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).contains("already listening"))
        kill(first.processIdentifier, SIGTERM)
        XCTAssertEqual(finish(first), 0)
    }

    func testServesABlockDevice() throws {
        // A loop device is a real block device: its size comes from BLKGETSIZE64, it is opened
        // O_EXCL, and trim and zeroing go to the block layer.
        let (directory, image, socket) = try makeBacking(sizeBytes: 32 << 20)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let losetup = Process()
        losetup.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        losetup.arguments = ["losetup", "--find", "--show", image]
        let output = Pipe()
        losetup.standardOutput = output
        try losetup.run()
        losetup.waitUntilExit()
        let device = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(losetup.terminationStatus, 0, "losetup could not attach a loop device (this test needs root and /dev/loop*)")
        guard losetup.terminationStatus == 0, device.hasPrefix("/dev/loop") else { return }
        defer {
            let detach = Process()
            detach.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            detach.arguments = ["losetup", "--detach", device]
            try? detach.run()
            detach.waitUntilExit()
        }
        let (process, _) = try start(["serve", "--backing", device, "--socket", socket, "--log-level", "warning"])
        try waitForSocket(socket, process: process)
        let client = try NBDClient(uri: "nbd+unix:///?socket=\(socket)")
        XCTAssertEqual(client.sizeBytes, 32 << 20)
        let data = pattern(seed: 71, count: 1 << 20)
        try client.write(data, offset: 4 << 20, flags: NBDFlag.fua)
        try client.flush()
        XCTAssertEqual(try client.read(length: 1 << 20, offset: 4 << 20), data)
        try client.zero(length: 65536, offset: 4 << 20)
        XCTAssertEqual(try client.read(length: 65536, offset: 4 << 20), [UInt8](repeating: 0, count: 65536))
        try client.trim(length: 65536, offset: 8 << 20)
        // A second server cannot open the device while the first holds it exclusively.
        let (second, secondErrors) = try start(["serve", "--backing", device, "--socket", socket + "2"])
        XCTAssertEqual(finish(second), 1)
        XCTAssertTrue(String(decoding: secondErrors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).contains("already in use"))
        kill(process.processIdentifier, SIGTERM)
        XCTAssertEqual(finish(process), 0)
        // The data reached the device, and through it the file behind the loop device.
        let contents = try Data(contentsOf: URL(fileURLWithPath: image))
        XCTAssertEqual(Array(contents[((4 << 20) + 65536)..<(5 << 20)]), Array(data[65536...]))
    }

    func testHelpExplainsServe() throws {
        let (process, _) = try start(["serve", "--help"])
        XCTAssertEqual(finish(process), 0)
        let help = Process()
        help.executableURL = URL(fileURLWithPath: binary)
        help.arguments = ["serve", "--help"]
        let output = Pipe()
        help.standardOutput = output
        try help.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        help.waitUntilExit()
        for word in ["--backing", "--socket", "--listen", "--export", "--read-only", "nbdinfo", "SIGTERM"] {
            XCTAssertTrue(text.contains(word), "help must mention \(word)")
        }
    }

    func testListensOnLoopbackTCPByDefaultAddressWhenAsked() throws {
        let (directory, image, _) = try makeBacking(sizeBytes: 1 << 20)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let port = 20000 + Int(getpid() % 20000)
        let (process, _) = try start(["serve", "--backing", image, "--listen", "127.0.0.1:\(port)", "--log-level", "warning"])
        var connected: NBDClient?
        for _ in 0..<500 where connected == nil {
            connected = try? NBDClient(uri: "nbd://127.0.0.1:\(port)/")
            if connected == nil { usleep(20_000) }
        }
        let client = try XCTUnwrap(connected, "sluice never listened on TCP port \(port)")
        XCTAssertEqual(client.sizeBytes, 1 << 20)
        let data = pattern(seed: 3, count: 4096)
        try client.write(data, offset: 0, flags: NBDFlag.fua)
        XCTAssertEqual(try client.read(length: 4096, offset: 0), data)
        kill(process.processIdentifier, SIGTERM)
        XCTAssertEqual(finish(process), 0)
    }
}
