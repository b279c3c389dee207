import NIOCore
import SluiceFormat
import SluiceVolume

/// Writes, trims and write-zeroes waiting their turn, in arrival order, and what the head of the
/// queue waits for.
struct UpdateQueue {
    /// Bounded by the requests the servers let in flight.
    var waiting = BoundedQueue<PendingUpdate>()
    var mergeRead = MergeRead.none
    var pass = ReentrantPass()
    /// What the head of the queue waits for, and since when.
    var headWait = HeadWait.none
    /// Writes were acknowledged since the last barrier (for `sync_data_interval`).
    var unsyncedWritesSinceBarrier = false

    /// An old copy of a block read from the cache device so a partial write can merge with it.
    enum MergeRead {
        case none
        case inFlight(position: CacheIndex.Position)
        /// Good only for the piece that asked for it, and only while the index still points at
        /// `position`; any other outcome drops it.
        case fetched(position: CacheIndex.Position, block: ByteBuffer)

        var isInFlight: Bool { if case .inFlight = self { return true } else { return false } }
    }

    enum HeadWait {
        case none
        /// A free ring slot: the cleaner must reclaim the tail.
        case forSlot(sinceNs: UInt64)
        /// A free segment buffer: a segment write (or, in pmem mode, a device sync) must finish.
        case forBuffer(sinceNs: UInt64)

        var isForSlot: Bool { if case .forSlot = self { return true } else { return false } }
        var sinceNs: UInt64? {
            switch self {
            case .none: return nil
            case .forSlot(let since), .forBuffer(let since): return since
            }
        }
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
    /// Bytes of a write already applied (a write larger than a segment is applied in parts); for
    /// a discard placing markers, blocks already done.
    var appliedBytes = 0
    /// For a discard: how far it has got.
    var discardStage = DiscardSequencer.Stage.waiting
    /// For a discard: its id once it has started.
    var discardID: UInt64 = 0
    /// For a write: the path it takes (``CacheMode``).
    var writePath = WritePath.undecided
    var completion: (consuming VolumeReply) -> Void
}

/// FUA writes and flushes gathering for the next barrier (volatile mode).
struct BarrierQueue {
    enum Gathering {
        case idle
        /// A barrier is scheduled (at the end of the turn or after `barrier_deadline_ms`).
        case gathering([(consuming VolumeReply) -> Void])
    }
    var gathering = Gathering.idle

    /// Adds a waiter; returns true when the caller must schedule the barrier.
    mutating func add(_ completion: @escaping (consuming VolumeReply) -> Void) -> Bool {
        switch gathering {
        case .idle:
            gathering = .gathering([completion])
            return true
        case .gathering(var waiters):
            waiters.append(completion)
            gathering = .gathering(waiters)
            return false
        }
    }

    mutating func take() -> [(consuming VolumeReply) -> Void] {
        guard case .gathering(let waiters) = gathering else { return [] }
        gathering = .idle
        return waiters
    }

    var isGathering: Bool { if case .gathering = gathering { return true } else { return false } }
}

/// Cache-device syncs: at most one in flight, shared by everyone who needs one (barriers, the
/// cleaner's fences, pmem areas waiting to be reused, superblock records).
struct CacheSyncs {
    enum State {
        case idle
        /// A sync is in flight; it covers every segment up to `coversThroughID` and everything
        /// written before sync number `number` was issued.
        case syncing(coversThroughID: UInt64, number: UInt64)
    }
    var state = State.idle
    /// Syncs issued so far.
    private(set) var issued: UInt64 = 0
    /// Waiters for every segment up to an id to be synced.
    var segmentWaiters: [(throughID: UInt64, completion: (Result<Void, MediumError>) -> Void)] = []
    /// Waiters for a sync issued after a write of theirs completed (a superblock record).
    var writeWaiters: [(syncNumber: UInt64, completion: (Result<Void, MediumError>) -> Void)] = []

    var isIdle: Bool { if case .idle = state { return true } else { return false } }

    /// The number of the next sync to be issued: a write that completed now is covered by it.
    var nextNumber: UInt64 { issued + 1 }

