import NIOCore

/// Splits the transmission-phase byte stream into requests, each with its payload.
///
/// A pure decoder: bytes in, requests out, no I/O. A write's payload is taken as a slice of the
/// inbound buffer when it arrived whole (no copy); otherwise it is gathered into one buffer of
/// exactly its size. A write longer than ``maximumPayloadBytes`` is never buffered: its payload is
/// read and discarded, and the request comes out as ``Frame/oversizedWrite(_:)`` so the server can
/// refuse it while the connection stays usable.
public struct NBDRequestDecoder {
    /// One decoded unit of the stream.
    public enum Frame {
        /// A request and, for writes, its payload.
        case request(NBDRequestHeader, payload: ByteBuffer?)
        /// A write whose payload exceeded the limit and was skipped.
        case oversizedWrite(NBDRequestHeader)
    }

    private enum State {
        case header
        case gatheringPayload(NBDRequestHeader, ByteBuffer)
        case discardingPayload(NBDRequestHeader, remainingBytes: UInt32)
    }

    /// The largest write payload that will be buffered.
    public let maximumPayloadBytes: UInt32
    private var state: State = .header

    public init(maximumPayloadBytes: UInt32) {
        self.maximumPayloadBytes = maximumPayloadBytes
    }

    /// Whether the decoder is between requests (no partial header or payload held).
    public var isAtRequestBoundary: Bool {
        if case .header = state { return true }
        return false
    }

    /// Decodes the next frame from `buffer`, consuming what it uses. Returns nil when more bytes
    /// are needed; a partial header stays in `buffer`, a partial payload is kept by the decoder.
    public mutating func next(from buffer: inout ByteBuffer, allocator: ByteBufferAllocator) throws -> Frame? {
        switch state {
        case .header:
            guard let header = try buffer.readNBDRequestHeader() else { return nil }
            guard header.hasPayload, header.lengthBytes > 0 else {
                return .request(header, payload: nil)
            }
            if header.lengthBytes > maximumPayloadBytes {
                state = .discardingPayload(header, remainingBytes: header.lengthBytes)
                return try next(from: &buffer, allocator: allocator)
            }
            let length = Int(header.lengthBytes)
            if buffer.readableBytes >= length {
                // The whole payload arrived with the header: share the inbound buffer.
                return .request(header, payload: buffer.readSlice(length: length)!)
            }
            var payload = allocator.buffer(capacity: length)
            payload.writeImmutableBuffer(buffer)
            buffer.moveReaderIndex(to: buffer.writerIndex)
            state = .gatheringPayload(header, payload)
            return nil
        case .gatheringPayload(let header, var payload):
            state = .header  // Drops the state's reference so that `payload` stays unique.
            let missing = Int(header.lengthBytes) - payload.readableBytes
            let available = min(missing, buffer.readableBytes)
            var piece = buffer.readSlice(length: available)!
            payload.writeBuffer(&piece)
            if payload.readableBytes == Int(header.lengthBytes) {
                return .request(header, payload: payload)
            }
            state = .gatheringPayload(header, payload)
            return nil
        case .discardingPayload(let header, let remaining):
            let skipped = min(Int(remaining), buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skipped)
            let left = remaining - UInt32(skipped)
            if left == 0 {
                state = .header
                return .oversizedWrite(header)
            }
            state = .discardingPayload(header, remainingBytes: left)
            return nil
        }
    }
}
