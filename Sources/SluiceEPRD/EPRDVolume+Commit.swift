import Dispatch
import NIOCore
import SluiceCache
import SluiceRAMDisk
import SluiceVolume

extension EPRDVolume {
    /// Asks for a commit; `completion` runs (on the commit loop) when one that covers every write
    /// completed before this call has written back and synced, or failed.
    func requestCommit(_ completion: @escaping (Result<Void, MediumError>) -> Void) {
        commitLoop.execute {
            if self.schedule.requested(by: completion) { self.runCommits() }
        }
    }

    /// Runs the commit the schedule started, and those it starts after it, until it is idle.
    private func runCommits() {
        commitLoop.preconditionInEventLoop()
        var another = true
        while another {
            let result = commitNowBlocking()
            let (served, startNext) = schedule.finished()
            for waiter in served { waiter(result) }
            another = startNext
        }
    }

    /// One timer tick: a commit if anything is dirty and none runs.
    private func timerTicked() {
        guard !schedule.isRunning, lock.withLock({ !dirty.isEmpty }) else { return }
        if schedule.requested(by: nil) { runCommits() }
    }

    /// (Re)starts the commit timer; 0 stops it. On the commit loop.
    func scheduleTimer(intervalMs: UInt64) {
        commitLoop.preconditionInEventLoop()
        commitTimer?.cancel()
        commitTimer = nil
        guard intervalMs > 0 else { return }
        let interval = TimeAmount.milliseconds(Int64(intervalMs))
        commitTimer = commitLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [weak self] _ in
            self?.timerTicked()
        }
    }

    /// Writes back every sector dirty now, in block order and merged, a step of at most
    /// ``chunksPerCommitStep`` chunks at a time, then syncs the backing store. Sectors written
    /// meanwhile are marked again and go with the next commit. If a write or the sync fails, every
    /// sector this commit took is marked dirty again: the image holds the newest data, so writing
    /// it again later is always right, and nothing is taken as durable that may not be.
    func commitNowBlocking() -> Result<Void, MediumError> {
        let startNs = DispatchTime.now().uptimeNanoseconds
        let chunks: [UInt64] = lock.withLock {
            let chunks = dirty.chunksInOrder()
            if !chunks.isEmpty { counters.commitsStarted += 1 }
            return chunks
        }
        // Nothing dirty: every earlier commit synced what it wrote (or marked it dirty again).
        guard !chunks.isEmpty else { return .success(()) }
        var taken: [DirtySectors.Run] = []
        var first = 0
        while first < chunks.count {
            let end = min(first + Self.chunksPerCommitStep, chunks.count)
            let (runs, staging) = takeStep(chunks[first..<end])
            taken += runs
            var position = 0
            for run in runs {
                do {
                    try medium.writeBytes(offset: run.offset, buffer: staging.getSlice(at: position, length: run.lengthBytes)!)
                } catch {
                    return commitFailed(taken, error, while: "writing back")
                }
                position += run.lengthBytes
            }
            first = end
        }
        do {
            try medium.synchronizeBytes()
        } catch {
            return commitFailed(taken, error, while: "syncing")
        }
        let bytes = taken.reduce(UInt64(0)) { $0 + UInt64($1.lengthBytes) }
        lock.withLock {
            counters.commits += 1
            counters.committedBytes += bytes
            counters.lastCommitMs = (DispatchTime.now().uptimeNanoseconds - startNs) / 1_000_000
        }
        return .success(())
    }

    /// Takes the dirty sectors of `chunks` and copies them out, under the lock, into one buffer.
    private func takeStep(_ chunks: ArraySlice<UInt64>) -> ([DirtySectors.Run], ByteBuffer) {
        lock.withLock {
            let runs = dirty.take(chunks: chunks)
            let total = runs.reduce(0) { $0 + $1.lengthBytes }
            var staging = ByteBufferAllocator().buffer(capacity: total)
            for run in runs {
                staging.writeWithUnsafeMutableBytes(minimumWritableBytes: run.lengthBytes) { target in
                    image.read(offset: run.offset, into: UnsafeMutableRawBufferPointer(rebasing: target[0..<run.lengthBytes]))
                    return run.lengthBytes
                }
            }
            return (runs, staging)
        }
    }

    private func commitFailed(_ taken: [DirtySectors.Run], _ error: any Error, while doing: String) -> Result<Void, MediumError> {
        let mediumError = (error as? MediumError) ?? .inputOutput(errno: 5)
        lock.withLock {
            dirty.mark(taken)
            counters.commitErrors += 1
            counters.lastError = "\(doing) to the backing store: \(mediumError)"
        }
        return .failure(mediumError)
    }
}
