import NIOCore

/// The fixed 28-byte header of a transmission request.
public struct NBDRequestHeader: Hashable, Sendable {
    public var flags: NBDCommandFlags
    public var command: NBDCommand
    /// The client's opaque value, echoed in the reply (the spec's "handle" or "cookie").
    public var cookie: UInt64
    public var offset: UInt64
    public var lengthBytes: UInt32

    public init(flags: NBDCommandFlags, command: NBDCommand, cookie: UInt64, offset: UInt64, lengthBytes: UInt32) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.lengthBytes = lengthBytes
    }

    /// Whether a payload of `lengthBytes` follows the header on the wire.
    public var hasPayload: Bool { command == .write }
}

extension ByteBuffer {
    /// Reads a request header, or returns nil (consuming nothing) if fewer than 28 bytes are readable.
    /// Throws if the magic is wrong, which means the stream is out of step and cannot be trusted.
    public mutating func readNBDRequestHeader() throws -> NBDRequestHeader? {
        guard readableBytes >= NBDWireSize.requestHeader else { return nil }
        let magic = getInteger(at: readerIndex, as: UInt32.self)!
        guard magic == NBDMagic.request else {
            throw NBDProtocolError.badRequestMagic(magic)
        }
        moveReaderIndex(forwardBy: 4)
        let flags = readInteger(as: UInt16.self)!
        let command = readInteger(as: UInt16.self)!
        let cookie = readInteger(as: UInt64.self)!
        let offset = readInteger(as: UInt64.self)!
        let length = readInteger(as: UInt32.self)!
        return NBDRequestHeader(
            flags: NBDCommandFlags(rawValue: flags), command: NBDCommand(rawValue: command),
            cookie: cookie, offset: offset, lengthBytes: length)
    }

    /// Writes a request header (clients and tests use this).
    @discardableResult
    public mutating func writeNBDRequestHeader(_ header: NBDRequestHeader) -> Int {
        writeInteger(NBDMagic.request)
            + writeInteger(header.flags.rawValue)
            + writeInteger(header.command.rawValue)
            + writeInteger(header.cookie)
            + writeInteger(header.offset)
            + writeInteger(header.lengthBytes)
    }
}

/// Ways a peer can break the protocol so badly that the connection must close.
public enum NBDProtocolError: Error, Hashable, CustomStringConvertible {
    case badRequestMagic(UInt32)
    case badOptionMagic(UInt64)
    case unknownClientFlags(UInt32)
    case optionTooLarge(lengthBytes: UInt32)
    case handshakeTimedOut
    case dataAfterDisconnect

    public var description: String {
        switch self {
        case .badRequestMagic(let magic):
            return "bad request magic 0x\(String(magic, radix: 16)) (expected 0x25609513); the stream is out of step"
        case .badOptionMagic(let magic):
            return "bad option magic 0x\(String(magic, radix: 16)) (expected IHAVEOPT)"
        case .unknownClientFlags(let flags):
            return "client sent unknown handshake flags 0x\(String(flags, radix: 16))"
        case .optionTooLarge(let length):
            return "option of \(length) bytes is too large"
        case .handshakeTimedOut:
            return "the client did not finish negotiating in time"
        case .dataAfterDisconnect:
            return "the client sent data after NBD_CMD_DISC"
        }
    }
}
