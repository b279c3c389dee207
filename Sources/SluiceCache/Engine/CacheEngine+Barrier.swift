import NIOCore
import SluiceFormat
import SluiceVolume

extension CacheEngine {
    /// Submits a flush: it completes once every write completed before it is durable.
    func submitFlush(completion: @escaping (VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        if isPmemMode && persistWaiters.isEmpty {
            // Every write acknowledged so far was persisted before its reply, so a flush (which
            // covers only acknowledged writes) has nothing to wait for.
            return completion(.done)
        }
        addDurabilityWaiter(completion)
    }

    /// Completes `completion` once everything acknowledged so far is durable: after the next drain
    /// of persistent memory in pmem mode, after a barrier in volatile mode.
    func addDurabilityWaiter(_ completion: @escaping (VolumeReply) -> Void) {
        if isPmemMode { addPersistWaiter(completion) } else { addBarrierWaiter(completion) }
    }

    /// Pmem mode: completes `completion` after the next drain. Every reply that comes due in one
    /// turn of the event loop shares that drain (group commit), so the cost per write falls as the
    /// load rises.
    func addPersistWaiter(_ completion: @escaping (VolumeReply) -> Void) {
        persistWaiters.append(completion)
        // A connection's burst ends with ``persistPendingReplies()``; only replies due outside
        // one need a drain scheduled at the end of the turn.
        guard !persistScheduled, !isInsideSessionBurst else { return }
        persistScheduled = true
        eventLoop.execute { self.runPersist() }
    }

    /// Pmem mode: drains now for the replies waiting, if any (at the end of a connection's burst).
    func persistPendingReplies() {
        eventLoop.preconditionInEventLoop()
        if !persistWaiters.isEmpty { runPersist() }
    }

    func runPersist() {
        persistScheduled = false
        guard !persistWaiters.isEmpty else { return }
        swap(&persistWaiters, &persistReplying)
        defer { persistReplying.removeAll(keepingCapacity: true) }
        if let failure {
            for waiter in persistReplying { waiter(.failed(.io(errno: failure.errnoValue))) }
            return
        }
        persistNow()
        counters.pmemPersistedReplies += UInt64(persistReplying.count)
        for waiter in persistReplying { waiter(.done) }
    }

    /// Drains persistent memory: every append flushed so far becomes durable.
    func persistNow() {
        guard let persistentMemory else { return }
        persistentMemory.drain()
        counters.pmemDrains += 1
    }

    /// Adds a FUA write or flush to the barrier being gathered. In volatile mode a barrier seals the
    /// open buffer as a partial segment, waits for it and every earlier segment to be written, and
    /// syncs the cache device once for all of them. Requests that arrive within
    /// `barrier_deadline_ms` (or in the same burst, with 0) share one partial segment.
    func addBarrierWaiter(_ completion: @escaping (VolumeReply) -> Void) {
        barrierGathering.append(BarrierWaiter(completion: completion))
        guard !barrierScheduled else { return }
        barrierScheduled = true
        if tunables.barrierDeadlineMs == 0 {
            eventLoop.execute { self.runBarrier() }
        } else {
            eventLoop.scheduleTask(in: .milliseconds(Int64(tunables.barrierDeadlineMs))) { self.runBarrier() }
        }
    }

    func runBarrier() {
        barrierScheduled = false
        let waiters = barrierGathering
        barrierGathering.removeAll(keepingCapacity: true)
        if let failure {
            for waiter in waiters { waiter.completion(.failed(.io(errno: failure.errnoValue))) }
            return
        }
        sealOpenBuffer(isPartial: true)
        if let failure {
            // The seal's write failed at once; these waiters are in no list that failing empties.
            for waiter in waiters { waiter.completion(.failed(.io(errno: failure.errnoValue))) }
            return
        }
        let lastSealedID = (openBuffer?.segmentID ?? nextSegmentID) - 1
        barriersWaiting.append(Barrier(throughID: lastSealedID, waiters: waiters))
        unsyncedWritesSinceBarrier = false
        driveBarriers()
        // The open buffer was taken; writes that waited for one may go on.
        processWaitingUpdates()
    }

    /// Completes the barriers that are durable and starts the sync the oldest one needs.
    func driveBarriers() {
        while !cacheSyncInFlight, failure == nil, let head = barriersWaiting.first {
            if head.throughID <= syncedThroughID {
                barriersWaiting.removeFirst()
                for waiter in head.waiters { waiter.completion(.done) }
                continue
            }
            // A sync covers only segments whose write completed before it was issued.
            guard writtenThroughID >= head.throughID else { return }
            startBarrierSync()
            return
        }
        // Pmem mode: a written segment's area is reused only once the device has synced it.
        if !cacheSyncInFlight, failure == nil,
           buffersAwaitingSync.contains(where: { $0.segmentID <= writtenThroughID && $0.segmentID > syncedThroughID }) {
            startBarrierSync()
        }
    }

    /// Pmem mode: persists how far the cache device has synced, so recovery can tell a log
    /// damaged inside from one torn at its end by a crash.
    private func recordSyncedThroughInPmem() {
        guard let persistentMemory else { return }
        persistentMemory.storeWord(syncedThroughID, at: PmemLayout.syncedWordOffset)
        persistentMemory.flush(offset: PmemLayout.syncedWordOffset, count: 8)
        persistNow()
    }

    /// Pmem mode: returns the areas of segments the cache device has synced to the free list.
    private func releaseSyncedBuffers() {
        guard !buffersAwaitingSync.isEmpty else { return }
        var released = false
        buffersAwaitingSync.removeAll { buffer in
            guard buffer.segmentID <= syncedThroughID else { return false }
            buffer.reset()
            freeBuffers.append(buffer)
            released = true
            return true
        }
        if released { processWaitingUpdates() }
    }

    private func startBarrierSync() {
        let coveredID = writtenThroughID
        cacheSyncInFlight = true
        cacheDevice.synchronize { result in
            self.counters.cacheSyncs += 1
            self.cacheSyncInFlight = false
            if case .failure(let error) = result {
                // A failed sync leaves unknown what is durable: nothing more may be acknowledged.
                return self.fail(error, doing: "syncing the cache device")
            }
            self.syncedThroughID = max(self.syncedThroughID, coveredID)
            self.recordSyncedThroughInPmem()
            self.releaseSyncedBuffers()
            while let head = self.barriersWaiting.first, head.throughID <= coveredID {
                self.barriersWaiting.removeFirst()
                for waiter in head.waiters { waiter.completion(.done) }
            }
            self.driveBarriers()
        }
    }

    /// Fails every FUA write and flush that is waiting (after a medium failure).
    func failBarriers(_ error: MediumError) {
        let gathering = barrierGathering
        barrierGathering.removeAll()
        let waiting = barriersWaiting
        barriersWaiting.removeAll()
        for waiter in gathering { waiter.completion(.failed(.io(errno: error.errnoValue))) }
        for barrier in waiting {
            for waiter in barrier.waiters { waiter.completion(.failed(.io(errno: error.errnoValue))) }
        }
    }
}
