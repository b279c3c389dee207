/// The seam between the engine and persistent memory (the pmem write buffer of pmem mode): every
/// store that must survive a power failure is flushed and drained through this protocol, so tests
/// can put ``SimulatedPersistentMemory`` underneath, which at a simulated power failure keeps what
/// was drained and a seeded random choice, word by word, of everything else.
///
/// Loads are plain memory reads at ``baseAddress``. Stores are plain writes there, followed by
/// ``flush(offset:count:)``; they are persistent only after a later ``drain()``.
public protocol PersistentMemory: AnyObject {
    var sizeBytes: Int { get }
    var baseAddress: UnsafeMutableRawPointer { get }
    /// Copies `bytes` to `offset` (non-temporal stores for large copies) and flushes them; they
    /// are persistent after the next ``drain()``.
    func copyAndFlush(to offset: Int, from bytes: UnsafeRawBufferPointer)
    /// Flushes stores already made to `offset ..< offset + count`.
    func flush(offset: Int, count: Int)
    /// Waits until every flush so far is persistent.
    func drain()
}

extension PersistentMemory {
    /// Stores one aligned 8-byte word: a store the hardware never tears.
    public func storeWord(_ value: UInt64, at offset: Int) {
        precondition(offset % 8 == 0 && offset + 8 <= sizeBytes, "unaligned or out-of-range word store")
        baseAddress.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt64.self)
    }

    public func loadWord(at offset: Int) -> UInt64 {
        precondition(offset % 8 == 0 && offset + 8 <= sizeBytes, "unaligned or out-of-range word load")
        return UInt64(littleEndian: baseAddress.load(fromByteOffset: offset, as: UInt64.self))
    }
}
