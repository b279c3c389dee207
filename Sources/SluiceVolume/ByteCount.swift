/// Sizes as people write them: `1048576`, `512K`, `64M`, `1G`, `2T`, with powers of 1024, and an
/// optional `i`, `iB` or `B` after the unit (`64MiB`). One parser for the command line, the
/// management API and every volume kind that takes a size.
public enum ByteCount {
    private static let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]

    /// The size `text` names, or nil if it names none (empty, not a number, zero, or too large).
    public static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text.uppercased())
        if digits.hasSuffix("IB") { digits = digits.dropLast(2) } else if digits.hasSuffix("I") || digits.hasSuffix("B") { digits = digits.dropLast() }
        var multiplier: UInt64 = 1
        if let last = digits.last, let unit = units[last] {
            multiplier = unit
            digits = digits.dropLast()
        }
        guard let value = UInt64(digits), value > 0 else { return nil }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : bytes
    }

    /// `bytes` in the largest unit that divides it (`64M`, `1536K`, `4097`).
    public static func format(_ bytes: UInt64) -> String {
        for (unit, size) in [("T", UInt64(1) << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)] where bytes >= size && bytes % size == 0 {
            return "\(bytes / size)\(unit)"
        }
        return "\(bytes)"
    }
}
