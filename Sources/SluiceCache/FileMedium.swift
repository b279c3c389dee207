import Glibc

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
            // BLKGETSIZE64
            guard ioctl(descriptor, 0x8008_1272, &size) == 0 else {
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
        guard checkedEnd(offset: offset, count: count) != nil else { return completion(.failure(.outOfRange)) }
        var bytes = [UInt8](repeating: 0, count: count)
        let status = bytes.withUnsafeMutableBytes { buffer in
            transferAll(count: count) { done in pread(fileDescriptor, buffer.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
        }
        completion(status == 0 ? .success(bytes) : .failure(.inputOutput(errno: status)))
    }

    public func write(offset: UInt64, bytes: [UInt8], completion: @escaping (Result<Void, MediumError>) -> Void) {
        guard checkedEnd(offset: offset, count: bytes.count) != nil else { return completion(.failure(.outOfRange)) }
        let status = bytes.withUnsafeBytes { buffer in
            transferAll(count: bytes.count) { done in pwrite(fileDescriptor, buffer.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done)) }
        }
        completion(status == 0 ? .success(()) : .failure(.inputOutput(errno: status)))
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        completion(fdatasync(fileDescriptor) == 0 ? .success(()) : .failure(.inputOutput(errno: errno)))
    }

    private func checkedEnd(offset: UInt64, count: Int) -> UInt64? {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        return count >= 0 && !overflow && end <= sizeBytes ? end : nil
    }

    /// Repeats `step(bytesDone)` until `count` bytes moved; 0 or an errno (EIO at end of file).
    private func transferAll(count: Int, _ step: (Int) -> Int) -> Int32 {
        var done = 0
        var interruptions = 0
        while done < count {
            let moved = step(done)
            if moved > 0 {
                done += moved
            } else if moved < 0 && errno == EINTR && interruptions < 1000 {
                interruptions += 1
            } else {
                return moved == 0 ? EIO : errno
            }
        }
        return 0
    }
}
