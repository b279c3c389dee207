import NIOCore

/// Encoders for everything the server sends. Each writes at the buffer's writer index.
extension ByteBuffer {
    /// The server's greeting: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
    @discardableResult
    public mutating func writeNBDGreeting(flags: NBDHandshakeFlags) -> Int {
        writeInteger(NBDMagic.greeting) + writeInteger(NBDMagic.option) + writeInteger(flags.rawValue)
    }

    /// An option reply header followed by `payloadBytes` of payload the caller writes next.
    @discardableResult
    public mutating func writeNBDOptionReplyHeader(option: NBDOptionCode, type: NBDOptionReplyType, payloadBytes: Int) -> Int {
        precondition(payloadBytes >= 0 && payloadBytes <= Int(UInt32.max))
        return writeInteger(NBDMagic.optionReply) + writeInteger(option.rawValue) + writeInteger(type.rawValue)
            + writeInteger(UInt32(payloadBytes))
    }

    /// An option reply with no payload (for example `NBD_REP_ACK`).
    @discardableResult
    public mutating func writeNBDOptionReply(option: NBDOptionCode, type: NBDOptionReplyType) -> Int {
        writeNBDOptionReplyHeader(option: option, type: type, payloadBytes: 0)
    }

    /// An option error reply carrying a human-readable message.
    @discardableResult
    public mutating func writeNBDOptionError(option: NBDOptionCode, type: NBDOptionReplyType, message: String) -> Int {
        precondition(type.isError)
        let text = utf8Prefix(message)
        return writeNBDOptionReplyHeader(option: option, type: type, payloadBytes: text.count) + writeBytes(text)
    }

    /// `NBD_REP_SERVER`: one export in a `NBD_OPT_LIST` answer.
    @discardableResult
    public mutating func writeNBDServerReply(exportName: String) -> Int {
        let name = Array(exportName.utf8)
        return writeNBDOptionReplyHeader(option: .list, type: .server, payloadBytes: 4 + name.count)
            + writeInteger(UInt32(name.count)) + writeBytes(name)
    }

    /// `NBD_REP_INFO` with `NBD_INFO_EXPORT`: size and transmission flags.
    @discardableResult
    public mutating func writeNBDInfoExport(option: NBDOptionCode, sizeBytes: UInt64, flags: NBDTransmissionFlags) -> Int {
        writeNBDOptionReplyHeader(option: option, type: .info, payloadBytes: 12)
            + writeInteger(NBDInfoType.export.rawValue) + writeInteger(sizeBytes) + writeInteger(flags.rawValue)
    }

    /// `NBD_REP_INFO` with `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
    @discardableResult
    public mutating func writeNBDInfoString(option: NBDOptionCode, type: NBDInfoType, value: String) -> Int {
        precondition(type == .name || type == .description)
        let text = utf8Prefix(value)
        return writeNBDOptionReplyHeader(option: option, type: .info, payloadBytes: 2 + text.count)
            + writeInteger(type.rawValue) + writeBytes(text)
    }

    /// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE`.
    @discardableResult
    public mutating func writeNBDInfoBlockSize(
        option: NBDOptionCode, minimumBytes: UInt32, preferredBytes: UInt32, maximumBytes: UInt32
    ) -> Int {
        writeNBDOptionReplyHeader(option: option, type: .info, payloadBytes: 14)
            + writeInteger(NBDInfoType.blockSize.rawValue) + writeInteger(minimumBytes)
            + writeInteger(preferredBytes) + writeInteger(maximumBytes)
    }

    /// `NBD_REP_META_CONTEXT`: one metadata context and its id.
    @discardableResult
    public mutating func writeNBDMetaContextReply(option: NBDOptionCode, contextID: UInt32, name: String) -> Int {
        let text = Array(name.utf8)
        return writeNBDOptionReplyHeader(option: option, type: .metaContext, payloadBytes: 4 + text.count)
            + writeInteger(contextID) + writeBytes(text)
    }

    /// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client chose no zeroes) 124 zero bytes.
    @discardableResult
    public mutating func writeNBDExportNameReply(sizeBytes: UInt64, flags: NBDTransmissionFlags, padWithZeroes: Bool) -> Int {
        var written = writeInteger(sizeBytes) + writeInteger(flags.rawValue)
        if padWithZeroes {
            written += writeRepeatingByte(0, count: NBDWireSize.exportNameReplyPadding)
        }
        return written
    }

