import Logging
import NIOCore
import SluiceVolume
import SluiceFormat

/// The write-back cache engine: it carries out what its parts decide.
///
/// Each concern is one part with its own state and invariants, and no part reaches into
/// another's state:
/// - ``SegmentRing``: segment ids and ring slots, from retired through reclaimed, written, synced
///   and open;
/// - ``CacheIndex``: the newest copy of every cached block, dirty or clean, with per-slot counts;
/// - ``BufferPool``: the open segment buffer and the sealed ones on their way to the device;
/// - a ``DurabilityPolicy`` (``VolatileDurability`` or ``PmemDurability``): what makes a reply
///   durable, the one place where the two modes differ;
/// - ``Cleaner``: reclaims the ring's tail (relocating live dirty blocks, dropping dead ones);
/// - ``WritebackBatcher``: when writeback runs, which blocks a batch takes, how many;
/// - ``DiscardSequencer``: orders trims and write-zeroes against writeback and the log;
/// - ``UpdateQueue``, ``BarrierQueue``, ``CacheSyncs``, ``PersistQueue``, ``RecordWriter``: the
///   waiting writes, barriers, device syncs, pmem group commits and superblock records.
///
/// All state belongs to one event loop (``eventLoop``); every method must be called there, and
/// every medium completes there. There are no locks, so every invariant can be checked without
/// races, and the checks stay on in release builds. Time comes from an ``EngineClock``, so the
/// simulator drives it.
///
/// Life of a block: a write lands in the open buffer; the full buffer is sealed into a segment
/// and written to the cache device; writeback copies the newest copy of each dirty block to the
/// backing store, syncs it and marks the block clean; the cleaner reclaims the ring's tail
/// (relocating blocks still dirty there), and a durable superblock record retires the reclaimed
/// segments, whose slots are then reused.
public final class CacheEngine {
    public let eventLoop: any EventLoop
    public let cacheDevice: any BlockMedium
    public let backingStore: any BlockMedium
    public let geometry: CacheGeometry
    public let superblock: SuperblockHeader
    public let clock: any EngineClock
    let logger: Logger
    let durability: any DurabilityPolicy

    public internal(set) var tunables: CacheTunables
    /// The cache mode; recorded in the superblock record.
    public internal(set) var cacheMode: CacheMode
    public internal(set) var counters = CacheCounters()

    var index: CacheIndex
    var ring: SegmentRing
    var buffers: BufferPool
    var updates = UpdateQueue()
    var barriers = BarrierQueue()
    var syncs = CacheSyncs()
    var persists = PersistQueue()
    var records: RecordWriter
    var discards = DiscardSequencer()
    var cleaner: Cleaner
    /// The cleaner's relocation of the tail segment, while it runs.
    var relocation: RelocationJob?
    var writeback = WritebackBatcher()
    /// The writeback batch in flight, and the memory the last one used, kept for the next.
    var batch: WritebackBatch?
    var spareWritebackMemory: WritebackMemory?
    var backingLoad = BackingLoadMeter()
    /// Read caching: which misses are cached, and the misses being read.
    var readAdmission = ReadAdmission()
    var fills = PendingFills()
    var bypass = BypassWrites()
    var cacheDeviceErrors = DeviceErrorMeter()
    /// Set when the cache device exceeded its error limit: the cache serves as in passthrough.
    public internal(set) var degradedReason: String?
    var lifecycle = Lifecycle.running
    var drivePass = ReentrantPass()
    /// `writeBackAll` callers, answered once nothing is dirty.
    var writeBackAllWaiters: [(Result<Void, Error>) -> Void] = []
    var periodicTimer: (any EngineTimer)?
    var lastBarrierNs: UInt64 = 0
    var lastRecordNs: UInt64 = 0
    var lastRetirementNs: UInt64 = 0

    /// Set when a medium failed in a way that leaves acknowledged data only in memory: the engine
    /// refuses every new write until restarted, so nothing more is acknowledged on a lie.
    public internal(set) var failure: MediumError?

    /// How many DRAM segment buffers the engine uses in volatile mode: one open, the rest sealed
    /// and being written.
    public static let volatileBufferCount = 8
    /// How often the engine re-evaluates writeback, cleaning, record refreshes and deadlines.
    static let periodicIntervalNs: UInt64 = 100_000_000

    /// Where the engine keeps its write buffers.
    public enum BufferPlacement {
        /// DRAM: a FUA write or FLUSH seals a partial segment and syncs the cache device.
        case volatile
        /// The areas of a pmem file: a write is durable once persisted there, so FUA and FLUSH
        /// need only a drain and segments are always written full.
        case persistent(memory: any PersistentMemory, layout: PmemLayout)
    }

