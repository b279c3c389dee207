import CLibURing
import Glibc
import NIOCore
import SluiceIO

/// A ``BlockMedium`` on a file or block device with plain blocking system calls. For tools that
/// run without a server (format, check, drain) and for tests on real files; the serving engine
/// drives its media through io_uring instead. Completions run before each call returns.
public final class FileMedium: BlockMedium {
    public let path: String
    public let sizeBytes: UInt64
    private let fileDescriptor: Int32
    /// Keeps an opened (and locked) file open while this medium uses its descriptor.
    private let owner: BlockFile?
    private let ownsDescriptor: Bool
    /// A second descriptor opened with O_DIRECT, for recovery's scan of the ring into 4 KiB-aligned
    /// buffers: gigabytes read once skip the page cache (one copy less, and nothing of the cache
    /// evicted for them). The kernel writes dirty cached pages of a range back before a direct
    /// read of it, so these reads see every earlier write. -1 where the file system refuses O_DIRECT.
    private let directReadDescriptor: Int32

    /// Uses an open file (its lock stays with it).
    public init(file: BlockFile) {
        path = file.path
        sizeBytes = file.sizeBytes
        fileDescriptor = file.fileDescriptor
        owner = file
        ownsDescriptor = false
        directReadDescriptor = Self.openDirect(descriptor: file.fileDescriptor)
    }

    /// Opens `path` read-write; creates nothing.
    public init(path: String) throws {
        self.path = path
        let descriptor = open(path, O_RDWR | O_CLOEXEC)
        guard descriptor >= 0 else { throw MediumError.inputOutput(errno: errno) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else {
            let code = errno
            close(descriptor)
            throw MediumError.inputOutput(errno: code)
        }
        var size = UInt64(status.st_size)
        if (status.st_mode & S_IFMT) == S_IFBLK {
            guard ioctl(descriptor, BlockingIO.blockDeviceSizeRequest, &size) == 0 else {
                let code = errno
                close(descriptor)
                throw MediumError.inputOutput(errno: code)
            }
        }
        fileDescriptor = descriptor
        sizeBytes = size
        owner = nil
        ownsDescriptor = true
        directReadDescriptor = Self.openDirect(descriptor: descriptor)
    }

    deinit {
        if ownsDescriptor { close(fileDescriptor) }
        if directReadDescriptor >= 0 { close(directReadDescriptor) }
    }

    /// Opens the file behind `descriptor` again, read-only with O_DIRECT (through /proc, so it is
    /// the same file even if its path has changed since).
    private static func openDirect(descriptor: Int32) -> Int32 {
        open("/proc/self/fd/\(descriptor)", O_RDONLY | O_CLOEXEC | sluice_o_direct())
    }

    /// Reads straight into `buffer`: with O_DIRECT when the buffer, offset and length are 4 KiB
    /// aligned, else (or where the file system refuses a direct read) through the page cache. Safe
    /// to call from several threads at once.
    public func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard contains(offset: offset, count: buffer.count) else { throw MediumError.outOfRange }
        let alignment = 4096
        var status = EINVAL
        if directReadDescriptor >= 0, offset % UInt64(alignment) == 0, buffer.count % alignment == 0,
           UInt(bitPattern: buffer.baseAddress) % UInt(alignment) == 0 {
            status = BlockingIO.read(fileDescriptor: directReadDescriptor, bytes: buffer, offset: offset)
        }
        if status == EINVAL { status = BlockingIO.read(fileDescriptor: fileDescriptor, bytes: buffer, offset: offset) }
        guard status == 0 else { throw MediumError.inputOutput(errno: status) }
    }

    public func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        var status: Int32 = 0
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            status = BlockingIO.read(fileDescriptor: fileDescriptor, bytes: UnsafeMutableRawBufferPointer(rebasing: raw[0..<count]), offset: offset)
            return count
        }
        completion(status == 0 ? .success(buffer) : .failure(.inputOutput(errno: status)))
    }

    public func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: bytes.readableBytes) else { return completion(.failure(.outOfRange)) }
        let status = bytes.withUnsafeReadableBytes { BlockingIO.write(fileDescriptor: fileDescriptor, bytes: $0, offset: offset) }
        completion(status == 0 ? .success(()) : .failure(.inputOutput(errno: status)))
    }

    public func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard contains(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        var ladder = ZeroingLadder(zeroes ? .zeroes : .trim)
        var action = ladder.firstAction()
        while case .fallocate(let mode) = action {
            let status = sluice_fallocate(fileDescriptor, mode, off_t(offset), off_t(count)) == 0 ? 0 : -errno
            action = ladder.fallocateCompleted(result: status)
        }
        switch action {
        case .fallocate: preconditionFailure("handled by the loop")
        // The last rung: its result is the request's.
        case .writeZeros: writeZeros(offset: offset, count: count, completion: completion)
        case .succeeded: completion(.success(()))
        case .failed(let code): completion(.failure(.inputOutput(errno: code)))
        }
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        completion(fdatasync(fileDescriptor) == 0 ? .success(()) : .failure(.inputOutput(errno: errno)))
    }
}
