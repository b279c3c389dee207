import CLibURing
import Glibc
import SluiceVolume

/// An open backing file or block device.
///
/// Regular files are locked with `flock` (exclusive when writable, shared when read-only) so that
/// two servers cannot write one file at once; block devices are opened with `O_EXCL`, which the
/// kernel enforces against mounts and other exclusive openers.
public final class BlockFile: @unchecked Sendable {
    /// The path the file was opened from, for messages.
    public let path: String
    /// The open descriptor.
    public let fileDescriptor: Int32
    /// Whether the file is a block device rather than a regular file.
    public let isBlockDevice: Bool
    /// The usable size in bytes: the file's size rounded down to whole 512-byte sectors.
    public let sizeBytes: UInt64
    /// Bytes at the end of a regular file that do not fill a sector and so are not served.
    public let ignoredTailBytes: UInt64
    /// Whether the file was opened read-only.
    public let isReadOnly: Bool

    private var isClosed = false

    /// Opens `path` for serving.
    public init(path: String, readOnly: Bool) throws {
        self.path = path
        self.isReadOnly = readOnly
        var status = stat()
        guard stat(path, &status) == 0 else {
            throw BlockFileError.cannotOpen(path: path, errno: errno)
        }
        let isBlockDevice = (status.st_mode & S_IFMT) == S_IFBLK
        guard isBlockDevice || (status.st_mode & S_IFMT) == S_IFREG else {
            throw BlockFileError.notAFileOrBlockDevice(path: path)
        }
        var flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if isBlockDevice { flags |= O_EXCL }
        let descriptor = open(path, flags)
        guard descriptor >= 0 else {
            let code = errno
            // O_EXCL on a block device fails with EBUSY while it is mounted or held by another.
            if isBlockDevice && code == EBUSY { throw BlockFileError.inUse(path: path) }
            throw BlockFileError.cannotOpen(path: path, errno: code)
        }
        if !isBlockDevice {
            if flock(descriptor, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0 {
                let code = errno
                Glibc.close(descriptor)
                if code == EWOULDBLOCK {
                    throw BlockFileError.inUse(path: path)
                }
                throw BlockFileError.cannotOpen(path: path, errno: code)
            }
        }
        var rawSize: UInt64 = 0
        if isBlockDevice {
            guard ioctl(descriptor, BlockingIO.blockDeviceSizeRequest, &rawSize) == 0 else {
                let code = errno
                Glibc.close(descriptor)
                throw BlockFileError.cannotOpen(path: path, errno: code)
            }
        } else {
            var opened = stat()
            guard fstat(descriptor, &opened) == 0 else {
                let code = errno
                Glibc.close(descriptor)
                throw BlockFileError.cannotOpen(path: path, errno: code)
            }
            rawSize = UInt64(opened.st_size)
        }
        let sectorBytes: UInt64 = 512
        guard rawSize >= sectorBytes else {
            Glibc.close(descriptor)
            throw BlockFileError.tooSmall(path: path, sizeBytes: rawSize)
        }
        self.fileDescriptor = descriptor
        self.isBlockDevice = isBlockDevice
        self.sizeBytes = rawSize / sectorBytes * sectorBytes
        self.ignoredTailBytes = rawSize - self.sizeBytes
    }

    /// Makes written data durable (`fdatasync`).
    public func synchronize() throws {
        guard fdatasync(fileDescriptor) == 0 else {
            throw BlockFileError.syncFailed(path: path, errno: errno)
        }
    }

    /// Closes the descriptor, which also drops the lock.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        Glibc.close(fileDescriptor)
    }

    deinit {
        close()
    }
}

/// Why a backing file could not be used.
public enum BlockFileError: Error, CustomStringConvertible, Equatable {
    case cannotOpen(path: String, errno: Int32)
    case notAFileOrBlockDevice(path: String)
    case inUse(path: String)
    case tooSmall(path: String, sizeBytes: UInt64)
    case syncFailed(path: String, errno: Int32)

    public var description: String {
        switch self {
        case .cannotOpen(let path, let code):
            return "cannot open \(path): \(String(cString: strerror(code)))"
        case .notAFileOrBlockDevice(let path):
            return "\(path) is neither a regular file nor a block device"
        case .inUse(let path):
            return "\(path) is already in use by another process (another server holding its lock, a mount, or an exclusive opener); stop that first"
        case .tooSmall(let path, let size):
            return "\(path) holds \(size) bytes, less than one 512-byte sector; make it larger (for example: truncate -s 1G \(path))"
        case .syncFailed(let path, let code):
            return "cannot sync \(path): \(String(cString: strerror(code)))"
        }
    }
}
