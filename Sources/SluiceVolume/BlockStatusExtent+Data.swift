extension BlockStatusExtent {
    /// `extents` (describing bytes from `start` on) with every byte inside `dataRanges` reported
    /// as data: what a layer that holds data of its own over a lower volume answers. `dataRanges`
    /// are sorted, disjoint and sector-aligned. Adjacent extents with equal flags are merged, and at
    /// most `maximumExtents` are returned (a prefix: a reply may describe less than was asked).
    public static func markingData(_ extents: [BlockStatusExtent], start: UInt64, dataRanges: [Range<UInt64>],
                                   maximumExtents: Int) -> [BlockStatusExtent] {
        precondition(maximumExtents > 0)
        var result: [BlockStatusExtent] = []
        func append(_ length: UInt64, _ flags: BlockStatusFlags) { result.appendMerging(lengthBytes: length, flags: flags) }
        var position = start
        var next = 0
        for extent in extents {
            let end = position + UInt64(extent.lengthBytes)
            if extent.flags.isEmpty {
                append(end - position, [])
                position = end
                continue
            }
            while next < dataRanges.count && dataRanges[next].upperBound <= position { next += 1 }
            var cursor = position
            var index = next
            while cursor < end, index < dataRanges.count, dataRanges[index].lowerBound < end {
                let range = dataRanges[index]
                append(max(range.lowerBound, cursor) - cursor, extent.flags)
                let dataEnd = min(range.upperBound, end)
                append(dataEnd - max(range.lowerBound, cursor), [])
                cursor = dataEnd
                if range.upperBound <= end { index += 1 } else { break }
            }
            append(end - cursor, extent.flags)
            position = end
        }
        return Array(result.prefix(maximumExtents))
    }
}

extension Array where Element == BlockStatusExtent {
    /// Appends `lengthBytes` with `flags`, lengthening the last extent when it has the same flags
    /// (an empty length appends nothing).
    public mutating func appendMerging(lengthBytes: UInt64, flags: BlockStatusFlags) {
        guard lengthBytes > 0 else { return }
        if let last, last.flags == flags {
            self[count - 1].lengthBytes = last.lengthBytes + UInt32(lengthBytes)
        } else {
            append(BlockStatusExtent(lengthBytes: UInt32(lengthBytes), flags: flags))
        }
    }
}
