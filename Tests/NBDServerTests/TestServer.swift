import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix
import SluiceIO
import SluicePassthrough
import XCTest

/// A real Sluice NBD server on a temporary Unix socket, serving passthrough volumes on temporary
/// files. `medium` picks where the files live: tmpfs takes the inline I/O paths, the local disk
/// takes the io_uring paths, so tests run both.
final class TestServer {
    enum Medium: String, CaseIterable {
        case memory = "/dev/shm"
        case disk = "/var/tmp"
    }

    struct ExportSpec {
        var name: String
        var sizeBytes: Int
        var readOnly = false
    }

    let directory: String
    let socketPath: String
    let group: MultiThreadedEventLoopGroup
    let server: NBDServer
    let volumes: [PassthroughVolume]
    let paths: [String]
    private var stopped = false

    init(medium: Medium = .disk, exports: [ExportSpec] = [ExportSpec(name: "", sizeBytes: 64 << 20)],
         configuration: NBDServerConfiguration = NBDServerConfiguration()) throws {
        // Sockets need short paths (108 bytes), so they always live under /tmp.
        directory = try TestServer.makeTemporaryDirectory(base: medium.rawValue)
        let socketDirectory = try TestServer.makeTemporaryDirectory(base: "/tmp")
        socketPath = socketDirectory + "/s.sock"
        var volumes: [PassthroughVolume] = []
        var paths: [String] = []
        var serverExports: [NBDServerExport] = []
        for (index, spec) in exports.enumerated() {
            let path = "\(directory)/export\(index).img"
            FileManager.default.createFile(atPath: path, contents: nil)
            let handle = FileHandle(forWritingAtPath: path)!
            try handle.truncate(atOffset: UInt64(spec.sizeBytes))
            try handle.close()
            let volume = try PassthroughVolume(path: path, readOnly: spec.readOnly)
            volumes.append(volume)
            paths.append(path)
            serverExports.append(NBDServerExport(name: spec.name, description: "test export \(index)", volume: volume, readOnly: spec.readOnly))
        }
        self.volumes = volumes
        self.paths = paths
        var configuration = configuration
        configuration.unixSocketPath = socketPath
        configuration.shutdownGracePeriod = .seconds(10)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        var logger = Logger(label: "test-server")
        logger.logLevel = .warning
        server = NBDServer(exports: serverExports, configuration: configuration, group: group, logger: logger)
        try server.start()
    }

    func uri(export: String = "") -> String {
        "nbd+unix:///\(export)?socket=\(socketPath)"
    }

    func stop() {
        guard !stopped else { return }
        stopped = true
        server.shutdown()
        for volume in volumes { try? volume.close() }
        try? IOUringDrivers.shared.stopAll(in: group)
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: directory)
        try? FileManager.default.removeItem(atPath: (socketPath as NSString).deletingLastPathComponent)
    }

    deinit {
        stop()
    }

    static func makeTemporaryDirectory(base: String) throws -> String {
        var template = Array("\(base)/sluice-test-XXXXXX".utf8CString)
        guard let result = mkdtemp(&template) else {
            throw NSError(domain: "TestServer", code: Int(errno), userInfo: [NSLocalizedDescriptionKey: "mkdtemp failed under \(base)"])
        }
        return String(cString: result)
    }
}

/// Deterministic bytes for a block, so any misplaced or stale block is caught.
func pattern(seed: UInt64, count: Int) -> [UInt8] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    return (0..<count).map { _ in
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return UInt8(truncatingIfNeeded: state)
    }
}

/// A large buffer made of a 64 KiB pattern tiled with memcpy (fast even in debug builds), with
/// each tile's first 8 bytes holding its index so that misplaced tiles are caught.
func tiledPattern(seed: UInt64, count: Int) -> [UInt8] {
    let tile = pattern(seed: seed, count: 65536)
    var result = [UInt8](repeating: 0, count: count)
    result.withUnsafeMutableBytes { destination in
        tile.withUnsafeBytes { source in
            var offset = 0
            var index: UInt64 = 0
            while offset < count {
                let length = min(65536, count - offset)
                memcpy(destination.baseAddress! + offset, source.baseAddress!, length)
                if length >= 8 { destination.storeBytes(of: index, toByteOffset: offset, as: UInt64.self) }
                offset += length
                index += 1
            }
        }
    }
    return result
}

/// Byte-for-byte equality through memcmp, fast even in debug builds.
func sameBytes(_ left: [UInt8], _ right: [UInt8]) -> Bool {
    left.count == right.count && left.withUnsafeBytes { a in right.withUnsafeBytes { b in memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
}

/// This process's resident memory in bytes (the in-process server's included).
func residentBytes() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
        let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
        let kilobytes = Int(line.split(separator: " ").dropFirst().first ?? "")
    else { return 0 }
    return kilobytes * 1024
}
