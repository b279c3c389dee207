import CLibURing
import Glibc
import NIOCore
import SluiceVolume
import SluiceIO

/// A ``BlockMedium`` on a file or block device, driven through the io_uring of the engine's event
/// loop: the cache device in production, and a backing store that is a local file or device.
/// Must be used only on that loop; completions arrive there.
/// The alignment O_DIRECT needs here: the cache's 4 KiB block.
enum CacheGeometryAlignment {
    static let bytes = 4096
}

public final class UringFileMedium: BlockMedium, IOCompletionHandler {
    public let file: BlockFile
    public var sizeBytes: UInt64 { file.sizeBytes }
    private let driver: IOUringDriver
    private var pending: [UInt64: Pending] = [:]
    private var nextContext: UInt64 = 1
    private let allocator = ByteBufferAllocator()
    /// A second descriptor opened with O_DIRECT, for writes from 4 KiB-aligned memory and for
    /// aligned reads: they skip the page cache (one copy less, no dirty-page throttling for a log
    /// that always writes new space, and reads of data that was never in the page cache complete
    /// in io_uring instead of an io-wq thread). The kernel keeps them coherent with the buffered
    /// descriptor (a direct read first writes back dirty cached pages of its range). -1 where the
    /// file system refuses O_DIRECT.
    private let directFileDescriptor: Int32
    /// Inside ``submittingTogether(_:)``: operations are queued and handed to the kernel at its end.
    private var togetherDepth = 0

    private enum Pending {
        case read((Result<ByteBuffer, MediumError>) -> Void)
        case done((Result<Void, MediumError>) -> Void)
        case discard(offset: UInt64, count: Int, ladder: ZeroingLadder, (Result<Void, MediumError>) -> Void)
    }

    /// Wraps an open file for use on `driver`'s event loop.
    public init(file: BlockFile, driver: IOUringDriver, direct: Bool = false) {
        self.file = file
        self.driver = driver
        directFileDescriptor = direct ? open(file.path, O_RDWR | O_CLOEXEC | sluice_o_direct()) : -1
        pending.reserveCapacity(256)
    }

    /// `SEEK_DATA`/`SEEK_HOLE` on a file (a few metadata calls, inline); a block device says data.
    public func allocation(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping ([BlockStatusExtent]) -> Void) {
        completion(BlockStatusScanner.extents(fileDescriptor: file.fileDescriptor, isBlockDevice: file.isBlockDevice,
                                              offset: offset, lengthBytes: lengthBytes, maximumExtents: maximumExtents))
    }

    deinit {
        if directFileDescriptor >= 0 { close(directFileDescriptor) }
    }