    /// Creates an engine for a cache whose state recovery rebuilt. `opened` is the superblock that
    /// was read, `recovered` the index and log position. Call ``start()`` before submitting.
    public init(
        eventLoop: any EventLoop, cacheDevice: any BlockMedium, backingStore: any BlockMedium,
        opened: CacheSuperblock.Opened, recovered: RecoveredCache, tunables: CacheTunables, logger: Logger,
        buffers placement: BufferPlacement = .volatile, clock: (any EngineClock)? = nil
    ) {
        self.eventLoop = eventLoop
        self.cacheDevice = cacheDevice
        self.backingStore = backingStore
        self.geometry = opened.geometry
        self.superblock = opened.header
        self.tunables = tunables
        self.logger = logger
        let clock = clock ?? EventLoopClock(eventLoop: eventLoop)
        self.clock = clock
        self.index = recovered.index
        precondition(recovered.index.positionsPerSlot == opened.geometry.dataBlocksPerSegment, "the index counts per ring slot")
        ring = SegmentRing(segmentCount: opened.geometry.segmentCount, retiredThroughID: opened.record.lastRetiredSegmentID,
                           nextSegmentID: recovered.nextSegmentID, nowNs: clock.nowNs)
        records = RecordWriter(current: opened.record)
        cacheMode = opened.record.cacheMode
        switch placement {
        case .volatile: durability = VolatileDurability()
        case .persistent(let memory, let layout): durability = PmemDurability(memory: memory, layout: layout)
        }
        buffers = BufferPool(free: durability.makeBuffers(geometry: opened.geometry))
        cleaner = Cleaner(settings: Cleaner.Settings(highWatermarkPercent: tunables.highWatermarkPercent,
                                                     lowWatermarkPercent: tunables.lowWatermarkPercent))
    }

    /// The backing store's size, which is the size of the volume.
    public var volumeSizeBytes: UInt64 { superblock.backingSizeBytes }

    /// Blocks whose newest data is only in the cache.
    public var dirtyBlocks: Int { index.dirtyCount }
    /// Blocks the cache holds (dirty, or clean copies not yet dropped).
    public var cachedBlocks: Int { index.count }

    /// Segments occupying a ring slot, and slots free for new segments.
    public var liveSegments: Int { ring.liveSegments }
    public var freeSegments: Int { ring.freeSegments }

    /// Whether the write buffers are in persistent memory.
    public var isPmemMode: Bool { durability.mode == .pmem }

    /// Ring slots writers may not take, so that the cleaner always has room to relocate into.
    var reserveSegments: Int { max(1, min(8, geometry.segmentCount / 32)) }

