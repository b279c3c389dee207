/// Why a volume request failed. Servers map these to their wire error codes in one place.
public enum VolumeError: Error, Hashable, Sendable {
    /// The medium reported an I/O error (the errno it gave).
    case io(errno: Int32)
    /// The request touched bytes outside the volume.
    case outOfRange
    /// The request would change a read-only volume.
    case readOnly
    /// The medium is full.
    case noSpace
    /// The volume cannot do this (for example a fast zero that would not be fast).
    case notSupported
    /// The volume is closing and takes no new requests.
    case shuttingDown
    /// The request is malformed (for example misaligned).
    case invalid
    /// Memory for the request could not be had.
    case noMemory

    /// Classifies an errno returned by the operating system.
    public init(errno code: Int32) {
        switch code {
        case 28 /* ENOSPC */, 122 /* EDQUOT */, 27 /* EFBIG */: self = .noSpace
        case 95 /* EOPNOTSUPP */: self = .notSupported
        case 30 /* EROFS */, 1 /* EPERM */, 13 /* EACCES */: self = .readOnly
        case 12 /* ENOMEM */: self = .noMemory
        case 22 /* EINVAL */: self = .invalid
        default: self = .io(errno: code)
        }
    }
}
