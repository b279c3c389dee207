import Foundation
import NBDClient
import NBDProtocol
import NBDServer
import NIOCore
import XCTest

/// The real server on a Unix socket, driven by libnbd (a real, independent client), on both a
/// memory file system (inline I/O paths) and the local disk (io_uring paths).
final class NBDServerTests: XCTestCase {
    private let size = 64 << 20

    private func eachMedium(_ body: (TestServer, TestServer.Medium) throws -> Void) throws {
        for medium in TestServer.Medium.allCases {
            let server = try TestServer(medium: medium, exports: [.init(name: "", sizeBytes: size)])
            defer { server.stop() }
            try body(server, medium)
        }
    }

    func testNegotiationAdvertisesSizeFlagsAndBlockSizes() throws {
        try eachMedium { server, _ in
            let client = try NBDClient(uri: server.uri())
            XCTAssertEqual(client.sizeBytes, Int64(size))
            XCTAssertTrue(client.structuredReplies)
            XCTAssertTrue(client.canFlush)
            XCTAssertTrue(client.canFUA)
            XCTAssertTrue(client.canTrim)
            XCTAssertTrue(client.canZero)
            XCTAssertTrue(client.canFastZero)
            XCTAssertTrue(client.canDF)
            XCTAssertTrue(client.canCache)
            XCTAssertTrue(client.canMultiConnection)
            XCTAssertTrue(client.canBlockStatus)
            XCTAssertFalse(client.isReadOnly)
            XCTAssertEqual(client.blockSizes.minimum, 512)
            XCTAssertEqual(client.blockSizes.preferred, 4096)
            XCTAssertEqual(client.blockSizes.maximum, 32 << 20)
        }
    }

    func testWritesReadBackWithAndWithoutFUAAndSurviveFlush() throws {
        try eachMedium { server, medium in
            for structured in [true, false] {
                let client = try NBDClient(uri: server.uri(), structuredReplies: structured)
                let first = pattern(seed: 1, count: 4096)
                let second = pattern(seed: 2, count: 12288)
                let sector = pattern(seed: 3, count: 512)
                try client.write(first, offset: 0)
                try client.write(second, offset: 1 << 20, flags: NBDFlag.fua)
                try client.write(sector, offset: 4096 + 512)
                try client.flush()
                XCTAssertEqual(try client.read(length: 4096, offset: 0), first, "\(medium)")
                XCTAssertEqual(try client.read(length: 12288, offset: 1 << 20), second, "\(medium)")
                XCTAssertEqual(try client.read(length: 512, offset: 4096 + 512), sector, "\(medium)")
                XCTAssertEqual(try client.read(length: 512, offset: 4096), [UInt8](repeating: 0, count: 512), "\(medium)")
                // The last sector of the export.
                let last = pattern(seed: 4, count: 512)
                try client.write(last, offset: UInt64(size - 512), flags: NBDFlag.fua)
                XCTAssertEqual(try client.read(length: 512, offset: UInt64(size - 512)), last)
            }
            // What was written is in the file itself.
            try server.volumes[0].file.synchronize()
            let onDisk = try Data(contentsOf: URL(fileURLWithPath: server.paths[0]))
            XCTAssertEqual(Array(onDisk[0..<4096]), pattern(seed: 1, count: 4096))
        }
    }

    func testLargeRequestsUpToTheMaximumPayload() throws {
        try eachMedium { server, _ in
            let client = try NBDClient(uri: server.uri())
            let big = tiledPattern(seed: 9, count: 32 << 20)
            try client.write(big, offset: 8 << 20)
            let back = try client.read(length: 32 << 20, offset: 8 << 20)
            XCTAssertTrue(sameBytes(back, big), "a 32 MiB write must read back intact")
        }
    }

