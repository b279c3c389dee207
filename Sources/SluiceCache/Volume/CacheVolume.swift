import Atomics
import NIOCore
import SluiceVolume

/// The cache as a ``Volume``: every session forwards its requests to the one ``CacheEngine``, on
/// the engine's event loop. Sessions on that loop call the engine directly; sessions on other loops
/// hop there and back once per request.
public final class CacheVolume: Volume, @unchecked Sendable {
    /// Touch only on `engine.eventLoop`.
    public let engine: CacheEngine
    public let sizeBytes: UInt64
    public let capabilities: VolumeCapabilities = [.flush, .fua, .trim, .writeZeroes, .blockStatus, .multipleConnections]
    public let blockSizes = VolumeBlockSizes.standard
    private let closed = ManagedAtomic<Bool>(false)
    /// Releases the media once the engine has shut down.
    var onClose: (() -> Void)?
    /// How writeback makes the backing store durable (``OpenedBacking/flushPolicy``), for status.
    public let backingFlush: String

    public init(engine: CacheEngine, backingFlush: String = OpenedBacking.flushes) {
        self.engine = engine
        self.backingFlush = backingFlush
        // The volume ends on a sector boundary; a backing store with a ragged tail keeps it unused.
        self.sizeBytes = engine.volumeSizeBytes / 512 * 512
    }

    public func openSession(on eventLoop: any EventLoop) throws -> any VolumeSession {
        CacheSession(volume: self, eventLoop: eventLoop)
    }

    /// Shuts the engine down cleanly (seal, write, sync, clean marker). Call from outside the
    /// engine's event loop.
    public func close() throws {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        defer { onClose?() }
        try onEngine { engine, promise in engine.shutdown { promise.completeWith($0) } }.wait()
    }

    /// Runs `body` on the engine's loop with a promise it completes: an engine operation that
    /// answers later, through a completion.
    func onEngine<Value>(_ body: @escaping (CacheEngine, EventLoopPromise<Value>) -> Void) -> EventLoopFuture<Value> {
        let engine = self.engine
        return engine.eventLoop.flatSubmit {
            let promise = engine.eventLoop.makePromise(of: Value.self)
            body(engine, promise)
            return promise.futureResult
        }
    }

    /// Runs `body` on the engine's loop and returns its result.
    public func withEngine<Result: Sendable>(_ body: @escaping (CacheEngine) -> Result) -> EventLoopFuture<Result> {
        let engine = self.engine
        return engine.eventLoop.submit { body(engine) }
    }
}

/// One client's session on a ``CacheVolume``.
final class CacheSession: VolumeSession {
    private let volume: CacheVolume
    private let eventLoop: any EventLoop
    private let engine: CacheEngine
    private let isOnEngineLoop: Bool
    private(set) var requestsInFlight = 0
    private var isSubmitting = false
    private var burstEndScheduled = false
    private var burstSink: (any VolumeCompletionSink)?

    init(volume: CacheVolume, eventLoop: any EventLoop) {
        self.volume = volume
        self.eventLoop = eventLoop
        self.engine = volume.engine
        self.isOnEngineLoop = eventLoop === volume.engine.eventLoop
    }

    func submit(_ request: consuming VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink) {
        eventLoop.preconditionInEventLoop()
        if let range = request.range {
            let (end, overflow) = range.offset.addingReportingOverflow(range.lengthBytes)
            guard !overflow, end <= volume.sizeBytes else {
                sink.volumeRequestCompleted(tag: tag, reply: .failed(.outOfRange))
                return
            }
        }
        requestsInFlight += 1
        let completion: (consuming VolumeReply) -> Void
        if isOnEngineLoop {
            completion = { reply in self.deliver(consume reply, tag: tag, sink: sink) }
        } else {
            let loop = eventLoop
            completion = { reply in
                let owned = consume reply
                loop.execute { self.deliver(owned, tag: tag, sink: sink) }
            }
        }
        if isOnEngineLoop {
            isSubmitting = true
            engine.beginSessionBurst()
            // Consumed: a read's buffer reaches the engine uniquely owned and is filled in place.
            Self.perform(consume request, on: engine, completion: completion)
            engine.endSessionBurst()
            isSubmitting = false
        } else {
            let engine = self.engine
            let owned = consume request
            engine.eventLoop.execute { Self.perform(owned, on: engine, completion: completion) }
        }
    }

    /// Maps one volume request onto the engine. Runs on the engine's loop.
    private static func perform(_ request: consuming VolumeRequest, on engine: CacheEngine, completion: @escaping (consuming VolumeReply) -> Void) {
        switch consume request {
        case .read(let offset, let length, let buffer):
            if length == 0 { return completion(.data(buffer)) }
            engine.submitRead(offset: offset, lengthBytes: Int(length), buffer: consume buffer, completion: completion)
        case .write(let offset, let data, let fua):
            if data.readableBytes == 0 { return fua ? engine.submitFlush(completion: completion) : completion(.done) }
            engine.submitWrite(offset: offset, data: data, fua: fua, completion: completion)
        case .flush:
            engine.submitFlush(completion: completion)
        case .trim(let offset, let length, let fua):
            engine.submitDiscard(offset: offset, lengthBytes: UInt64(length), zeroes: false, fua: fua, completion: completion)
        case .writeZeroes(let offset, let length, let flags):
            // Zeroing goes through the log's discard markers and the backing store; whether that is
            // fast depends on the backing store, so a fast-only request is declined.
            if flags.contains(.fastOnly) { return completion(.failed(.notSupported)) }
            engine.submitDiscard(offset: offset, lengthBytes: UInt64(length), zeroes: true, fua: flags.contains(.fua), completion: completion)
        case .cache:
            completion(.done)
        case .blockStatus(let offset, let length, let maximumExtents):
            engine.submitBlockStatus(offset: offset, lengthBytes: length, maximumExtents: maximumExtents, completion: completion)
        }
    }

    private func deliver(_ reply: consuming VolumeReply, tag: UInt32, sink: any VolumeCompletionSink) {
        requestsInFlight -= 1
        sink.volumeRequestCompleted(tag: tag, reply: consume reply)
        // Completions during submit are flushed by the server when its read burst ends; later
        // ones are flushed together once the loop has delivered what is ready.
        guard !isSubmitting else { return }
        burstSink = sink
        guard !burstEndScheduled else { return }
        burstEndScheduled = true
        eventLoop.execute {
            self.burstEndScheduled = false
            self.burstSink?.volumeCompletionBurstEnded()
            self.burstSink = nil
        }
    }

    /// The end of a burst of requests from this connection. In pmem mode the writes of the burst
    /// are persisted here, with one drain, so their replies go out with the server's flush that
    /// follows; a drain scheduled on the engine's loop covers anything that completes later.
    func submitBatch() {
        guard isOnEngineLoop, engine.groupsRepliesPerBurst else { return }
        isSubmitting = true
        engine.persistPendingReplies()
        isSubmitting = false
    }

    func close() {}
}
