import NIOCore
import SluiceVolume

/// The seam between the cache engine and every medium it persists to: the cache device and the
/// backing store. Every read, write, discard and sync the engine makes goes through this protocol,
/// so tests can put a ``SimulatedMedium`` underneath that forgets, at a simulated power failure,
/// whatever was written but not yet synced.
///
/// Completions may run before the call returns or later, always on the engine's own thread.
public protocol BlockMedium: AnyObject {
    /// The usable size in bytes.
    var sizeBytes: UInt64 { get }

    /// Reads `count` bytes at `offset`.
    func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void)

    /// Writes the readable bytes of `bytes` at `offset`. They are durable only after a later
    /// ``synchronize(completion:)`` completes.
    func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Writes `bytes`, which the caller keeps valid and unchanged until the completion runs.
    /// Media that can write straight from it (O_DIRECT from 4 KiB-aligned memory) do; the others
    /// copy it (the default).
    func write(offset: UInt64, unownedBytes bytes: UnsafeRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Reads `bytes.count` bytes at `offset` into `bytes`, which the caller keeps valid, and does
    /// not touch, until the completion runs. Media that can read straight into it (O_DIRECT into
    /// 4 KiB-aligned memory) do; the others read and copy (the default).
    func read(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Reads `bytes.count` bytes at `offset` into `bytes` at once if the medium holds them in memory
    /// (the page cache) and can do so without waiting for a device; returns false, having read
    /// nothing usable, otherwise. The default never can.
    func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool

    /// Makes the range read as zeros (`zeroes`) or tells the medium it is no longer needed (reads
    /// then return the old bytes or zeros). Durable only after a later sync.
    func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Makes every write that completed before this call durable.
    func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Runs `body`, whose operations the medium may hand to the device together (one system
    /// call for a batch of reads). Completions may still arrive within `body`.
    func submittingTogether(_ body: () -> Void)

    /// How `offset ..< offset + lengthBytes` is allocated (NBD's `base:allocation`): sector-multiple
    /// extents in order from `offset`, at most `maximumExtents` of them, covering at least one
    /// sector and never more than asked. A medium that cannot tell says data for the whole range,
    /// which is always a correct answer.
    func allocation(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping ([BlockStatusExtent]) -> Void)
}

extension BlockMedium {
    public func submittingTogether(_ body: () -> Void) { body() }

    public func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool { false }

    public func allocation(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping ([BlockStatusExtent]) -> Void) {
        completion([BlockStatusExtent(lengthBytes: lengthBytes, flags: [])])
    }

    public func read(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        read(offset: offset, count: bytes.count) { result in
            completion(result.map { buffer in
                buffer.withUnsafeReadableBytes { bytes.copyMemory(from: $0) }
            })
        }
    }

    public func write(offset: UInt64, unownedBytes bytes: UnsafeRawBufferPointer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        write(offset: offset, bytes: ByteBuffer(bytes: bytes), completion: completion)
    }

    /// Writes an array of bytes (for metadata and tests; data paths pass `ByteBuffer`s).
    public func write(offset: UInt64, bytes: [UInt8], completion: @escaping (Result<Void, MediumError>) -> Void) {
        write(offset: offset, bytes: ByteBuffer(bytes: bytes), completion: completion)
    }

    /// Whether `offset ..< offset + count` lies inside the medium (and does not overflow).
    public func contains(offset: UInt64, count: Int) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(max(count, 0)))
        return count >= 0 && !overflow && end <= sizeBytes
    }

    /// Writes `count` zero bytes at `offset`, a megabyte at a time: the fallback of a medium that
    /// cannot zero a range by itself. Writes that complete before `write` returns are continued in
    /// a loop, not by recursion, so a synchronous medium zeroing gigabytes keeps a flat stack.
    public func writeZeros(offset: UInt64, count: Int, completion: @escaping (Result<Void, MediumError>) -> Void) {
        var offset = offset
        var remaining = count
        while remaining > 0 {
            let length = min(remaining, zeroChunk.readableBytes)
            var returned = false
            var inlineResult: Result<Void, MediumError>?
            write(offset: offset, bytes: zeroChunk.getSlice(at: 0, length: length)!) { result in
                guard returned else { return inlineResult = result }
                // Completed later: go on from the completion.
                if case .failure = result { return completion(result) }
                self.writeZeros(offset: offset + UInt64(length), count: remaining - length, completion: completion)
            }
            returned = true
            guard let inlineResult else { return }
            if case .failure = inlineResult { return completion(inlineResult) }
            offset += UInt64(length)
            remaining -= length
        }
        completion(.success(()))
    }

    /// Reads into an array of bytes (for metadata and tests).
    public func readBytes(offset: UInt64, count: Int, completion: @escaping (Result<[UInt8], MediumError>) -> Void) {
        read(offset: offset, count: count) { result in
            completion(result.map { Array($0.readableBytesView) })
        }
    }
}

/// A run of zeros that zero-filling writes come from. Shared and never written to.
private let zeroChunk = ByteBuffer(repeating: 0, count: 1 << 20)

/// A medium failed an operation.
public enum MediumError: Error, Equatable, CustomStringConvertible {
    case inputOutput(errno: Int32)
    case outOfRange
    /// The simulated machine lost power; the medium answers nothing more until it is restarted.
    case poweredOff

    public var description: String {
        switch self {
        case .inputOutput(let code): return "I/O error (errno \(code))"
        case .outOfRange: return "access beyond the end of the medium"
        case .poweredOff: return "the medium lost power"
        }
    }

    /// The errno a client sees for this failure.
    public var errnoValue: Int32 {
        switch self {
        case .inputOutput(let code): return code
        case .outOfRange: return 22
        case .poweredOff: return 5
        }
    }
}
