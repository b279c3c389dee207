import NBDProtocol
import SluiceVolume

/// One export: a name, a description and the volume behind them.
public struct NBDServerExport: Sendable {
    public var name: String
    public var description: String
    public var volume: any Volume
    /// Serve the volume read-only even if it is writable.
    public var readOnly: Bool

    public init(name: String, description: String = "", volume: any Volume, readOnly: Bool = false) {
        self.name = name
        self.description = description
        self.volume = volume
        self.readOnly = readOnly
    }

    /// What negotiation advertises for this export: the volume's capabilities as NBD flags.
    var descriptor: NBDExportDescriptor {
        let capabilities = volume.capabilities
        var flags: NBDTransmissionFlags = [.hasFlags]
        if readOnly || capabilities.contains(.readOnly) { flags.insert(.readOnly) }
        if capabilities.contains(.flush) { flags.insert(.sendFlush) }
        if capabilities.contains(.fua) { flags.insert(.sendFUA) }
        if capabilities.contains(.rotational) { flags.insert(.rotational) }
        if capabilities.contains(.multipleConnections) { flags.insert(.canMultiConnection) }
        if capabilities.contains(.cache) { flags.insert(.sendCache) }
        if !flags.contains(.readOnly) {
            if capabilities.contains(.trim) { flags.insert(.sendTrim) }
            if capabilities.contains(.writeZeroes) {
                flags.insert(.sendWriteZeroes)
                if capabilities.contains(.fastZero) { flags.insert(.sendFastZero) }
            }
        }
        let sizes = volume.blockSizes
        return NBDExportDescriptor(
            name: name, description: description, sizeBytes: volume.sizeBytes, transmissionFlags: flags,
            minimumBlockBytes: sizes.minimumBytes, preferredBlockBytes: sizes.preferredBytes,
            maximumPayloadBytes: sizes.maximumPayloadBytes,
            supportsBlockStatus: capabilities.contains(.blockStatus))
    }
}
