import Glibc
import SluiceFormat
import SluiceIO

/// `sluice-recover upgrade`: turns a version-1 cache into the current version in place.
public enum CacheUpgrade {
    public enum Outcome: Equatable, Sendable {
        case upgraded(from: UInt32, to: UInt32)
        case alreadyCurrent(UInt32)
    }

    public struct IOFailure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Rewrites the superblock header's version (and checksum) and syncs it. Holds the device's
    /// exclusive lock, so a cache a server uses is refused. Nothing else on the device changes:
    /// a version-1 log is a valid version-2 log (docs/FORMAT.md, *Format versions*).
    public static func upgrade(cachePath: String) throws -> Outcome {
        let file = try BlockFile(path: cachePath, readOnly: false)
        var block = [UInt8](repeating: 0, count: CacheGeometry.blockBytes)
        let got = block.withUnsafeMutableBytes { pread(file.fileDescriptor, $0.baseAddress, $0.count, 0) }
        guard got == CacheGeometry.blockBytes else {
            throw got < 0 ? IOFailure(description: "reading the superblock of \(cachePath) failed: \(String(cString: strerror(errno)))")
                : FormatError.notFormatted
        }
        let version = SuperblockHeader.storedVersion(block)
        if version == SuperblockHeader.formatVersion {
            // A damaged current header is reported as such, not "upgraded".
            _ = try block.withUnsafeBytes { try SuperblockHeader(decoding: $0) }
            return .alreadyCurrent(version)
        }
        let upgraded = try SuperblockHeader.upgradedFromVersion1(block)
        let written = upgraded.withUnsafeBytes { pwrite(file.fileDescriptor, $0.baseAddress, $0.count, 0) }
        guard written == CacheGeometry.blockBytes, fdatasync(file.fileDescriptor) == 0 else {
            throw IOFailure(description: "writing the upgraded superblock of \(cachePath) failed: \(String(cString: strerror(errno))); "
                            + "run the upgrade again (the header is either the old one or the new one)")
        }
        return .upgraded(from: SuperblockHeader.upgradableVersion, to: SuperblockHeader.formatVersion)
    }
}