    func testTrimAndWriteZeroesReadBackAsZeros() throws {
        try eachMedium { server, medium in
            let client = try NBDClient(uri: server.uri())
            let zeros = [UInt8](repeating: 0, count: 65536)
            for (index, flags) in [UInt32(0), NBDFlag.noHole, NBDFlag.fua, NBDFlag.noHole | NBDFlag.fua].enumerated() {
                let offset = UInt64(index) << 20
                try client.write(pattern(seed: UInt64(10 + index), count: 65536), offset: offset)
                try client.zero(length: 65536, offset: offset, flags: flags)
                XCTAssertEqual(try client.read(length: 65536, offset: offset), zeros, "\(medium) zero flags \(flags)")
            }
            // A fast zero either succeeds (and zeroes) or fails with ENOTSUP and changes nothing.
            let data = pattern(seed: 20, count: 65536)
            try client.write(data, offset: 8 << 20)
            do {
                try client.zero(length: 65536, offset: 8 << 20, flags: NBDFlag.fastZero | NBDFlag.noHole)
                XCTAssertEqual(try client.read(length: 65536, offset: 8 << 20), zeros)
            } catch let failure as NBDClient.Failure {
                XCTAssertEqual(failure.errno, ENOTSUP, "\(failure)")
                XCTAssertEqual(try client.read(length: 65536, offset: 8 << 20), data)
            }
            // Trim: the data is either still there or zero, and with punch-hole support it is zero.
            try client.write(data, offset: 9 << 20)
            try client.trim(length: 65536, offset: 9 << 20, flags: NBDFlag.fua)
            XCTAssertEqual(try client.read(length: 65536, offset: 9 << 20), zeros)
            try client.cache(length: 1 << 20, offset: 0)
        }
    }

    func testBlockStatusReportsHolesAndData() throws {
        try eachMedium { server, medium in
            let client = try NBDClient(uri: server.uri())
            try client.write(pattern(seed: 5, count: 1 << 20), offset: 4 << 20)
            let extents = try client.blockStatus(length: 16 << 20, offset: 0)
            XCTAssertFalse(extents.isEmpty)
            // Walk the extents: [0, 4M) hole, [4M, 5M) data, then hole.
            var position: UInt64 = 0
            var dataRanges: [(UInt64, UInt64)] = []
            for (length, flags) in extents {
                XCTAssertGreaterThan(length, 0)
                XCTAssertEqual(length % 512, 0)
                if flags & 1 == 0 { dataRanges.append((position, position + UInt64(length))) }
                position += UInt64(length)
            }
            XCTAssertTrue(dataRanges.contains { $0.0 <= 4 << 20 && $0.1 >= 5 << 20 }, "\(medium): \(extents)")
            XCTAssertFalse(dataRanges.contains { $0.1 <= 4 << 20 && $0.0 < 1 << 20 }, "\(medium): \(extents)")
            let one = try client.blockStatus(length: 16 << 20, offset: 0, flags: NBDFlag.requestOne)
            XCTAssertEqual(one.count, 1)
            XCTAssertLessThanOrEqual(one[0].0, 16 << 20)
        }
    }

    func testManyRequestsInFlightOnOneConnection() throws {
        try eachMedium { server, medium in
            let client = try NBDClient(uri: server.uri())
            let count = 128
            let blocks = (0..<count).map { pattern(seed: UInt64(100 + $0), count: 4096) }
            var cookies: [Int64] = []
            for (index, block) in blocks.enumerated() {
                try block.withUnsafeBytes {
                    cookies.append(try client.startWrite($0, offset: UInt64(index * 8192), flags: index % 3 == 0 ? NBDFlag.fua : 0))
                }
            }
            try blocks.withUnsafeBufferPointer { _ in try client.waitForAll(cookies) }
            var readBack = [[UInt8]](repeating: [UInt8](repeating: 0, count: 4096), count: count)
            cookies = []
            for index in 0..<count {
                try readBack[index].withUnsafeMutableBytes { cookies.append(try client.startRead($0, offset: UInt64(index * 8192))) }
            }
            try client.waitForAll(cookies)
            XCTAssertEqual(readBack, blocks, "\(medium)")
        }
    }

