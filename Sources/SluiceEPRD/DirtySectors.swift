import SluiceFormat
import SluiceRAMDisk

/// Which 512-byte sectors of an EPRD's RAM image differ from its backing store: one sector mask
/// per 4 KiB block (bit *n* is the block's sector *n*, as everywhere in Sluice), grouped by the
/// image's 64 KiB chunks so a commit visits only chunks that hold dirty sectors.
///
/// Not thread-safe: the volume's lock covers it with the image.
struct DirtySectors {
    static let blocksPerChunk = SparseMemory.chunkBytes / CacheGeometry.blockBytes
    static let sectorsPerChunk = SparseMemory.chunkBytes / CacheGeometry.sectorBytes

    /// A run of consecutive dirty bytes on the backing store.
    struct Run: Equatable {
        var offset: UInt64
        var lengthBytes: Int
        var end: UInt64 { offset + UInt64(lengthBytes) }
    }

    /// Chunk number → its blocks' sector masks; chunks with no dirty sector are absent.
    private var masks: [UInt64: [UInt8]] = [:]
    /// How many sectors are dirty.
    private(set) var sectorCount = 0

    var bytes: UInt64 { UInt64(sectorCount * CacheGeometry.sectorBytes) }
    var isEmpty: Bool { sectorCount == 0 }

    /// The chunks holding dirty sectors, in block order: what a commit started now must write.
    func chunksInOrder() -> [UInt64] { masks.keys.sorted() }

    /// Marks `offset ..< offset + lengthBytes` dirty; both are multiples of 512.
    mutating func mark(offset: UInt64, lengthBytes: Int) {
        precondition(offset % UInt64(CacheGeometry.sectorBytes) == 0 && lengthBytes % CacheGeometry.sectorBytes == 0,
                     "dirty ranges are whole sectors")
        SparseMemory.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, inChunk, length, _ in
            var chunkMasks = masks.removeValue(forKey: chunk) ?? [UInt8](repeating: 0, count: Self.blocksPerChunk)
            var sector = inChunk / CacheGeometry.sectorBytes
            let endSector = sector + length / CacheGeometry.sectorBytes
            while sector < endSector {
                let block = sector / CacheGeometry.sectorsPerBlock
                let bit: UInt8 = 1 << UInt8(sector % CacheGeometry.sectorsPerBlock)
                if chunkMasks[block] & bit == 0 {
                    chunkMasks[block] |= bit
                    sectorCount += 1
                }
                sector += 1
            }
            masks[chunk] = chunkMasks
        }
    }

    /// Marks every run dirty again (a commit that could not write or sync them).
    mutating func mark(_ runs: [Run]) {
        for run in runs { mark(offset: run.offset, lengthBytes: run.lengthBytes) }
    }

    /// Takes the dirty sectors of `chunks` (in block order) as merged runs, clearing them: a commit
    /// writes them next. Sectors written after this are marked again and go with a later commit.
    mutating func take(chunks: ArraySlice<UInt64>) -> [Run] {
        var runs: [Run] = []
        for chunk in chunks {
            guard let chunkMasks = masks.removeValue(forKey: chunk) else { continue }
            for (block, mask) in chunkMasks.enumerated() where mask != 0 {
                sectorCount -= mask.nonzeroBitCount
                let blockOffset = chunk * UInt64(SparseMemory.chunkBytes) + UInt64(block * CacheGeometry.blockBytes)
                forEachSectorRun(mask) { sector, count in
                    let run = Run(offset: blockOffset + UInt64(sector * CacheGeometry.sectorBytes),
                                  lengthBytes: count * CacheGeometry.sectorBytes)
                    if let last = runs.last, last.end == run.offset {
                        runs[runs.count - 1].lengthBytes += run.lengthBytes
                    } else {
                        runs.append(run)
                    }
                }
            }
        }
        return runs
    }
}
