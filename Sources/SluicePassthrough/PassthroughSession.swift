import CLibURing
import Glibc
import NIOCore
import SluiceIO
import SluiceVolume

/// One client's session on a ``PassthroughVolume``, confined to one event loop and its io_uring.
///
/// Most requests are one io_uring operation. Write-zeroes and trim may take several steps (a
/// fallocate, a fallback, then a sync for force-unit-access), which run one after another inside
/// the same pending request.
final class PassthroughSession: VolumeSession, IOCompletionHandler {
    private let volume: PassthroughVolume
    private let driver: IOUringDriver
    private let fileDescriptor: Int32
    private let policy: InlineIOPolicy
    private var pending: [PendingRequest] = []
    private var freePending: [UInt32] = []
    private var needsSubmit = false
    private var sinksInBurst: [any VolumeCompletionSink] = []
    private var sinksBeingNotified: [any VolumeCompletionSink] = []
    private(set) var requestsInFlight = 0

    /// A run of zeros that zero-filling writes come from. Shared and never written to.
    private static let zeroBuffer = ByteBuffer(repeating: 0, count: zeroChunkBytes)
    private static let zeroChunkBytes = 1 << 20

    /// Where a multi-step request stands.
    private enum Step: UInt8 {
        case single
        /// A `fallocate` of the request's ``ZeroingLadder``.
        case ladder
        /// The ladder's zero-filling writes, a chunk at a time.
        case zeroWrite
        case syncAfter
    }

    private struct PendingRequest {
        var tag: UInt32 = 0
        var sink: (any VolumeCompletionSink)?
        var step: Step = .single
        var offset: UInt64 = 0
        var lengthBytes: UInt32 = 0
        /// Bytes already zeroed by a zero-filling write.
        var doneBytes: UInt32 = 0
        var zeroFlags: WriteZeroesFlags = []
        var ladder = ZeroingLadder(.trim)
        var syncAfter = false
    }

    init(volume: PassthroughVolume, driver: IOUringDriver) {
        self.volume = volume
        self.driver = driver
        self.fileDescriptor = volume.file.fileDescriptor
        self.policy = volume.inlinePolicy
        pending.reserveCapacity(64)
        freePending.reserveCapacity(64)
    }

