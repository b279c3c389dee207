import NIOCore

extension CacheEngine {
    /// Shuts down cleanly: seals and writes the open buffer, syncs, lets a writeback batch in flight
    /// finish, and records the clean-shutdown marker so the next start needs no full scan.
    public func shutdown(completion: @escaping (Result<Void, Error>) -> Void) {
        eventLoop.preconditionInEventLoop()
        isClosing = true
        periodicTask?.cancel()
        writebackTimer?.cancel()
        shutdownCompletion = completion
        closingProgressed()
    }

    /// Goes on with a shutdown once no write or discard is waiting: new ones are refused, and the
    /// ones already accepted must land before the clean marker says everything is in the log.
    func closingProgressed() {
        guard let completion = shutdownCompletion, waitingUpdates.isEmpty, !mergeReadInFlight else { return }
        shutdownCompletion = nil
        addBarrierWaiter { reply in
            if case .failed = reply {
                return completion(.failure(self.failure ?? MediumError.inputOutput(errno: 5)))
            }
            self.whenWritebackIdle {
                if let failure = self.failure { return completion(.failure(failure)) }
                self.writeRecord(cleanShutdown: true) { result in
                    completion(result.mapError { $0 as Error })
                }
            }
        }
    }

    private func whenWritebackIdle(_ body: @escaping () -> Void) {
        if writeback == nil && !recordWriteInFlight && discardsInFlight == 0 {
            body()
        } else {
            eventLoop.scheduleTask(in: .milliseconds(5)) { self.whenWritebackIdle(body) }
        }
    }
}
