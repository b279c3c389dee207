/// What a volume supports. A server advertises exactly these to its clients.
public struct VolumeCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Writes, trims and write-zeroes are refused.
    public static let readOnly = VolumeCapabilities(rawValue: 1 << 0)
    /// Flush makes completed writes durable.
    public static let flush = VolumeCapabilities(rawValue: 1 << 1)
    /// Force-unit-access on writes is honoured.
    public static let fua = VolumeCapabilities(rawValue: 1 << 2)
    /// Trim is supported.
    public static let trim = VolumeCapabilities(rawValue: 1 << 3)
    /// Write-zeroes is supported.
    public static let writeZeroes = VolumeCapabilities(rawValue: 1 << 4)
    /// Write-zeroes can fail fast instead of writing zeros slowly.
    public static let fastZero = VolumeCapabilities(rawValue: 1 << 5)
    /// The cache hint is supported.
    public static let cache = VolumeCapabilities(rawValue: 1 << 6)
    /// Block status describes allocation.
    public static let blockStatus = VolumeCapabilities(rawValue: 1 << 7)
    /// Every session sees the same data and a flush on one covers writes completed on all, so a
    /// client may open many connections.
    public static let multipleConnections = VolumeCapabilities(rawValue: 1 << 8)
    /// The medium is rotational, so clients may want to sort their requests.
    public static let rotational = VolumeCapabilities(rawValue: 1 << 9)
}

/// The block sizes a volume asks clients to honour, in bytes.
public struct VolumeBlockSizes: Sendable, Hashable {
    /// No request may be smaller or unaligned to this.
    public var minimumBytes: UInt32
    /// Requests of this size and alignment avoid read-modify-write.
    public var preferredBytes: UInt32
    /// No request's payload may be larger than this.
    public var maximumPayloadBytes: UInt32

    public init(minimumBytes: UInt32, preferredBytes: UInt32, maximumPayloadBytes: UInt32) {
        precondition(minimumBytes.nonzeroBitCount == 1, "minimum block size must be a power of two")
        precondition(preferredBytes.nonzeroBitCount == 1, "preferred block size must be a power of two")
        precondition(minimumBytes <= preferredBytes && preferredBytes <= maximumPayloadBytes)
        self.minimumBytes = minimumBytes
        self.preferredBytes = preferredBytes
        self.maximumPayloadBytes = maximumPayloadBytes
    }

    /// 512-byte sectors, 4 KiB preferred, 32 MiB payloads: what Sluice serves by default.
    public static let standard = VolumeBlockSizes(
        minimumBytes: 512, preferredBytes: 4096, maximumPayloadBytes: 32 * 1024 * 1024)
}
