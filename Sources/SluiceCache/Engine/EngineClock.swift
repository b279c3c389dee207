import NIOCore

/// The engine's clock and timers. Production uses the event loop's monotonic clock
/// (``EventLoopClock``); the simulator uses a clock the test advances, so every timer-driven
/// decision (writeback pacing, `max_age`, barrier deadlines, record refreshes) happens at a
/// moment set by the seed, not by the wall clock.
///
/// Timers fire on the engine's event loop.
public protocol EngineClock: AnyObject {
    /// Monotonic time in nanoseconds.
    var nowNs: UInt64 { get }
    /// Runs `body` on the engine's loop once `delayNs` have passed.
    @discardableResult
    func schedule(afterNs delayNs: UInt64, _ body: @escaping () -> Void) -> any EngineTimer
}

/// A scheduled timer; cancelling one that already fired does nothing.
public protocol EngineTimer: AnyObject {
    func cancel()
}

/// The event loop's monotonic clock and `scheduleTask`.
public final class EventLoopClock: EngineClock {
    private let eventLoop: any EventLoop

    public init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    public var nowNs: UInt64 { UInt64(NIODeadline.now().uptimeNanoseconds) }

    @discardableResult
    public func schedule(afterNs delayNs: UInt64, _ body: @escaping () -> Void) -> any EngineTimer {
        ScheduledTimer(eventLoop.scheduleTask(in: .nanoseconds(Int64(min(delayNs, UInt64(Int64.max))))) { body() })
    }

    private final class ScheduledTimer: EngineTimer {
        let task: Scheduled<Void>
        init(_ task: Scheduled<Void>) { self.task = task }
        func cancel() { task.cancel() }
    }
}
