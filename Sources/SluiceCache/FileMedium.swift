import Glibc
import SluiceIO

/// A ``BlockMedium`` on a file or block device with plain blocking system calls. For tools that
/// run without a server (format, check, drain) and for tests on real files; the serving engine
/// drives its media through io_uring instead. Completions run before each call returns.
public final class FileMedium: BlockMedium {
    public let path: String
    public let sizeBytes: UInt64
    private let fileDescriptor: Int32

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
    }

    deinit {
        close(fileDescriptor)
    }

    public func read(offset: UInt64, count: Int, completion: @escaping (Result<[UInt8], MediumError>) -> Void) {
        guard isInRange(offset: offset, count: count) else { return completion(.failure(.outOfRange)) }
        var bytes = [UInt8](repeating: 0, count: count)
        let status = bytes.withUnsafeMutableBytes { BlockingIO.read(fileDescriptor: fileDescriptor, bytes: $0, offset: offset) }
        completion(status == 0 ? .success(bytes) : .failure(.inputOutput(errno: status)))
    }

    public func write(offset: UInt64, bytes: [UInt8], completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard isInRange(offset: offset, count: bytes.count) else { return completion(.failure(.outOfRange)) }
        let status = bytes.withUnsafeBytes { BlockingIO.write(fileDescriptor: fileDescriptor, bytes: $0, offset: offset) }
        completion(status == 0 ? .success(()) : .failure(.inputOutput(errno: status)))
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        completion(fdatasync(fileDescriptor) == 0 ? .success(()) : .failure(.inputOutput(errno: errno)))
    }

    private func isInRange(offset: UInt64, count: Int) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        return count >= 0 && !overflow && end <= sizeBytes
    }
}