    mutating func issue(coversThroughID: UInt64) -> UInt64 {
        precondition(isIdle, "two cache-device syncs at once")
        issued += 1
        state = .syncing(coversThroughID: coversThroughID, number: issued)
        return issued
    }
}

/// Pmem mode's group commit: replies waiting for the next drain.
struct PersistQueue {
    private(set) var waiters: [(consuming VolumeReply) -> Void] = []
    /// An empty array with capacity, so taking the waiters allocates nothing in a steady state.
    private var spare: [(consuming VolumeReply) -> Void] = []
    enum Schedule {
        case none
        /// A drain runs at the end of this turn of the loop.
        case endOfTurn
    }
    var schedule = Schedule.none
    /// A session on the engine's loop is submitting a burst; its end drains for it.
    var burstDepth = 0

    mutating func add(_ waiter: @escaping (consuming VolumeReply) -> Void) { waiters.append(waiter) }

    /// Takes every waiter; give the array back with ``recycle(_:)`` once they are answered.
    mutating func takeWaiters() -> [(consuming VolumeReply) -> Void] {
        var taken = spare
        spare = []
        swap(&taken, &waiters)
        return taken
    }

    mutating func recycle(_ array: consuming [(consuming VolumeReply) -> Void]) {
        var emptied = array
        emptied.removeAll(keepingCapacity: true)
        spare = emptied
    }
}

/// Superblock record writes: one at a time, alternating between the two record blocks. Requests
/// that arrive while one is being written are merged into the next.
struct RecordWriter {
    /// The record most recently made durable.
    private(set) var current: SuperblockRecord
    enum State {
        case idle
        case writing(SuperblockRecord)
    }
    private(set) var state = State.idle
    /// What the next record must carry, merged from the requests waiting.
    var pending: Request?

    struct Request {
        /// Retire every segment up to this id (nil: keep the current one).
        var retireThroughID: UInt64?
        var cleanShutdown: Bool
        /// A new cache mode (nil: keep the current one).
        var cacheMode: CacheMode? = nil
        var completions: [(Result<Void, MediumError>) -> Void]

        mutating func merge(_ other: Request) {
            if let id = other.retireThroughID { retireThroughID = max(retireThroughID ?? 0, id) }
            cleanShutdown = other.cleanShutdown
            if let mode = other.cacheMode { cacheMode = mode }
            completions += other.completions
        }
    }

    init(current: SuperblockRecord) {
        self.current = current
    }

    var isIdle: Bool { if case .idle = state { return true } else { return false } }

    /// The record the next write carries.
    func next(for request: Request, syncedThroughID: UInt64) -> SuperblockRecord {
        let retired = max(request.retireThroughID ?? current.lastRetiredSegmentID, current.lastRetiredSegmentID)
        return SuperblockRecord(sequence: current.sequence + 1, lastRetiredSegmentID: retired,
                                lastFlushedSegmentID: max(syncedThroughID, retired), cleanShutdown: request.cleanShutdown,
                                cacheMode: request.cacheMode ?? current.cacheMode)
    }

    mutating func started(_ record: SuperblockRecord) {
        precondition(isIdle, "two superblock record writes at once")
        state = .writing(record)
    }

    /// The write in flight finished; on success its record is the current one.
    mutating func finished(durable: Bool) {
        guard case .writing(let record) = state else { preconditionFailure("no superblock record write in flight") }
        if durable { current = record }
        state = .idle
    }
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

/// A loop that completions re-enter: media may complete within the call that starts an
/// operation, and the completion wants the loop that issued it to run again. A re-entrant
/// ``begin()`` asks the running pass to go round once more instead of recursing, so the stack
/// stays flat and the loop's work is never done twice at once.
///
///     guard pass.begin() else { return }
///     repeat { ... } while pass.again()
struct ReentrantPass: Equatable {
    enum State: Equatable {
        case idle
        case running
        case runAgain
    }
    private(set) var state = State.idle

    /// Starts a pass; false when one is running (it will go round again).
    mutating func begin() -> Bool {
        switch state {
        case .idle:
            state = .running
            return true
        case .running, .runAgain:
            state = .runAgain
            return false
        }
    }

    /// At the end of a round: whether to go round again; otherwise the pass is over.
    mutating func again() -> Bool {
        if state == .runAgain {
            state = .running
            return true
        }
        state = .idle
        return false
    }

    /// Ends the pass at once (a failure stops the loop).
    mutating func end() { state = .idle }

    var isRunning: Bool { state != .idle }
}
