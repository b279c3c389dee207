import Dispatch
import NIOConcurrencyHelpers
import NIOCore
import SluiceCache
import SluiceRAMDisk
import SluiceVolume

/// An eventually persistent RAM disk (EPRD): a RAM image of a backing file or block device.
///
/// The image is loaded lazily, 64 KiB at a time: the first request that touches a chunk reads it
/// from the backing store (a write that covers a chunk whole needs no read). Writes change the
/// image only and mark their 512-byte sectors dirty; a *commit* writes the dirty sectors back in
/// block order, merged into runs, and syncs the backing store. Commits run every
/// ``Configuration/commitIntervalMs`` and, with barriers on, for every FLUSH and FUA write,
/// which are acknowledged only when a commit that covers them has synced: honest durable storage.
/// With barriers off they are acknowledged at once, and only the commit interval bounds what a
/// crash loses (``durabilityNote``). The backing store's existing contents are served as they
/// are: attaching never formats anything.
///
/// The image holds up to the whole disk in memory; chunks stay once loaded.
///
/// Threads: sessions do their work inline, under one lock, when the chunks they touch are in
/// memory. Loads run on `loadLoop` and commits on `commitLoop` (they may be the same loop), each
/// calling the backing store's blocking interface; the medium is the seam that tests replace with
/// one that forgets unsynced writes at a simulated power failure.
public final class EPRDVolume: Volume, @unchecked Sendable {
    /// How an EPRD commits.
    public struct Configuration: Sendable {
        /// Time between commits; 0 commits only for barriers and write-back requests.
        public var commitIntervalMs: UInt64
        /// FLUSH and FUA wait for a commit (on), or are acknowledged at once (off: unsafe).
        public var barriers: Bool
        /// The sector size clients are told to honour: a power of two from 512 to 4096.
        public var sectorBytes: UInt32

        public init(commitIntervalMs: UInt64 = 5000, barriers: Bool = true, sectorBytes: UInt32 = 512) {
            self.commitIntervalMs = commitIntervalMs
            self.barriers = barriers
            self.sectorBytes = sectorBytes
        }
    }

    /// Why an EPRD could not be attached or changed.
    public struct Refusal: Error, CustomStringConvertible {
        public let description: String
    }

    /// What an EPRD promises, for its export description, `status` and the log.
    public static func durabilityNote(barriers: Bool, commitIntervalMs: UInt64) -> String {
        if barriers {
            return "EPRD with barriers on: FLUSH and FUA are acknowledged once written back and synced"
        }
        let bound = commitIntervalMs == 0 ? "nothing (the commit interval is 0), so a crash may lose everything written since the last write-back" : "the commit interval (\(Double(commitIntervalMs) / 1000) s)"
        return "EPRD with barriers off (unsafe): FLUSH and FUA are acknowledged at once; only \(bound) bounds what a crash loses"
    }

    /// Dirty data a commit copies out and writes per step, so that it never holds the lock, or
    /// memory, for the whole dirty set at once: 128 chunks, 8 MiB.
    static let chunksPerCommitStep = 128
    /// Chunks read from the backing store in one call when a request needs several in a row.
    static let chunksPerLoad = 64

    public let sizeBytes: UInt64
    public let blockSizes: VolumeBlockSizes
    public let capabilities: VolumeCapabilities = [.flush, .fua, .writeZeroes, .cache, .multipleConnections]
    /// The loop management answers on.
    let managementLoop: any EventLoop
    let commitLoop: any EventLoop
    let loadLoop: any EventLoop
    let medium: any SynchronousBlockMedium

    let lock = NIOLock()
    /// The RAM image; a chunk it holds is newer than (or the same as) the backing store's bytes.
    let image = SparseMemory()
    var dirty = DirtySectors()
    var counters = Counters()
    var isClosed = false
    /// Under the lock: sessions read it, management changes it.
    var barriersOn: Bool
    var commitIntervalMs: UInt64

    // Commit loop only.
    var schedule = CommitSchedule<(Result<Void, MediumError>) -> Void>()
    var commitTimer: RepeatedTask?

    /// What status shows; under the lock.
    struct Counters {
        var loadedBytes: UInt64 = 0
        var loadErrors: UInt64 = 0
        var commitsStarted: UInt64 = 0
        /// Commits that wrote back and synced.
        var commits: UInt64 = 0
        var commitErrors: UInt64 = 0
        /// Whether a commit is between taking dirty sectors and syncing them.
        var isCommitting: Bool { commitsStarted > commits + commitErrors }
        var committedBytes: UInt64 = 0
        var barrierWaits: UInt64 = 0
        var lastCommitMs: UInt64 = 0
        var lastError: String?
    }

    /// Attaches `medium` (the backing store, whose contents are served as they are).
    public init(medium: any SynchronousBlockMedium, configuration: Configuration,
                commitLoop: any EventLoop, loadLoop: any EventLoop, managementLoop: any EventLoop) throws {
        let sector = configuration.sectorBytes
        guard sector >= 512, sector <= 4096, sector.nonzeroBitCount == 1 else {
            throw Refusal(description: "an EPRD's sector size must be 512, 1024, 2048 or 4096 bytes, not \(sector)")
        }
        let size = medium.sizeBytes / UInt64(sector) * UInt64(sector)
        guard size > 0 else {
            throw Refusal(description: "the backing store holds \(medium.sizeBytes) bytes, less than one \(sector)-byte sector; make it larger")
        }
        self.medium = medium
        self.sizeBytes = size
        self.blockSizes = VolumeBlockSizes(minimumBytes: sector, preferredBytes: max(4096, sector),
                                           maximumPayloadBytes: VolumeBlockSizes.standard.maximumPayloadBytes)
        self.barriersOn = configuration.barriers
        self.commitIntervalMs = configuration.commitIntervalMs
        self.commitLoop = commitLoop
        self.loadLoop = loadLoop
        self.managementLoop = managementLoop
        commitLoop.execute { self.scheduleTimer(intervalMs: configuration.commitIntervalMs) }
    }

    public var barriers: Bool { lock.withLock { barriersOn } }
    public var commitInterval: UInt64 { lock.withLock { commitIntervalMs } }
    public var dirtyBytes: UInt64 { lock.withLock { dirty.bytes } }
    public var residentBytes: UInt64 { lock.withLock { image.allocatedBytes } }

    public func openSession(on eventLoop: any EventLoop) throws -> any VolumeSession {
        EPRDSession(volume: self, eventLoop: eventLoop)
    }

    /// Commits what is dirty, then stops taking requests. Fails if the last commit failed: what
    /// was dirty is then lost with the image, and the error says so.
    public func close() throws {
        let result = commitLoop.submit { () -> Result<Void, MediumError> in
            self.commitTimer?.cancel()
            self.commitTimer = nil
            return self.commitNowBlocking()
        }
        let outcome = try result.wait()
        lock.withLock {
            isClosed = true
            image.freeAll()
        }
        if case .failure(let error) = outcome {
            throw Refusal(description: "the last write-back of the EPRD failed (\(error)); data written since the previous commit is lost")
        }
    }
}