    func testReadingPausesAtTheInFlightLimitsAndResumes() throws {
        // Tiny limits make the server stop reading after a few requests and resume as they complete.
        let configuration = NBDServerConfiguration(inFlightRequestsMax: 3, inFlightBytesMax: 64 * 1024, replyQueueBytesMax: 8 * 1024)
        for medium in TestServer.Medium.allCases {
            let server = try TestServer(medium: medium, configuration: configuration)
            defer { server.stop() }
            let client = try NBDClient(uri: server.uri())
            let blocks = (0..<200).map { pattern(seed: UInt64(500 + $0), count: 32768) }
            var cookies: [Int64] = []
            for (index, block) in blocks.enumerated() {
                try block.withUnsafeBytes { cookies.append(try client.startWrite($0, offset: UInt64(index) * 32768, flags: index % 7 == 0 ? NBDFlag.fua : 0)) }
            }
            try client.waitForAll(cookies)
            var readBack = [[UInt8]](repeating: [UInt8](repeating: 0, count: 32768), count: blocks.count)
            cookies = []
            for index in 0..<blocks.count {
                try readBack[index].withUnsafeMutableBytes { cookies.append(try client.startRead($0, offset: UInt64(index) * 32768)) }
            }
            try client.waitForAll(cookies)
            XCTAssertTrue(zip(readBack, blocks).allSatisfy { sameBytes($0, $1) }, "\(medium)")
        }
    }

    func testFlushOnOneConnectionAfterWritesOnAnother() throws {
        let server = try TestServer(medium: .disk)
        defer { server.stop() }
        let writer = try NBDClient(uri: server.uri())
        let flusher = try NBDClient(uri: server.uri())
        let data = pattern(seed: 77, count: 8192)
        try writer.write(data, offset: 1 << 20)
        try flusher.flush()
        XCTAssertEqual(try flusher.read(length: 8192, offset: 1 << 20), data, "connections share one volume")
    }

    func testErrorsFollowTheSpecificationAndKeepTheConnection() throws {
        try eachMedium { server, _ in
            for structured in [true, false] {
                let client = try NBDClient(uri: server.uri(), strict: false, structuredReplies: structured)
                func expect(_ errno: Int32, _ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line) {
                    do {
                        try body()
                        XCTFail("expected errno \(errno)", file: file, line: line)
                    } catch let failure as NBDClient.Failure {
                        XCTAssertEqual(failure.errno, errno, "\(failure)", file: file, line: line)
                    } catch {
                        XCTFail("\(error)", file: file, line: line)
                    }
                }
                let end = UInt64(size)
                expect(EINVAL) { _ = try client.read(length: 4096, offset: end - 512) }
                expect(EINVAL) { try client.trim(length: 4096, offset: end) }
                expect(ENOSPC) { try client.write([UInt8](repeating: 1, count: 4096), offset: end - 512) }
                expect(ENOSPC) { try client.zero(length: 4096, offset: end) }
                expect(EINVAL) { _ = try client.read(length: 512, offset: 100) }
                expect(EINVAL) { _ = try client.read(length: (32 << 20) + 4096, offset: 0) }
                // An oversized write: the payload is skipped, the connection stays usable.
                expect(EINVAL) { try client.write([UInt8](repeating: 7, count: (32 << 20) + 4096), offset: 0) }
                // Zero-length requests are answered.
                XCTAssertEqual(try client.read(length: 0, offset: 0), [])
                try client.write([], offset: 0)
                try client.zero(length: 0, offset: 0)
                try client.trim(length: 0, offset: 0)
                // The connection still works.
                let data = pattern(seed: 8, count: 4096)
                try client.write(data, offset: 0)
                XCTAssertEqual(try client.read(length: 4096, offset: 0), data)
            }
        }
    }

