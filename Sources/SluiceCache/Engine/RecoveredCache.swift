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
    /// copy's sector mask already holds every dirty sector). The result is checked against the
    /// chain (`checkReplay`) before the engine may serve from it.
    public init(chain: SegmentChain, geometry: CacheGeometry) {
        var index = CacheIndex(capacity: geometry.cacheBlocks, positionsPerSlot: geometry.dataBlocksPerSegment)
        for segment in chain.segments {
            let slot = geometry.slot(ofSegment: segment.segmentID)
            for (offset, entry) in segment.entries.enumerated() {
                let position = CacheIndex.Position(slot * geometry.dataBlocksPerSegment + offset)
                if entry.supersedesWithoutData {
                    // A discard marker (the block was trimmed or zeroed after its earlier copies), or
                    // a clean copy: recovery keeps no clean copies (docs/FORMAT.md, row R3).
                    index.remove(blockNumber: entry.blockNumber)
                } else {
                    index.insert(entry.blockNumber, sectorMask: entry.sectorMask, at: position)
                }
            }
        }
        Self.checkReplay(index, chain: chain, geometry: geometry)
        self.index = index
        dirtySegmentIDs = chain.segments.map(\.segmentID)
        nextSegmentID = chain.lastSegmentID + 1
    }

    /// Asserts (kept in release builds: serving from a wrong index returns stale data) that every
    /// index entry points into a chain segment at that segment's newest entry for the block, with
    /// its mask; that no block whose newest entry is a discard marker is indexed; and so that the
    /// index holds exactly one entry per block whose newest entry holds data.
    ///
    /// One pass from the newest entry back. `CacheIndex` keeps a resident word only at the position
    /// its table maps the block to, so an occupied position must hold exactly its chain entry (and
    /// is counted); an unoccupied one is a superseded copy or a marker, and is looked up: its block
    /// must be indexed at a newer position, or be absent below a newer marker. A newest copy that is
    /// not indexed fails the lookup; one indexed at an older copy fails at the newer copy; one
    /// indexed outside the chain leaves `matched` short of `index.count`. Lookups are needed only
    /// for superseded copies and markers, so a log of distinct blocks is checked by reading the
    /// index's positions in order.
    static func checkReplay(_ index: CacheIndex, chain: SegmentChain, geometry: CacheGeometry) {
        let perSegment = geometry.dataBlocksPerSegment
        let firstSlot = geometry.slot(ofSegment: chain.lastRetiredSegmentID + 1)
        // A position's place in the log, oldest first (positions outside the chain sort after it).
        func order(_ position: CacheIndex.Position) -> Int {
            let slot = Int(position) / perSegment
            return (slot - firstSlot + geometry.segmentCount) % geometry.segmentCount * perSegment + Int(position) % perSegment
        }
        var matched = 0
        var discardedLater = Set<UInt64>()
        for segment in chain.segments.reversed() {
            let base = geometry.slot(ofSegment: segment.segmentID) * perSegment
            for offset in segment.entries.indices.reversed() {
                let entry = segment.entries[offset]
                let here = CacheIndex.Position(base + offset)
                if let resident = index.resident(at: here) {
                    precondition(resident.blockNumber == entry.blockNumber && resident.sectorMask == entry.sectorMask && !entry.supersedesWithoutData,
                                 "replay: position \(here) holds block \(resident.blockNumber), not segment \(segment.segmentID)'s entry")
                    matched += 1
                } else if let found = index.lookup(entry.blockNumber) {
                    precondition(order(found.position) > order(here),
                                 "replay: block \(entry.blockNumber) is indexed at an older copy than segment \(segment.segmentID)'s")
                } else {
                    precondition(entry.supersedesWithoutData || discardedLater.contains(entry.blockNumber),
                                 "replay: block \(entry.blockNumber) of segment \(segment.segmentID) is missing from the index")
                }
                if entry.supersedesWithoutData { discardedLater.insert(entry.blockNumber) }
            }
        }
        precondition(matched == index.count, "replay: \(index.count - matched) index entries point at no newest copy in the log")
    }
}
