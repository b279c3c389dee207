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

    /// Uses an open file (its lock stays with it).
    public init(file: BlockFile) {
        path = file.path
        sizeBytes = file.sizeBytes
        fileDescriptor = file.fileDescriptor
        owner = file
        ownsDescriptor = false
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
    }

    deinit {
        if ownsDescriptor { close(fileDescriptor) }
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
        // Punching a hole reads back as zeros on every filesystem that supports it; where it is not
        // supported, zeros are written (a trim may simply do nothing).
        if sluice_fallocate(fileDescriptor, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(offset), off_t(count)) == 0 {
            return completion(.success(()))
        }
        guard zeroes else { return completion(.success(())) }
        writeZeros(offset: offset, count: count, completion: completion)
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        completion(fdatasync(fileDescriptor) == 0 ? .success(()) : .failure(.inputOutput(errno: errno)))
    }
}
