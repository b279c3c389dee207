import NIOConcurrencyHelpers
import NIOCore
import SluiceVolume

/// A RAM disk: a volume whose bytes live in memory, taken on first write and given back on trim
/// (RapidDisk's `rapiddisk`, nbdkit's `memory` plugin).
///
/// **Not durable.** FLUSH and FUA are accepted, as there is nothing to make durable, but a crash,
/// a kill or a restart loses everything written: the export description, `status` and the log at
/// start say so (``durabilityNote``).
///
/// At run time it can grow or shrink (``resize(toBytes:)``; new connections see the new size, and
/// a shrink that would drop written data is refused), be locked read-only (``setLocked(_:)``), and
/// have its memory limit changed. Sessions on any event loop share one lock: every request is a
/// copy of at most a few MiB.
public final class RAMDiskVolume: Volume, @unchecked Sendable {
    /// What a RAM disk promises, for its export description, `status` and the log.
    public static let durabilityNote = "RAM disk: not durable; FLUSH and FUA are accepted, but a crash, kill or restart loses everything written"

    public let blockSizes: VolumeBlockSizes = .standard
    /// The loop management answers on.
    let managementLoop: any EventLoop

    private let lock = NIOLock()
    private let memory = SparseMemory()
    private var currentSizeBytes: UInt64
    /// nil: the size (the whole disk may be written).
    private var memoryLimitBytes: UInt64?
    private var isLocked: Bool
    private var isClosed = false

    /// A RAM disk of `sizeBytes` (a multiple of 512), holding at most `limitBytes` of data in memory
    /// (nil: as much as its size).
    public init(sizeBytes: UInt64, limitBytes: UInt64? = nil, locked: Bool = false, managementLoop: any EventLoop) throws {
        try Self.checkSize(sizeBytes)
        self.currentSizeBytes = sizeBytes
        self.memoryLimitBytes = limitBytes
        self.isLocked = locked
        self.managementLoop = managementLoop
    }

    public var sizeBytes: UInt64 { lock.withLock { currentSizeBytes } }

    /// The bytes of memory the disk's data takes now.
    public var allocatedBytes: UInt64 { lock.withLock { memory.allocatedBytes } }

    /// The most memory the data may take (by default, what the whole disk takes written).
    public var limitBytes: UInt64 { lock.withLock { memoryLimitBytes ?? Self.chunksCovering(currentSizeBytes) } }

    public var locked: Bool { lock.withLock { isLocked } }

    public var capabilities: VolumeCapabilities {
        var capabilities: VolumeCapabilities = [.flush, .fua, .trim, .writeZeroes, .fastZero, .cache, .blockStatus, .multipleConnections]
        if locked { capabilities.insert(.readOnly) }
        return capabilities
    }

    public func openSession(on eventLoop: any EventLoop) throws -> any VolumeSession {
        RAMDiskSession(volume: self, eventLoop: eventLoop)
    }

    /// Gives the memory back. Nothing is saved: a RAM disk's contents end with it.
    public func close() throws {
        lock.withLock {
            isClosed = true
            memory.freeAll()
        }
    }

    /// Why a RAM disk refused a change.
    public struct Refusal: Error, CustomStringConvertible {
        public let description: String
    }

    /// The memory a disk of `bytes` takes when every chunk is written: its last chunk is whole.
    static func chunksCovering(_ bytes: UInt64) -> UInt64 {
        let chunk = UInt64(SparseMemory.chunkBytes)
        return (bytes + chunk - 1) / chunk * chunk
    }

    private static func checkSize(_ bytes: UInt64) throws {
        guard bytes > 0, bytes % 512 == 0 else {
            throw Refusal(description: "a RAM disk's size must be a positive multiple of 512 bytes, not \(bytes)")
        }
        guard bytes <= 1 << 50 else { throw Refusal(description: "a RAM disk's size must be at most 1P, not \(bytes)") }
    }

