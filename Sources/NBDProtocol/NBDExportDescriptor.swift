/// What negotiation needs to know about one export.
public struct NBDExportDescriptor: Hashable, Sendable {
    /// The name clients ask for.
    public var name: String
    /// A human-readable description, sent when asked for.
    public var description: String
    public var sizeBytes: UInt64
    /// The export's transmission flags, without `SEND_DF`, which depends on structured replies.
    public var transmissionFlags: NBDTransmissionFlags
    public var minimumBlockBytes: UInt32
    public var preferredBlockBytes: UInt32
    public var maximumPayloadBytes: UInt32
    /// Whether the export answers `base:allocation` block-status queries.
    public var supportsBlockStatus: Bool

    public init(
        name: String, description: String, sizeBytes: UInt64, transmissionFlags: NBDTransmissionFlags,
        minimumBlockBytes: UInt32, preferredBlockBytes: UInt32, maximumPayloadBytes: UInt32,
        supportsBlockStatus: Bool
    ) {
        self.name = name
        self.description = description
        self.sizeBytes = sizeBytes
        self.transmissionFlags = transmissionFlags.union(.hasFlags)
        self.minimumBlockBytes = minimumBlockBytes
        self.preferredBlockBytes = preferredBlockBytes
        self.maximumPayloadBytes = maximumPayloadBytes
        self.supportsBlockStatus = supportsBlockStatus
    }
}

/// What a finished negotiation agreed on.
public struct NBDNegotiation: Hashable, Sendable {
    /// The export chosen for transmission.
    public var export: NBDExportDescriptor
    /// The flags sent to the client, including `SEND_DF` when structured replies are on.
    public var transmissionFlags: NBDTransmissionFlags
    /// Whether replies use structured chunks.
    public var structuredReplies: Bool
    /// Whether the client selected `base:allocation` for this export.
    public var blockStatusSelected: Bool
}
