/// When an EPRD commits: the commit timer, flushes that wait for a commit (barriers on) and
/// management's write-back all ask for one; one runs at a time, and whoever asks while one runs
/// is served by the next, which starts as soon as the running one ends.
///
/// Why a request during a commit waits for the *next* one: the running commit took its list of
/// dirty sectors before the request came, so writes acknowledged before the request may not be in
/// it. The next commit starts after the running one has synced, so when it ends, everything the
/// earlier one took is durable too, and everything dirty when it started is written and synced.
///
/// A value type driven by events on the commit loop; the volume carries out what it returns.
struct CommitSchedule<Waiter> {
    enum State {
        case idle
        /// A commit runs for `waiters`; `next` asked after it started (and `nextRequested` is
        /// whether anyone, waiting or not, did).
        case running(waiters: [Waiter], next: [Waiter], nextRequested: Bool)
    }

    private(set) var state = State.idle

    var isRunning: Bool {
        if case .running = state { return true }
        return false
    }

    /// Someone asks for a commit (`waiter` is told when one that covers the request ends; nil for
    /// a timer tick nobody waits on). Returns whether to start one now.
    mutating func requested(by waiter: Waiter?) -> Bool {
        switch state {
        case .idle:
            state = .running(waiters: waiter.map { [$0] } ?? [], next: [], nextRequested: false)
            return true
        case .running(let waiters, var next, _):
            if let waiter { next.append(waiter) }
            state = .running(waiters: waiters, next: next, nextRequested: true)
            return false
        }
    }

    /// The running commit ended (written and synced, or failed). Returns the waiters it served
    /// and whether to start the next one at once (for those who asked meanwhile).
    mutating func finished() -> (served: [Waiter], startNext: Bool) {
        guard case .running(let waiters, let next, let nextRequested) = state else {
            preconditionFailure("a commit ended while none was running")
        }
        if nextRequested {
            state = .running(waiters: next, next: [], nextRequested: false)
        } else {
            state = .idle
        }
        return (waiters, nextRequested)
    }
}
