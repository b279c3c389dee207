/// Every number on the NBD wire, in one place.
///
/// Layouts and values follow the NBD protocol specification (NetworkBlockDevice/nbd `doc/proto.md`).
/// All integers on the wire are big-endian.
public enum NBDMagic {
    /// `NBDMAGIC`, the first eight bytes a server sends.
    public static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`, sent by the server after the greeting and before every client option.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Starts every option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// Starts every transmission request.
    public static let request: UInt32 = 0x2560_9513
    /// Starts a simple reply.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// Starts a structured reply chunk.
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Flags the server sends in the handshake.
public struct NBDHandshakeFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the handshake with.
public struct NBDClientFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
}

/// An option a client sends during negotiation. Unknown values are kept so they can be refused.
public struct NBDOptionCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let exportName = NBDOptionCode(rawValue: 1)
    public static let abort = NBDOptionCode(rawValue: 2)
    public static let list = NBDOptionCode(rawValue: 3)
    public static let peekExport = NBDOptionCode(rawValue: 4)
    public static let startTLS = NBDOptionCode(rawValue: 5)
    public static let info = NBDOptionCode(rawValue: 6)
    public static let go = NBDOptionCode(rawValue: 7)
    public static let structuredReply = NBDOptionCode(rawValue: 8)
    public static let listMetaContext = NBDOptionCode(rawValue: 9)
    public static let setMetaContext = NBDOptionCode(rawValue: 10)
    public static let extendedHeaders = NBDOptionCode(rawValue: 11)

    public var description: String {
        switch self {
        case .exportName: return "EXPORT_NAME"
        case .abort: return "ABORT"
        case .list: return "LIST"
        case .peekExport: return "PEEK_EXPORT"
        case .startTLS: return "STARTTLS"
        case .info: return "INFO"
        case .go: return "GO"
        case .structuredReply: return "STRUCTURED_REPLY"
        case .listMetaContext: return "LIST_META_CONTEXT"
        case .setMetaContext: return "SET_META_CONTEXT"
        case .extendedHeaders: return "EXTENDED_HEADERS"
        default: return "option \(rawValue)"
        }
    }
}

/// The type of an option reply. Errors have bit 31 set.
public struct NBDOptionReplyType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ack = NBDOptionReplyType(rawValue: 1)
    public static let server = NBDOptionReplyType(rawValue: 2)
    public static let info = NBDOptionReplyType(rawValue: 3)
    public static let metaContext = NBDOptionReplyType(rawValue: 4)
    private static let errorBit: UInt32 = 1 << 31
    public static let errorUnsupported = NBDOptionReplyType(rawValue: errorBit + 1)
    public static let errorPolicy = NBDOptionReplyType(rawValue: errorBit + 2)
    public static let errorInvalid = NBDOptionReplyType(rawValue: errorBit + 3)
    public static let errorPlatform = NBDOptionReplyType(rawValue: errorBit + 4)
    public static let errorTLSRequired = NBDOptionReplyType(rawValue: errorBit + 5)
    public static let errorUnknown = NBDOptionReplyType(rawValue: errorBit + 6)
    public static let errorShutdown = NBDOptionReplyType(rawValue: errorBit + 7)
    public static let errorBlockSizeRequired = NBDOptionReplyType(rawValue: errorBit + 8)
    public static let errorTooBig = NBDOptionReplyType(rawValue: errorBit + 9)

    public var isError: Bool { rawValue & Self.errorBit != 0 }
}

/// Information items of `NBD_OPT_INFO` and `NBD_OPT_GO`.
public struct NBDInfoType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let export = NBDInfoType(rawValue: 0)
    public static let name = NBDInfoType(rawValue: 1)
    public static let description = NBDInfoType(rawValue: 2)
    public static let blockSize = NBDInfoType(rawValue: 3)
}

/// Flags describing an export during transmission.
public struct NBDTransmissionFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConnection = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// A transmission command. Unknown values are kept so they can be refused.
public struct NBDCommand: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let read = NBDCommand(rawValue: 0)
    public static let write = NBDCommand(rawValue: 1)
    public static let disconnect = NBDCommand(rawValue: 2)
    public static let flush = NBDCommand(rawValue: 3)
    public static let trim = NBDCommand(rawValue: 4)
    public static let cache = NBDCommand(rawValue: 5)
    public static let writeZeroes = NBDCommand(rawValue: 6)
    public static let blockStatus = NBDCommand(rawValue: 7)

    public var description: String {
        switch self {
        case .read: return "READ"
        case .write: return "WRITE"
        case .disconnect: return "DISC"
        case .flush: return "FLUSH"
        case .trim: return "TRIM"
        case .cache: return "CACHE"
        case .writeZeroes: return "WRITE_ZEROES"
        case .blockStatus: return "BLOCK_STATUS"
        default: return "command \(rawValue)"
        }
    }
}

/// Flags on a transmission request.
public struct NBDCommandFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let doNotFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// An error code in a transmission reply.
public struct NBDError: RawRepresentable, Hashable, Sendable, Error, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let none = NBDError(rawValue: 0)
    public static let notPermitted = NBDError(rawValue: 1)
    public static let inputOutput = NBDError(rawValue: 5)
    public static let noMemory = NBDError(rawValue: 12)
    public static let invalid = NBDError(rawValue: 22)
    public static let noSpace = NBDError(rawValue: 28)
    public static let overflow = NBDError(rawValue: 75)
    public static let notSupported = NBDError(rawValue: 95)
    public static let shutdown = NBDError(rawValue: 108)

    public var description: String {
        switch self {
        case .none: return "success"
        case .notPermitted: return "EPERM"
        case .inputOutput: return "EIO"
        case .noMemory: return "ENOMEM"
        case .invalid: return "EINVAL"
        case .noSpace: return "ENOSPC"
        case .overflow: return "EOVERFLOW"
        case .notSupported: return "ENOTSUP"
        case .shutdown: return "ESHUTDOWN"
        default: return "error \(rawValue)"
        }
    }
}

/// The type of a structured reply chunk. Errors have bit 15 set.
public struct NBDReplyChunkType: RawRepresentable, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let none = NBDReplyChunkType(rawValue: 0)
    public static let offsetData = NBDReplyChunkType(rawValue: 1)
    public static let offsetHole = NBDReplyChunkType(rawValue: 2)
    public static let blockStatus = NBDReplyChunkType(rawValue: 5)
    public static let error = NBDReplyChunkType(rawValue: (1 << 15) + 1)
    public static let errorOffset = NBDReplyChunkType(rawValue: (1 << 15) + 2)
}

/// Flags of a structured reply chunk.
public struct NBDReplyChunkFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The last chunk of a reply.
    public static let done = NBDReplyChunkFlags(rawValue: 1 << 0)
}

/// Sizes of fixed-length wire structures, in bytes.
public enum NBDWireSize {
    public static let greeting = 18
    public static let clientFlags = 4
    public static let optionHeader = 16
    public static let optionReplyHeader = 20
    public static let exportNameReplyPadding = 124
    public static let requestHeader = 28
    public static let simpleReplyHeader = 16
    public static let structuredReplyHeader = 20
    /// A structured `OFFSET_DATA` chunk's header and offset, before the data.
    public static let structuredReadPrefix = 28
    /// The longest string (export name, description, query, message) the protocol allows.
    public static let stringMaximum = 4096
}

/// The metadata context Sluice serves: allocation status.
public enum NBDMetaContext {
    public static let baseAllocation = "base:allocation"
    /// The id `base:allocation` is given when a client selects it.
    public static let baseAllocationID: UInt32 = 1
}
