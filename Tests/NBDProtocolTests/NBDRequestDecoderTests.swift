import NIOCore
import XCTest

@testable import NBDProtocol

final class NBDRequestDecoderTests: XCTestCase {
    private let allocator = ByteBufferAllocator()

    private func header(_ command: NBDCommand, length: UInt32, cookie: UInt64 = 7, offset: UInt64 = 4096,
                        flags: NBDCommandFlags = []) -> NBDRequestHeader {
        NBDRequestHeader(flags: flags, command: command, cookie: cookie, offset: offset, lengthBytes: length)
    }

    func testRequestHeaderLayoutIsBigEndian28Bytes() throws {
        var buffer = allocator.buffer(capacity: 28)
        buffer.writeNBDRequestHeader(header(.write, length: 0x1000, cookie: 0x0102_0304_0506_0708, offset: 0x1122_3344_5566_7788, flags: .fua))
        XCTAssertEqual(Array(buffer.readableBytesView), [
            0x25, 0x60, 0x95, 0x13,  // magic
            0x00, 0x01,  // flags: FUA
            0x00, 0x01,  // command: WRITE
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // cookie
            0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,  // offset
            0x00, 0x00, 0x10, 0x00,  // length
        ])
        let decoded = try buffer.readNBDRequestHeader()
        XCTAssertEqual(decoded, header(.write, length: 0x1000, cookie: 0x0102_0304_0506_0708, offset: 0x1122_3344_5566_7788, flags: .fua))
        XCTAssertEqual(buffer.readableBytes, 0)
    }

    func testPartialHeaderConsumesNothing() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1 << 25)
        var full = allocator.buffer(capacity: 28)
        full.writeNBDRequestHeader(header(.read, length: 512))
        var partial = full.getSlice(at: 0, length: 27)!
        XCTAssertNil(try decoder.next(from: &partial, allocator: allocator))
        XCTAssertEqual(partial.readableBytes, 27)
    }

    func testBadMagicThrows() {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1 << 25)
        var buffer = allocator.buffer(capacity: 28)
        buffer.writeRepeatingByte(0x41, count: 28)
        XCTAssertThrowsError(try decoder.next(from: &buffer, allocator: allocator)) { error in
            XCTAssertEqual(error as? NBDProtocolError, .badRequestMagic(0x4141_4141))
        }
    }

    func testReadHasNoPayloadAndWriteCarriesItsPayload() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1 << 25)
        var buffer = allocator.buffer(capacity: 128)
        buffer.writeNBDRequestHeader(header(.read, length: 4096, cookie: 1))
        buffer.writeNBDRequestHeader(header(.write, length: 8, cookie: 2))
        buffer.writeBytes([1, 2, 3, 4, 5, 6, 7, 8])
        buffer.writeNBDRequestHeader(header(.flush, length: 0, cookie: 3, offset: 0))
        guard case .request(let first, let firstPayload) = try decoder.next(from: &buffer, allocator: allocator) else {
            return XCTFail("expected a request")
        }
        XCTAssertEqual(first.command, .read)
        XCTAssertNil(firstPayload)
        guard case .request(let second, let payload) = try decoder.next(from: &buffer, allocator: allocator) else {
            return XCTFail("expected a request")
        }
        XCTAssertEqual(second.cookie, 2)
        XCTAssertEqual(payload.map { Array($0.readableBytesView) }, [1, 2, 3, 4, 5, 6, 7, 8])
        guard case .request(let third, nil) = try decoder.next(from: &buffer, allocator: allocator) else {
            return XCTFail("expected a request")
        }
        XCTAssertEqual(third.command, .flush)
        XCTAssertNil(try decoder.next(from: &buffer, allocator: allocator))
        XCTAssertTrue(decoder.isAtRequestBoundary)
    }

    func testPayloadSplitAcrossManyReadsIsGatheredExactly() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1 << 25)
        var stream = allocator.buffer(capacity: 10_000)
        stream.writeNBDRequestHeader(header(.write, length: 5000, cookie: 9))
        let payloadBytes = (0..<5000).map { UInt8(truncatingIfNeeded: $0 * 31) }
        stream.writeBytes(payloadBytes)
        stream.writeNBDRequestHeader(header(.read, length: 512, cookie: 10))
        var frames: [NBDRequestDecoder.Frame] = []
        // Feed in awkward pieces: 1, 2, 3, ... bytes at a time.
        var piece = 1
        while stream.readableBytes > 0 {
            var chunk = stream.readSlice(length: min(piece, stream.readableBytes))!
            while let frame = try decoder.next(from: &chunk, allocator: allocator) {
                frames.append(frame)
            }
            // A partial header stays in the chunk: carry it into the next piece.
            if chunk.readableBytes > 0 {
                var carried = allocator.buffer(capacity: chunk.readableBytes + stream.readableBytes)
                carried.writeBuffer(&chunk)
                carried.writeBuffer(&stream)
                stream = carried
            }
            piece = piece % 97 + 1
        }
        XCTAssertEqual(frames.count, 2)
        guard case .request(let write, let payload?) = frames[0] else { return XCTFail("expected the write first") }
        XCTAssertEqual(write.cookie, 9)
        XCTAssertEqual(Array(payload.readableBytesView), payloadBytes)
        guard case .request(let read, nil) = frames[1] else { return XCTFail("expected the read second") }
        XCTAssertEqual(read.cookie, 10)
    }

    func testOversizedWritePayloadIsSkippedNotBuffered() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1024)
        var buffer = allocator.buffer(capacity: 4096)
        buffer.writeNBDRequestHeader(header(.write, length: 3000, cookie: 5))
        buffer.writeRepeatingByte(0xEE, count: 1000)
        XCTAssertNil(try decoder.next(from: &buffer, allocator: allocator))
        XCTAssertEqual(buffer.readableBytes, 0, "skipped bytes must be consumed, not kept")
        buffer.writeRepeatingByte(0xEE, count: 2000)
        buffer.writeNBDRequestHeader(header(.read, length: 512, cookie: 6))
        guard case .oversizedWrite(let skipped) = try decoder.next(from: &buffer, allocator: allocator) else {
            return XCTFail("expected the oversized write to be reported")
        }
        XCTAssertEqual(skipped.cookie, 5)
        guard case .request(let next, nil) = try decoder.next(from: &buffer, allocator: allocator) else {
            return XCTFail("the stream must stay in step after skipping")
        }
        XCTAssertEqual(next.cookie, 6)
    }

    func testZeroLengthWriteHasNoPayload() throws {
        var decoder = NBDRequestDecoder(maximumPayloadBytes: 1024)
        var buffer = allocator.buffer(capacity: 64)
        buffer.writeNBDRequestHeader(header(.write, length: 0, cookie: 1))
        buffer.writeNBDRequestHeader(header(.read, length: 0, cookie: 2))
        guard case .request(_, nil) = try decoder.next(from: &buffer, allocator: allocator),
            case .request(let read, nil) = try decoder.next(from: &buffer, allocator: allocator)
        else { return XCTFail("expected two requests") }
        XCTAssertEqual(read.cookie, 2)
    }
}
