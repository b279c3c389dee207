@_implementationOnly import CISAL

/// CRC-32C (Castagnoli), computed by Intel ISA-L with the CPU's CRC instructions where it has them.
///
/// The value is the standard one (`"123456789"` gives `0xE3069283`), and it chains: the checksum of
/// `a + b` is `checksum(b, continuing: checksum(a))`.
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return previous }
        // ISA-L's iSCSI CRC neither inverts its input state nor its result; the standard CRC-32C
        // does both, which also makes chaining work.
        var state = ~previous
        var offset = 0
        while offset < bytes.count {
            // ISA-L takes an Int32 length; feed very large buffers in pieces.
            let length = min(bytes.count - offset, 1 << 30)
            state = UInt32(crc32_iscsi(UnsafeMutablePointer(mutating: base.advanced(by: offset).assumingMemoryBound(to: UInt8.self)),
                                       Int32(length), state))
            offset += length
        }
        return ~state
    }

    public static func checksum(_ bytes: [UInt8], continuing previous: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: previous) }
    }
}
