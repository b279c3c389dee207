import NIOCore

/// A request to a volume. Servers build these after validating the wire request.
public enum VolumeRequest {
    /// Reads `lengthBytes` at `offset`, appending them to `buffer` at its writer index.
    ///
    /// The caller reserves room (for example a reply header) before the writer index, so the data
    /// lands in place and the reply goes out without a copy.
    case read(offset: UInt64, lengthBytes: UInt32, buffer: ByteBuffer)

    /// Writes the readable bytes of `data` at `offset`; with `fua`, they are durable before completion.
    case write(offset: UInt64, data: ByteBuffer, fua: Bool)

    /// Makes every write that completed before this request durable.
    case flush

    /// Tells the volume the range is no longer needed. Reads of it afterwards return either the old
    /// data or zeros.
    case trim(offset: UInt64, lengthBytes: UInt32, fua: Bool)

    /// Makes the range read as zeros.
    case writeZeroes(offset: UInt64, lengthBytes: UInt32, flags: WriteZeroesFlags)

    /// Hints that the range will be read soon.
    case cache(offset: UInt64, lengthBytes: UInt32)

    /// Describes allocation of the range as a list of extents, at most `maximumExtents` long.
    case blockStatus(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int)

    /// The range the request touches, if it has one.
    public var range: (offset: UInt64, lengthBytes: UInt64)? {
        switch self {
        case .read(let offset, let length, _): return (offset, UInt64(length))
        case .write(let offset, let data, _): return (offset, UInt64(data.readableBytes))
        case .flush: return nil
        case .trim(let offset, let length, _): return (offset, UInt64(length))
        case .writeZeroes(let offset, let length, _): return (offset, UInt64(length))
        case .cache(let offset, let length): return (offset, UInt64(length))
        case .blockStatus(let offset, let length, _): return (offset, UInt64(length))
        }
    }

    /// Whether the request changes the volume's contents.
    public var isWrite: Bool {
        switch self {
        case .write, .trim, .writeZeroes: return true
        case .read, .flush, .cache, .blockStatus: return false
        }
    }
}

/// Options of a write-zeroes request.
public struct WriteZeroesFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    /// The zeroed range is durable before completion.
    public static let fua = WriteZeroesFlags(rawValue: 1 << 0)
    /// The range must stay allocated: the volume may not punch a hole to zero it.
    public static let noHole = WriteZeroesFlags(rawValue: 1 << 1)
    /// Fail with ``VolumeError/notSupported`` at once rather than zero slowly (by writing zeros).
    public static let fastOnly = WriteZeroesFlags(rawValue: 1 << 2)
}

/// The result of a volume request.
public enum VolumeReply {
    /// A request without data succeeded.
    case done
    /// A read succeeded; the buffer holds the caller's reserved prefix followed by the data.
    case data(ByteBuffer)
    /// A block-status request succeeded.
    case extents([BlockStatusExtent])
    /// The request failed; nothing is known to have changed beyond what the error says.
    case failed(VolumeError)
}

/// One run of bytes with the same allocation state.
public struct BlockStatusExtent: Hashable, Sendable {
    public var lengthBytes: UInt32
    public var flags: BlockStatusFlags

    public init(lengthBytes: UInt32, flags: BlockStatusFlags) {
        self.lengthBytes = lengthBytes
        self.flags = flags
    }
}

/// Allocation state of an extent, with the bit values of NBD's `base:allocation` context.
public struct BlockStatusFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// The extent is not allocated on the medium.
    public static let hole = BlockStatusFlags(rawValue: 1 << 0)
    /// The extent reads as zeros.
    public static let zero = BlockStatusFlags(rawValue: 1 << 1)
}