    func submit(_ request: consuming VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink) {
        driver.eventLoop.preconditionInEventLoop()
        if let range = request.range {
            let (end, overflow) = range.offset.addingReportingOverflow(range.lengthBytes)
            guard !overflow, end <= volume.sizeBytes else {
                sink.volumeRequestCompleted(tag: tag, reply: .failed(.outOfRange))
                return
            }
        }
        if request.isWrite && volume.file.isReadOnly {
            sink.volumeRequestCompleted(tag: tag, reply: .failed(.readOnly))
            return
        }
        // Consumed: a read's buffer is uniquely owned here, so it is filled in place.
        switch consume request {
        case .read(let offset, let length, var buffer):
            if length == 0 {
                sink.volumeRequestCompleted(tag: tag, reply: .data(buffer))
                return
            }
            buffer.reserveCapacity(minimumWritableBytes: Int(length))
            if policy.inlineReads {
                let result = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { bytes in
                    let status = BlockingIO.read(
                        fileDescriptor: fileDescriptor, bytes: UnsafeMutableRawBufferPointer(rebasing: bytes[0..<Int(length)]),
                        offset: offset)
                    return status == 0 ? Int(length) : 0
                }
                sink.volumeRequestCompleted(tag: tag, reply: result == Int(length) ? .data(buffer) : .failed(.io(errno: EIO)))
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            enqueue(IOOperation(kind: .read, fileDescriptor: fileDescriptor, offset: offset, lengthBytes: length,
                                buffer: buffer, context: UInt64(index)))
        case .write(let offset, let data, let fua):
            if data.readableBytes == 0 {
                sink.volumeRequestCompleted(tag: tag, reply: .done)
                return
            }
            if fua ? policy.inlineDurableOperations : policy.inlinePlainWrites {
                let status = data.withUnsafeReadableBytes {
                    BlockingIO.write(fileDescriptor: fileDescriptor, bytes: $0, offset: offset)
                }
                sink.volumeRequestCompleted(tag: tag, reply: status == 0 ? .done : .failed(VolumeError(errno: status)))
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            enqueue(IOOperation(kind: .write, fileDescriptor: fileDescriptor, offset: offset,
                                lengthBytes: UInt32(data.readableBytes), buffer: data,
                                readWriteFlags: fua ? Int32(RWF_DSYNC) : 0, context: UInt64(index)))
        case .flush:
            if policy.inlineDurableOperations {
                let status = fdatasync(fileDescriptor) == 0 ? 0 : errno
                sink.volumeRequestCompleted(tag: tag, reply: status == 0 ? .done : .failed(VolumeError(errno: status)))
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            enqueue(IOOperation(kind: .syncData, fileDescriptor: fileDescriptor, context: UInt64(index)))
        case .trim(let offset, let length, let fua):
            if length == 0 {
                sink.volumeRequestCompleted(tag: tag, reply: .done)
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            pending[Int(index)].offset = offset
            pending[Int(index)].lengthBytes = length
            pending[Int(index)].syncAfter = fua
            startLadder(.trim, index: index)
        case .writeZeroes(let offset, let length, let flags):
            if length == 0 {
                sink.volumeRequestCompleted(tag: tag, reply: .done)
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            pending[Int(index)].offset = offset
            pending[Int(index)].lengthBytes = length
            pending[Int(index)].zeroFlags = flags
            pending[Int(index)].syncAfter = flags.contains(.fua)
            startLadder(flags.contains(.noHole) ? .zeroesKeepingAllocation : .zeroes, index: index)
        case .cache(let offset, let length):
            if length == 0 {
                sink.volumeRequestCompleted(tag: tag, reply: .done)
                return
            }
            let index = beginRequest(tag: tag, sink: sink)
            enqueue(IOOperation(kind: .fadvise, fileDescriptor: fileDescriptor, offset: offset, lengthBytes: length,
                                mode: POSIX_FADV_WILLNEED, context: UInt64(index)))
        case .blockStatus(let offset, let length, let maximumExtents):
            guard length > 0 else {
                sink.volumeRequestCompleted(tag: tag, reply: .failed(.invalid))
                return
            }
            let extents = BlockStatusScanner.extents(
                fileDescriptor: fileDescriptor, isBlockDevice: volume.file.isBlockDevice,
                offset: offset, lengthBytes: length, maximumExtents: max(1, maximumExtents))
            sink.volumeRequestCompleted(tag: tag, reply: .extents(extents))
        }
    }

    func submitBatch() {
        if needsSubmit {
            needsSubmit = false
            driver.ring.submit()
        }
    }

    func close() {
        // Requests still in flight complete and are delivered; nothing else holds resources.
    }

    // MARK: - Completions

    func ioCompleted(_ operation: IOOperation, result: Int32) {
        let index = UInt32(truncatingIfNeeded: operation.context)
        precondition(Int(index) < pending.count && pending[Int(index)].sink != nil, "completion for an unknown request")
        let request = pending[Int(index)]
        switch request.step {
        case .single:
            if result < 0 {
                finish(index: index, reply: .failed(VolumeError(errno: -result)))
            } else if operation.kind == .read {
                finish(index: index, reply: .data(operation.buffer!))
            } else {
                finish(index: index, reply: .done)
            }
        case .ladder:
            let next = pending[Int(index)].ladder.fallocateCompleted(result: result)
            climb(next, index: index, fromCompletion: true)
        case .zeroWrite:
            if result >= 0 {
                pending[Int(index)].doneBytes += operation.lengthBytes
                if pending[Int(index)].doneBytes < request.lengthBytes { return enqueueZeroWriteChunk(index: index) }
            }
            let next = pending[Int(index)].ladder.zerosWritten(result: result)
            climb(next, index: index, fromCompletion: true)
        case .syncAfter:
            if result < 0 {
                finish(index: index, reply: .failed(VolumeError(errno: -result)))
            } else {
                finish(index: index, reply: .done)
            }
        }
    }

    func ioBurstEnded() {
        guard !sinksInBurst.isEmpty else { return }
        swap(&sinksInBurst, &sinksBeingNotified)
        for sink in sinksBeingNotified {
            sink.volumeCompletionBurstEnded()
        }
        sinksBeingNotified.removeAll(keepingCapacity: true)
    }

    // MARK: - Steps

    private func startLadder(_ purpose: ZeroingLadder.Purpose, index: UInt32) {
        pending[Int(index)].ladder = ZeroingLadder(purpose)
        climb(pending[Int(index)].ladder.firstAction(), index: index, fromCompletion: false)
    }

    /// Takes the ladder's next step. The first fallocate goes to the kernel with the rest of the
    /// batch; a later one, from a completion, at once.
    private func climb(_ action: ZeroingLadder.Action, index: UInt32, fromCompletion: Bool) {
        switch action {
        case .fallocate(let mode):
            pending[Int(index)].step = .ladder
            let request = pending[Int(index)]
            enqueue(IOOperation(kind: .fallocate, fileDescriptor: fileDescriptor, offset: request.offset,
                                lengthBytes: request.lengthBytes, mode: mode, context: UInt64(index)))
            if fromCompletion { submitBatch() }
        case .writeZeros: startZeroWrite(index: index)
        case .succeeded: finishOrSync(index: index)
        case .failed(let code): finish(index: index, reply: .failed(VolumeError(errno: code)))
        }
    }

    private func startZeroWrite(index: UInt32) {
        if pending[Int(index)].zeroFlags.contains(.fastOnly) {
            finish(index: index, reply: .failed(.notSupported))
            return
        }
        pending[Int(index)].step = .zeroWrite
        pending[Int(index)].doneBytes = 0
        enqueueZeroWriteChunk(index: index)
    }

    private func enqueueZeroWriteChunk(index: UInt32) {
        let request = pending[Int(index)]
        let chunk = min(UInt32(Self.zeroChunkBytes), request.lengthBytes - request.doneBytes)
        enqueue(IOOperation(kind: .write, fileDescriptor: fileDescriptor, offset: request.offset + UInt64(request.doneBytes),
                            lengthBytes: chunk, buffer: Self.zeroBuffer, context: UInt64(index)))
        submitBatch()
    }

    private func finishOrSync(index: UInt32) {
        if pending[Int(index)].syncAfter {
            pending[Int(index)].step = .syncAfter
            enqueue(IOOperation(kind: .syncData, fileDescriptor: fileDescriptor, context: UInt64(index)))
            submitBatch()
        } else {
            finish(index: index, reply: .done)
        }
    }

    private func enqueue(_ operation: IOOperation) {
        driver.ring.enqueue(operation, handler: self)
        needsSubmit = true
    }

    private func beginRequest(tag: UInt32, sink: any VolumeCompletionSink) -> UInt32 {
        requestsInFlight += 1
        volume.requestsInFlight.wrappingIncrement(ordering: .relaxed)
        let request = PendingRequest(tag: tag, sink: sink)
        if let free = freePending.popLast() {
            pending[Int(free)] = request
            return free
        }
        pending.append(request)
        return UInt32(pending.count - 1)
    }

    private func finish(index: UInt32, reply: VolumeReply) {
        let request = pending[Int(index)]
        pending[Int(index)] = PendingRequest()
        freePending.append(index)
        requestsInFlight -= 1
        volume.requestsInFlight.wrappingDecrement(ordering: .releasing)
        let sink = request.sink!
        if !sinksInBurst.contains(where: { $0 === sink }) {
            sinksInBurst.append(sink)
        }
        sink.volumeRequestCompleted(tag: request.tag, reply: reply)
    }
}
