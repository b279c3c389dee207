import SluiceCache

/// Persistent memory in a test: a byte array whose persistent image changes only at ``drain()``
/// (for flushed ranges), and at a simulated power failure keeps, for every 8-byte word that was
/// stored but not drained, either the old or the new value, chosen by a seed (a CPU may write a
/// dirty cache line back at any moment, and only 8-byte aligned stores are atomic).
public final class SimulatedPersistentMemory: PersistentMemory {
    public let sizeBytes: Int
    public let baseAddress: UnsafeMutableRawPointer
    /// What survives a power failure for certain.
    public private(set) var persistent: [UInt8]
    /// Flushed ranges waiting for a drain.
    private var flushed: [(offset: Int, count: Int)] = []
    public private(set) var drainCount = 0
    public private(set) var flushCount = 0

    public init(sizeBytes: Int) {
        precondition(sizeBytes > 0 && sizeBytes % 8 == 0)
        self.sizeBytes = sizeBytes
        baseAddress = .allocate(byteCount: sizeBytes, alignment: 64)
        baseAddress.initializeMemory(as: UInt8.self, repeating: 0, count: sizeBytes)
        persistent = [UInt8](repeating: 0, count: sizeBytes)
    }

    /// Memory whose persistent contents are `bytes` (what survived a power failure).
    public convenience init(persistentBytes bytes: [UInt8]) {
        self.init(sizeBytes: bytes.count)
        bytes.withUnsafeBytes { baseAddress.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        persistent = bytes
    }

    deinit {
        baseAddress.deallocate()
    }

    public func copyAndFlush(to offset: Int, from bytes: UnsafeRawBufferPointer) {
        precondition(offset >= 0 && offset + bytes.count <= sizeBytes, "persistent memory copy out of range")
        (baseAddress + offset).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        flush(offset: offset, count: bytes.count)
    }

    public func flush(offset: Int, count: Int) {
        precondition(offset >= 0 && count >= 0 && offset + count <= sizeBytes, "persistent memory flush out of range")
        flushed.append((offset, count))
        flushCount += 1
    }

    public func drain() {
        for range in flushed {
            persistent.withUnsafeMutableBytes {
                ($0.baseAddress! + range.offset).copyMemory(from: baseAddress + range.offset, byteCount: range.count)
            }
        }
        flushed.removeAll(keepingCapacity: true)
        drainCount += 1
    }

    /// Cuts the power: returns what the memory holds afterwards. Every 8-byte word whose current
    /// value differs from its persistent one keeps the old or takes the new value, by `seed`.
    public func powerFail(seed: UInt64) -> [UInt8] {
        var generator = SplitMix64(seed: seed)
        var survivor = persistent
        survivor.withUnsafeMutableBytes { target in
            for word in stride(from: 0, to: sizeBytes, by: 8) {
                let current = baseAddress.load(fromByteOffset: word, as: UInt64.self)
                guard current != target.load(fromByteOffset: word, as: UInt64.self) else { continue }
                if generator.next() & 1 == 1 { target.storeBytes(of: current, toByteOffset: word, as: UInt64.self) }
            }
        }
        return survivor
    }
}
