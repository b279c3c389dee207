import SluiceFormat
import SluiceVolume

extension CacheEngine {
    /// The most one block-status reply describes. A reply may describe less than was asked (the
    /// client asks again from where it ends), and this bounds the index walk per request.
    static let blockStatusMaxBytes: UInt32 = 32 << 20

    /// NBD `base:allocation` of the cache volume: the backing store's allocation, with every block
    /// the cache holds reported as data (its newest copy may not have reached the backing store).
    func submitBlockStatus(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping (consuming VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        guard lengthBytes > 0 else { return completion(.failed(.invalid)) }
        guard offset + UInt64(lengthBytes) <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        let length = min(lengthBytes, Self.blockStatusMaxBytes)
        let limit = max(1, maximumExtents)
        // Taken before the backing store is asked: a block held now is reported as data whatever
        // the backing store answers, since its writeback may land, and the block leave the cache,
        // while the question is out. A block not held now has its newest data on the backing store.
        let held = heldRanges(offset: offset, lengthBytes: UInt64(length))
        backingStore.allocation(offset: offset, lengthBytes: length, maximumExtents: limit) { extents in
            completion(.extents(BlockStatusExtent.markingData(extents, start: offset, dataRanges: held, maximumExtents: limit)))
        }
    }

    /// Byte ranges of the blocks in `offset ..< offset + lengthBytes` that have a copy in the
    /// cache, clipped to that range, sorted and merged.
    private func heldRanges(offset: UInt64, lengthBytes: UInt64) -> [Range<UInt64>] {
        let blockBytes = UInt64(CacheGeometry.blockBytes)
        let end = offset + lengthBytes
        var ranges: [Range<UInt64>] = []
        for block in (offset / blockBytes)...((end - 1) / blockBytes) where index.lookup(block) != nil {
            let range = max(block * blockBytes, offset)..<min((block + 1) * blockBytes, end)
            if let last = ranges.last, last.upperBound == range.lowerBound {
                ranges[ranges.count - 1] = last.lowerBound..<range.upperBound
            } else {
                ranges.append(range)
            }
        }
        return ranges
    }
}
