import CLibURing
import Glibc
import NIOCore
import NIOPosix
import XCTest

@testable import SluiceIO

/// The io_uring ring and its event-loop driver, on a real file on the local disk.
final class IOUringTests: XCTestCase {
    private final class Collector: IOCompletionHandler {
        var completions: [(IOOperation, Int32)] = []
        var bursts = 0
        func ioCompleted(_ operation: IOOperation, result: Int32) { completions.append((operation, result)) }
        func ioBurstEnded() { bursts += 1 }
    }

    private var group: MultiThreadedEventLoopGroup!
    private var path: String!
    private var descriptor: Int32 = -1

    override func setUp() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        path = "/var/tmp/sluice-io-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        descriptor = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        XCTAssertEqual(ftruncate(descriptor, 1 << 20), 0)
    }

    override func tearDown() {
        try? IOUringDrivers.shared.stopAll(in: group)
        try? group.syncShutdownGracefully()
        close(descriptor)
        unlink(path)
    }

    /// Runs `body` on the loop and waits until `until` says the collector has what it needs.
    private func onLoop(_ body: @escaping (IOUringDriver, Collector) -> Void, until done: @escaping (Collector) -> Bool) throws -> Collector {
        let loop = group.next()
        let collector = Collector()
        let driver = try loop.submit { try IOUringDrivers.shared.driver(for: loop) }.wait()
        try loop.submit { body(driver, collector) }.wait()
        for _ in 0..<1000 {
            if try loop.submit({ done(collector) }).wait() { return collector }
            usleep(2000)
        }
        XCTFail("operations did not complete")
        return collector
    }

    func testWriteSyncThenReadBackIntoTheReservedTail() throws {
        let data = (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let collector = try onLoop({ driver, collector in
            var buffer = ByteBufferAllocator().buffer(capacity: 8192)
            buffer.writeBytes(data)
            driver.ring.enqueue(IOOperation(kind: .write, fileDescriptor: self.descriptor, offset: 4096, lengthBytes: 8192,
                                            buffer: buffer, readWriteFlags: Int32(RWF_DSYNC), context: 1), handler: collector)
            driver.ring.enqueue(IOOperation(kind: .syncData, fileDescriptor: self.descriptor, context: 2), handler: collector)
            driver.ring.submit()
        }, until: { $0.completions.count == 2 })
        // Operations submitted together complete in any order.
        let results = Dictionary(uniqueKeysWithValues: collector.completions.map { ($0.0.context, $0.1) })
        XCTAssertEqual(results, [1: 8192, 2: 0])
        XCTAssertGreaterThanOrEqual(collector.bursts, 1)

        let reader = try onLoop({ driver, collector in
            var buffer = ByteBufferAllocator().buffer(capacity: 16 + 8192)
            buffer.writeString("header, 16 bytes")
            driver.ring.enqueue(IOOperation(kind: .read, fileDescriptor: self.descriptor, offset: 4096, lengthBytes: 8192,
                                            buffer: buffer, context: 3), handler: collector)
            driver.ring.submit()
        }, until: { $0.completions.count == 1 })
        let (operation, result) = reader.completions[0]
        XCTAssertEqual(result, 8192)
        var buffer = try XCTUnwrap(operation.buffer)
        XCTAssertEqual(buffer.readString(length: 16), "header, 16 bytes")
        XCTAssertEqual(buffer.readBytes(length: 8192), data)
    }

    func testErrorsComeBackAsNegatedErrno() throws {
        let collector = try onLoop({ driver, collector in
            var buffer = ByteBufferAllocator().buffer(capacity: 4096)
            buffer.writeRepeatingByte(1, count: 4096)
            driver.ring.enqueue(IOOperation(kind: .write, fileDescriptor: 9999, offset: 0, lengthBytes: 4096, buffer: buffer), handler: collector)
            // Reading past the end of the file is end-of-file, reported as EIO rather than a silent short read.
            var readBuffer = ByteBufferAllocator().buffer(capacity: 4096)
            readBuffer.reserveCapacity(4096)
            driver.ring.enqueue(IOOperation(kind: .read, fileDescriptor: self.descriptor, offset: 4 << 20, lengthBytes: 4096,
                                            buffer: readBuffer), handler: collector)
            driver.ring.submit()
        }, until: { $0.completions.count == 2 })
        XCTAssertEqual(Set(collector.completions.map(\.1)), [-EBADF, -EIO])
    }

    func testManyOperationsReuseSlotsAndAllComplete() throws {
        let count = 2000
        let collector = try onLoop({ driver, collector in
            for index in 0..<count {
                var buffer = ByteBufferAllocator().buffer(capacity: 512)
                buffer.writeRepeatingByte(UInt8(truncatingIfNeeded: index), count: 512)
                driver.ring.enqueue(IOOperation(kind: .write, fileDescriptor: self.descriptor, offset: UInt64(index % 2048) * 512,
                                                lengthBytes: 512, buffer: buffer, context: UInt64(index)), handler: collector)
                if index % 100 == 99 { driver.ring.submit() }
            }
            driver.ring.submit()
        }, until: { $0.completions.count == count })
        XCTAssertEqual(collector.completions.count, count)
        XCTAssertTrue(collector.completions.allSatisfy { $0.1 == 512 })
        XCTAssertEqual(Set(collector.completions.map(\.0.context)).count, count)
        var check = [UInt8](repeating: 0, count: 512)
        XCTAssertEqual(pread(descriptor, &check, 512, 1999 * 512), 512)
        XCTAssertEqual(check, [UInt8](repeating: UInt8(truncatingIfNeeded: 1999), count: 512))
    }

    func testFallocatePunchesAHole() throws {
        XCTAssertEqual(pwrite(descriptor, [UInt8](repeating: 0xFF, count: 65536), 65536, 0), 65536)
        let collector = try onLoop({ driver, collector in
            driver.ring.enqueue(IOOperation(kind: .fallocate, fileDescriptor: self.descriptor, offset: 0, lengthBytes: 65536,
                                            mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE), handler: collector)
            driver.ring.submit()
        }, until: { $0.completions.count == 1 })
        XCTAssertEqual(collector.completions[0].1, 0)
        var check = [UInt8](repeating: 1, count: 65536)
        XCTAssertEqual(pread(descriptor, &check, 65536, 0), 65536)
        XCTAssertEqual(check, [UInt8](repeating: 0, count: 65536))
    }
}
