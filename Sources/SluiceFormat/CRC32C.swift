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

    /// The checksum of `a + b` from the checksums of `a` and of `b`, where `b` is one 4 KiB block:
    /// `checksum(a + b) == combine(checksum(a), withBlock: checksum(b))`. A few table lookups
    /// instead of reading the block again: a segment's checksum is folded from its blocks' ones.
    @inline(__always)
    public static func combine(_ crcA: UInt32, withBlock crcB: UInt32) -> UInt32 {
        shiftedOneBlock(crcA) ^ crcB
    }

    /// `crc` multiplied by x^(8 × 4096) modulo the polynomial: what `crc` becomes after 4 KiB more
    /// of input, were the checksum not conditioned (the standard checksum's pre- and
    /// post-inversion cancel out in ``combine(_:withBlock:)``, as in zlib's `crc32_combine`).
    @inline(__always)
    static func shiftedOneBlock(_ crc: UInt32) -> UInt32 {
        let t = blockShiftTables
        return t[Int(crc & 0xFF)] ^ t[256 + Int((crc >> 8) & 0xFF)] ^ t[512 + Int((crc >> 16) & 0xFF)] ^ t[768 + Int(crc >> 24)]
    }

    /// Reflected CRC-32C polynomial.
    static let polynomial: UInt32 = 0x82F6_3B78

    /// The map `crc ↦ crc · x^(8 × 4096)` is linear over GF(2), so it is four tables of 256 entries,
    /// one per byte of `crc`.
    static let blockShiftTables: [UInt32] = {
        // x^(2^k) by squaring, from x (0x40000000 reflected) to x^(2^15) = x^(8 × 4096).
        var power: UInt32 = 1 << 30
        for _ in 0..<15 { power = multiplyModP(power, power) }
        var tables = [UInt32](repeating: 0, count: 1024)
        for byte in 0..<4 {
            for value in 0..<256 {
                tables[byte * 256 + value] = multiplyModP(power, UInt32(value) << (8 * byte))
            }
        }
        return tables
    }()

    /// a · b modulo the polynomial, both reflected (zlib's `multmodp`).
    static func multiplyModP(_ a: UInt32, _ b: UInt32) -> UInt32 {
        var m: UInt32 = 1 << 31
        var product: UInt32 = 0
        var b = b
        while m != 0 {
            if a & m != 0 { product ^= b }
            m >>= 1
            b = b & 1 != 0 ? (b >> 1) ^ polynomial : b >> 1
        }
        return product
    }
}
