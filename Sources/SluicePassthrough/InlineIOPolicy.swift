import CLibURing
import Glibc

/// Decides which operations on a backing file run as plain system calls on the event loop and
/// which go through io_uring.
///
/// io_uring shines where the kernel can start the work without blocking and finish it later (reads
/// that miss the page cache, force-unit-access writes and syncs that wait on a device). Where the
/// kernel cannot do an operation without blocking it hands it to an io-wq worker thread, and the
/// round trip through that thread costs more than the work when the work is only a memory copy:
/// buffered writes into the page cache (no file system here supports non-blocking buffered writes),
/// and every operation on a memory file system such as tmpfs. Those run inline, as nbdkit's file
/// plugin runs them on its worker threads.
///
/// The cost of inline buffered writes: when the kernel throttles a writer because too much dirty
/// data waits for the device, the event loop waits with it. That happens only when the backing
/// store is slower than the clients, when every writer waits anyway.
struct InlineIOPolicy: Sendable, Equatable {
    /// The file lives in memory (tmpfs, ramfs, hugetlbfs): nothing on it ever waits for a device.
    var isMemoryBacked: Bool

    /// Plain (not force-unit-access) writes land in the page cache: run them inline.
    var inlinePlainWrites: Bool { true }
    /// Reads run inline only where they can never wait for a device.
    var inlineReads: Bool { isMemoryBacked }
    /// Force-unit-access writes and flushes wait for a device except on memory file systems.
    var inlineDurableOperations: Bool { isMemoryBacked }

    private static let memoryFileSystemMagics: Set<Int> = [
        0x0102_1994,  // TMPFS_MAGIC
        0x8584_58f6,  // RAMFS_MAGIC
        0x9584_58f6,  // HUGETLBFS_MAGIC
    ]

    /// Probes the file system `fileDescriptor` lives on.
    static func probe(fileDescriptor: Int32, isBlockDevice: Bool) -> InlineIOPolicy {
        guard !isBlockDevice else { return InlineIOPolicy(isMemoryBacked: false) }
        var fileSystem = statfs()
        guard fstatfs(fileDescriptor, &fileSystem) == 0 else { return InlineIOPolicy(isMemoryBacked: false) }
        let magic = Int(truncatingIfNeeded: fileSystem.f_type) & 0xffff_ffff
        return InlineIOPolicy(isMemoryBacked: memoryFileSystemMagics.contains(magic))
    }
}
