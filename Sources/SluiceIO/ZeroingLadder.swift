import CLibURing
import Glibc

/// The one way Sluice trims or zeroes a range of a file or block device: a value type that says
/// which `fallocate` to try next, and when only writing zeros is left, given how the last step
/// ended. Every driver (the passthrough session's io_uring, the cache's io_uring medium, the
/// blocking file medium) runs it; none has a fallback order of its own.
///
/// | purpose | rungs, each tried when the one before is unsupported |
/// |---|---|
/// | trim | punch a hole; a medium that cannot keeps the data (a trim is advisory) |
/// | zeroes | punch a hole (cheapest, frees the space); zero the range; write zeros |
/// | zeroes keeping allocation (NBD `NO_HOLE`) | zero the range; punch and allocate again (tmpfs zeroes only by punching); write zeros |
///
/// A step that fails for any other reason (EIO, ENOSPC, ...) fails the request: the next rung
/// would hide a real error. Results are as io_uring reports them: 0 or more for success, a
/// negated errno for failure.
public struct ZeroingLadder: Sendable, Equatable {
    public enum Purpose: Sendable, Equatable {
        /// Discard the data; reads may return anything written before (NBD trim).
        case trim
        /// Reads must return zeros; the range may become a hole.
        case zeroes
        /// Reads must return zeros and the range stays allocated (NBD write-zeroes with NO_HOLE).
        case zeroesKeepingAllocation
    }

    public enum Action: Sendable, Equatable {
        /// `fallocate(mode:)` over the whole range, then ``fallocateCompleted(result:)``.
        case fallocate(mode: Int32)
        /// Write zeros over the whole range, then ``zerosWritten(result:)``.
        case writeZeros
        case succeeded
        case failed(errno: Int32)
    }

    private enum Rung: Sendable, Equatable {
        case punch
        case zeroRange
        case punchBeforeAllocating
        case allocate
        case writeZeros
        case finished
    }

    public let purpose: Purpose
    private var rung: Rung

    public init(_ purpose: Purpose) {
        self.purpose = purpose
        rung = purpose == .zeroesKeepingAllocation ? .zeroRange : .punch
    }

    /// The first step.
    public func firstAction() -> Action {
        action(for: rung)
    }

    /// The `fallocate` of the last action ended with `result`.
    public mutating func fallocateCompleted(result: Int32) -> Action {
        precondition([.punch, .zeroRange, .punchBeforeAllocating, .allocate].contains(rung), "no fallocate was asked for")
        if result >= 0 {
            if rung == .punchBeforeAllocating { return move(to: .allocate) }
            return move(to: .finished)
        }
        guard Self.isUnsupported(errno: -result) else {
            rung = .finished
            return .failed(errno: -result)
        }
        switch (purpose, rung) {
        case (.trim, _): return move(to: .finished)
        case (.zeroes, .punch): return move(to: .zeroRange)
        // Punching is unsupported already: allocating again after a punch cannot work either.
        case (.zeroes, _): return move(to: .writeZeros)
        case (.zeroesKeepingAllocation, .zeroRange): return move(to: .punchBeforeAllocating)
        // A hole that cannot be provisioned again reads as zeros; writing zeros provisions it.
        case (.zeroesKeepingAllocation, _): return move(to: .writeZeros)
        }
    }

    /// The zero-filling writes of the last action ended with `result`.
    public mutating func zerosWritten(result: Int32) -> Action {
        precondition(rung == .writeZeros, "no zero writes were asked for")
        rung = .finished
        return result >= 0 ? .succeeded : .failed(errno: -result)
    }

    /// Errors that say "this medium cannot do that", as opposed to "it failed".
    public static func isUnsupported(errno code: Int32) -> Bool {
        code == EOPNOTSUPP || code == ENOTTY || code == ENOSYS || code == EINVAL
    }

    private mutating func move(to next: Rung) -> Action {
        rung = next
        return action(for: next)
    }

    private func action(for rung: Rung) -> Action {
        switch rung {
        case .punch, .punchBeforeAllocating: return .fallocate(mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        case .zeroRange: return .fallocate(mode: FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        case .allocate: return .fallocate(mode: 0)
        case .writeZeros: return .writeZeros
        case .finished: return .succeeded
        }
    }
}
