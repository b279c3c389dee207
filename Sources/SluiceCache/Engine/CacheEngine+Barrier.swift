import NIOCore
import SluiceVolume

extension CacheEngine {
    /// Submits a flush: it completes once every write completed before it is durable.
    func submitFlush(completion: @escaping (VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        addBarrierWaiter(completion)
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
