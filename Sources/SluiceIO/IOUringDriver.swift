import CLibURing
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Runs an ``IOUring`` on a SwiftNIO event loop.
///
/// The ring's eventfd is registered with the loop as a pipe channel, so the loop itself wakes up to
/// reap completions: requests are submitted and completed on the thread that owns the connection,
/// with no extra thread and no hop.
public final class IOUringDriver {
    /// The ring. Touch it only on ``eventLoop``.
    public let ring: IOUring
    /// The loop that owns the ring.
    public let eventLoop: any EventLoop
    private var eventChannel: (any Channel)?

    private init(ring: IOUring, eventLoop: any EventLoop) {
        self.ring = ring
        self.eventLoop = eventLoop
    }

    /// Creates a driver on `eventLoop`; must be called on that loop.
    static func start(on eventLoop: any EventLoop, entries: UInt32) throws -> IOUringDriver {
        eventLoop.preconditionInEventLoop()
        let ring = try IOUring(entries: entries)
        let driver = IOUringDriver(ring: ring, eventLoop: eventLoop)
        ring.retrySubmissionLater = { [unowned ring] in
            eventLoop.scheduleTask(in: .milliseconds(1)) { ring.submit() }
        }
        let handler = EventFileHandler(ring: ring)
        // The pipe bootstrap takes ownership of the eventfd and closes it with the channel.
        NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .takingOwnershipOfDescriptor(input: ring.eventFileDescriptor)
            .whenComplete { result in
                switch result {
                case .success(let channel):
                    driver.eventChannel = channel
                case .failure(let error):
                    preconditionFailure("the io_uring eventfd could not join the event loop: \(error)")
                }
            }
        return driver
    }

    /// Stops watching the eventfd. Call after every operation has completed.
    func stop() -> EventLoopFuture<Void> {
        eventLoop.flatSubmit {
            self.ring.reapCompletions()
            let closed = self.eventChannel?.close() ?? self.eventLoop.makeSucceededVoidFuture()
            return closed.map { _ = self.ring.shutdown() }
        }
    }
}

/// Reaps the ring whenever its eventfd becomes readable.
private final class EventFileHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let ring: IOUring

    init(ring: IOUring) {
        self.ring = ring
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // The eventfd's 8-byte counter only says "something completed"; the ring says what.
        ring.reapCompletions()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        ring.reapCompletions()
    }
}

/// The io_uring drivers of a process, one per event loop, created on first use.
public final class IOUringDrivers: Sendable {
    /// The drivers of this process.
    public static let shared = IOUringDrivers()

    private let drivers = NIOLockedValueBox<[ObjectIdentifier: IOUringDriver]>([:])
    private let entriesPerRing: UInt32 = 512

    /// The driver of `eventLoop`, created if needed. Must be called on that loop.
    public func driver(for eventLoop: any EventLoop) throws -> IOUringDriver {
        eventLoop.preconditionInEventLoop()
        let key = ObjectIdentifier(eventLoop as AnyObject)
        if let existing = drivers.withLockedValue({ $0[key] }) {
            return existing
        }
        let driver = try IOUringDriver.start(on: eventLoop, entries: entriesPerRing)
        drivers.withLockedValue { $0[key] = driver }
        return driver
    }

    /// Stops and forgets every driver whose loop belongs to `group`. Their rings must be idle.
    public func stopAll(in group: any EventLoopGroup) throws {
        var toStop: [IOUringDriver] = []
        for loop in group.makeIterator() {
            let key = ObjectIdentifier(loop as AnyObject)
            if let driver = drivers.withLockedValue({ $0.removeValue(forKey: key) }) {
                toStop.append(driver)
            }
        }
        for driver in toStop {
            try driver.stop().wait()
        }
    }
}

extension IOUringDriver: @unchecked Sendable {}
