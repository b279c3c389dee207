/// The runs of consecutive set bits of a block's sector mask (bit *n* is the block's sector *n*):
/// the one iterator over sector runs.
public enum SectorRuns {
    /// The first run of set bits of `mask` at or after sector `from`.
    @inline(__always)
    public static func first(in mask: UInt8, from: Int = 0) -> (sector: Int, count: Int)? {
        var sector = from
        while sector < CacheGeometry.sectorsPerBlock && mask & (1 << sector) == 0 { sector += 1 }
        guard sector < CacheGeometry.sectorsPerBlock else { return nil }
        var end = sector + 1
        while end < CacheGeometry.sectorsPerBlock && mask & (1 << end) != 0 { end += 1 }
        return (sector, end - sector)
    }
}

/// Calls `body(firstSector, sectorCount)` for each run of consecutive set bits of `mask`.
@inline(__always)
public func forEachSectorRun(_ mask: UInt8, _ body: (Int, Int) -> Void) {
    var from = 0
    while let run = SectorRuns.first(in: mask, from: from) {
        body(run.sector, run.count)
        from = run.sector + run.count
    }
}
