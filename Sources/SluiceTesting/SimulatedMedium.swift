import Foundation
import NIOCore
import SluiceCache
import SluiceVolume

/// An in-memory medium for tests that behaves like a disk with a volatile write cache.
///
/// A completed write is visible to reads at once but is durable only after a sync. At a simulated
/// power failure (``powerFail(seed:)``) each write made since the last sync survives or is lost,
/// chosen by a seeded generator, and a write that survives may be torn at a 512-byte sector
/// boundary, as real devices may tear them. Any failing seed replays exactly. Faults can be
/// injected: the next writes or syncs fail with EIO.

public final class SimulatedMedium: BlockMedium {
    public let sizeBytes: UInt64
    /// What would be on the medium after a power failure right now, ignoring unsynced writes.
    public private(set) var durable: [UInt8]
    /// What reads see: durable contents plus every completed write.
    public private(set) var visible: [UInt8]
    private var unsynced: [(offset: Int, bytes: [UInt8])] = []
    private var isPoweredOff = false
    private let recoveryReadLock = NSLock()

    /// Failures to inject: the next this many writes (or syncs) fail with EIO.
    public var failNextWrites = 0
    public var failNextSyncs = 0

    /// Counters, for tests that check what the engine did to the medium.
    public private(set) var writeCount = 0
    public private(set) var bytesWritten = 0
    public private(set) var syncCount = 0

    public init(sizeBytes: Int) {
        precondition(sizeBytes > 0)
        self.sizeBytes = UInt64(sizeBytes)
        durable = [UInt8](repeating: 0, count: sizeBytes)
        visible = durable
    }

    /// A medium whose durable contents are `bytes` (for example what survived a power failure).
    public init(durableBytes bytes: [UInt8]) {
        sizeBytes = UInt64(bytes.count)
        durable = bytes
        visible = bytes
    }

    /// Failures to inject on reads: the next this many reads fail with EIO.
    public var failNextReads = 0
    public private(set) var readCount = 0
    public private(set) var discardCount = 0

    public func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        guard !isPoweredOff else { return completion(.failure(.poweredOff)) }
        guard let range = range(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        if failNextReads > 0 {
            failNextReads -= 1
            return completion(.failure(.inputOutput(errno: 5)))
        }
        readCount += 1
        completion(.success(visible.withUnsafeBytes { ByteBuffer(bytes: UnsafeRawBufferPointer(rebasing: $0[range])) }))
    }

    /// How often ``readIfCached(offset:into:)`` finds its data "in memory": every `n`-th call
    /// (1: always, 0: never, as a medium without a page cache). A hit reads what a read would.
    public var readsCachedEvery = 0
    private var readIfCachedCalls = 0
    public private(set) var cachedReadCount = 0

    /// A page-cache hit, as on a file: succeeds on every ``readsCachedEvery``-th call, so engine
    /// tests run both the inline path and the asynchronous one it falls back to.
    public func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool {
        guard readsCachedEvery > 0, !isPoweredOff, failNextReads == 0, let range = range(offset: offset, count: bytes.count) else { return false }
        readIfCachedCalls += 1
        guard readIfCachedCalls % readsCachedEvery == 0 else { return false }
        cachedReadCount += 1
        visible.withUnsafeBytes { bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[range])) }
        return true
    }

    /// Recovery's read straight into its buffer, from several threads at once (while nothing
    /// writes): the counters and injected failures are taken under a lock, the copy is not.
    public func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let range: Range<Int> = try {
            recoveryReadLock.lock()
            defer { recoveryReadLock.unlock() }
            guard !isPoweredOff else { throw MediumError.poweredOff }
            guard let found = self.range(offset: offset, count: buffer.count) else { throw MediumError.outOfRange }
            if failNextReads > 0 {
                failNextReads -= 1
                throw MediumError.inputOutput(errno: 5)
            }
            readCount += 1
            return found
        }()
        visible.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[range])) }
    }

    public func write(offset: UInt64, bytes buffer: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        let bytes = Array(buffer.readableBytesView)
        guard !isPoweredOff else { return completion(.failure(.poweredOff)) }
        guard let range = range(offset: offset, count: bytes.count) else { return completion(.failure(.outOfRange)) }
        if failNextWrites > 0 {
            failNextWrites -= 1
            return completion(.failure(.inputOutput(errno: 5)))
        }
        visible.replaceSubrange(range, with: bytes)
        unsynced.append((range.lowerBound, bytes))
        writeCount += 1
        bytesWritten += bytes.count
        completion(.success(()))
    }

    public func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard !isPoweredOff else { return completion(.failure(.poweredOff)) }
        guard let range = range(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        if failNextWrites > 0 {
            failNextWrites -= 1
            return completion(.failure(.inputOutput(errno: 5)))
        }
        // A discard is modelled as writing zeros, which is what a trim may leave behind too.
        let zeros = [UInt8](repeating: 0, count: count)
        visible.replaceSubrange(range, with: zeros)
        unsynced.append((range.lowerBound, zeros))
        discardCount += 1
        completion(.success(()))
    }

    /// Sectors that read as zeros are reported as zero (not holes: the medium allocates nothing),
    /// the rest as data.
    public func allocation(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping ([BlockStatusExtent]) -> Void) {
        var extents: [BlockStatusExtent] = []
        var sector = Int(offset)
        let end = Int(offset) + Int(lengthBytes)
        while sector < end {
            let flags: BlockStatusFlags = visible[sector..<(sector + 512)].allSatisfy { $0 == 0 } ? .zero : []
            if extents.count == maximumExtents, extents.last?.flags != flags { break }
            extents.appendMerging(lengthBytes: 512, flags: flags)
            sector += 512
        }
        completion(extents)
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard !isPoweredOff else { return completion(.failure(.poweredOff)) }
        if failNextSyncs > 0 {
            failNextSyncs -= 1
            return completion(.failure(.inputOutput(errno: 5)))
        }
        durable = visible
        unsynced.removeAll()
        syncCount += 1
        completion(.success(()))
    }

    /// Cuts the power: every unsynced write survives whole, is lost, or survives torn at a sector
    /// boundary, decided by `seed`. Returns what the medium holds afterwards; the medium itself
    /// answers nothing more.
    @discardableResult
    public func powerFail(seed: UInt64) -> [UInt8] {
        var generator = SplitMix64(seed: seed)
        func random() -> UInt64 { generator.next() }
        var survivor = durable
        // Writes land in order; a device may reorder, so each write decides on its own.
        for write in unsynced {
            switch random() % 3 {
            case 0:
                continue
            case 1:
                survivor.replaceSubrange(write.offset..<(write.offset + write.bytes.count), with: write.bytes)
            default:
                let sectors = (write.bytes.count + 511) / 512
                let kept = Int(random() % UInt64(sectors + 1)) * 512
                let length = min(kept, write.bytes.count)
                survivor.replaceSubrange(write.offset..<(write.offset + length), with: write.bytes[0..<length])
            }
        }
        isPoweredOff = true
        unsynced.removeAll()
        durable = survivor
        visible = survivor
        return survivor
    }

    private func range(offset: UInt64, count: Int) -> Range<Int>? {
        guard contains(offset: offset, count: count) else { return nil }
        return Int(offset)..<(Int(offset) + count)
    }
}

extension SimulatedMedium: SynchronousBlockMedium {}
