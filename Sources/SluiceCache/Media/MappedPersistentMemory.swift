import CLibPmem
import Glibc

/// Persistent memory mapped from a file with libpmem: a DAX file on real persistent memory, or a
/// file on tmpfs for emulation (where libpmem falls back to msync unless `PMEM_IS_PMEM_FORCE=1`).
public final class MappedPersistentMemory: PersistentMemory {
    public let path: String
    public let sizeBytes: Int
    public let baseAddress: UnsafeMutableRawPointer
    /// Whether the mapping is real persistent memory (flushes are cache-line flushes, not msync).
    public let isPersistentMemory: Bool

    /// Why a pmem file could not be mapped.
    public struct MappingError: Error, CustomStringConvertible {
        public let description: String
        /// Another process holds the file's lock.
        public var isInUse = false
    }

    /// The file held open for its lock: one pmem file serves one process at a time.
    private let lockDescriptor: Int32

    /// Maps `path`, creating it with `createBytes` if it does not exist and `createBytes` is given.
    /// The file is locked (`flock`, exclusive) while mapped; a file another process holds is
    /// refused, so two servers, or a format and a server, never share a write buffer.
    public init(path: String, createBytes: Int? = nil) throws {
        let descriptor = open(path, createBytes == nil ? O_RDWR : (O_RDWR | O_CREAT), 0o600)
        guard descriptor >= 0 else {
            throw MappingError(description: "the pmem file \(path) cannot be opened: \(String(cString: strerror(errno))); give the pmem file this cache was formatted with")
        }
        guard flock(descriptor, LOCK_EX | LOCK_NB) == 0 else {
            close(descriptor)
            throw MappingError(description: "the pmem file \(path) is already in use by another process (a server using it); stop that first",
                               isInUse: true)
        }
        lockDescriptor = descriptor
        var mappedLength = 0
        var isPmem: Int32 = 0
        let flags: Int32 = createBytes == nil ? 0 : Int32(PMEM_FILE_CREATE)
        guard let address = pmem_map_file(path, createBytes ?? 0, flags, 0o600, &mappedLength, &isPmem) else {
            let reason = String(cString: pmem_errormsg())
            close(descriptor)
            throw MappingError(description: "cannot map the pmem file \(path): \(reason)")
        }
        self.path = path
        self.sizeBytes = mappedLength
        self.baseAddress = address
        self.isPersistentMemory = isPmem != 0
    }

    deinit {
        pmem_unmap(baseAddress, sizeBytes)
        close(lockDescriptor)
    }

    public func copyAndFlush(to offset: Int, from bytes: UnsafeRawBufferPointer) {
        precondition(offset >= 0 && offset + bytes.count <= sizeBytes, "persistent memory copy out of range")
        if isPersistentMemory {
            // Non-temporal stores for whole blocks: the data bypasses the CPU caches.
            pmem_memcpy(baseAddress + offset, bytes.baseAddress, bytes.count, UInt32(PMEM_F_MEM_NONTEMPORAL | PMEM_F_MEM_NODRAIN))
        } else {
            (baseAddress + offset).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
            noteFlushed(offset: offset, count: bytes.count)
        }
    }

    public func flush(offset: Int, count: Int) {
        precondition(offset >= 0 && count >= 0 && offset + count <= sizeBytes, "persistent memory flush out of range")
        if isPersistentMemory {
            pmem_flush(baseAddress + offset, count)
        } else {
            noteFlushed(offset: offset, count: count)
        }
    }

    public func drain() {
        if isPersistentMemory {
            pmem_drain()
        } else if flushedEnd > flushedStart {
            // Without real pmem a flush is an msync, which is also the drain; one msync over the
            // span of everything flushed since the last drain serves a whole group of writes.
            pmem_msync(baseAddress + flushedStart, flushedEnd - flushedStart)
            flushedStart = Int.max
            flushedEnd = 0
        }
    }

    /// The span flushed since the last drain, when the mapping is not real pmem.
    private var flushedStart = Int.max
    private var flushedEnd = 0

    private func noteFlushed(offset: Int, count: Int) {
        flushedStart = min(flushedStart, offset)
        flushedEnd = max(flushedEnd, offset + count)
    }
}
