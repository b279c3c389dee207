@_implementationOnly import CLibNBD
import CLibURing
import Foundation
import Glibc
import NIOConcurrencyHelpers
import NIOCore

/// A ``BlockMedium`` on a remote NBD export (`nbd://…`, `nbd+unix://…`) through libnbd's
/// asynchronous API, so a cache can sit in front of a network disk with many requests in flight.
///
/// Requests are issued from the engine's loop; one thread of its own waits on the connection's
/// socket, tells libnbd what became ready, and hands each finished command back to the engine's
/// loop. An eventfd wakes that thread when a new command needs the socket.
public final class NBDMedium: BlockMedium, @unchecked Sendable {
    public let uri: String
    public let sizeBytes: UInt64
    private let handle: OpaquePointer
    private let eventLoop: any EventLoop
    private let wakeFileDescriptor: Int32
    private let lock = NIOLock()
    private var pending: [Int64: Pending] = [:]
    private var isStopping = false
    private var pollThread: Thread?
    private let stopped = DispatchSemaphore(value: 0)
    private let canFlush: Bool
    /// The operator's word that the export's writes are durable once acknowledged, so it is
    /// accepted although it does not advertise flush.
    public let durableOnAcknowledgement: Bool
    private let canTrim: Bool
    private let canZero: Bool

    private enum Pending {
        case read(ByteBuffer, Int, (Result<ByteBuffer, MediumError>) -> Void)
        case write(ByteBuffer, (Result<Void, MediumError>) -> Void)
        case done((Result<Void, MediumError>) -> Void)
    }

    /// A connection could not be made or the export is unusable.
    public struct ConnectionError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Connects to `uri` (blocking) and starts the connection's thread. An export that does not
    /// advertise flush is refused unless `durableOnAcknowledgement` says its acknowledged writes
    /// are durable: writeback marks blocks clean, and reuses their segments, only after syncing
    /// the backing store, and without flush that sync would promise what nothing guarantees.
    public init(uri: String, eventLoop: any EventLoop, durableOnAcknowledgement: Bool = false) throws {
        guard let handle = nbd_create() else { throw ConnectionError(description: "libnbd could not create a handle") }
        self.uri = uri
        self.handle = handle
        self.eventLoop = eventLoop
        if nbd_connect_uri(handle, uri) < 0 {
            let message = String(cString: nbd_get_error())
            nbd_close(handle)
            throw ConnectionError(description: "cannot connect to the backing export \(uri): \(message)")
        }
        let size = nbd_get_size(handle)
        guard size > 0 else {
            nbd_close(handle)
            throw ConnectionError(description: "the backing export \(uri) reports no size")
        }
        guard nbd_is_read_only(handle) != 1 else {
            nbd_close(handle)
            throw ConnectionError(description: "the backing export \(uri) is read-only; a write-back cache needs to write to it")
        }
        canFlush = nbd_can_flush(handle) == 1
        guard canFlush || durableOnAcknowledgement else {
            nbd_close(handle)
            throw ConnectionError(description: Self.cannotFlushMessage(uri: uri))
        }
        sizeBytes = UInt64(size)
        self.durableOnAcknowledgement = durableOnAcknowledgement
        canTrim = nbd_can_trim(handle) == 1
        canZero = nbd_can_zero(handle) == 1
        wakeFileDescriptor = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        precondition(wakeFileDescriptor >= 0, "eventfd failed")
        let thread = Thread { [unowned self] in self.pollLoop() }
        thread.name = "sluice-nbd-backing"
        pollThread = thread
        thread.start()
    }

    /// Whether the export honours flush. Without it nothing written back can be made durable,
    /// unless its writes are durable once acknowledged.
    public var supportsFlush: Bool { canFlush }

    /// Why an export without flush is refused, and the two ways out.
    static func cannotFlushMessage(uri: String) -> String {
        "the backing export \(uri) does not advertise flush, so Sluice cannot make written-back data durable "
            + "before it marks it clean and reuses its place in the cache: a crash of the export's server could lose it. "
            + "Serve it from an NBD server that supports flush, or, only if every write it acknowledges is already durable "
            + "(a server with no volatile write cache), say so with --backing-durable-on-ack"
    }

    /// Stops the connection's thread and disconnects. Every command must have completed.
    public func close() {
        lock.withLock { isStopping = true }
        wake()
        stopped.wait()
        nbd_shutdown(handle, 0)
        nbd_close(handle)
        Glibc.close(wakeFileDescriptor)
    }

