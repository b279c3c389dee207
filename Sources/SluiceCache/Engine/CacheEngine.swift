import Logging
import NIOCore
import SluiceVolume
import SluiceFormat

/// The write-back cache engine: the index, the open segment buffer, sealed segments on their way
/// to the cache device, writeback to the backing store, and the barriers that make writes durable.
///
/// All state belongs to one event loop (``eventLoop``); every method must be called there, and
/// every medium completes there. There are no locks, so every invariant can be checked without
/// races, and the checks stay on in release builds.
///
/// Life of a block: a write lands in the open buffer (acknowledged at once); the full buffer is
/// sealed into a segment and written to the cache device while the next buffer fills; writeback
/// copies the newest version of each dirty block to the backing store, syncs it, records progress
/// in the superblock record, and only then forgets the blocks and frees their segments.
public final class CacheEngine {
    public let eventLoop: any EventLoop
    public let cacheDevice: any BlockMedium
    public let backingStore: any BlockMedium
    public let geometry: CacheGeometry
    public let superblock: SuperblockHeader
    let logger: Logger

    public internal(set) var tunables: CacheTunables
    public internal(set) var counters = CacheCounters()

    /// Where the newest copy of every dirty block is.
    var index: CacheIndex
    /// The superblock record most recently made durable, and the slot written next.
    var record: SuperblockRecord
    var recordWriteInFlight = false

    // MARK: Segments
    //
    // Ids grow by one forever; id N lives in ring slot (N - 1) mod segmentCount. Segments
    // lastWrittenBackID+1 ... nextSegmentID-1 are live (sealed or open); a slot is free again once
    // its segment has been written back and the record saying so is durable.

    /// The newest segment whose blocks are all on the backing store, synced and recorded.
    var lastWrittenBackID: UInt64
    /// The id the next opened segment gets.
    var nextSegmentID: UInt64
    /// The buffer writes go to; nil while no slot or buffer is free.
    var openBuffer: (any WriteBuffer)?
    /// Buffers not in use. The engine owns `bufferCount` buffers in all.
    var freeBuffers: [any WriteBuffer]
    /// Sealed segments whose device write has not completed, by ring slot (reads are served from
    /// them while they are in flight).
    var sealedBySlot: [Int: any WriteBuffer] = [:]
    /// Pmem mode: sealed segments written to the cache device but not yet synced there. Their
    /// pmem areas still hold the only durable copy, so they are reused only after a sync.
    var buffersAwaitingSync: [any WriteBuffer] = []
    /// Sealed segments not yet written, by slot: they wait for readers of the slot's previous
    /// segment to finish.
    var segmentWritesWaiting: [Int: UnsafeRawBufferPointer] = [:]
    /// Discards started and not yet done placing their markers (their ids), and their block ranges.
    var discardRangesInFlight: [UInt64: Range<UInt64>] = [:]
    var nextDiscardID: UInt64 = 1
    /// Every segment with an id up to this one is on the cache device (written, maybe not synced).
    var writtenThroughID: UInt64
    /// Segments written out of order, waiting for earlier ones before `writtenThroughID` moves.
    var writtenAheadIDs: Set<UInt64> = []
    /// Every segment with an id up to this one is synced on the cache device.
    var syncedThroughID: UInt64
    /// Device reads in flight per ring slot: a slot is not overwritten while it is being read.
    var readersPerSlot: [UInt16]

    // MARK: Waiting work

    /// Writes and discards that could not proceed (no free segment, or a merge read in flight), in
    /// arrival order. Bounded by the requests the servers let in flight.
    var waitingUpdates = BoundedQueue<PendingUpdate>()
    /// Set while the head of `waitingUpdates` waits for an old copy read from the cache device.
    var mergeReadInFlight = false
    /// An old copy fetched for a merge: the cache position and its 4 KiB.
    var fetchedOldCopy: (position: CacheIndex.Position, block: ByteBuffer)?

    /// The persistent memory holding the write buffers, in pmem mode; nil in volatile mode.
    public let persistentMemory: (any PersistentMemory)?
    /// Pmem mode: replies waiting for the next drain (group commit), and whether it is scheduled.
    var persistWaiters: [(VolumeReply) -> Void] = []
    var persistScheduled = false
    /// The replies being completed by a drain (kept to reuse its storage).
    var persistReplying: [(VolumeReply) -> Void] = []
    /// Set while a session on the engine's loop submits requests; the burst's end persists them.
    var isInsideSessionBurst = false

