import NBDProtocol
import SluiceVolume

/// The one place where volume errors become NBD error codes.
enum NBDReplyMapping {
    static func error(for volumeError: VolumeError, command: NBDCommand, fastZero: Bool) -> NBDError {
        switch volumeError {
        case .io: return .inputOutput
        case .outOfRange: return command == .write || command == .writeZeroes ? .noSpace : .invalid
        case .readOnly: return .notPermitted
        case .noSpace: return .noSpace
        // ENOTSUP is reserved for a fast zero that would not be fast.
        case .notSupported: return command == .writeZeroes && fastZero ? .notSupported : .invalid
        case .shuttingDown: return .shutdown
        case .invalid: return .invalid
        case .noMemory: return .noMemory
        }
    }

    static func message(for volumeError: VolumeError) -> String {
        switch volumeError {
        case .io(let code): return "I/O error on the medium (errno \(code))"
        case .outOfRange: return "request outside the volume"
        case .readOnly: return "the volume is read-only"
        case .noSpace: return "no space left on the medium"
        case .notSupported: return "the volume cannot do this quickly"
        case .shuttingDown: return "the server is shutting down"
        case .invalid: return "the volume refused the request as invalid"
        case .noMemory: return "out of memory"
        }
    }
}