    func testReadOnlyExportRefusesWritesWithEPERM() throws {
        let server = try TestServer(exports: [.init(name: "ro", sizeBytes: 1 << 20, readOnly: true)])
        defer { server.stop() }
        let client = try NBDClient(uri: server.uri(export: "ro"), strict: false)
        XCTAssertTrue(client.isReadOnly)
        XCTAssertFalse(client.canTrim)
        for attempt in [{ try client.write([UInt8](repeating: 1, count: 512), offset: 0) },
                        { try client.trim(length: 512, offset: 0) },
                        { try client.zero(length: 512, offset: 0) }] {
            XCTAssertThrowsError(try attempt()) { XCTAssertEqual(($0 as? NBDClient.Failure)?.errno, EPERM) }
        }
        XCTAssertEqual(try client.read(length: 512, offset: 0), [UInt8](repeating: 0, count: 512))
    }

    func testSeveralNamedExports() throws {
        let server = try TestServer(exports: [.init(name: "a", sizeBytes: 1 << 20), .init(name: "b", sizeBytes: 2 << 20)])
        defer { server.stop() }
        let a = try NBDClient(uri: server.uri(export: "a"))
        let b = try NBDClient(uri: server.uri(export: "b"))
        let byDefault = try NBDClient(uri: server.uri(export: ""))
        XCTAssertEqual(a.sizeBytes, 1 << 20)
        XCTAssertEqual(b.sizeBytes, 2 << 20)
        XCTAssertEqual(byDefault.sizeBytes, 1 << 20, "the first export is the default")
        try a.write(pattern(seed: 1, count: 512), offset: 0)
        XCTAssertEqual(try b.read(length: 512, offset: 0), [UInt8](repeating: 0, count: 512), "exports are separate")
        XCTAssertThrowsError(try NBDClient(uri: server.uri(export: "missing")))
    }

    func testGarbageHandshakeClosesOnlyThatConnection() throws {
        let server = try TestServer()
        defer { server.stop() }
        let good = try NBDClient(uri: server.uri())
        let garbage = try RawNBDConnection(socketPath: server.socketPath)
        _ = try garbage.receive(18)
        try garbage.send(Array("this is not an NBD client at all, just noise".utf8))
        XCTAssertTrue(try garbage.waitForClose())
        let flags = try RawNBDConnection(socketPath: server.socketPath)
        _ = try flags.receive(18)
        try flags.send([0, 0, 0, 0x80])  // unknown client flags
        XCTAssertTrue(try flags.waitForClose())
        let data = pattern(seed: 6, count: 4096)
        try good.write(data, offset: 0)
        XCTAssertEqual(try good.read(length: 4096, offset: 0), data)
        XCTAssertEqual(try NBDClient(uri: server.uri()).sizeBytes, 64 << 20, "new clients are still served")
    }

    func testBadRequestMagicAndVanishingClientsCloseOnlyTheirConnection() throws {
        let server = try TestServer()
        defer { server.stop() }
        let good = try NBDClient(uri: server.uri())
        let bad = try RawNBDConnection(socketPath: server.socketPath)
        XCTAssertEqual(try bad.negotiate(), 64 << 20)
        try bad.send([UInt8](repeating: 0x55, count: 28))
        XCTAssertTrue(try bad.waitForClose())

        // A client that dies halfway through a write payload.
        let vanishing = try RawNBDConnection(socketPath: server.socketPath)
        _ = try vanishing.negotiate()
        try vanishing.sendRequest(.write, cookie: 1, offset: 0, length: 1 << 20, payload: pattern(seed: 1, count: 1000))
        _ = vanishing  // closed by deinit below
        // And one that dies halfway through a header.
        let truncated = try RawNBDConnection(socketPath: server.socketPath)
        _ = try truncated.negotiate()
        try truncated.send([0x25, 0x60, 0x95])

        let data = pattern(seed: 7, count: 4096)
        try good.write(data, offset: 4096)
        XCTAssertEqual(try good.read(length: 4096, offset: 4096), data)
    }

