/// Why a cache device (or its pmem file or backing store) cannot be used as it is. Every message
/// names the problem and, where there is one, the fix.
public enum FormatError: Error, Equatable, CustomStringConvertible {
    case notFormatted
    case unsupportedVersion(found: UInt32, supported: UInt32)
    case corruptSuperblock(String)
    case noValidRecord
    case invalidSegmentSize(Int)
    case deviceTooSmall(deviceBytes: UInt64, neededBytes: UInt64)
    case truncated(deviceBytes: UInt64, neededBytes: UInt64)
    case wrongBacking(expected: String, found: String)
    case backingSizeChanged(expected: UInt64, found: UInt64)
    case wrongMode(recorded: String, requested: String)
    case backingIdentityTooLong(bytes: Int, maximum: Int)
    case logShorterThanRecorded(lastFlushedID: UInt64, foundID: UInt64, reason: String)

    public var description: String {
        switch self {
        case .notFormatted:
            return "the cache device is not formatted for Sluice; format it with `sluice format --cache PATH --backing PATH` (this erases it)"
        case .unsupportedVersion(let found, let supported) where found == SuperblockHeader.upgradableVersion:
            return "the cache device has format version \(found), written by an earlier Sluice; this Sluice reads version \(supported). Upgrade it in place with `sluice-recover upgrade --cache PATH` (its data stays as it is; an earlier Sluice will no longer open it)"
        case .unsupportedVersion(let found, let supported):
            return "the cache device has format version \(found), but this Sluice reads version \(supported); use a matching Sluice, or drain the cache and format it again"
        case .corruptSuperblock(let detail):
            return "the cache device's superblock is damaged (\(detail)); check it with `sluice-recover check`, or format it again if its contents are not needed"
        case .noValidRecord:
            return "neither superblock record slot of the cache device is valid; check it with `sluice-recover check`"
        case .invalidSegmentSize(let bytes):
            return "segment size \(bytes) is not a power of two between 64 KiB and 64 MiB"
        case .deviceTooSmall(let device, let needed):
            return "the cache device holds \(device) bytes but needs at least \(needed) for two segments; use a larger device or smaller segments"
        case .truncated(let device, let needed):
            return "the cache device holds \(device) bytes but its superblock describes \(needed); it was truncated or is the wrong device"
        case .wrongBacking(let expected, let found):
            return "this cache belongs to backing store \(expected), not \(found); give the right --backing, or drain and format the cache for the new backing"
        case .backingSizeChanged(let expected, let found):
            return "the backing store was \(expected) bytes when the cache was formatted and is \(found) bytes now; give the right --backing, or drain the cache and format it again"
        case .wrongMode(let recorded, let requested):
            if recorded == "pmem" {
                return "this cache keeps its write buffer in a pmem file, and \(requested) mode was asked for; pass --pmem PATH with the pmem file it was formatted with, or switch it to volatile mode with `sluice mode --volatile --pmem PATH`"
            }
            return "this cache was formatted in \(recorded) mode, and \(requested) mode was asked for; switch it first with `sluice mode --pmem PATH`, or serve it without --pmem"
        case .backingIdentityTooLong(let bytes, let maximum):
            return "the backing store's canonical path or URI is \(bytes) bytes long, and a cache records at most \(maximum); give the backing store a shorter path or URI"
        case .logShorterThanRecorded(let flushed, let found, let reason):
            return "the cache's record says segments up to \(flushed) were synced, but the log ends at \(found) (\(reason)): the device was changed or damaged since; check it with `sluice-recover check`"
        }
    }
}
