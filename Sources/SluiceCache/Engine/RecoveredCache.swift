import RecoverCache
import SluiceFormat

/// The cache state rebuilt from the log that recovery accepted: an index holding the newest copy
/// of every block still dirty, and where the log goes on.
public struct RecoveredCache {
    public var index: CacheIndex
    /// Segments whose blocks may still be dirty, oldest first; writeback resumes with them.
    public var dirtySegmentIDs: [UInt64]
    /// The id the next segment written gets.
    public var nextSegmentID: UInt64

    /// Replays `chain` in id order: each block's copy in a later segment replaces the one in an
    /// earlier segment (the write path merges partial writes into the newest copy, so the newest
    /// copy's sector mask already holds every dirty sector).
    public init(chain: SegmentChain, geometry: CacheGeometry) {
        var index = CacheIndex(capacity: geometry.cacheBlocks, positionsPerSlot: geometry.dataBlocksPerSegment)
        for segment in chain.segments {
            let slot = geometry.slot(ofSegment: segment.segmentID)
            for (offset, entry) in segment.entries.enumerated() {
                let position = CacheIndex.Position(slot * geometry.dataBlocksPerSegment + offset)
                if entry.sectorMask == 0 {
                    // A discard marker: the block was trimmed or zeroed after its earlier copies.
                    index.remove(blockNumber: entry.blockNumber)
                } else {
                    index.insert(entry.blockNumber, sectorMask: entry.sectorMask, at: position)
                }
            }
        }
        self.index = index
        dirtySegmentIDs = chain.segments.map(\.segmentID)
        nextSegmentID = chain.lastSegmentID + 1
    }
}
