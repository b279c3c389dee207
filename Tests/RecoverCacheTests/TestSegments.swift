import SluiceFormat

/// The bytes of segment `id` as the engine writes it, with `blocks` data blocks of a pattern
/// that differs per segment and block, for tests that craft rings and devices.
func segmentImage(id: UInt64, blocks: Int, uuid: [UInt8], geometry: CacheGeometry) -> [UInt8] {
    var segment = [UInt8](repeating: 0, count: geometry.segmentBytes)
    let entries = (0..<blocks).map { SegmentHeader.Entry(blockNumber: id * 100 + UInt64($0), sectorMask: 0xFF) }
    for index in 0..<blocks {
        let base = (geometry.headerBlocks + index) * CacheGeometry.blockBytes
        for offset in 0..<CacheGeometry.blockBytes { segment[base + offset] = UInt8(truncatingIfNeeded: Int(id) &* 31 &+ index &+ offset) }
    }
    let header = SegmentHeader(segmentID: id, cacheUUID: uuid, isPartial: blocks < geometry.dataBlocksPerSegment, entries: entries)
    segment.withUnsafeMutableBytes { raw in
        let headerBytes = geometry.headerBlocks * CacheGeometry.blockBytes
        header.encode(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<headerBytes]),
                      data: UnsafeRawBufferPointer(rebasing: raw[headerBytes...]), geometry: geometry)
    }
    return segment
}
