import Glibc
import SluiceVolume

/// Describes the allocation of a regular file with `SEEK_DATA` and `SEEK_HOLE`.
///
/// The scan is a few `lseek` calls, which touch only metadata, so it runs inline on the caller's
/// thread. Block devices and file systems without hole support report everything as data, which
/// is always a correct answer.
public enum BlockStatusScanner {
    /// `SEEK_DATA` and `SEEK_HOLE` from `<unistd.h>`, which Glibc's module hides without `_GNU_SOURCE`.
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4

    public static func extents(
        fileDescriptor: Int32, isBlockDevice: Bool, offset: UInt64, lengthBytes: UInt32, maximumExtents: Int
    ) -> [BlockStatusExtent] {
        precondition(lengthBytes > 0 && maximumExtents > 0)
        let end = offset + UInt64(lengthBytes)
        if isBlockDevice {
            return [BlockStatusExtent(lengthBytes: lengthBytes, flags: [])]
        }
        var extents: [BlockStatusExtent] = []
        var position = offset
        // Each pass emits one extent and advances by at least one byte, and extents are capped.
        while position < end && extents.count < maximumExtents {
            let dataStart = lseek(fileDescriptor, off_t(position), seekData)
            if dataStart < 0 {
                if errno == ENXIO {
                    // No data from here to the end of the file.
                    extents.appendMerging(lengthBytes: end - position, flags: [.hole, .zero])
                } else {
                    extents.appendMerging(lengthBytes: end - position, flags: [])
                }
                break
            }
            if UInt64(dataStart) > position {
                let holeEnd = min(UInt64(dataStart), end)
                extents.appendMerging(lengthBytes: holeEnd - position, flags: [.hole, .zero])
                position = holeEnd
                continue
            }
            let holeStart = lseek(fileDescriptor, off_t(position), seekHole)
            let dataEnd = holeStart < 0 ? end : min(max(UInt64(holeStart), position + 1), end)
            extents.appendMerging(lengthBytes: dataEnd - position, flags: [])
            position = dataEnd
        }
        return roundedToSectors(extents, requestedBytes: UInt64(lengthBytes))
    }

    /// File systems report holes at their own granularity; clients are promised 512-byte multiples.
    /// A boundary inside a sector moves so that the whole sector counts as data, which is always
    /// a correct answer (data may read as zeros; a hole may not hold data). Boundaries are computed
    /// from the true offsets, so an extent dropped by rounding never shifts the ones after it.
    public static func roundedToSectors(_ extents: [BlockStatusExtent], requestedBytes: UInt64) -> [BlockStatusExtent] {
        let sectorBytes: UInt64 = 512
        guard extents.contains(where: { UInt64($0.lengthBytes) % sectorBytes != 0 }) else { return extents }
        var result: [BlockStatusExtent] = []
        var trueEnd: UInt64 = 0
        var emittedEnd: UInt64 = 0
        for extent in extents {
            trueEnd += UInt64(extent.lengthBytes)
            // The extents may stop short of the request (when capped): never stretch the last one
            // over bytes that were not looked at.
            let target: UInt64
            if extent.flags.isEmpty {
                target = (trueEnd + sectorBytes - 1) / sectorBytes * sectorBytes
            } else {
                target = trueEnd / sectorBytes * sectorBytes
            }
            guard target > emittedEnd else { continue }
            // Data may absorb a neighbouring partial hole, never the other way round.
            result.appendMerging(lengthBytes: target - emittedEnd, flags: extent.flags)
            emittedEnd = target
        }
        return result.isEmpty ? [BlockStatusExtent(lengthBytes: UInt32(requestedBytes), flags: [])] : result
    }
}
