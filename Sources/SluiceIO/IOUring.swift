import CLibURing
import Glibc
import NIOCore

/// An io_uring instance owned by one thread (one event loop).
///
/// Submissions are queued by ``enqueue(_:handler:)`` and pushed to the kernel by ``submit()``;
/// completions are collected by ``reapCompletions()``, which the owning ``IOUringDriver`` calls
/// after every submit and whenever the ring's eventfd fires. Operations live in a slot table that
/// is reused, so a steady stream of requests allocates nothing here.
public final class IOUring {
    private let ring: UnsafeMutablePointer<io_uring>
    private var slots: [Slot]
    private var freeSlots: [UInt32]
    private var unsubmittedCount = 0
    private var handlersInBurst: [IOCompletionHandler] = []
    private var handlersBeingNotified: [IOCompletionHandler] = []
    private var isReaping = false
    private var needsAnotherReapPass = false
    private var isClosed = false
    /// Called when the kernel refuses submissions for lack of resources and nothing can be reaped to
    /// make room: the owner retries ``submit()`` a little later instead of spinning.
    public var retrySubmissionLater: (() -> Void)?
    /// The eventfd the kernel signals when an operation completes.
    public let eventFileDescriptor: Int32

    /// The number of operations queued or submitted and not yet completed.
    public private(set) var operationsInFlight = 0

    /// The most reap passes one call makes before it must have drained the ring: a loop that runs
    /// this long means an owner resubmits forever from its completion handler, which is a bug.
    private static let reapPassesMax = 1 << 20

    private struct Slot {
        var operation: IOOperation?
        /// The buffer the kernel reads from or writes to, held apart from `operation` so that it
        /// is uniquely referenced when the ring moves its writer index after a read.
        var buffer: ByteBuffer?
        /// The first byte of the transfer inside `buffer`.
        var basePointer: UnsafeMutableRawPointer?
        var handler: IOCompletionHandler?
        /// Bytes already transferred of a read or write the kernel did in parts.
        var transferredBytes: UInt32 = 0
    }

    /// Creates a ring with room for `entries` submissions at once.
    public init(entries: UInt32 = 256) throws {
        self.ring = .allocate(capacity: 1)
        self.ring.initialize(to: io_uring())
        var parameters = io_uring_params()
        // Completions may outnumber the submission queue when many requests are in flight; the
        // completion queue is made larger so it does not overflow into the kernel's backlog.
        parameters.flags = UInt32(IORING_SETUP_CQSIZE)
        parameters.cq_entries = entries * 8
        let status = io_uring_queue_init_params(entries, ring, &parameters)
        guard status == 0 else {
            ring.deallocate()
            throw IOUringError.setupFailed(errno: -status)
        }
        let eventFileDescriptor = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard eventFileDescriptor >= 0 else {
            let code = errno
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw IOUringError.setupFailed(errno: code)
        }
        // Every completion signals the eventfd. (The "async only" registration would miss buffered
        // reads that finish through task work on this thread rather than in an io-wq worker, and a
        // client waiting on such a read would wait until something else woke the loop.)
        let registered = io_uring_register_eventfd(ring, eventFileDescriptor)
        guard registered == 0 else {
            close(eventFileDescriptor)
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw IOUringError.setupFailed(errno: -registered)
        }
        self.eventFileDescriptor = eventFileDescriptor
        self.slots = []
        self.freeSlots = []
        self.slots.reserveCapacity(Int(entries))
        self.freeSlots.reserveCapacity(Int(entries))
        self.handlersInBurst.reserveCapacity(64)
        self.handlersBeingNotified.reserveCapacity(64)
    }

    deinit {
        if !isClosed {
            io_uring_queue_exit(ring)
        }
        ring.deallocate()
    }

    /// Releases the kernel ring, unless operations are still in flight: then the kernel may still
    /// write into their buffers, so the ring is left alone (it is freed with the process).
    /// The eventfd belongs to whoever registered it with the event loop.
    @discardableResult
    public func shutdown() -> Bool {
        guard operationsInFlight == 0 else { return false }
        defer { isClosed = true }
        if !isClosed {
            io_uring_queue_exit(ring)
        }
        return true
    }

