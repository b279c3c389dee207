import SluiceFormat

/// The log that recovery accepts: the segments whose ids follow the last written-back segment one
/// by one, each verified by its checksum, and why the chain ends where it does.
public struct SegmentChain: Equatable, Sendable {
    /// Why the chain ends. Each case is one row of the recovery table in `docs/FORMAT.md`.
    public enum End: Equatable, Sendable {
        /// The next slot holds no segment header: the log simply ends there.
        case empty(slot: Int)
        /// The next slot holds a segment from an earlier lap of the ring (a smaller id): the log
        /// ends; the stale segment is never replayed.
        case staleLap(slot: Int, expectedID: UInt64, foundID: UInt64)
        /// The next slot holds a segment whose id is larger than expected: the device is damaged
        /// or was written by something else, and nothing from there on is trusted.
        case idJump(slot: Int, expectedID: UInt64, foundID: UInt64)
        /// The next slot's header or data fails its checksum: the write was torn by a crash (or
        /// the medium is damaged); it is not applied.
        case checksumMismatch(slot: Int, expectedID: UInt64)
        /// The next slot belongs to another cache (an earlier format of the device).
        case foreign(slot: Int)
        /// The next slot's header is not self-consistent.
        case malformed(slot: Int)
        /// Every slot holds a segment of the chain: the ring is full.
        case ringFull
    }

    /// The accepted segments, in id order, starting right after the last written-back one.
    public var segments: [SegmentHeader]
    public var end: End

    /// The id of the newest accepted segment, or the last written-back id when none was accepted.
    public var lastSegmentID: UInt64 { segments.last?.segmentID ?? (lastWrittenBackSegmentID) }
    public let lastWrittenBackSegmentID: UInt64

    /// Walks the ring from the segment after `lastWrittenBackSegmentID`. `readSegment` returns the
    /// bytes of a ring slot (its header blocks and data blocks); it is called at most once per slot.
    ///
    /// Segments up to `trustedThroughID` (the last flushed id of a clean shutdown) are accepted
    /// from their headers alone: `readSegment` may return just the header blocks for them, and only
    /// the headers' ids are checked. Every later segment must verify in full.
    public static func scan(
        geometry: CacheGeometry, cacheUUID: [UInt8], lastWrittenBackSegmentID: UInt64, trustedThroughID: UInt64 = 0,
        readSegment: (Int) throws -> [UInt8]
    ) rethrows -> SegmentChain {
        var segments: [SegmentHeader] = []
        var expected = lastWrittenBackSegmentID + 1
        // At most one lap: a chain longer than the ring would overwrite its own start.
        for _ in 0..<geometry.segmentCount {
            let slot = geometry.slot(ofSegment: expected)
            let bytes = try readSegment(slot)
            let header: SegmentHeader
            do {
                // Read the id before verifying, so a stale segment from an earlier lap is reported
                // as such even when its data has since been partly overwritten.
                let unverified = try bytes.withUnsafeBytes {
                    try SegmentHeader(decodingHeader: UnsafeRawBufferPointer(rebasing: $0[0..<(geometry.headerBlocks * CacheGeometry.blockBytes)]),
                                      geometry: geometry, cacheUUID: cacheUUID)
                }
                if unverified.segmentID < expected {
                    return SegmentChain(segments: segments, end: .staleLap(slot: slot, expectedID: expected, foundID: unverified.segmentID),
                                        lastWrittenBackSegmentID: lastWrittenBackSegmentID)
                }
                if unverified.segmentID > expected {
                    return SegmentChain(segments: segments, end: .idJump(slot: slot, expectedID: expected, foundID: unverified.segmentID),
                                        lastWrittenBackSegmentID: lastWrittenBackSegmentID)
                }
                if expected <= trustedThroughID {
                    header = unverified
                } else {
                    header = try bytes.withUnsafeBytes { try SegmentHeader(verifying: $0, geometry: geometry, cacheUUID: cacheUUID) }
                }
            } catch let invalid as SegmentHeader.Invalid {
                let end: End
                switch invalid {
                case .noHeader: end = .empty(slot: slot)
                case .foreign: end = .foreign(slot: slot)
                case .malformed: end = .malformed(slot: slot)
                case .checksumMismatch: end = .checksumMismatch(slot: slot, expectedID: expected)
                }
                return SegmentChain(segments: segments, end: end, lastWrittenBackSegmentID: lastWrittenBackSegmentID)
            }
            segments.append(header)
            expected += 1
        }
        return SegmentChain(segments: segments, end: .ringFull, lastWrittenBackSegmentID: lastWrittenBackSegmentID)
    }
}
