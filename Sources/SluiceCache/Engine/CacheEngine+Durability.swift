import NIOCore
import SluiceFormat
import SluiceVolume

extension CacheEngine {
    /// Submits a flush: it completes once every write completed before it is durable.
    func submitFlush(completion: @escaping (consuming VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        awaitDurability(durability.flushWait(repliesAwaitingPersist: !persists.waiters.isEmpty), flushBypassWrites(completion))
    }

    /// Completes `completion` once what `wait` names has happened.
    func awaitDurability(_ wait: DurabilityWait, _ completion: @escaping (consuming VolumeReply) -> Void) {
        switch wait {
        case .none: completion(.done)
        case .barrier: addBarrierWaiter(completion)
        case .persist: addPersistWaiter(completion)
        }
    }

    // MARK: Pmem group commit

    /// Pmem mode: completes `completion` after the next drain. Every reply that comes due in one
    /// turn of the event loop shares that drain (group commit), so the cost per write falls as the
    /// load rises.
    func addPersistWaiter(_ completion: @escaping (consuming VolumeReply) -> Void) {
        persists.add(completion)
        // A connection's burst ends with ``persistPendingReplies()``; only replies due outside
        // one need a drain scheduled at the end of the turn.
        guard case .none = persists.schedule, persists.burstDepth == 0 else { return }
        persists.schedule = .endOfTurn
        eventLoop.execute { self.runPersist() }
    }

    /// A session on the engine's loop starts submitting a burst of requests.
    public func beginSessionBurst() { persists.burstDepth += 1 }
    public func endSessionBurst() {
        precondition(persists.burstDepth > 0, "a session burst ended that never began")
        persists.burstDepth -= 1
    }

    /// Whether a connection's burst should end with ``persistPendingReplies()``.
    public var groupsRepliesPerBurst: Bool { durability.groupsRepliesPerBurst }

    /// Pmem mode: drains now for the replies waiting, if any (at the end of a connection's burst).
    public func persistPendingReplies() {
        eventLoop.preconditionInEventLoop()
        if !persists.waiters.isEmpty { runPersist() }
    }

    private func runPersist() {
        persists.schedule = .none
        guard !persists.waiters.isEmpty else { return }
        let replying = persists.takeWaiters()
        if let failure {
            for waiter in replying { waiter(.failed(.io(errno: failure.errnoValue))) }
        } else {
            persistAppended()
            counters.pmemPersistedReplies += UInt64(replying.count)
            for waiter in replying { waiter(.done) }
        }
        persists.recycle(replying)
    }

    /// Makes every append so far durable, if the buffers can alone (a pmem drain). Returns false
    /// in volatile mode, where only a barrier can.
    @discardableResult
    func persistAppended() -> Bool {
        guard durability.persistAppended() else { return false }
        counters.pmemDrains += 1
        return true
    }

    // MARK: Barriers (volatile mode)

    /// Adds a FUA write or flush to the barrier being gathered. A barrier seals the open buffer as
    /// a partial segment, waits for it and every earlier segment to be written, and syncs the
    /// cache device once for all of them. Requests that arrive within `barrier_deadline_ms` (or in
    /// the same burst, with 0) share one partial segment.
    func addBarrierWaiter(_ completion: @escaping (consuming VolumeReply) -> Void) {
        guard barriers.add(completion) else { return }
        if tunables.barrierDeadlineMs == 0 {
            eventLoop.execute { self.runBarrier() }
        } else {
            clock.schedule(afterNs: UInt64(tunables.barrierDeadlineMs) * 1_000_000) { self.runBarrier() }
        }
    }

    private func runBarrier() {
        let waiters = barriers.take()
        guard !waiters.isEmpty else { return }
        if let failure {
            for waiter in waiters { waiter(.failed(.io(errno: failure.errnoValue))) }
            return
        }
        // Everything appended so far, taken before sealing: the seal's write may complete at once
        // and let waiting writes open and fill the next segment, which this barrier does not cover.
        let throughID = newestAppendedSegmentID
        sealOpenBuffer(isPartial: true)
        if let failure {
            // The seal's write failed at once; these waiters are in no list that failing empties.
            for waiter in waiters { waiter(.failed(.io(errno: failure.errnoValue))) }
            return
        }
        updates.unsyncedWritesSinceBarrier = false
        lastBarrierNs = clock.nowNs
        whenSynced(through: throughID) { result in
            let reply: VolumeReply
            switch result {
            case .success: reply = .done
            case .failure(let error): reply = .failed(.io(errno: error.errnoValue))
            }
            for waiter in waiters { waiter(reply) }
        }
        // The open buffer was taken; writes that waited for one may go on.
        drive()
    }

    // MARK: Cache-device syncs

    /// Completes once every segment up to `id` is synced on the cache device. The segment must be
    /// sealed (or get sealed): only written segments are synced.
    func whenSynced(through id: UInt64, _ completion: @escaping (Result<Void, MediumError>) -> Void) {
        if id <= ring.syncedThroughID { return completion(.success(())) }
        syncs.segmentWaiters.append((id, completion))
        driveSyncs()
    }

    /// Completes once a sync issued after now completes: it covers a write that just completed.
    func whenNextSyncCompletes(_ completion: @escaping (Result<Void, MediumError>) -> Void) {
        syncs.writeWaiters.append((syncs.nextNumber, completion))
        driveSyncs()
    }

    /// Starts a sync if one is wanted and none is in flight: for a waiter whose segments are all
    /// written, a record write, a pmem area waiting to be reused, or a reclaim's fence.
    func driveSyncs() {
        guard syncs.isIdle, failure == nil else { return }
        let written = ring.writtenThroughID
        let synced = ring.syncedThroughID
        let wanted = !syncs.writeWaiters.isEmpty
            || syncs.segmentWaiters.contains { $0.throughID <= written }
            || (buffers.needsSync(writtenThroughID: written, syncedThroughID: synced) && buffersRunShort)
            || (retirementIsDue && cleaner.oldestFenceID.map { $0 > synced && $0 <= written } ?? false)
        guard wanted else { return }
        let number = syncs.issue(coversThroughID: written)
        cacheDevice.synchronize { result in self.syncCompleted(number: number, coveringThroughID: written, result: result) }
    }

    private func syncCompleted(number: UInt64, coveringThroughID covered: UInt64, result: Result<Void, MediumError>) {
        syncs.state = .idle
        counters.cacheSyncs += 1
        if case .failure(let error) = result {
            // A failed sync leaves unknown what is durable: nothing more may be acknowledged.
            return fail(error, doing: "syncing the cache device")
        }
        ring.synced(through: covered)
        let synced = ring.syncedThroughID
        if durability.cacheDeviceSynced(through: synced) { counters.pmemDrains += 1 }
        _ = buffers.releaseSynced(through: synced)
        var due: [(Result<Void, MediumError>) -> Void] = []
        syncs.segmentWaiters.removeAll { waiter in
            guard waiter.throughID <= synced else { return false }
            due.append(waiter.completion)
            return true
        }
        syncs.writeWaiters.removeAll { waiter in
            guard waiter.syncNumber <= number else { return false }
            due.append(waiter.completion)
            return true
        }
        for completion in due { completion(.success(())) }
        drive()
    }

    /// Whether written segments' buffers should be freed now (pmem mode, where an area is
    /// reused only after a sync): half of them are in use, or a writer waits for one. One sync
    /// then frees several, instead of a device flush per segment.
    var buffersRunShort: Bool {
        buffers.free.count * 2 <= buffers.total || { if case .forBuffer = updates.headWait { return true } else { return false } }()
    }

    /// Fails every FUA write, flush and sync waiter (after a medium failure).
    func failDurabilityWaiters(_ error: MediumError) {
        let gathering = barriers.take()
        let segmentWaiters = syncs.segmentWaiters
        let writeWaiters = syncs.writeWaiters
        syncs.segmentWaiters.removeAll()
        syncs.writeWaiters.removeAll()
        for waiter in gathering { waiter(.failed(.io(errno: error.errnoValue))) }
        for waiter in segmentWaiters { waiter.completion(.failure(error)) }
        for waiter in writeWaiters { waiter.completion(.failure(error)) }
    }

    // MARK: Superblock records

    /// Why a superblock record is written.
    enum RecordPurpose {
        /// At start: the cache is in use, so a crash is never taken for a clean shutdown.
        case markInUse
        /// The periodic refresh of the last flushed hint.
        case refresh
        /// Reclaimed segments up to the id are retired: their slots may be reused.
        case retire(UInt64)
        /// A graceful close, retiring the reclaimed segments up to the id.
        case cleanShutdown(retiring: UInt64)
        /// The cache mode changed.
        case cacheMode(CacheMode)
    }

    /// Writes the next superblock record (to the record block the current one is not in) and
    /// makes it durable with a sync. Requests made while one is written share the next write.
    func writeRecord(_ purpose: RecordPurpose, completion: @escaping (Result<Void, MediumError>) -> Void) {
        var request = RecordWriter.Request(retireThroughID: nil, cleanShutdown: false, completions: [completion])
        switch purpose {
        case .markInUse, .refresh: break
        case .retire(let id): request.retireThroughID = id
        case .cleanShutdown(let id):
            request.retireThroughID = id
            request.cleanShutdown = true
        case .cacheMode(let mode): request.cacheMode = mode
        }
        if records.pending == nil { records.pending = request } else { records.pending!.merge(request) }
        startRecordWrite()
    }

    private func startRecordWrite() {
        guard records.isIdle, let request = records.pending else { return }
        records.pending = nil
        let record = records.next(for: request, syncedThroughID: ring.syncedThroughID)
        precondition(record.lastRetiredSegmentID <= ring.reclaimedThroughID, "a record retires segments that were not reclaimed")
        records.started(record)
        cacheDevice.write(offset: record.blockOffset, bytes: record.encoded()) { written in
            if case .failure(let error) = written { return self.recordFinished(request, .failure(error)) }
            self.whenNextSyncCompletes { synced in self.recordFinished(request, synced) }
        }
    }

    private func recordFinished(_ request: RecordWriter.Request, _ result: Result<Void, MediumError>) {
        var succeeded = false
        if case .success = result { succeeded = true }
        records.finished(durable: succeeded)
        counters.recordWrites += 1
        if !succeeded { counters.recordWriteErrors += 1 }
        if succeeded {
            lastRecordNs = clock.nowNs
            let retired = records.current.lastRetiredSegmentID
            if retired > ring.retiredThroughID { retire(through: retired) }
        }
        for completion in request.completions { completion(result) }
        startRecordWrite()
        drive()
    }
}
