import NIOCore

/// One operation for an ``IOUring``: a read, write, sync, fallocate or fadvise on a file descriptor.
///
/// Reads and writes that the kernel completes only in part are continued by the ring itself, so the
/// owner sees one completion for the whole transfer.
public struct IOOperation {
    /// What the operation does.
    public enum Kind: UInt8, Sendable {
        /// Reads `lengthBytes` at `offset`, appending them to `buffer` at its writer index.
        case read
        /// Writes the first `lengthBytes` readable bytes of `buffer` at `offset`.
        case write
        /// `fdatasync`s the file.
        case syncData
        /// `fallocate(mode)` over the range.
        case fallocate
        /// `posix_fadvise(mode)` over the range.
        case fadvise
    }

    public var kind: Kind
    public var fileDescriptor: Int32
    public var offset: UInt64
    public var lengthBytes: UInt32
    /// For reads, the buffer the data is appended to; for writes, the data. The ring holds it until
    /// completion, which keeps the memory the kernel is using alive.
    public var buffer: ByteBuffer?
    /// `RWF_*` flags for reads and writes (for example `RWF_DSYNC` for a force-unit-access write).
    public var readWriteFlags: Int32
    /// The `fallocate` mode or `posix_fadvise` advice.
    public var mode: Int32
    /// For a write without a `buffer`: memory the owner keeps valid and unchanged until the
    /// operation completes (for example a 4 KiB-aligned segment buffer written with O_DIRECT).
    /// For a read without a `buffer`: memory the owner keeps valid, and does not touch, until the
    /// operation completes; the data lands there.
    public var unownedBytes: UnsafeRawPointer?
    /// A value the owner uses to find its request again.
    public var context: UInt64
    /// Hand the operation to an io-wq worker thread at once instead of starting it on the
    /// submitting thread: for direct reads, whose submission (the block layer's work) would
    /// otherwise run on the event loop.
    public var runsOnWorker = false

    public init(
        kind: Kind, fileDescriptor: Int32, offset: UInt64 = 0, lengthBytes: UInt32 = 0,
        buffer: ByteBuffer? = nil, readWriteFlags: Int32 = 0, mode: Int32 = 0, context: UInt64 = 0
    ) {
        self.kind = kind
        self.fileDescriptor = fileDescriptor
        self.offset = offset
        self.lengthBytes = lengthBytes
        self.buffer = buffer
        self.readWriteFlags = readWriteFlags
        self.mode = mode
        self.context = context
        self.unownedBytes = nil
    }
}

/// Receives the completions of operations submitted to an ``IOUring``, on the ring's event loop.
public protocol IOCompletionHandler: AnyObject {
    /// An operation finished. `result` is the byte count for reads and writes (always the full
    /// length on success), zero for the other kinds, or a negated errno. For a read, the data has
    /// been appended to `operation.buffer`.
    func ioCompleted(_ operation: IOOperation, result: Int32)

    /// Every completion reaped in one pass has been delivered.
    func ioBurstEnded()
}