    public func write(offset: UInt64, unownedBytes bytes: UnsafeRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.count) else { return completion(.failure(.outOfRange)) }
        let alignment = UInt(CacheGeometryAlignment.bytes)
        guard directFileDescriptor >= 0, offset % UInt64(alignment) == 0, UInt(bytes.count) % alignment == 0,
              UInt(bitPattern: bytes.baseAddress) % alignment == 0 else {
            return write(offset: offset, bytes: ByteBuffer(bytes: bytes), completion: completion)
        }
        var operation = IOOperation(kind: .write, fileDescriptor: directFileDescriptor, offset: offset, lengthBytes: UInt32(bytes.count))
        operation.unownedBytes = bytes.baseAddress
        // Submitting a direct write can block until the device has room for the request (a busy
        // queue of the engine's reads and writes): an io-wq worker waits for it, not the loop.
        operation.runsOnWorker = true
        start(operation, .done(completion))
    }

    /// Reads through the page cache: blocks read often (cache hits, relocated tails) are served
    /// from memory, as a passthrough volume's are. Coherent with the O_DIRECT segment writes: a
    /// direct write invalidates the cached pages of its range, and the engine never reads a slot
    /// while its segment is being written (those reads come from the segment's buffer). Writeback
    /// batches read O_DIRECT into their own memory instead (``read(offset:into:completion:)``).
    public func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        var buffer = allocator.buffer(capacity: count)
        buffer.reserveCapacity(minimumWritableBytes: count)
        start(IOOperation(kind: .read, fileDescriptor: file.fileDescriptor, offset: offset, lengthBytes: UInt32(count), buffer: buffer),
              .read(completion))
    }

    /// A page-cache hit read with one system call on the loop (RWF_NOWAIT), as a cached block is a
    /// memory copy: no io_uring round trip, no buffer of its own. A miss reads nothing and says so.
    public func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool {
        guard contains(offset: offset, count: bytes.count), let base = bytes.baseAddress else { return false }
        return sluice_pread_nowait(file.fileDescriptor, base, bytes.count, offset) == bytes.count
    }

    public func read(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.count) else { return completion(.failure(.outOfRange)) }
        let alignment = UInt(CacheGeometryAlignment.bytes)
        guard directFileDescriptor >= 0, offset % UInt64(alignment) == 0, UInt(bytes.count) % alignment == 0,
              UInt(bitPattern: bytes.baseAddress) % alignment == 0 else {
            return read(offset: offset, count: bytes.count) { result in
                completion(result.map { buffer in buffer.withUnsafeReadableBytes { bytes.copyMemory(from: $0) } })
            }
        }
        var operation = IOOperation(kind: .read, fileDescriptor: directFileDescriptor, offset: offset, lengthBytes: UInt32(bytes.count))
        operation.unownedBytes = UnsafeRawPointer(bytes.baseAddress)
        start(operation, .done(completion))
    }

    /// Queues every operation `body` starts and hands them to the kernel with one system call.
    public func submittingTogether(_ body: () -> Void) {
        togetherDepth += 1
        body()
        togetherDepth -= 1
        if togetherDepth == 0 { driver.ring.submit() }
    }

    public func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.readableBytes) else { return completion(.failure(.outOfRange)) }
        start(IOOperation(kind: .write, fileDescriptor: file.fileDescriptor, offset: offset, lengthBytes: UInt32(bytes.readableBytes),
                          buffer: bytes), .done(completion))
    }

    public func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        let ladder = ZeroingLadder(zeroes ? .zeroes : .trim)
        perform(ladder.firstAction(), ladder, offset: offset, count: count, completion: completion)
    }

    /// One step of the ``ZeroingLadder``.
    private func perform(_ action: ZeroingLadder.Action, _ ladder: ZeroingLadder, offset: UInt64, count: Int,
                         completion: @escaping (Result<Void, MediumError>) -> Void) {
        switch action {
        case .fallocate(let mode):
            start(IOOperation(kind: .fallocate, fileDescriptor: file.fileDescriptor, offset: offset, lengthBytes: UInt32(count), mode: mode),
                  .discard(offset: offset, count: count, ladder: ladder, completion))
        case .writeZeros:
            // The last rung: its result is the request's.
            writeZeros(offset: offset, count: count, completion: completion)
        case .succeeded: completion(.success(()))
        case .failed(let code): completion(.failure(.inputOutput(errno: code)))
        }
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        start(IOOperation(kind: .syncData, fileDescriptor: file.fileDescriptor), .done(completion))
    }

    private func start(_ operation: IOOperation, _ entry: Pending) {
        driver.eventLoop.preconditionInEventLoop()
        var operation = operation
        operation.context = nextContext
        pending[nextContext] = entry
        nextContext += 1
        driver.ring.enqueue(operation, handler: self)
        if togetherDepth == 0 { driver.ring.submit() }
    }

    public func ioCompleted(_ operation: IOOperation, result: Int32) {
        guard let entry = pending.removeValue(forKey: operation.context) else {
            preconditionFailure("io_uring completion for an operation this medium did not start")
        }
        switch entry {
        case .read(let completion):
            if result < 0 { return completion(.failure(.inputOutput(errno: -result))) }
            completion(.success(operation.buffer!))
        case .done(let completion):
            completion(result < 0 ? .failure(.inputOutput(errno: -result)) : .success(()))
        case .discard(let offset, let count, var ladder, let completion):
            let next = ladder.fallocateCompleted(result: result)
            perform(next, ladder, offset: offset, count: count, completion: completion)
        }
    }

    public func ioBurstEnded() {}
}
