/// The seam between the cache engine and every medium it persists to: the cache device and the
/// backing store. Every write and every sync the engine makes goes through this protocol, so tests
/// can put a ``SimulatedMedium`` underneath that forgets, at a simulated power failure, whatever
/// was written but not yet synced.
///
/// Completions may run before the call returns or later, always on the engine's own thread.
public protocol BlockMedium: AnyObject {
    /// The usable size in bytes.
    var sizeBytes: UInt64 { get }

    /// Reads `count` bytes at `offset`.
    func read(offset: UInt64, count: Int, completion: @escaping (Result<[UInt8], MediumError>) -> Void)

    /// Writes `bytes` at `offset`. They are durable only after a later ``synchronize(completion:)``
    /// completes.
    func write(offset: UInt64, bytes: [UInt8], completion: @escaping (Result<Void, MediumError>) -> Void)

    /// Makes every write that completed before this call durable.
    func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void)
}

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
}