    func testAClientThatNeverNegotiatesIsDisconnected() throws {
        var configuration = NBDServerConfiguration()
        configuration.handshakeTimeout = .milliseconds(300)
        let server = try TestServer(configuration: configuration)
        defer { server.stop() }
        let silent = try RawNBDConnection(socketPath: server.socketPath)
        XCTAssertNotNil(try silent.receive(18), "the greeting comes first")
        XCTAssertTrue(try silent.waitForClose(), "a client that never sends its flags is dropped")
        // One that negotiates in time is not.
        let client = try NBDClient(uri: server.uri())
        usleep(500_000)
        XCTAssertEqual(try client.read(length: 512, offset: 0).count, 512)
    }

    func testDisconnectWithFlagsIsNeverAnswered() throws {
        let server = try TestServer()
        defer { server.stop() }
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        _ = try raw.negotiate()
        try raw.sendRequest(.disconnect, cookie: 1, offset: 99, length: 7, flags: [.noHole, .doNotFragment])
        XCTAssertTrue(try raw.waitForClose(), "DISC closes the connection without a reply")
    }

    func testRawProtocolOversizedWriteAndZeroLengthKeepTheStreamInStep() throws {
        let server = try TestServer()
        defer { server.stop() }
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        _ = try raw.negotiate()
        // A write of 40 MiB: over the maximum, so refused, but its payload is consumed.
        let oversized = 40 << 20
        try raw.sendRequest(.write, cookie: 11, offset: 0, length: UInt32(oversized))
        let chunk = [UInt8](repeating: 0xAB, count: 1 << 20)
        for _ in 0..<(oversized >> 20) { try raw.send(chunk) }
        let refused = try XCTUnwrap(raw.receiveSimpleReply())
        XCTAssertEqual(refused.cookie, 11)
        XCTAssertEqual(refused.error, 22)
        try raw.sendRequest(.read, cookie: 12, offset: 0, length: 0)
        let empty = try XCTUnwrap(raw.receiveSimpleReply())
        XCTAssertEqual(empty.cookie, 12)
        XCTAssertEqual(empty.error, 0)
        try raw.sendRequest(.write, cookie: 13, offset: 512, length: 512, flags: .fua, payload: pattern(seed: 2, count: 512))
        XCTAssertEqual(try XCTUnwrap(raw.receiveSimpleReply()).error, 0)
        try raw.sendRequest(.read, cookie: 14, offset: 512, length: 512)
        let read = try XCTUnwrap(raw.receiveSimpleReply(dataBytes: 512))
        XCTAssertEqual(read.cookie, 14)
        XCTAssertEqual(read.data, pattern(seed: 2, count: 512))
        try raw.sendRequest(NBDCommand(rawValue: 99), cookie: 15, offset: 0, length: 0)
        XCTAssertEqual(try XCTUnwrap(raw.receiveSimpleReply()).error, 22, "unknown commands get EINVAL")
        try raw.sendRequest(.disconnect, cookie: 16, offset: 0, length: 0)
        XCTAssertTrue(try raw.waitForClose())
    }

    func testMessagesSplitAtEveryByteBoundary() throws {
        // Every message arrives one byte at a time, so every read ends inside a header, an option
        // or a payload: nothing may be lost between reads.
        let server = try TestServer()
        defer { server.stop() }
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        raw.sendsOneByteAtATime = true
        XCTAssertEqual(try raw.negotiate(), 64 << 20)
        let data = pattern(seed: 41, count: 1024)
        try raw.sendRequest(.write, cookie: 1, offset: 4096, length: 1024, payload: data)
        try raw.sendRequest(.read, cookie: 2, offset: 4096, length: 1024)
        try raw.sendRequest(.flush, cookie: 3, offset: 0, length: 0)
        let written = try XCTUnwrap(raw.receiveSimpleReply())
        XCTAssertEqual(written.cookie, 1)
        XCTAssertEqual(written.error, 0)
        let read = try XCTUnwrap(raw.receiveSimpleReply(dataBytes: 1024))
        XCTAssertEqual(read.cookie, 2)
        XCTAssertEqual(read.data, data)
        let flushed = try XCTUnwrap(raw.receiveSimpleReply())
        XCTAssertEqual(flushed.cookie, 3)
        XCTAssertEqual(flushed.error, 0)
    }

