import Foundation
import NBDClient
import XCTest

/// The built `sluice` binary (and other programs) run as a user runs them, shared by the
/// command-line tests: run to completion with a time limit, start a server and wait until it
/// listens, stop it with a signal.
enum SluiceBinary {
    /// Tests/NBDServerTests/SluiceBinary.swift → the package root → .build/debug/sluice
    static var path: String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/sluice").path
    }

    /// The built sluice-recover, beside sluice.
    static var recoverPath: String {
        URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("sluice-recover").path
    }

    /// Runs sluice to completion; returns its exit status, standard output and standard error.
    @discardableResult
    static func run(_ arguments: [String], timeoutSeconds: Double = 300,
                    file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String, errors: String) {
        try runProgram(path, arguments, timeoutSeconds: timeoutSeconds, file: file, line: line)
    }

    /// Runs any program to completion with a time limit, draining both pipes while it runs so a
    /// chatty program cannot block on a full pipe; a program still running at the limit is killed
    /// and the test fails.
    @discardableResult
    static func runProgram(_ executable: String, _ arguments: [String], timeoutSeconds: Double = 300,
                           file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String, errors: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        final class Collected: @unchecked Sendable {
            var output = Data()
            var errors = Data()
        }
        let collected = Collected()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { collected.output = output.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        group.enter()
        DispatchQueue.global().async { collected.errors = errors.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            XCTFail("\(executable) \(arguments.joined(separator: " ")) did not finish in \(Int(timeoutSeconds)) s", file: file, line: line)
        }
        process.waitUntilExit()
        group.wait()
        return (process.terminationStatus, String(decoding: collected.output, as: UTF8.self), String(decoding: collected.errors, as: UTF8.self))
    }

    /// Starts `sluice` with `arguments` (a `serve` command) and waits until it accepts NBD
    /// connections on `socket`. Its standard error goes to `log` when given (else nowhere), and a
    /// server that never listens fails the test with what it logged.
    static func startServer(_ arguments: [String], socket: String, log: String? = nil,
                            file: StaticString = #filePath, line: UInt = #line) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        if let log {
            _ = FileManager.default.createFile(atPath: log, contents: nil)
            process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        } else {
            process.standardError = FileHandle.nullDevice
        }
        try process.run()
        for _ in 0..<3000 {
            if FileManager.default.fileExists(atPath: socket), (try? NBDClient(uri: "nbd+unix:///?socket=\(socket)")) != nil { return process }
            if !process.isRunning { break }
            usleep(20_000)
        }
        let logged = log.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) } ?? "(standard error not kept)"
        XCTFail("the server never listened on \(socket): \(logged)", file: file, line: line)
        return process
    }

    /// Sends `signal` and waits for the process to exit; returns its termination status.
    @discardableResult
    static func stop(_ process: Process, signal: Int32 = SIGTERM, file: StaticString = #filePath, line: UInt = #line) -> Int32 {
        if process.isRunning { kill(process.processIdentifier, signal) }
        let deadline = Date().addingTimeInterval(60)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        XCTAssertFalse(process.isRunning, "\(process.executableURL?.lastPathComponent ?? "the process") did not exit", file: file, line: line)
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Creates (or truncates) a sparse file of `sizeBytes` at `path`.
    @discardableResult
    static func makeFile(_ path: String, sizeBytes: Int) throws -> String {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.truncate(atOffset: UInt64(sizeBytes))
        try handle.close()
        return path
    }
}
