import NIOCore

/// The server side of fixed-newstyle negotiation, as a value type.
///
/// It takes decoded client messages and returns what the connection must do: send bytes, start
/// transmission, or close. It performs no I/O, so every path is unit-tested byte for byte.
public struct NBDHandshakeStateMachine {
    /// What the connection must do next.
    public enum Action: Equatable {
        /// Send these bytes and keep negotiating.
        case send(ByteBuffer)
        /// Send these bytes, then close the connection (the client aborted).
        case sendAndClose(ByteBuffer)
        /// Close at once: the client broke the protocol or asked for an export that does not exist
        /// through an option that cannot carry an error.
        case close(reason: String)
        /// Send these bytes and switch to the transmission phase.
        case startTransmission(ByteBuffer, NBDNegotiation)
    }

    private enum Phase {
        case awaitingClientFlags
        case negotiating
        case finished
    }

    private let exports: [NBDExportDescriptor]
    private let allocator: ByteBufferAllocator
    private var phase: Phase = .awaitingClientFlags
    private var clientFlags: NBDClientFlags = []
    private var structuredReplies = false
    /// The export that the last `SET_META_CONTEXT` named, and whether it selected `base:allocation`.
    private var metaContextExportName: String?
    private var metaContextSelected = false

    /// The handshake flags this server offers.
    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// Creates a machine serving `exports`; the first is the default export (the empty name).
    public init(exports: [NBDExportDescriptor], allocator: ByteBufferAllocator) {
        precondition(!exports.isEmpty, "a server needs at least one export")
        self.exports = exports
        self.allocator = allocator
    }

    /// The bytes the server sends as soon as a client connects.
    public func greeting() -> ByteBuffer {
        var buffer = allocator.buffer(capacity: NBDWireSize.greeting)
        buffer.writeNBDGreeting(flags: Self.serverFlags)
        return buffer
    }

    /// Handles one decoded message from the client.
    public mutating func receive(_ message: NBDHandshakeDecoder.Message) -> Action {
        switch (phase, message) {
        case (.awaitingClientFlags, .clientFlags(let flags)):
            let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
            guard flags.isSubset(of: known) else {
                phase = .finished
                return .close(reason: NBDProtocolError.unknownClientFlags(flags.rawValue).description)
            }
            clientFlags = flags
            phase = .negotiating
            return .send(allocator.buffer(capacity: 0))
        case (.negotiating, .option(let code, let data)):
            return handleOption(code, data: data)
        case (.negotiating, .oversizedOption(let code, let length)):
            return handleOversizedOption(code, lengthBytes: length)
        case (.awaitingClientFlags, _), (.negotiating, .clientFlags), (.finished, _):
            phase = .finished
            return .close(reason: "unexpected message during negotiation")
        }
    }

    // MARK: - Options

