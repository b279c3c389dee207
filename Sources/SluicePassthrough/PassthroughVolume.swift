import Atomics
import Glibc
import NIOCore
import SluiceIO
import SluiceVolume

/// A volume that sends every request straight to a backing file or block device through io_uring.
///
/// Reads and writes go through the page cache, as with nbdkit's file plugin and qemu-nbd's
/// write-back cache mode; force-unit-access writes use `RWF_DSYNC`, and flush is `fdatasync`,
/// which covers every write that completed before it on any session.
public final class PassthroughVolume: Volume, @unchecked Sendable {
    /// The backing file.
    public let file: BlockFile
    public let sizeBytes: UInt64
    public let capabilities: VolumeCapabilities
    public let blockSizes: VolumeBlockSizes = .standard
    /// Which operations run inline rather than through io_uring, from the backing's file system.
    let inlinePolicy: InlineIOPolicy
    /// Requests in flight on every session: the descriptor stays open until they are done.
    let requestsInFlight = ManagedAtomic<Int>(0)

    /// Opens `path` as a passthrough volume.
    public init(path: String, readOnly: Bool) throws {
        let file = try BlockFile(path: path, readOnly: readOnly)
        self.file = file
        self.inlinePolicy = InlineIOPolicy.probe(fileDescriptor: file.fileDescriptor, isBlockDevice: file.isBlockDevice)
        self.sizeBytes = file.sizeBytes
        var capabilities: VolumeCapabilities = [
            .flush, .fua, .trim, .writeZeroes, .fastZero, .cache, .blockStatus, .multipleConnections,
        ]
        if readOnly { capabilities.insert(.readOnly) }
        self.capabilities = capabilities
    }

    public func openSession(on eventLoop: any EventLoop) throws -> any VolumeSession {
        let driver = try IOUringDrivers.shared.driver(for: eventLoop)
        return PassthroughSession(volume: self, driver: driver)
    }

    /// Waits for requests still in flight (a connection closed by force at shutdown may leave some
    /// in the kernel), syncs and closes the file. If they never finish, the file is left open:
    /// closing it under the kernel's feet could send their data to whatever file reuses the number.
    public func close() throws {
        var waitedMilliseconds = 0
        while requestsInFlight.load(ordering: .acquiring) > 0 {
            guard waitedMilliseconds < Self.closeWaitMillisecondsMax else {
                throw PassthroughVolumeError.requestsStillInFlight(path: file.path, count: requestsInFlight.load(ordering: .acquiring))
            }
            usleep(1000)
            waitedMilliseconds += 1
        }
        defer { file.close() }
        if !file.isReadOnly {
            try file.synchronize()
        }
    }

    private static let closeWaitMillisecondsMax = 60_000
}

/// Why a passthrough volume could not close.
public enum PassthroughVolumeError: Error, CustomStringConvertible {
    case requestsStillInFlight(path: String, count: Int)

    public var description: String {
        switch self {
        case .requestsStillInFlight(let path, let count):
            return "\(count) requests on \(path) did not finish within a minute; the file is left open and was not synced"
        }
    }
}
