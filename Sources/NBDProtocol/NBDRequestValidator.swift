/// Checks every transmission request at the edge, before anything reaches storage.
///
/// One function decides, for every command, which flags are allowed, which ranges and sizes are
/// acceptable, and which error a bad request gets, following the NBD specification's error rules.
public enum NBDRequestValidator {
    /// A request that passed every check, in the server's own terms.
    public enum Command: Equatable {
        case read(offset: UInt64, lengthBytes: UInt32, doNotFragment: Bool)
        case write(offset: UInt64, lengthBytes: UInt32, fua: Bool)
        case disconnect
        case flush
        case trim(offset: UInt64, lengthBytes: UInt32, fua: Bool)
        case cache(offset: UInt64, lengthBytes: UInt32)
        case writeZeroes(offset: UInt64, lengthBytes: UInt32, fua: Bool, noHole: Bool, fastZero: Bool)
        case blockStatus(offset: UInt64, lengthBytes: UInt32, requestOne: Bool)
    }

    /// A refused request: the error to send and a message for the log and for structured replies.
    public struct Refusal: Error, Equatable {
        public var error: NBDError
        public var message: String
    }

    /// Validates `header` against what negotiation agreed on.
    public static func validate(_ header: NBDRequestHeader, negotiation: NBDNegotiation) -> Result<Command, Refusal> {
        validate(header, limits: NBDRequestLimits(negotiation: negotiation))
    }

    /// Validates `header` against limits taken from the negotiation once, so the per-request path
    /// copies no strings and touches no reference counts.
    public static func validate(_ header: NBDRequestHeader, limits export: NBDRequestLimits) -> Result<Command, Refusal> {
        let flags = export.transmissionFlags
        let readOnly = flags.contains(.readOnly)
        let offset = header.offset
        let length = header.lengthBytes

        func refuse(_ error: NBDError, _ message: String) -> Result<Command, Refusal> {
            .failure(Refusal(error: error, message: message))
        }

        // DISC never gets a reply, so it is never refused, whatever its flags, offset or length.
        if header.command == .disconnect { return .success(.disconnect) }

        // Flags allowed per command. FUA is accepted on every command, as the spec requires.
        var allowed: NBDCommandFlags = flags.contains(.sendFUA) ? [.fua] : []
        switch header.command {
        case .read: if flags.contains(.sendDF) { allowed.insert(.doNotFragment) }
        case .writeZeroes:
            allowed.insert(.noHole)
            if flags.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .blockStatus: allowed.insert(.requestOne)
        case .write, .disconnect, .flush, .trim, .cache: break
        default:
            return refuse(.invalid, "unknown command \(header.command.rawValue)")
        }
        guard header.flags.isSubset(of: allowed) else {
            let extra = header.flags.subtracting(allowed).rawValue
            return refuse(.invalid, "\(header.command) does not take flags 0x\(String(extra, radix: 16))")
        }

        switch header.command {
        case .disconnect:
            return .success(.disconnect)
        case .flush:
            guard offset == 0 && length == 0 else {
                return refuse(.invalid, "FLUSH must have offset and length 0")
            }
            guard flags.contains(.sendFlush) else { return refuse(.invalid, "FLUSH is not supported") }
            return .success(.flush)
        default:
            break
        }

        // Range checks: the end must not pass the export; offset + length must not overflow.
        let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
        let beyondEnd = overflow || end > export.sizeBytes
        let minimum = UInt64(export.minimumBlockBytes)
        let aligned = offset % minimum == 0 && UInt64(length) % minimum == 0

        switch header.command {
        case .read:
            guard length <= export.maximumPayloadBytes else {
                return refuse(.invalid, "READ of \(length) bytes exceeds the maximum of \(export.maximumPayloadBytes)")
            }
            guard !beyondEnd else { return refuse(.invalid, "READ beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "READ not aligned to \(minimum) bytes") }
            return .success(.read(offset: offset, lengthBytes: length, doNotFragment: header.flags.contains(.doNotFragment)))
        case .write:
            guard !readOnly else { return refuse(.notPermitted, "the export is read-only") }
            guard length <= export.maximumPayloadBytes else {
                return refuse(.invalid, "WRITE of \(length) bytes exceeds the maximum of \(export.maximumPayloadBytes)")
            }
            guard !beyondEnd else { return refuse(.noSpace, "WRITE beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "WRITE not aligned to \(minimum) bytes") }
            return .success(.write(offset: offset, lengthBytes: length, fua: header.flags.contains(.fua)))
        case .trim:
            guard !readOnly else { return refuse(.notPermitted, "the export is read-only") }
            guard flags.contains(.sendTrim) else { return refuse(.invalid, "TRIM is not supported") }
            guard !beyondEnd else { return refuse(.invalid, "TRIM beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "TRIM not aligned to \(minimum) bytes") }
            return .success(.trim(offset: offset, lengthBytes: length, fua: header.flags.contains(.fua)))
        case .writeZeroes:
            guard !readOnly else { return refuse(.notPermitted, "the export is read-only") }
            guard flags.contains(.sendWriteZeroes) else { return refuse(.invalid, "WRITE_ZEROES is not supported") }
            guard !beyondEnd else { return refuse(.noSpace, "WRITE_ZEROES beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "WRITE_ZEROES not aligned to \(minimum) bytes") }
            return .success(.writeZeroes(
                offset: offset, lengthBytes: length, fua: header.flags.contains(.fua),
                noHole: header.flags.contains(.noHole), fastZero: header.flags.contains(.fastZero)))
        case .cache:
            guard flags.contains(.sendCache) else { return refuse(.invalid, "CACHE is not supported") }
            guard length <= export.maximumPayloadBytes else {
                return refuse(.invalid, "CACHE of \(length) bytes exceeds the maximum of \(export.maximumPayloadBytes)")
            }
            guard !beyondEnd else { return refuse(.invalid, "CACHE beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "CACHE not aligned to \(minimum) bytes") }
            return .success(.cache(offset: offset, lengthBytes: length))
        case .blockStatus:
            guard export.blockStatusSelected else {
                return refuse(.invalid, "BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT")
            }
            guard length > 0 else { return refuse(.invalid, "BLOCK_STATUS of length 0") }
            guard !beyondEnd else { return refuse(.invalid, "BLOCK_STATUS beyond the end of the export") }
            guard aligned else { return refuse(.invalid, "BLOCK_STATUS not aligned to \(minimum) bytes") }
            return .success(.blockStatus(offset: offset, lengthBytes: length, requestOne: header.flags.contains(.requestOne)))
        default:
            preconditionFailure("command \(header.command) passed the flag check but has no validation")
        }
    }
}

/// What request validation needs from a negotiation: plain numbers and flags, cheap to copy.
public struct NBDRequestLimits: Hashable, Sendable {
    public var sizeBytes: UInt64
    public var transmissionFlags: NBDTransmissionFlags
    public var minimumBlockBytes: UInt32
    public var maximumPayloadBytes: UInt32
    public var blockStatusSelected: Bool

    public init(negotiation: NBDNegotiation) {
        sizeBytes = negotiation.export.sizeBytes
        transmissionFlags = negotiation.transmissionFlags
        minimumBlockBytes = negotiation.export.minimumBlockBytes
        maximumPayloadBytes = negotiation.export.maximumPayloadBytes
        blockStatusSelected = negotiation.blockStatusSelected
    }
}