    /// FUA writes and flushes gathering for the next barrier.
    var barrierGathering: [BarrierWaiter] = []
    var barrierScheduled = false
    /// Barriers sealed and waiting for their segments to be written and synced, oldest first.
    var barriersWaiting: [Barrier] = []
    var cacheSyncInFlight = false
    /// Writes acknowledged since the cache device was last synced (for `sync_data_interval`).
    var unsyncedWritesSinceBarrier = false

    // MARK: Writeback and discards

    var writeback: WritebackBatch?
    var discardsInFlight = 0
    /// Discards waiting for a writeback batch touching their blocks to finish.
    var discardsWaitingForWriteback: [PendingUpdate] = []
    var drainWaiters: [(Result<Void, Error>) -> Void] = []
    var backingLoad = BackingLoadMeter()
    var writebackTimer: Scheduled<Void>?
    var periodicTask: RepeatedTask?
    var lastRecordWriteUptimeNs: UInt64 = 0
    var lastBarrierUptimeNs: UInt64 = 0

    /// Set when a medium failed in a way that leaves acknowledged data only in memory: the engine
    /// refuses every new write until restarted, so nothing more is acknowledged on a lie.
    public internal(set) var failure: MediumError?
    var isClosing = false
    /// Set while a clean shutdown waits for the queue of writes to empty.
    var shutdownCompletion: ((Result<Void, Error>) -> Void)?
    /// No writeback batch starts before this (a second after a failed one).
    var writebackRetryNotBeforeNs: UInt64 = 0
    var isProcessingUpdates = false
    /// Set while writes wait because every ring slot is live: writeback is then urgent.
    var isWaitingForRing = false
    var updatesNeedAnotherPass = false

    /// How many segment buffers the engine uses: one open, the rest sealed and being written.
    public static let bufferCount = 8

    /// Where the engine keeps its write buffers.
    public enum BufferPlacement {
        /// DRAM: a FUA write or FLUSH seals a partial segment and syncs the cache device.
        case volatile
        /// The areas of a pmem file: a write is durable once persisted there, so FUA and FLUSH
        /// need only a drain and segments are always written full.
        case persistent(memory: any PersistentMemory, layout: PmemLayout)
    }

    /// Whether the write buffers are in persistent memory.
    public var isPmemMode: Bool { persistentMemory != nil }

    /// Creates an engine for a cache whose state recovery rebuilt. `opened` is the superblock that
    /// was read, `recovered` the index and log position. Call ``start()`` before submitting.
    public init(
        eventLoop: any EventLoop, cacheDevice: any BlockMedium, backingStore: any BlockMedium,
        opened: CacheSuperblock.Opened, recovered: RecoveredCache, tunables: CacheTunables, logger: Logger,
        buffers placement: BufferPlacement = .volatile
    ) {
        self.eventLoop = eventLoop
        self.cacheDevice = cacheDevice
        self.backingStore = backingStore
        self.geometry = opened.geometry
        self.superblock = opened.header
        self.record = opened.record
        self.tunables = tunables
        self.logger = logger
        self.index = recovered.index
        self.lastWrittenBackID = opened.record.lastWrittenBackSegmentID
        self.nextSegmentID = recovered.nextSegmentID
        self.writtenThroughID = recovered.nextSegmentID - 1
        self.syncedThroughID = recovered.nextSegmentID - 1
        self.readersPerSlot = [UInt16](repeating: 0, count: opened.geometry.segmentCount)
        switch placement {
        case .volatile:
            persistentMemory = nil
            freeBuffers = (0..<Self.bufferCount).map { _ in SegmentBuffer(geometry: opened.geometry) }
        case .persistent(let memory, let layout):
            precondition(layout.areaCount >= 2, "pmem mode needs an open area and at least one sealed one")
            persistentMemory = memory
            // Popped from the end: area 0 is used first, which keeps tests easy to follow.
            freeBuffers = (0..<layout.areaCount).reversed().map {
                PmemSegmentBuffer(memory: memory, layout: layout, area: $0, geometry: opened.geometry)
            }
        }
        precondition(nextSegmentID > lastWrittenBackID, "the log cannot end before the last written-back segment")
        precondition(nextSegmentID - 1 - lastWrittenBackID <= UInt64(geometry.segmentCount), "more live segments than slots")
    }

    /// The backing store's size, which is the size of the volume.
    public var volumeSizeBytes: UInt64 { superblock.backingSizeBytes }

    /// Blocks whose newest data is only in the cache.
    public var dirtyBlocks: Int { index.count }

