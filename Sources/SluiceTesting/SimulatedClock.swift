import NIOCore
import SluiceCache

/// A clock for the simulator: time stands still until the test advances it, and timers fire
/// only then, in time order, on the engine's loop. Every timer-driven decision of the engine
/// (writeback pacing, `max_age`, barrier deadlines, record refreshes) then happens at a moment the
/// seed chose, so a failing seed replays exactly.
public final class SimulatedClock: EngineClock {
    private let loop: any EventLoop
    public private(set) var nowNs: UInt64
    private var timers: [Timer] = []
    private var nextTimerID: UInt64 = 0

    final class Timer: EngineTimer {
        let dueNs: UInt64
        let id: UInt64
        var body: (() -> Void)?
        init(dueNs: UInt64, id: UInt64, body: @escaping () -> Void) {
            self.dueNs = dueNs
            self.id = id
            self.body = body
        }
        func cancel() { body = nil }
    }

    /// A clock on `loop` that starts at `startNs`.
    public init(loop: any EventLoop, startNs: UInt64 = 1_000_000_000) {
        self.loop = loop
        nowNs = startNs
    }

    @discardableResult
    public func schedule(afterNs delayNs: UInt64, _ body: @escaping () -> Void) -> any EngineTimer {
        nextTimerID += 1
        let timer = Timer(dueNs: nowNs &+ delayNs, id: nextTimerID, body: body)
        timers.append(timer)
        return timer
    }

    /// Timers not yet fired or cancelled.
    public var pendingTimers: Int { timers.filter { $0.body != nil }.count }

    /// Moves time forward by `delayNs`, firing every timer that falls due, earliest first (ties in
    /// the order they were scheduled). Call on the loop.
    public func advance(byNs delayNs: UInt64) {
        loop.preconditionInEventLoop()
        let target = nowNs &+ delayNs
        while let next = timers.filter({ $0.body != nil && $0.dueNs <= target }).min(by: { ($0.dueNs, $0.id) < ($1.dueNs, $1.id) }) {
            timers.removeAll { $0 === next }
            nowNs = max(nowNs, next.dueNs)
            let body = next.body
            next.body = nil
            body?()
        }
        timers.removeAll { $0.body == nil }
        nowNs = target
    }
}
