/// How a cache treats writes and reads (bcache's and Open CAS's modes). Kept in the superblock
/// record, so a restart keeps the mode a user chose; any mode may follow any other at any time.
public enum CacheMode: String, CaseIterable, Codable, Sendable {
    /// Writes land in the log and are written back later (the default).
    case writeback
    /// A write is acknowledged once the backing store has it (synced, with FUA) and is also cached
    /// clean; nothing new becomes dirty.
    case writethrough
    /// Writes go to the backing store only, after cached copies of their blocks are invalidated;
    /// reads are cached.
    case writearound
    /// Reads and writes go to the backing store; what is cached is still served, and what is dirty
    /// is written back until nothing is.
    case passthrough

    /// The mode's number in the superblock record's flags.
    public var code: UInt32 {
        switch self {
        case .writeback: return 0
        case .writethrough: return 1
        case .writearound: return 2
        case .passthrough: return 3
        }
    }

    public init?(code: UInt32) {
        guard let mode = Self.allCases.first(where: { $0.code == code }) else { return nil }
        self = mode
    }

    /// Whether new writes of blocks with no dirty copy go straight to the backing store.
    public var writesBypassLog: Bool { self != .writeback }

    /// Whether read misses may be cached.
    public var cachesReads: Bool { self != .passthrough }

    /// Every mode's name, for messages.
    public static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }
}