    public func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        let base = buffer.withVeryUnsafeMutableBytes { $0.baseAddress! }
        issue(.read(buffer, count, completion)) { callback in
            nbd_aio_pread(self.handle, base, count, offset, callback, 0)
        }
        buffer = ByteBuffer()
    }

    public func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.readableBytes) else { return completion(.failure(.outOfRange)) }
        // The buffer is kept in the pending entry until the command completes, so its storage stays put.
        let base = bytes.withUnsafeReadableBytes { $0.baseAddress! }
        let count = bytes.readableBytes
        issue(.write(bytes, completion)) { callback in
            nbd_aio_pwrite(self.handle, base, count, offset, callback, 0)
        }
    }

    /// Writes straight from the caller's memory, which stays valid until the completion.
    public func write(offset: UInt64, unownedBytes bytes: UnsafeRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.count) else { return completion(.failure(.outOfRange)) }
        let base = bytes.baseAddress!
        let count = bytes.count
        issue(.done(completion)) { callback in
            nbd_aio_pwrite(self.handle, base, count, offset, callback, 0)
        }
    }

    public func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        if zeroes {
            guard canZero else { return writeZeros(offset: offset, count: count, completion: completion) }
            issue(.done(completion)) { callback in nbd_aio_zero(self.handle, UInt64(count), offset, callback, 0) }
        } else {
            guard canTrim else { return completion(.success(())) }
            issue(.done(completion)) { callback in nbd_aio_trim(self.handle, UInt64(count), offset, callback, 0) }
        }
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard canFlush else {
            // Only an export declared durable on acknowledgement gets here (init refuses the rest):
            // every write it acknowledged is already durable, so there is nothing to sync.
            precondition(durableOnAcknowledgement, "an export without flush was accepted without --backing-durable-on-ack")
            return completion(.success(()))
        }
        issue(.done(completion)) { callback in nbd_aio_flush(self.handle, callback, 0) }
    }

    /// Starts a command under the lock, so the poll thread cannot retire it before it is recorded.
    private func issue(_ entry: Pending, _ start: (nbd_completion_callback) -> Int64) {
        let cookie: Int64 = lock.withLock {
            let cookie = start(nbd_completion_callback(callback: nil, user_data: nil, free: nil))
            if cookie > 0 { pending[cookie] = entry }
            return cookie
        }
        guard cookie > 0 else {
            let code = nbd_get_errno()
            let message = String(cString: nbd_get_error())
            complete(entry, status: -1, errno: code == 0 ? 5 : code, message: message)
            return
        }
        wake()
    }

    private func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFileDescriptor, &one, 8)
    }

    /// The connection's thread: waits for the socket or a wake-up, lets libnbd make progress, and
    /// retires finished commands.
    private func pollLoop() {
        let socket = nbd_aio_get_fd(handle)
        var descriptors = [pollfd](repeating: pollfd(), count: 2)
        while true {
            if lock.withLock({ isStopping && pending.isEmpty }) { break }
            let direction = nbd_aio_get_direction(handle)
            var events: Int16 = 0
            if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
            if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
            descriptors[0] = pollfd(fd: socket, events: events, revents: 0)
            descriptors[1] = pollfd(fd: wakeFileDescriptor, events: Int16(POLLIN), revents: 0)
            let ready = poll(&descriptors, 2, 1000)
            if ready < 0 && errno != EINTR { break }
            if descriptors[1].revents & Int16(POLLIN) != 0 {
                var counter: UInt64 = 0
                _ = Glibc.read(wakeFileDescriptor, &counter, 8)
            }
            let socketEvents = descriptors[0].revents
            if socketEvents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { nbd_aio_notify_read(handle) }
            if socketEvents & Int16(POLLOUT) != 0 { nbd_aio_notify_write(handle) }
            retireFinished()
            if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 {
                failAll(message: "the connection to the backing export \(uri) was lost")
                if lock.withLock({ isStopping }) { break }
                usleep(100_000)
            }
        }
        stopped.signal()
    }

    private func retireFinished() {
        var finished: [(Pending, Int32, Int32, String)] = []
        lock.withLock {
            while true {
                let cookie = nbd_aio_peek_command_completed(handle)
                guard cookie > 0 else { break }
                let status = nbd_aio_command_completed(handle, UInt64(cookie))
                let code = status < 0 ? nbd_get_errno() : 0
                let message = status < 0 ? String(cString: nbd_get_error()) : ""
                if let entry = pending.removeValue(forKey: cookie) { finished.append((entry, status, code, message)) }
            }
        }
        for (entry, status, code, message) in finished {
            complete(entry, status: status, errno: code, message: message)
        }
    }

    private func failAll(message: String) {
        let entries: [Pending] = lock.withLock {
            let all = Array(pending.values)
            pending.removeAll()
            return all
        }
        for entry in entries { complete(entry, status: -1, errno: 5, message: message) }
    }

    /// Hands a finished command to the engine's loop.
    private func complete(_ entry: Pending, status: Int32, errno code: Int32, message: String) {
        let error = MediumError.inputOutput(errno: code == 0 ? 5 : code)
        eventLoop.execute {
            switch entry {
            case .read(var buffer, let count, let completion):
                guard status >= 0 else { return completion(.failure(error)) }
                buffer.moveWriterIndex(forwardBy: count)
                completion(.success(buffer))
            case .write(_, let completion), .done(let completion):
                completion(status >= 0 ? .success(()) : .failure(error))
            }
        }
    }
}