    /// Live segments (sealed or open) and the ring size.
    public var liveSegments: Int { Int(nextSegmentID - 1 - lastWrittenBackID) }
    public var freeSegments: Int { geometry.segmentCount - liveSegments }

    /// Marks the cache as in use (not cleanly shut down) and starts the periodic work. The record
    /// must say "dirty" before anything is written, or a crash would leave a clean marker that
    /// hides the new segments from recovery.
    public func start() -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        let promise = eventLoop.makePromise(of: Void.self)
        writeRecord(cleanShutdown: false) { result in
            switch result {
            case .success:
                self.periodicTask = self.eventLoop.scheduleRepeatedTask(initialDelay: .milliseconds(100), delay: .milliseconds(100)) { _ in
                    self.periodicTick()
                }
                self.kickWriteback()
                promise.succeed(())
            case .failure(let error):
                promise.fail(error)
            }
        }
        return promise.futureResult
    }

    /// A ring slot's first cache position.
    func firstPosition(ofSlot slot: Int) -> Int { slot * geometry.dataBlocksPerSegment }

    func slot(of position: CacheIndex.Position) -> Int { Int(position) / geometry.dataBlocksPerSegment }

    /// Marks the engine failed after a medium error that leaves acknowledged data unsafe.
    func fail(_ error: MediumError, doing what: String) {
        if failure == nil {
            logger.critical("cache stopped accepting writes: \(what) failed: \(error). Acknowledged data is still served; restart to recover from the log.")
            failure = error
        }
        failBarriers(error)
        // A pass over the queue that is running fails what is left when it stops.
        if !isProcessingUpdates { failWaitingUpdates() }
    }
}

extension CacheEngine {
    /// Fails every waiting write and discard after a medium failure.
    func failWaitingUpdates() {
        guard let failure else { return }
        var keep: [PendingUpdate] = []
        for update in waitingUpdates.removeAll() {
            if case .discard = update.kind, case .passingDown = update.discardStage {
                // Its backing request is still out; it is failed when that returns.
                keep.append(update)
                continue
            }
            if case .discard = update.kind { discardRangesInFlight[update.discardID] = nil }
            update.completion(.failed(.io(errno: failure.errnoValue)))
        }
        for update in keep { waitingUpdates.append(update) }
    }
}

/// A write, trim or write-zeroes waiting its turn.
struct PendingUpdate {
    enum Kind {
        case write(data: ByteBuffer, fua: Bool)
        case discard(lengthBytes: UInt64, zeroes: Bool, fua: Bool)
    }
    var kind: Kind
    var offset: UInt64
    /// Bytes of a write already applied (a write larger than a segment is applied in parts).
    var appliedBytes = 0
    /// For a discard: how far it has got.
    var discardStage = DiscardStage.waiting
    /// For a discard: its id once it has started.
    var discardID: UInt64 = 0
    var completion: (VolumeReply) -> Void
}

/// Where a discard at the head of the queue stands.
enum DiscardStage {
    /// Not started: waits for a writeback batch writing its blocks.
    case waiting
    /// The backing store is doing the discard (and syncing it).
    case passingDown
    /// The backing store has it; placing discard markers (progress in `appliedBytes`).
    case passedDown
    case failed(MediumError)
}

/// A FUA write or flush waiting for a barrier.
struct BarrierWaiter {
    var completion: (VolumeReply) -> Void
}

/// A sealed barrier: done once every segment up to `throughID` is synced. (Discards sync the
/// backing store themselves before their markers enter the log, so a barrier never needs to.)
struct Barrier {
    var throughID: UInt64
    var waiters: [BarrierWaiter]
}

/// A FIFO that never grows past what the servers allow in flight; asserting the bound turns a
/// runaway producer into a crash in tests rather than unbounded memory.
struct BoundedQueue<Element> {
    private var storage: [Element?] = []
    private var head = 0
    static var capacityMax: Int { 1 << 20 }

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }

    mutating func append(_ element: Element) {
        precondition(count < Self.capacityMax, "waiting queue beyond its bound")
        storage.append(element)
    }

    var first: Element? {
        get { isEmpty ? nil : storage[head] }
        set {
            precondition(!isEmpty)
            storage[head] = newValue
        }
    }

    mutating func removeFirst() -> Element {
        let element = storage[head]!
        storage[head] = nil
        head += 1
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        }
        return element
    }

    mutating func removeAll() -> [Element] {
        let all = storage[head...].compactMap { $0 }
        storage.removeAll()
        head = 0
        return all
    }
}