    /// Marks the cache as in use (not cleanly shut down) and starts the periodic work. The record
    /// must say "dirty" before anything is written, or a crash would leave a clean marker that
    /// hides the new segments from recovery.
    public func start() -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        let promise = eventLoop.makePromise(of: Void.self)
        writeRecord(.markInUse) { result in
            switch result {
            case .success:
                // The record's sync made every segment recovery took or wrote durable. (Not counted
                // among the drains: those are the ones replies wait for.)
                _ = self.durability.forgetStaleBuffers(geometry: self.geometry)
                self.schedulePeriodicTick()
                self.drive()
                promise.succeed(())
            case .failure(let error):
                promise.fail(error)
            }
        }
        return promise.futureResult
    }

    private func schedulePeriodicTick() {
        periodicTimer = clock.schedule(afterNs: Self.periodicIntervalNs) { [weak self] in
            guard let self, self.lifecycle.runsPeriodicWork else { return }
            self.periodicTick()
            self.schedulePeriodicTick()
        }
    }

    /// Stops the periodic work (a graceful close, or a test's simulated power failure).
    func stopPeriodicWork() {
        periodicTimer?.cancel()
        periodicTimer = nil
    }

    /// A ring slot's first cache position.
    func firstPosition(ofSlot slot: Int) -> Int { slot * geometry.dataBlocksPerSegment }

    func slot(of position: CacheIndex.Position) -> Int { Int(position) / geometry.dataBlocksPerSegment }

    /// The ring slot of `buffer`'s segment. The segment ID is read before `ring` is touched:
    /// `ring.slot(of: buffer.segmentID)` makes the compiler keep a copy of the ring (three
    /// retains and releases) around the protocol call, on every write.
    @inline(__always)
    func ringSlot(of buffer: any WriteBuffer) -> Int {
        let segmentID = buffer.segmentID
        return ring.slot(of: segmentID)
    }

    func dataIndex(of position: CacheIndex.Position) -> Int { Int(position) % geometry.dataBlocksPerSegment }

    /// The buffer that still holds `slot`'s segment in memory (open, sealed, or waiting for its
    /// sync), if any: the slot's blocks are read from there, never from a device write in flight.
    func bufferInMemory(ofSlot slot: Int) -> (any WriteBuffer)? {
        ring.segmentID(inSlot: slot).flatMap { buffers.inMemory(slot: slot, segmentID: $0) }
    }

    /// Marks the engine failed after a medium error that leaves acknowledged data unsafe.
    func fail(_ error: MediumError, doing what: String) {
        if failure == nil {
            if !lifecycle.isPoweredOff {
                logger.critical("cache stopped accepting writes: \(what) failed: \(error). Acknowledged data is still served; restart to recover from the log.")
            }
            failure = error
        }
        failDurabilityWaiters(error)
        // A pass over the queue that is running fails what is left when it stops.
        if !updates.pass.isRunning { failWaitingUpdates() }
        drive()
    }

    /// Runs every part's next step until none has anything to do. Completions of media that
    /// answer within the call re-enter here; the running pass then goes round again.
    func drive() {
        if case .poweredOff = lifecycle { return }
        guard drivePass.begin() else { return }
        repeat {
            processWaitingUpdates()
            continueRelocation()
            stepCleaner()
            retireReclaimedSegments()
            if updates.headWait.isForSlot { sealFenceSegmentIfWaiting(onlyIfCleanerIsStuck: true) }
            stepWriteback()
            driveSyncs()
            closingProgressed()
        } while drivePass.again()
    }

    /// With `max_age` set, an open segment older than that is sealed, so its blocks can be written
    /// back: an idle cache does not hold dirty data in its open buffer forever.
    private func sealOpenSegmentIfOld(nowNs: UInt64) {
        guard tunables.maxAgeSeconds > 0, let open = buffers.open, !open.isEmpty, !barriers.isGathering,
              nowNs &- ring.openedAtNs(of: open.segmentID) >= UInt64(tunables.maxAgeSeconds) * 1_000_000_000 else { return }
        addBarrierWaiter { _ in }
    }

    /// Work the engine does every 100 ms: re-evaluate writeback pacing and cleaning, the periodic
    /// barrier, `max_age` of the open segment, and the periodic record refresh.
    func periodicTick() {
        let now = clock.nowNs
        if tunables.syncDataIntervalSeconds > 0, updates.unsyncedWritesSinceBarrier,
           now &- lastBarrierNs >= UInt64(tunables.syncDataIntervalSeconds) * 1_000_000_000 {
            lastBarrierNs = now
            addBarrierWaiter { _ in }
        }
        sealOpenSegmentIfOld(nowNs: now)
        sealFenceSegmentIfWaiting(onlyIfCleanerIsStuck: false)
        if tunables.updateSuperblockRecordIntervalSeconds > 0, records.isIdle, failure == nil, lifecycle.acceptsRequests,
           records.current.lastFlushedSegmentID != ring.syncedThroughID,
           now &- lastRecordNs >= UInt64(tunables.updateSuperblockRecordIntervalSeconds) * 1_000_000_000 {
            writeRecord(.refresh) { result in
                if case .failure(let error) = result { self.logger.error("refreshing the superblock record failed: \(error)") }
            }
        }
        drive()
    }
}

/// Where the engine is in its life.
enum Lifecycle {
    case running
    /// A graceful close is under way: new requests are refused; it completes once the queued
    /// writes are in, the open segment is written and synced, and the clean record is durable.
    case closing(stage: ClosingStage, completion: (Result<Void, Error>) -> Void)
    case closed
    /// The simulated machine lost power (tests): nothing more is done.
    case poweredOff

    var acceptsRequests: Bool { if case .running = self { return true } else { return false } }
    var isPoweredOff: Bool { if case .poweredOff = self { return true } else { return false } }
    var runsPeriodicWork: Bool { if case .running = self { return true } else { return false } }
}

enum ClosingStage {
    /// Waiting for queued writes and the cleaner's relocation to finish.
    case waitingForUpdates
    /// The final barrier (or the clean record) is in flight.
    case finishing
    /// Everything is written and synced: waiting for the writeback batch in flight and record
    /// writes before the clean record.
    case readyForCleanRecord
}
