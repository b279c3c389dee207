import NIOCore
import XCTest

@testable import NBDProtocol

final class NBDHandshakeTests: XCTestCase {
    private let allocator = ByteBufferAllocator()

    private let disk = NBDExportDescriptor(
        name: "disk", description: "test disk", sizeBytes: 1 << 30,
        transmissionFlags: [.sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConnection, .sendCache, .sendFastZero],
        minimumBlockBytes: 512, preferredBlockBytes: 4096, maximumPayloadBytes: 1 << 25, supportsBlockStatus: true)
    private let other = NBDExportDescriptor(
        name: "other", description: "", sizeBytes: 1 << 20, transmissionFlags: [.readOnly],
        minimumBlockBytes: 512, preferredBlockBytes: 4096, maximumPayloadBytes: 1 << 25, supportsBlockStatus: true)

    private func machine() -> NBDHandshakeStateMachine {
        var machine = NBDHandshakeStateMachine(exports: [disk, other], allocator: allocator)
        XCTAssertEqual(machine.receive(.clientFlags([.fixedNewstyle, .noZeroes])), .send(allocator.buffer(capacity: 0)))
        return machine
    }

    private func data(_ body: (inout ByteBuffer) -> Void) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 64)
        body(&buffer)
        return buffer
    }

    private func infoRequest(name: String, infos: [NBDInfoType]) -> ByteBuffer {
        data {
            $0.writeInteger(UInt32(name.utf8.count))
            $0.writeString(name)
            $0.writeInteger(UInt16(infos.count))
            for info in infos { $0.writeInteger(info.rawValue) }
        }
    }

    private func metaRequest(name: String, queries: [String]) -> ByteBuffer {
        data {
            $0.writeInteger(UInt32(name.utf8.count))
            $0.writeString(name)
            $0.writeInteger(UInt32(queries.count))
            for query in queries {
                $0.writeInteger(UInt32(query.utf8.count))
                $0.writeString(query)
            }
        }
    }

    /// Splits option replies into (type, payload) pairs, checking the framing of each.
    private func replies(_ action: NBDHandshakeStateMachine.Action, option: NBDOptionCode) -> [(NBDOptionReplyType, [UInt8])] {
        let buffer: ByteBuffer
        switch action {
        case .send(let bytes), .sendAndClose(let bytes), .startTransmission(let bytes, _): buffer = bytes
        case .close: return []
        }
        var copy = buffer
        var result: [(NBDOptionReplyType, [UInt8])] = []
        while copy.readableBytes > 0 {
            XCTAssertEqual(copy.readInteger(as: UInt64.self), NBDMagic.optionReply)
            XCTAssertEqual(copy.readInteger(as: UInt32.self), option.rawValue)
            let type = NBDOptionReplyType(rawValue: copy.readInteger(as: UInt32.self)!)
            let length = Int(copy.readInteger(as: UInt32.self)!)
            result.append((type, copy.readBytes(length: length)!))
        }
        return result
    }

    // MARK: - Decoder

    func testDecoderSplitsFlagsAndOptions() throws {
        var decoder = NBDHandshakeDecoder()
        var buffer = allocator.buffer(capacity: 64)
        buffer.writeInteger(UInt32(3))
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(NBDOptionCode.list.rawValue)
        buffer.writeInteger(UInt32(2))
        buffer.writeBytes([0xAB])
        XCTAssertEqual(try decoder.next(from: &buffer), .clientFlags([.fixedNewstyle, .noZeroes]))
        XCTAssertNil(try decoder.next(from: &buffer))
        buffer.writeBytes([0xCD])
        guard case .option(let code, let payload) = try decoder.next(from: &buffer) else { return XCTFail("expected an option") }
        XCTAssertEqual(code, .list)
        XCTAssertEqual(Array(payload.readableBytesView), [0xAB, 0xCD])
    }

    func testDecoderRejectsBadOptionMagic() throws {
        var decoder = NBDHandshakeDecoder()
        var buffer = allocator.buffer(capacity: 64)
        buffer.writeInteger(UInt32(1))
        buffer.writeString("GARBAGE!GARBAGE!")
        _ = try decoder.next(from: &buffer)
        XCTAssertThrowsError(try decoder.next(from: &buffer))
    }

    func testDecoderSkipsOversizedOption() throws {
        var decoder = NBDHandshakeDecoder(maximumOptionBytes: 16)
        var buffer = allocator.buffer(capacity: 64)
        buffer.writeInteger(UInt32(1))
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(NBDOptionCode.go.rawValue)
        buffer.writeInteger(UInt32(40))
        buffer.writeRepeatingByte(1, count: 25)
        _ = try decoder.next(from: &buffer)
        XCTAssertNil(try decoder.next(from: &buffer))
        XCTAssertEqual(buffer.readableBytes, 0)
        buffer.writeRepeatingByte(1, count: 15)
        XCTAssertEqual(try decoder.next(from: &buffer), .oversizedOption(.go, lengthBytes: 40))
    }

    // MARK: - State machine

    func testUnknownClientFlagsClose() {
        var machine = NBDHandshakeStateMachine(exports: [disk], allocator: allocator)
        guard case .close = machine.receive(.clientFlags(NBDClientFlags(rawValue: 0x10))) else {
            return XCTFail("unknown client flags must close the connection")
        }
    }

    func testListNamesEveryExport() {
        var machine = machine()
        let answer = replies(machine.receive(.option(.list, data: allocator.buffer(capacity: 0))), option: .list)
        XCTAssertEqual(answer.map(\.0), [.server, .server, .ack])
        XCTAssertEqual(answer[0].1, [0, 0, 0, 4] + Array("disk".utf8))
        XCTAssertEqual(answer[1].1, [0, 0, 0, 5] + Array("other".utf8))
        let invalid = replies(machine.receive(.option(.list, data: data { $0.writeInteger(UInt8(1)) })), option: .list)
        XCTAssertEqual(invalid.map(\.0), [.errorInvalid])
    }

    func testInfoReportsExportAndKeepsNegotiating() {
        var machine = machine()
        let action = machine.receive(.option(.info, data: infoRequest(name: "disk", infos: [.name, .description, .blockSize])))
        guard case .send = action else { return XCTFail("INFO must not end negotiation") }
        let answer = replies(action, option: .info)
        XCTAssertEqual(answer.map(\.0), [.info, .info, .info, .info, .ack])
        XCTAssertEqual(Array(answer[0].1[0..<10]), [0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0])
        XCTAssertEqual(answer[1].1, [0, 1] + Array("disk".utf8))
        XCTAssertEqual(answer[2].1, [0, 2] + Array("test disk".utf8))
        XCTAssertEqual(answer[3].1, [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
    }

    func testGoStartsTransmissionWithDFOnlyAfterStructuredReplies() {
        var plain = machine()
        guard case .startTransmission(_, let first) = plain.receive(.option(.go, data: infoRequest(name: "", infos: []))) else {
            return XCTFail("GO must start transmission")
        }
        XCTAssertEqual(first.export.name, "disk", "the empty name is the default export")
        XCTAssertFalse(first.structuredReplies)
        XCTAssertFalse(first.transmissionFlags.contains(.sendDF))
        XCTAssertTrue(first.transmissionFlags.contains(.hasFlags))

        var structured = machine()
        _ = structured.receive(.option(.structuredReply, data: allocator.buffer(capacity: 0)))
        guard case .startTransmission(_, let second) = structured.receive(.option(.go, data: infoRequest(name: "disk", infos: []))) else {
            return XCTFail("GO must start transmission")
        }
        XCTAssertTrue(second.structuredReplies)
        XCTAssertTrue(second.transmissionFlags.contains(.sendDF))
    }

    func testUnknownExportIsAnErrorForGoAndAClosedConnectionForExportName() {
        var machine = machine()
        let answer = replies(machine.receive(.option(.go, data: infoRequest(name: "nope", infos: []))), option: .go)
        XCTAssertEqual(answer.map(\.0), [.errorUnknown])
        guard case .close = machine.receive(.option(.exportName, data: data { $0.writeString("nope") })) else {
            return XCTFail("EXPORT_NAME of an unknown export must close")
        }
    }

    func testExportNameHonoursNoZeroes() {
        var withZeroes = NBDHandshakeStateMachine(exports: [disk], allocator: allocator)
        _ = withZeroes.receive(.clientFlags(.fixedNewstyle))
        guard case .startTransmission(let padded, _) = withZeroes.receive(.option(.exportName, data: data { $0.writeString("disk") })) else {
            return XCTFail("EXPORT_NAME must start transmission")
        }
        XCTAssertEqual(padded.readableBytes, 134)
        var machine = machine()
        guard case .startTransmission(let bare, _) = machine.receive(.option(.exportName, data: data { $0.writeString("disk") })) else {
            return XCTFail("EXPORT_NAME must start transmission")
        }
        XCTAssertEqual(bare.readableBytes, 10)
    }

    func testAbortAcknowledgesThenCloses() {
        var machine = machine()
        let action = machine.receive(.option(.abort, data: allocator.buffer(capacity: 0)))
        guard case .sendAndClose = action else { return XCTFail("ABORT must ack and close") }
        XCTAssertEqual(replies(action, option: .abort).map(\.0), [.ack])
    }

    func testUnknownOptionsAreRefusedAndNegotiationGoesOn() {
        var machine = machine()
        XCTAssertEqual(replies(machine.receive(.option(NBDOptionCode(rawValue: 99), data: data { $0.writeString("x") })),
                               option: NBDOptionCode(rawValue: 99)).map(\.0), [.errorUnsupported])
        XCTAssertEqual(replies(machine.receive(.option(.startTLS, data: allocator.buffer(capacity: 0))), option: .startTLS).map(\.0),
                       [.errorUnsupported])
        XCTAssertEqual(replies(machine.receive(.option(.extendedHeaders, data: allocator.buffer(capacity: 0))),
                               option: .extendedHeaders).map(\.0), [.errorUnsupported])
        XCTAssertEqual(replies(machine.receive(.oversizedOption(.info, lengthBytes: 1 << 20)), option: .info).map(\.0), [.errorTooBig])
        guard case .startTransmission = machine.receive(.option(.go, data: infoRequest(name: "disk", infos: []))) else {
            return XCTFail("negotiation must go on after refused options")
        }
    }

    func testMalformedInfoIsInvalid() {
        var machine = machine()
        let truncated = data { $0.writeInteger(UInt32(50)); $0.writeString("disk") }
        XCTAssertEqual(replies(machine.receive(.option(.info, data: truncated)), option: .info).map(\.0), [.errorInvalid])
        var trailing = infoRequest(name: "disk", infos: [.name])
        trailing.writeInteger(UInt8(0))
        XCTAssertEqual(replies(machine.receive(.option(.info, data: trailing)), option: .info).map(\.0), [.errorInvalid])
    }

    func testMetaContexts() {
        var machine = machine()
        XCTAssertEqual(replies(machine.receive(.option(.setMetaContext, data: metaRequest(name: "disk", queries: ["base:allocation"]))),
                               option: .setMetaContext).map(\.0), [.errorInvalid], "SET needs structured replies first")
        let listAll = replies(machine.receive(.option(.listMetaContext, data: metaRequest(name: "disk", queries: []))), option: .listMetaContext)
        XCTAssertEqual(listAll.map(\.0), [.metaContext, .ack])
        XCTAssertEqual(listAll[0].1, [0, 0, 0, 0] + Array("base:allocation".utf8))
        let wildcard = replies(machine.receive(.option(.listMetaContext, data: metaRequest(name: "disk", queries: ["base:"]))), option: .listMetaContext)
        XCTAssertEqual(wildcard.map(\.0), [.metaContext, .ack])
        let foreign = replies(machine.receive(.option(.listMetaContext, data: metaRequest(name: "disk", queries: ["qemu:dirty-bitmap:x"]))),
                              option: .listMetaContext)
        XCTAssertEqual(foreign.map(\.0), [.ack])

        _ = machine.receive(.option(.structuredReply, data: allocator.buffer(capacity: 0)))
        let set = replies(machine.receive(.option(.setMetaContext, data: metaRequest(name: "disk", queries: ["base:allocation"]))),
                          option: .setMetaContext)
        XCTAssertEqual(set.map(\.0), [.metaContext, .ack])
        XCTAssertEqual(set[0].1, [0, 0, 0, 1] + Array("base:allocation".utf8))
        var copy = machine
        guard case .startTransmission(_, let selected) = copy.receive(.option(.go, data: infoRequest(name: "disk", infos: []))) else {
            return XCTFail("GO must start transmission")
        }
        XCTAssertTrue(selected.blockStatusSelected)
        guard case .startTransmission(_, let elsewhere) = machine.receive(.option(.go, data: infoRequest(name: "other", infos: []))) else {
            return XCTFail("GO must start transmission")
        }
        XCTAssertFalse(elsewhere.blockStatusSelected, "contexts chosen for one export do not apply to another")
    }
}