    func testRepliesQueuedBeforeDisconnectAllArriveAtASlowReader() throws {
        let server = try TestServer()
        defer { server.stop() }
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        _ = try raw.negotiate()
        let data = tiledPattern(seed: 51, count: 8 << 20)
        try raw.sendRequest(.write, cookie: 1, offset: 0, length: UInt32(data.count), payload: data)
        XCTAssertEqual(try XCTUnwrap(raw.receiveSimpleReply()).error, 0)
        // Four 8 MiB reads and a disconnect, sent together; the replies are read only afterwards.
        for cookie in 2...5 {
            try raw.sendRequest(.read, cookie: UInt64(cookie), offset: 0, length: UInt32(data.count))
        }
        try raw.sendRequest(.disconnect, cookie: 6, offset: 0, length: 0)
        usleep(300_000)
        var cookies: [UInt64] = []
        for _ in 2...5 {
            let reply = try XCTUnwrap(raw.receiveSimpleReply(dataBytes: data.count), "a reply queued before the disconnect was lost")
            XCTAssertTrue(sameBytes(reply.data, data))
            cookies.append(reply.cookie)
        }
        XCTAssertEqual(cookies.sorted(), [2, 3, 4, 5])
        XCTAssertTrue(try raw.waitForClose(), "the server closes after the last reply")
    }

    func testAClientThatNeverReadsCannotMakeTheServerHoldUnboundedMemory() throws {
        let server = try TestServer()
        defer { server.stop() }
        let before = residentBytes()
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        _ = try raw.negotiate()
        // 4000 reads of 32 MiB each (125 GiB of replies) in 112 KB of headers, never read back.
        var headers = ByteBufferAllocator().buffer(capacity: 4000 * 28)
        for cookie in 0..<4000 {
            headers.writeNBDRequestHeader(NBDRequestHeader(flags: [], command: .read, cookie: UInt64(cookie), offset: 0, lengthBytes: 32 << 20))
        }
        raw.sendsWithoutBlocking = true
        try raw.send(headers)
        usleep(1_000_000)
        let grown = residentBytes() - before
        XCTAssertLessThan(grown, 512 << 20, "the server buffered \(grown >> 20) MiB for a client that does not read")
        // Other clients are still served.
        let client = try NBDClient(uri: server.uri())
        XCTAssertEqual(try client.read(length: 4096, offset: 0).count, 4096)
    }

    func testAReadThatMissesThePageCacheCompletesOnItsOwn() throws {
        // On the local disk reads go through io_uring; a read that misses the page cache completes
        // later, and the event loop must be woken for it with nothing else happening.
        let server = try TestServer(medium: .disk)
        defer { server.stop() }
        let client = try NBDClient(uri: server.uri())
        let data = tiledPattern(seed: 61, count: 4 << 20)
        try client.write(data, offset: 0)
        try client.flush()
        let descriptor = open(server.paths[0], O_RDONLY)
        XCTAssertGreaterThanOrEqual(descriptor, 0)
        XCTAssertEqual(fdatasync(descriptor), 0)
        XCTAssertEqual(posix_fadvise(descriptor, 0, 0, POSIX_FADV_DONTNEED), 0)
        close(descriptor)
        let started = Date()
        let back = try client.read(length: 4 << 20, offset: 0)
        XCTAssertTrue(sameBytes(back, data))
        XCTAssertLessThan(Date().timeIntervalSince(started), 20, "the read only completed when something else woke the loop")
    }

