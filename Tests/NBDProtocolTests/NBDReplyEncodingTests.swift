import NIOCore
import XCTest

@testable import NBDProtocol

final class NBDReplyEncodingTests: XCTestCase {
    private func bytes(_ body: (inout ByteBuffer) -> Void) -> [UInt8] {
        var buffer = ByteBufferAllocator().buffer(capacity: 64)
        body(&buffer)
        return Array(buffer.readableBytesView)
    }

    func testGreeting() {
        XCTAssertEqual(bytes { $0.writeNBDGreeting(flags: [.fixedNewstyle, .noZeroes]) },
                       Array("NBDMAGIC".utf8) + Array("IHAVEOPT".utf8) + [0x00, 0x03])
    }

    func testOptionReplyHeaderAndError() {
        XCTAssertEqual(bytes { $0.writeNBDOptionReply(option: .structuredReply, type: .ack) }, [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,
            0x00, 0x00, 0x00, 0x08,
            0x00, 0x00, 0x00, 0x01,
            0x00, 0x00, 0x00, 0x00,
        ])
        let error = bytes { $0.writeNBDOptionError(option: .info, type: .errorUnknown, message: "no") }
        XCTAssertEqual(Array(error[12..<20]), [0x80, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x02])
        XCTAssertEqual(Array(error[20...]), Array("no".utf8))
    }

    func testInfoReplies() {
        let export = bytes { $0.writeNBDInfoExport(option: .go, sizeBytes: 0x4000_0000, flags: [.hasFlags, .sendFlush]) }
        XCTAssertEqual(Array(export[12..<20]), [0, 0, 0, 3, 0, 0, 0, 12])
        XCTAssertEqual(Array(export[20...]), [0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0x05])
        let sizes = bytes { $0.writeNBDInfoBlockSize(option: .go, minimumBytes: 512, preferredBytes: 4096, maximumBytes: 1 << 25) }
        XCTAssertEqual(Array(sizes[16..<20]), [0, 0, 0, 14])
        XCTAssertEqual(Array(sizes[20...]), [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
        let name = bytes { $0.writeNBDInfoString(option: .info, type: .name, value: "disk") }
        XCTAssertEqual(Array(name[16...]), [0, 0, 0, 6, 0, 1] + Array("disk".utf8))
    }

    func testServerAndMetaContextReplies() {
        let server = bytes { $0.writeNBDServerReply(exportName: "disk") }
        XCTAssertEqual(Array(server[12...]), [0, 0, 0, 2, 0, 0, 0, 8, 0, 0, 0, 4] + Array("disk".utf8))
        let context = bytes { $0.writeNBDMetaContextReply(option: .setMetaContext, contextID: 1, name: "base:allocation") }
        XCTAssertEqual(Array(context[12..<24]), [0, 0, 0, 4, 0, 0, 0, 19, 0, 0, 0, 1])
    }

    func testExportNameReplyPadding() {
        XCTAssertEqual(bytes { $0.writeNBDExportNameReply(sizeBytes: 1, flags: .hasFlags, padWithZeroes: true) }.count, 134)
        XCTAssertEqual(bytes { $0.writeNBDExportNameReply(sizeBytes: 1, flags: .hasFlags, padWithZeroes: false) },
                       [0, 0, 0, 0, 0, 0, 0, 1, 0, 1])
    }

    func testSimpleReply() {
        XCTAssertEqual(bytes { $0.writeNBDSimpleReply(error: .noSpace, cookie: 0xAABB) },
                       [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0xAA, 0xBB])
        var buffer = ByteBufferAllocator().buffer(capacity: 16)
        buffer.writeRepeatingByte(0xFF, count: 16)
        buffer.setNBDSimpleReply(error: .none, cookie: 3, at: 0)
        XCTAssertEqual(Array(buffer.readableBytesView), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3])
    }

    func testStructuredChunks() {
        XCTAssertEqual(bytes { $0.writeNBDChunkDone(cookie: 2) },
                       [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0])
        let error = bytes { $0.writeNBDChunkError(cookie: 2, error: .invalid, message: "bad") }
        XCTAssertEqual(Array(error[4..<8]), [0, 1, 0x80, 0x01])
        XCTAssertEqual(Array(error[16...]), [0, 0, 0, 9, 0, 0, 0, 22, 0, 3] + Array("bad".utf8))
        let status = bytes {
            $0.writeNBDChunkBlockStatus(cookie: 2, contextID: 1, descriptors: [(4096, 3), (512, 0)])
        }
        XCTAssertEqual(Array(status[4..<8]), [0, 1, 0, 5])
        XCTAssertEqual(Array(status[16...]), [0, 0, 0, 20, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0])
        var read = ByteBufferAllocator().buffer(capacity: 32)
        read.writeRepeatingByte(0, count: 28)
        read.writeBytes([9, 9])
        read.setNBDOffsetDataPrefix(cookie: 5, offset: 1024, dataBytes: 2, at: 0)
        XCTAssertEqual(Array(read.readableBytesView), [
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 10,
            0, 0, 0, 0, 0, 0, 4, 0, 9, 9,
        ])
    }
}
