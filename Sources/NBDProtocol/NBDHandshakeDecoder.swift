import NIOCore

/// Splits the negotiation-phase byte stream into the client's flags and its options.
///
/// A pure decoder. An option whose data exceeds ``maximumOptionBytes`` is skipped without being
/// buffered and comes out as ``Message/oversizedOption(_:lengthBytes:)``.
public struct NBDHandshakeDecoder {
    /// One decoded unit of the negotiation stream.
    public enum Message: Equatable {
        case clientFlags(NBDClientFlags)
        case option(NBDOptionCode, data: ByteBuffer)
        case oversizedOption(NBDOptionCode, lengthBytes: UInt32)
    }

    private enum State {
        case clientFlags
        case optionHeader
        case optionData(NBDOptionCode, lengthBytes: UInt32)
        case skippingOption(NBDOptionCode, lengthBytes: UInt32, remainingBytes: UInt32)
    }

    /// The most option data that will be buffered. Legitimate options are a few kilobytes at most.
    public let maximumOptionBytes: UInt32
    private var state: State = .clientFlags

    public init(maximumOptionBytes: UInt32 = 64 * 1024) {
        self.maximumOptionBytes = maximumOptionBytes
    }

    /// Decodes the next message, consuming what it uses, or returns nil when more bytes are needed.
    public mutating func next(from buffer: inout ByteBuffer) throws -> Message? {
        switch state {
        case .clientFlags:
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            state = .optionHeader
            return .clientFlags(NBDClientFlags(rawValue: flags))
        case .optionHeader:
            guard buffer.readableBytes >= NBDWireSize.optionHeader else { return nil }
            let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt64.self)!
            guard magic == NBDMagic.option else { throw NBDProtocolError.badOptionMagic(magic) }
            buffer.moveReaderIndex(forwardBy: 8)
            let code = NBDOptionCode(rawValue: buffer.readInteger(as: UInt32.self)!)
            let length = buffer.readInteger(as: UInt32.self)!
            if length > maximumOptionBytes {
                state = .skippingOption(code, lengthBytes: length, remainingBytes: length)
            } else {
                state = .optionData(code, lengthBytes: length)
            }
            return try next(from: &buffer)
        case .optionData(let code, let length):
            guard buffer.readableBytes >= Int(length) else { return nil }
            state = .optionHeader
            return .option(code, data: buffer.readSlice(length: Int(length))!)
        case .skippingOption(let code, let length, let remaining):
            let skipped = min(Int(remaining), buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skipped)
            let left = remaining - UInt32(skipped)
            if left == 0 {
                state = .optionHeader
                return .oversizedOption(code, lengthBytes: length)
            }
            state = .skippingOption(code, lengthBytes: length, remainingBytes: left)
            return nil
        }
    }
}