    private mutating func handleOption(_ code: NBDOptionCode, data: ByteBuffer) -> Action {
        switch code {
        case .exportName:
            return handleExportName(data)
        case .abort:
            phase = .finished
            var reply = allocator.buffer(capacity: NBDWireSize.optionReplyHeader)
            reply.writeNBDOptionReply(option: .abort, type: .ack)
            return .sendAndClose(reply)
        case .list:
            guard data.readableBytes == 0 else {
                return error(code, .errorInvalid, "NBD_OPT_LIST takes no data")
            }
            var reply = allocator.buffer(capacity: 256)
            for export in exports {
                reply.writeNBDServerReply(exportName: export.name)
            }
            reply.writeNBDOptionReply(option: .list, type: .ack)
            return .send(reply)
        case .info, .go:
            return handleInfoOrGo(code, data: data)
        case .structuredReply:
            guard data.readableBytes == 0 else {
                return error(code, .errorInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            structuredReplies = true
            var reply = allocator.buffer(capacity: NBDWireSize.optionReplyHeader)
            reply.writeNBDOptionReply(option: code, type: .ack)
            return .send(reply)
        case .listMetaContext, .setMetaContext:
            return handleMetaContext(code, data: data)
        case .startTLS:
            return error(code, .errorUnsupported, "this server does not offer TLS; use a Unix socket or a trusted network")
        default:
            return error(code, .errorUnsupported, "\(code) is not supported by this server")
        }
    }

    private mutating func handleOversizedOption(_ code: NBDOptionCode, lengthBytes: UInt32) -> Action {
        switch code {
        case .exportName:
            phase = .finished
            return .close(reason: "NBD_OPT_EXPORT_NAME of \(lengthBytes) bytes is too large")
        case .abort:
            return handleOption(.abort, data: allocator.buffer(capacity: 0))
        default:
            return error(code, .errorTooBig, "\(code) data of \(lengthBytes) bytes is too large")
        }
    }

    private mutating func handleExportName(_ data: ByteBuffer) -> Action {
        phase = .finished
        var data = data
        let name = data.readString(length: data.readableBytes) ?? ""
        guard let export = resolveExport(name) else {
            // NBD_OPT_EXPORT_NAME has no way to carry an error: the spec says to disconnect.
            return .close(reason: "client asked for unknown export \"\(name)\"")
        }
        let negotiation = makeNegotiation(export: export, requestedName: name)
        var reply = allocator.buffer(capacity: 10 + NBDWireSize.exportNameReplyPadding)
        reply.writeNBDExportNameReply(
            sizeBytes: export.sizeBytes, flags: negotiation.transmissionFlags,
            padWithZeroes: !clientFlags.contains(.noZeroes))
        return .startTransmission(reply, negotiation)
    }

    private mutating func handleInfoOrGo(_ code: NBDOptionCode, data: ByteBuffer) -> Action {
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self),
            nameLength <= UInt32(data.readableBytes) && data.readableBytes - Int(nameLength) >= 2,
            let name = data.readString(length: Int(nameLength)),
            let requestCount = data.readInteger(as: UInt16.self),
            data.readableBytes == Int(requestCount) * 2
        else {
            return error(code, .errorInvalid, "malformed \(code) request")
        }
        var requested: Set<NBDInfoType> = []
        for _ in 0..<requestCount {
            requested.insert(NBDInfoType(rawValue: data.readInteger(as: UInt16.self)!))
        }
        guard let export = resolveExport(name) else {
            return error(code, .errorUnknown, "no export named \"\(name)\" on this server")
        }
        let negotiation = makeNegotiation(export: export, requestedName: name)
        var reply = allocator.buffer(capacity: 256)
        reply.writeNBDInfoExport(option: code, sizeBytes: export.sizeBytes, flags: negotiation.transmissionFlags)
        if requested.contains(.name) {
            reply.writeNBDInfoString(option: code, type: .name, value: export.name)
        }
        if requested.contains(.description) && !export.description.isEmpty {
            reply.writeNBDInfoString(option: code, type: .description, value: export.description)
        }
        // Sent whether or not it was asked for, which the spec allows; requests that break the
        // limits are refused with EINVAL in any case.
        reply.writeNBDInfoBlockSize(
            option: code, minimumBytes: export.minimumBlockBytes, preferredBytes: export.preferredBlockBytes,
            maximumBytes: export.maximumPayloadBytes)
        reply.writeNBDOptionReply(option: code, type: .ack)
        if code == .go {
            phase = .finished
            return .startTransmission(reply, negotiation)
        }
        return .send(reply)
    }

    private mutating func handleMetaContext(_ code: NBDOptionCode, data: ByteBuffer) -> Action {
        if code == .setMetaContext {
            // A SET replaces the earlier selection even when it fails.
            metaContextExportName = nil
            metaContextSelected = false
            guard structuredReplies else {
                return error(code, .errorInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies first")
            }
        }
        var data = data
        guard let nameLength = data.readInteger(as: UInt32.self),
            nameLength <= UInt32(data.readableBytes),
            let name = data.readString(length: Int(nameLength)),
            let queryCount = data.readInteger(as: UInt32.self)
        else {
            return error(code, .errorInvalid, "malformed \(code) request")
        }
        var queries: [String] = []
        for _ in 0..<queryCount {
            guard let length = data.readInteger(as: UInt32.self), length <= UInt32(data.readableBytes),
                let query = data.readString(length: Int(length))
            else {
                return error(code, .errorInvalid, "malformed \(code) query")
            }
            queries.append(query)
        }
        guard data.readableBytes == 0 else {
            return error(code, .errorInvalid, "trailing bytes after \(code) queries")
        }
        guard let export = resolveExport(name) else {
            return error(code, .errorUnknown, "no export named \"\(name)\" on this server")
        }
        var matches = false
        if export.supportsBlockStatus {
            if code == .listMetaContext {
                // No queries lists everything; "base:" is a wildcard for the base namespace.
                matches = queries.isEmpty || queries.contains(NBDMetaContext.baseAllocation) || queries.contains("base:")
            } else {
                matches = queries.contains(NBDMetaContext.baseAllocation)
            }
        }
        var reply = allocator.buffer(capacity: 64)
        if matches {
            let contextID = code == .setMetaContext ? NBDMetaContext.baseAllocationID : 0
            reply.writeNBDMetaContextReply(option: code, contextID: contextID, name: NBDMetaContext.baseAllocation)
        }
        if code == .setMetaContext {
            metaContextExportName = export.name
            metaContextSelected = matches
        }
        reply.writeNBDOptionReply(option: code, type: .ack)
        return .send(reply)
    }

    // MARK: - Helpers

    private func resolveExport(_ name: String) -> NBDExportDescriptor? {
        if name.isEmpty { return exports[0] }
        return exports.first { $0.name == name }
    }

    private func makeNegotiation(export: NBDExportDescriptor, requestedName: String) -> NBDNegotiation {
        var flags = export.transmissionFlags.union(.hasFlags)
        flags.remove(.sendDF)
        if structuredReplies { flags.insert(.sendDF) }
        let selected = structuredReplies && metaContextSelected && metaContextExportName == export.name
        return NBDNegotiation(
            export: export, transmissionFlags: flags, structuredReplies: structuredReplies,
            blockStatusSelected: selected)
    }

    private func error(_ code: NBDOptionCode, _ type: NBDOptionReplyType, _ message: String) -> Action {
        var reply = allocator.buffer(capacity: NBDWireSize.optionReplyHeader + message.utf8.count)
        reply.writeNBDOptionError(option: code, type: type, message: message)
        return .send(reply)
    }
}
