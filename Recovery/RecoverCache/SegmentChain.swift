import SluiceFormat

/// The log that recovery accepts: the segments whose ids follow the last retired segment one
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

    /// The accepted segments, in id order, starting right after the last retired one.
    public var segments: [SegmentHeader]
    public var end: End

    /// The id of the newest accepted segment, or the last retired id when none was accepted.
    public var lastSegmentID: UInt64 { segments.last?.segmentID ?? (lastRetiredSegmentID) }
    public let lastRetiredSegmentID: UInt64

    /// Walks the ring from the segment after `lastRetiredSegmentID`. `readSegment` returns the
    /// bytes of a ring slot (its header blocks and data blocks); it is called at most once per slot.
    ///
    /// Segments up to `trustedThroughID` (the last flushed id of a clean shutdown) are accepted
    /// from their headers alone: `readSegment` may return just the header blocks for them, and only
    /// the headers' ids are checked. Every later segment must verify in full.
    public static func scan(
        geometry: CacheGeometry, cacheUUID: [UInt8], lastRetiredSegmentID: UInt64, trustedThroughID: UInt64 = 0,
        readSegment: (Int) throws -> [UInt8]
    ) rethrows -> SegmentChain {
        var walk = Walk(geometry: geometry, cacheUUID: cacheUUID, lastRetiredSegmentID: lastRetiredSegmentID,
                        trustedThroughID: trustedThroughID)
        while let slot = walk.nextSlot {
            let bytes = try readSegment(slot)
            bytes.withUnsafeBytes { walk.take($0) }
        }
        return walk.chain!
    }

    /// The walk as a state machine, one slot at a time, so that recovery can feed it bytes from
    /// buffers it reuses while the next reads are in flight. `scan` is this loop over arrays.
    public struct Walk {
        public let geometry: CacheGeometry
        public let cacheUUID: [UInt8]
        public let lastRetiredSegmentID: UInt64
        public let trustedThroughID: UInt64
        /// The id the next slot must hold.
        public private(set) var expectedID: UInt64
        private var segments: [SegmentHeader] = []
        private var end: End?

        public init(geometry: CacheGeometry, cacheUUID: [UInt8], lastRetiredSegmentID: UInt64, trustedThroughID: UInt64 = 0) {
            self.geometry = geometry
            self.cacheUUID = cacheUUID
            self.lastRetiredSegmentID = lastRetiredSegmentID
            self.trustedThroughID = trustedThroughID
            expectedID = lastRetiredSegmentID + 1
        }

        /// The slot to read next, or nil once the chain has ended. At most one lap: a chain longer
        /// than the ring would overwrite its own start.
        public var nextSlot: Int? {
            end == nil ? geometry.slot(ofSegment: expectedID) : nil
        }

        /// The chain, once the walk has ended.
        public var chain: SegmentChain? {
            end.map { SegmentChain(segments: segments, end: $0, lastRetiredSegmentID: lastRetiredSegmentID) }
        }

        /// Takes the bytes of `nextSlot` (only its header blocks suffice up to `trustedThroughID`):
        /// accepts the segment and goes on, or ends the chain, saying why.
        public mutating func take(_ bytes: UnsafeRawBufferPointer) {
            precondition(end == nil, "the walk has ended")
            let slot = geometry.slot(ofSegment: expectedID)
            do {
                // Read the id before verifying, so a stale segment from an earlier lap is reported
                // as such even when its data has since been partly overwritten.
                let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
                let unverified = try SegmentHeader(decodingHeader: UnsafeRawBufferPointer(rebasing: bytes[0..<headerBytes]),
                                                   geometry: geometry, cacheUUID: cacheUUID)
                if unverified.segmentID < expectedID {
                    return end = .staleLap(slot: slot, expectedID: expectedID, foundID: unverified.segmentID)
                }
                if unverified.segmentID > expectedID {
                    return end = .idJump(slot: slot, expectedID: expectedID, foundID: unverified.segmentID)
                }
                if expectedID <= trustedThroughID {
                    segments.append(unverified)
                } else {
                    segments.append(try SegmentHeader(verifying: bytes, geometry: geometry, cacheUUID: cacheUUID))
                }
            } catch let invalid as SegmentHeader.Invalid {
                switch invalid {
                case .noHeader: end = .empty(slot: slot)
                case .foreign: end = .foreign(slot: slot)
                case .malformed: end = .malformed(slot: slot)
                case .checksumMismatch: end = .checksumMismatch(slot: slot, expectedID: expectedID)
                }
                return
            } catch {
                preconditionFailure("segment decoding throws only SegmentHeader.Invalid: \(error)")
            }
            expectedID += 1
            if segments.count == geometry.segmentCount { end = .ringFull }
        }
    }
}
