import NIOCore
import NIOPosix
import SluiceIO
import XCTest

@testable import SluiceCache

final class UringFileMediumTests: XCTestCase {
    /// Aligned reads go through the O_DIRECT descriptor and read back what was written, whatever
    /// the buffer's allocation alignment; unaligned ones go through the page cache.
    func testDirectReadsReturnWhatWasWritten() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer {
            try? IOUringDrivers.shared.stopAll(in: group)
            try? group.syncShutdownGracefully()
        }
        let loop = group.next()
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("uring-medium-\(getpid()).img").path
        FileManager.default.createFile(atPath: path, contents: Data(count: 1 << 20))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let file = try BlockFile(path: path, readOnly: false)
        defer { file.close() }
        let result = try loop.submit { () -> EventLoopFuture<[String]> in
            let driver = try IOUringDrivers.shared.driver(for: loop)
            let medium = UringFileMedium(file: file, driver: driver, direct: true)
            var pattern = [UInt8](repeating: 0, count: 64 * 1024)
            for index in pattern.indices { pattern[index] = UInt8(truncatingIfNeeded: index * 7 + index / 4096) }
            let promise = loop.makePromise(of: [String].self)
            medium.write(offset: 8192, bytes: ByteBuffer(bytes: pattern)) { written in
                guard case .success = written else { return promise.succeed(["write: \(written)"]) }
                var problems: [String] = []
                var outstanding = 0
                for (offset, count) in [(8192, 4096), (8192, 65536), (12288, 8192), (8192 + 512, 1024)] {
                    outstanding += 1
                    medium.read(offset: UInt64(offset), count: count) { read in
                        outstanding -= 1
                        switch read {
                        case .success(let bytes):
                            let expected = Array(pattern[(offset - 8192)..<(offset - 8192 + count)])
                            if Array(bytes.readableBytesView) != expected { problems.append("read \(offset)+\(count): wrong bytes") }
                        case .failure(let error):
                            problems.append("read \(offset)+\(count): \(error)")
                        }
                        if outstanding == 0 { promise.succeed(problems) }
                    }
                }
            }
            return promise.futureResult
        }.wait().wait()
        XCTAssertEqual(result, [])
    }

    /// `readIfCached` reads what the page cache holds at once and is coherent with O_DIRECT writes
    /// (as the engine's segment writes are): right after one it returns the written data or
    /// refuses; once a read has brought the pages in it returns them.
    func testReadIfCachedReadsOnlyWhatThePageCacheHolds() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer {
            try? IOUringDrivers.shared.stopAll(in: group)
            try? group.syncShutdownGracefully()
        }
        let loop = group.next()
        // On the local disk: on tmpfs the page cache is the file, and everything is cached.
        let path = "/var/tmp/uring-cached-\(getpid()).img"
        // Sparse, so no page of it was ever cached.
        FileManager.default.createFile(atPath: path, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: path) }
        XCTAssertEqual(truncate(path, 1 << 20), 0)
        let file = try BlockFile(path: path, readOnly: false)
        defer { file.close() }
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { aligned.deallocate() }
        for index in 0..<8192 { aligned[index] = UInt8(truncatingIfNeeded: index * 13 + index / 4096) }
        let expected = Array(aligned)
        let outcome = try loop.submit { () -> EventLoopFuture<(Bool, [UInt8], Bool, [UInt8])> in
            let medium = UringFileMedium(file: file, driver: try IOUringDrivers.shared.driver(for: loop), direct: true)
            let promise = loop.makePromise(of: (Bool, [UInt8], Bool, [UInt8]).self)
            medium.write(offset: 512 << 10, unownedBytes: UnsafeRawBufferPointer(aligned)) { _ in
                var first = [UInt8](repeating: 0, count: 8192)
                let firstDone = first.withUnsafeMutableBytes { medium.readIfCached(offset: 512 << 10, into: $0) }
                medium.read(offset: 512 << 10, count: 8192) { _ in
                    var second = [UInt8](repeating: 0, count: 8192)
                    let secondDone = second.withUnsafeMutableBytes { medium.readIfCached(offset: 512 << 10, into: $0) }
                    promise.succeed((firstDone, first, secondDone, second))
                }
            }
            return promise.futureResult
        }.flatMap { $0 }.wait()
        // Right after the direct write the kernel may refuse (no cached pages) or, having started
        // readahead without waiting for long, answer: either way never with other data.
        if outcome.0 { XCTAssertEqual(outcome.1, expected, "an inline read right after a direct write returns the written data") }
        XCTAssertTrue(outcome.2, "pages a read brought in are read inline")
        XCTAssertEqual(outcome.3, expected)
    }
}