    func testStructuredReadsAreOneChunkAndErrorsCarryMessages() throws {
        let server = try TestServer()
        defer { server.stop() }
        let raw = try RawNBDConnection(socketPath: server.socketPath)
        _ = try raw.negotiate(structuredReplies: true)
        let data = pattern(seed: 31, count: 65536)
        try raw.sendRequest(.write, cookie: 1, offset: 65536, length: 65536, payload: data)
        let written = try XCTUnwrap(raw.receiveSimpleReply())
        XCTAssertEqual(written.error, 0)
        // With DF (and without) a read is exactly one OFFSET_DATA chunk, flagged DONE.
        for flags in [NBDCommandFlags.doNotFragment, []] {
            try raw.sendRequest(.read, cookie: 2, offset: 65536, length: 65536, flags: flags)
            let chunk = try XCTUnwrap(raw.receiveChunk())
            XCTAssertEqual(chunk.cookie, 2)
            XCTAssertEqual(chunk.type, NBDReplyChunkType.offsetData.rawValue)
            XCTAssertEqual(chunk.flags, NBDReplyChunkFlags.done.rawValue)
            XCTAssertEqual(ByteBuffer(bytes: chunk.payload.prefix(8)).getInteger(at: 0, as: UInt64.self), 65536)
            XCTAssertEqual(Array(chunk.payload.dropFirst(8)), data)
        }
        // A read past the end: one ERROR chunk with EINVAL and a message.
        try raw.sendRequest(.read, cookie: 3, offset: 64 << 20, length: 512)
        let error = try XCTUnwrap(raw.receiveChunk())
        XCTAssertEqual(error.type, NBDReplyChunkType.error.rawValue)
        XCTAssertEqual(error.flags, NBDReplyChunkFlags.done.rawValue)
        let payload = ByteBuffer(bytes: error.payload)
        XCTAssertEqual(payload.getInteger(at: 0, as: UInt32.self), 22)
        let messageLength = Int(payload.getInteger(at: 4, as: UInt16.self)!)
        XCTAssertGreaterThan(messageLength, 0)
        XCTAssertEqual(error.payload.count, 6 + messageLength)
        // A zero-length read is a single NONE chunk.
        try raw.sendRequest(.read, cookie: 4, offset: 0, length: 0)
        let none = try XCTUnwrap(raw.receiveChunk())
        XCTAssertEqual(none.type, NBDReplyChunkType.none.rawValue)
        XCTAssertEqual(none.flags, NBDReplyChunkFlags.done.rawValue)
        // BLOCK_STATUS without a selected context is refused with EINVAL.
        try raw.sendRequest(.blockStatus, cookie: 5, offset: 0, length: 4096)
        let refused = try XCTUnwrap(raw.receiveChunk())
        XCTAssertEqual(refused.type, NBDReplyChunkType.error.rawValue)
        XCTAssertEqual(ByteBuffer(bytes: refused.payload).getInteger(at: 0, as: UInt32.self), 22)
    }

    func testShutdownFinishesRequestsInFlight() throws {
        let server = try TestServer(medium: .disk)
        let client = try NBDClient(uri: server.uri())
        let blocks = (0..<64).map { pattern(seed: UInt64(300 + $0), count: 65536) }
        var cookies: [Int64] = []
        for (index, block) in blocks.enumerated() {
            try block.withUnsafeBytes { cookies.append(try client.startWrite($0, offset: UInt64(index) << 16)) }
        }
        try client.waitForAll(cookies)
        server.server.shutdown()
        XCTAssertEqual(server.server.connectionCount, 0)
        try server.volumes[0].close()
        let contents = try Data(contentsOf: URL(fileURLWithPath: server.paths[0]))
        for (index, block) in blocks.enumerated() {
            XCTAssertEqual(Array(contents[(index << 16)..<((index + 1) << 16)]), block)
        }
        server.stop()
    }
}