    /// Queues `operation`; its completion goes to `handler`. Call ``submit()`` to start it.
    ///
    /// A read's buffer must have `lengthBytes` writable bytes reserved. Hand over the only reference
    /// to it where you can: a shared buffer is copied once here so that the ring's copy is unique.
    public func enqueue(_ operation: IOOperation, handler: IOCompletionHandler) {
        precondition(!isClosed, "enqueue on a closed io_uring")
        var operation = operation
        var buffer = operation.buffer
        operation.buffer = nil
        var basePointer: UnsafeMutableRawPointer? = nil
        switch operation.kind {
        case .read:
            if buffer == nil, let unowned = operation.unownedBytes {
                basePointer = UnsafeMutableRawPointer(mutating: unowned)
                break
            }
            precondition(buffer != nil, "an io_uring read needs a buffer or unowned memory")
            precondition(buffer!.writableBytes >= Int(operation.lengthBytes), "an io_uring read buffer is too small")
            // The read-only view of the whole storage skips copy-on-write (the mutable one does
            // not: it would copy the storage whenever the caller still holds a reference, which it
            // usually does for a moment, and move the data away from an alignment the caller
            // chose for O_DIRECT). Copying a read buffer of up to 32 MiB would cost more than the
            // read, and nothing else writes to the storage while the kernel fills it.
            let writerIndex = buffer!.writerIndex
            basePointer = buffer!.withVeryUnsafeBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress!) + writerIndex }
        case .write:
            if buffer == nil, let unowned = operation.unownedBytes {
                basePointer = UnsafeMutableRawPointer(mutating: unowned)
            } else {
                precondition(buffer != nil, "an io_uring write needs a buffer")
                precondition(buffer!.readableBytes >= Int(operation.lengthBytes), "an io_uring write buffer is too small")
                basePointer = buffer!.withUnsafeReadableBytes { UnsafeMutableRawPointer(mutating: $0.baseAddress) }
            }
        case .syncData, .fallocate, .fadvise:
            break
        }
        let slot = Slot(operation: operation, buffer: buffer, basePointer: basePointer, handler: handler)
        buffer = nil
        let index: UInt32
        if let free = freeSlots.popLast() {
            index = free
            slots[Int(index)] = slot
        } else {
            index = UInt32(slots.count)
            slots.append(slot)
        }
        operationsInFlight += 1
        prepare(slotIndex: index)
    }

    /// Pushes every queued operation to the kernel, then delivers the completions that are ready.
    public func submit() {
        if unsubmittedCount > 0 {
            submitToKernel()
        }
        reapCompletions()
    }

    private func submitToKernel() {
        var attempts = 0
        while unsubmittedCount > 0 {
            let submitted = io_uring_submit(ring)
            if submitted > 0 {
                unsubmittedCount = max(0, unsubmittedCount - Int(submitted))
            } else if submitted == 0 {
                unsubmittedCount = 0
            } else if submitted == -EINTR {
                continue
            } else if submitted == -EAGAIN || submitted == -EBUSY {
                // The kernel is short of resources or the completion queue is full. Delivering
                // completions makes room; if there are none, try again later rather than spin.
                attempts += 1
                if reapOnce() == 0 || attempts > 64 {
                    retrySubmissionLater?()
                    return
                }
            } else {
                // The ring itself is broken (for example -EBADF after teardown): nothing queued can
                // ever complete, which would lose replies silently. Stop loudly.
                preconditionFailure("io_uring_submit failed: \(submitted)")
            }
        }
    }

    /// Delivers every completion the kernel has posted, then tells each handler that was given one
    /// that the burst is over.
    public func reapCompletions() {
        guard !isReaping else {
            // A handler submitted from inside a completion: the outer pass picks its results up.
            needsAnotherReapPass = true
            return
        }
        isReaping = true
        var passes = 0
        repeat {
            needsAnotherReapPass = false
            while reapOnce() > 0 {
                if unsubmittedCount > 0 { submitToKernel() }
                passes += 1
                precondition(passes < Self.reapPassesMax, "io_uring reap loop did not terminate")
            }
            if !handlersInBurst.isEmpty {
                swap(&handlersInBurst, &handlersBeingNotified)
                for handler in handlersBeingNotified {
                    handler.ioBurstEnded()
                }
                handlersBeingNotified.removeAll(keepingCapacity: true)
            }
            if unsubmittedCount > 0 {
                submitToKernel()
                needsAnotherReapPass = true
            }
            passes += 1
            precondition(passes < Self.reapPassesMax, "io_uring reap loop did not terminate")
        } while needsAnotherReapPass
        isReaping = false
    }

    @discardableResult
    private func reapOnce() -> Int {
        var reaped = 0
        var cqe: UnsafeMutablePointer<io_uring_cqe>? = nil
        while io_uring_peek_cqe(ring, &cqe) == 0, let entry = cqe {
            let index = UInt32(truncatingIfNeeded: entry.pointee.user_data)
            let result = entry.pointee.res
            io_uring_cqe_seen(ring, entry)
            reaped += 1
            complete(slotIndex: index, result: result)
        }
        return reaped
    }

    private func complete(slotIndex index: UInt32, result: Int32) {
        precondition(Int(index) < slots.count, "io_uring completion for an unknown slot \(index)")
        precondition(slots[Int(index)].operation != nil, "io_uring completion for a free slot \(index)")
        let kind = slots[Int(index)].operation!.kind
        let lengthBytes = slots[Int(index)].operation!.lengthBytes
        var finalResult = result
        if kind == .read || kind == .write {
            if result > 0 {
                let transferred = slots[Int(index)].transferredBytes + UInt32(result)
                precondition(transferred <= lengthBytes, "io_uring transferred more than asked")
                slots[Int(index)].transferredBytes = transferred
                if transferred < lengthBytes {
                    // A partial transfer: continue where the kernel stopped.
                    prepare(slotIndex: index)
                    return
                }
                finalResult = Int32(bitPattern: lengthBytes)
            } else if result == 0 && lengthBytes > 0 {
                // End of file, or a device that accepts nothing: never loop on it.
                finalResult = -EIO
            }
        }
        var operation = slots[Int(index)].operation!
        var buffer = slots[Int(index)].buffer
        let handler = slots[Int(index)].handler!
        slots[Int(index)] = Slot()
        freeSlots.append(index)
        operationsInFlight -= 1
        if kind == .read && finalResult >= 0, buffer != nil {
            buffer!.moveWriterIndex(forwardBy: Int(lengthBytes))
        }
        operation.buffer = buffer
        buffer = nil
        if !handlersInBurst.contains(where: { $0 === handler }) {
            handlersInBurst.append(handler)
        }
        handler.ioCompleted(operation, result: finalResult)
    }

    private func nextSubmissionEntry() -> UnsafeMutablePointer<io_uring_sqe> {
        // The submission queue holds only entries not yet handed to the kernel; handing them over
        // frees it. Under memory pressure that can take a few attempts.
        for _ in 0..<1000 {
            if let entry = io_uring_get_sqe(ring) { return entry }
            submitToKernel()
            if let entry = io_uring_get_sqe(ring) { return entry }
            reapOnce()
            usleep(100)
        }
        preconditionFailure("io_uring submission queue stays full")
    }

    private func prepare(slotIndex index: UInt32) {
        let entry = nextSubmissionEntry()
        let slot = slots[Int(index)]
        let operation = slot.operation!
        let transferred = slot.transferredBytes
        let remaining = operation.lengthBytes - transferred
        let offset = operation.offset + UInt64(transferred)
        switch operation.kind {
        case .read:
            io_uring_prep_read(entry, operation.fileDescriptor, slot.basePointer! + Int(transferred), remaining, offset)
            entry.pointee.rw_flags = operation.readWriteFlags
        case .write:
            io_uring_prep_write(entry, operation.fileDescriptor, slot.basePointer! + Int(transferred), remaining, offset)
            entry.pointee.rw_flags = operation.readWriteFlags
        case .syncData:
            io_uring_prep_fsync(entry, operation.fileDescriptor, UInt32(IORING_FSYNC_DATASYNC))
        case .fallocate:
            io_uring_prep_fallocate(entry, operation.fileDescriptor, operation.mode, off_t(offset), off_t(remaining))
        case .fadvise:
            io_uring_prep_fadvise(entry, operation.fileDescriptor, offset, off_t(remaining), operation.mode)
        }
        entry.pointee.user_data = UInt64(index)
        if operation.runsOnWorker { entry.pointee.flags |= UInt8(1 << IOSQE_ASYNC_BIT) }
        unsubmittedCount += 1
    }
}

/// Failures setting up io_uring.
public enum IOUringError: Error, CustomStringConvertible {
    case setupFailed(errno: Int32)

    public var description: String {
        switch self {
        case .setupFailed(let code):
            return "io_uring could not be set up: \(String(cString: strerror(code))) (errno \(code))"
        }
    }
}
