import NIOCore

extension CacheEngine {
    /// Closes gracefully: lets the queued writes land, seals and writes the open buffer, syncs,
    /// lets a writeback batch in flight finish, retires the segments that hold no dirty block,
    /// and records the clean-shutdown marker so the next start needs no full scan.
    public func shutdown(completion: @escaping (Result<Void, Error>) -> Void) {
        eventLoop.preconditionInEventLoop()
        guard case .running = lifecycle else { return completion(.failure(MediumError.inputOutput(errno: 5))) }
        lifecycle = .closing(stage: .waitingForUpdates, completion: completion)
        stopPeriodicWork()
        drive()
    }

    /// Goes on with a graceful close once what it waits for is done. New requests are refused;
    /// the ones already accepted must land before the clean marker says everything is in the log.
    func closingProgressed() {
        guard case .closing(let stage, let completion) = lifecycle else { return }
        switch stage {
        case .waitingForUpdates:
            guard updates.waiting.isEmpty, !updates.mergeRead.isInFlight, bypass.isEmpty else { return }
            // A relocation still running stops here: what it moved stays moved, the rest of its
            // segment stays in the log.
            if let job = relocation, job.readsOutstanding == 0 { abandonRelocation() }
            guard relocation == nil else { return }
            lifecycle = .closing(stage: .finishing, completion: completion)
            // Bypass writes without FUA are synced on the backing store too.
            addBarrierWaiter(flushBypassWrites { reply in
                guard case .done = reply else { return self.closed(.failure(self.failure ?? MediumError.inputOutput(errno: 5))) }
                self.lifecycle = .closing(stage: .readyForCleanRecord, completion: completion)
                self.drive()
            })
        case .finishing:
            return
        case .readyForCleanRecord:
            guard batch == nil, records.isIdle, records.pending == nil else { return }
            if let failure { return closed(.failure(failure)) }
            lifecycle = .closing(stage: .finishing, completion: completion)
            // Everything appended is synced (the barrier), so every reclaimed segment's fence has
            // passed; the cleaner reclaimed the clean prefix of the log on the way here.
            _ = cleaner.retirable(durableThroughID: .max)
            writeRecord(.cleanShutdown(retiring: ring.reclaimedThroughID)) { result in
                self.closed(result.mapError { $0 as Error })
            }
        }
    }

    private func closed(_ result: Result<Void, Error>) {
        guard case .closing(_, let completion) = lifecycle else { preconditionFailure("closed twice") }
        lifecycle = .closed
        completion(result)
    }
}

extension CacheEngine {
    /// The simulated machine lost power (tests): the engine does nothing more of its own accord;
    /// what its dead media answer still arrives and is ignored or fails.
    func powerFailed() {
        stopPeriodicWork()
        lifecycle = .poweredOff
    }
}