    /// A simple reply header. For a successful read the data follows.
    @discardableResult
    public mutating func writeNBDSimpleReply(error: NBDError, cookie: UInt64) -> Int {
        writeInteger(NBDMagic.simpleReply) + writeInteger(error.rawValue) + writeInteger(cookie)
    }

    /// Overwrites a simple reply header at `index` (used to fill a prefix reserved before read data).
    public mutating func setNBDSimpleReply(error: NBDError, cookie: UInt64, at index: Int) {
        setInteger(NBDMagic.simpleReply, at: index)
        setInteger(error.rawValue, at: index + 4)
        setInteger(cookie, at: index + 8)
    }

    /// A structured chunk header followed by `payloadBytes` of payload the caller writes next.
    @discardableResult
    public mutating func writeNBDChunkHeader(
        flags: NBDReplyChunkFlags, type: NBDReplyChunkType, cookie: UInt64, payloadBytes: Int
    ) -> Int {
        precondition(payloadBytes >= 0 && payloadBytes <= Int(UInt32.max))
        return writeInteger(NBDMagic.structuredReply) + writeInteger(flags.rawValue) + writeInteger(type.rawValue)
            + writeInteger(cookie) + writeInteger(UInt32(payloadBytes))
    }

    /// Overwrites the prefix of a final `OFFSET_DATA` chunk at `index`: the header and the offset,
    /// with the data already in place after it.
    public mutating func setNBDOffsetDataPrefix(cookie: UInt64, offset: UInt64, dataBytes: Int, at index: Int) {
        setInteger(NBDMagic.structuredReply, at: index)
        setInteger(NBDReplyChunkFlags.done.rawValue, at: index + 4)
        setInteger(NBDReplyChunkType.offsetData.rawValue, at: index + 6)
        setInteger(cookie, at: index + 8)
        setInteger(UInt32(8 + dataBytes), at: index + 16)
        setInteger(offset, at: index + 20)
    }

    /// A final `NBD_REPLY_TYPE_NONE` chunk: success with nothing to say.
    @discardableResult
    public mutating func writeNBDChunkDone(cookie: UInt64) -> Int {
        writeNBDChunkHeader(flags: .done, type: .none, cookie: cookie, payloadBytes: 0)
    }

    /// A final `NBD_REPLY_TYPE_ERROR` chunk with a message.
    @discardableResult
    public mutating func writeNBDChunkError(cookie: UInt64, error: NBDError, message: String) -> Int {
        precondition(error != .none)
        let text = utf8Prefix(message)
        return writeNBDChunkHeader(flags: .done, type: .error, cookie: cookie, payloadBytes: 6 + text.count)
            + writeInteger(error.rawValue) + writeInteger(UInt16(text.count)) + writeBytes(text)
    }

    /// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: `(length, flags)` descriptors for one context.
    @discardableResult
    public mutating func writeNBDChunkBlockStatus(
        cookie: UInt64, contextID: UInt32, descriptors: [(lengthBytes: UInt32, flags: UInt32)]
    ) -> Int {
        precondition(!descriptors.isEmpty && descriptors.allSatisfy { $0.lengthBytes > 0 })
        var written = writeNBDChunkHeader(
            flags: .done, type: .blockStatus, cookie: cookie, payloadBytes: 4 + 8 * descriptors.count)
        written += writeInteger(contextID)
        for descriptor in descriptors {
            written += writeInteger(descriptor.lengthBytes) + writeInteger(descriptor.flags)
        }
        return written
    }
}

/// The UTF-8 bytes of `text`, cut to the protocol's 4096-byte string limit on a character boundary
/// so the result is still valid UTF-8.
func utf8Prefix(_ text: String, maximumBytes: Int = NBDWireSize.stringMaximum) -> [UInt8] {
    var bytes = Array(text.utf8)
    guard bytes.count > maximumBytes else { return bytes }
    var end = maximumBytes
    // Step back over continuation bytes (10xxxxxx) to the start of the cut character.
    while end > 0 && bytes[end] & 0xC0 == 0x80 { end -= 1 }
    bytes.removeSubrange(end...)
    return bytes
}