    /// Grows or shrinks the disk. Sessions opened before keep working; their requests past the new
    /// end fail as out of range. A shrink that would drop written (non-zero) data is refused:
    /// trim the tail first.
    public func resize(toBytes newSize: UInt64) throws {
        try Self.checkSize(newSize)
        try lock.withLock {
            guard !isLocked else { throw Refusal(description: "the RAM disk is locked (read-only); unlock it (locked=0) before resizing") }
            if newSize < currentSizeBytes {
                guard !memory.holdsData(atOrAfter: newSize) else {
                    throw Refusal(description: "shrinking to \(ByteCount.format(newSize)) would drop data written past that point; trim it first (for example blkdiscard or fstrim), or choose a larger size")
                }
                memory.dropChunks(atOrAfter: newSize)
            }
            currentSizeBytes = newSize
        }
    }

    /// Locks the disk read-only (new connections are told, and writes on open ones fail), or
    /// unlocks it.
    public func setLocked(_ locked: Bool) {
        lock.withLock { isLocked = locked }
    }

    /// The most memory the data may take (nil: the size). Below what it takes now, nothing is given
    /// back, but no new chunk is taken until trims bring it under.
    public func setLimit(_ bytes: UInt64?) {
        lock.withLock { memoryLimitBytes = bytes }
    }

    /// Carries out one request (the session checked nothing).
    func perform(_ request: consuming VolumeRequest) -> VolumeReply {
        lock.lock()
        defer { lock.unlock() }
        guard !isClosed else { return .failed(.shuttingDown) }
        if let range = request.range {
            let (end, overflow) = range.offset.addingReportingOverflow(range.lengthBytes)
            guard !overflow, end <= currentSizeBytes else { return .failed(.outOfRange) }
        }
        if request.isWrite && isLocked { return .failed(.readOnly) }
        let limit = memoryLimitBytes ?? Self.chunksCovering(currentSizeBytes)
        do {
            switch consume request {
            case .read(let offset, let length, var buffer):
                buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { target in
                    memory.read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: target[0..<Int(length)]))
                    return Int(length)
                }
                return .data(buffer)
            case .write(let offset, let data, _):
                try data.withUnsafeReadableBytes { try memory.write(offset: offset, from: $0, limitBytes: limit) }
                return .done
            case .trim(let offset, let length, _):
                try memory.zero(offset: offset, lengthBytes: Int(length), keepAllocated: false, limitBytes: limit)
                return .done
            case .writeZeroes(let offset, let length, let flags):
                try memory.zero(offset: offset, lengthBytes: Int(length), keepAllocated: flags.contains(.noHole), limitBytes: limit)
                return .done
            case .blockStatus(let offset, let length, let maximumExtents):
                return .extents(memory.extents(offset: offset, lengthBytes: Int(length), maximumExtents: max(1, maximumExtents)))
            case .flush, .cache:
                return .done
            }
        } catch let error as VolumeError {
            return .failed(error)
        } catch {
            return .failed(.io(errno: 5))
        }
    }
}

/// One client's session on a ``RAMDiskVolume``: every request completes within ``submit(_:tag:sink:)``,
/// and the burst ends at ``submitBatch()``.
final class RAMDiskSession: VolumeSession {
    private let volume: RAMDiskVolume
    private let eventLoop: any EventLoop
    private var burst = CompletionBurst()

    init(volume: RAMDiskVolume, eventLoop: any EventLoop) {
        self.volume = volume
        self.eventLoop = eventLoop
    }

    var requestsInFlight: Int { 0 }

    func submit(_ request: consuming VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink) {
        eventLoop.preconditionInEventLoop()
        let reply = volume.perform(request)
        burst.note(sink)
        sink.volumeRequestCompleted(tag: tag, reply: reply)
    }

    func submitBatch() {
        eventLoop.preconditionInEventLoop()
        burst.end()
    }

    func close() {
        submitBatch()
    }
}
