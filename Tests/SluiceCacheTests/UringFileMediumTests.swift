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
}
