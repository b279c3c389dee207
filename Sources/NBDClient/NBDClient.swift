@_implementationOnly import CLibNBD
import Glibc

/// A small Swift face on libnbd: a real, independent NBD client for tests and load generators.
public final class NBDClient {
    /// A request or connection that failed, with the errno libnbd reports.
    public struct Failure: Error, CustomStringConvertible {
        public var errno: Int32
        public var message: String
        public var description: String { "libnbd: \(message) (errno \(errno))" }
    }

    private let handle: OpaquePointer

    /// Connects to `uri`. With `strict: false` libnbd sends requests it would normally refuse
    /// itself (out of range, unaligned, zero-length), so the server's own checks can be tested.
    public init(uri: String, strict: Bool = true, structuredReplies: Bool = true, metaContext: Bool = true) throws {
        guard let handle = nbd_create() else { throw Failure(errno: 0, message: "nbd_create failed") }
        self.handle = handle
        if !strict { nbd_set_strict_mode(handle, 0) }
        nbd_set_request_structured_replies(handle, structuredReplies)
        if metaContext { nbd_add_meta_context(handle, "base:allocation") }
        try check(nbd_connect_uri(handle, uri))
    }

    deinit {
        nbd_close(handle)
    }

    private func lastFailure() -> Failure {
        Failure(errno: nbd_get_errno(), message: String(cString: nbd_get_error()))
    }

    @discardableResult
    private func check(_ status: Int32) throws -> Int32 {
        if status < 0 { throw lastFailure() }
        return status
    }

    public var sizeBytes: Int64 { nbd_get_size(handle) }
    public var canFlush: Bool { nbd_can_flush(handle) == 1 }
    public var canFUA: Bool { nbd_can_fua(handle) == 1 }
    public var canTrim: Bool { nbd_can_trim(handle) == 1 }
    public var canZero: Bool { nbd_can_zero(handle) == 1 }
    public var canFastZero: Bool { nbd_can_fast_zero(handle) == 1 }
    public var canDF: Bool { nbd_can_df(handle) == 1 }
    public var canCache: Bool { nbd_can_cache(handle) == 1 }
    public var canMultiConnection: Bool { nbd_can_multi_conn(handle) == 1 }
    public var isReadOnly: Bool { nbd_is_read_only(handle) == 1 }
    public var canBlockStatus: Bool { nbd_can_meta_context(handle, "base:allocation") == 1 }
    public var structuredReplies: Bool { nbd_get_structured_replies_negotiated(handle) == 1 }
    /// The minimum, preferred and maximum block sizes the server advertised (0 if none).
    public var blockSizes: (minimum: Int64, preferred: Int64, maximum: Int64) {
        (nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MINIMUM)), nbd_get_block_size(handle, Int32(LIBNBD_SIZE_PREFERRED)),
         nbd_get_block_size(handle, Int32(LIBNBD_SIZE_MAXIMUM)))
    }

    public func read(length: Int, offset: UInt64, flags: UInt32 = 0) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: length)
        try bytes.withUnsafeMutableBytes { try check(nbd_pread(handle, $0.baseAddress, length, offset, flags)) }
        return bytes
    }

    public func write(_ bytes: [UInt8], offset: UInt64, flags: UInt32 = 0) throws {
        try bytes.withUnsafeBytes { try check(nbd_pwrite(handle, $0.baseAddress, bytes.count, offset, flags)) }
    }

    public func flush() throws { try check(nbd_flush(handle, 0)) }
    public func trim(length: UInt64, offset: UInt64, flags: UInt32 = 0) throws { try check(nbd_trim(handle, length, offset, flags)) }
    public func zero(length: UInt64, offset: UInt64, flags: UInt32 = 0) throws { try check(nbd_zero(handle, length, offset, flags)) }
    public func cache(length: UInt64, offset: UInt64) throws { try check(nbd_cache(handle, length, offset, 0)) }

    /// `base:allocation` extents as (length, flags) pairs.
    public func blockStatus(length: UInt64, offset: UInt64, flags: UInt32 = 0) throws -> [(UInt32, UInt32)] {
        final class Box { var entries: [(UInt32, UInt32)] = [] }
        let box = Box()
        let unmanaged = Unmanaged.passRetained(box)
        defer { unmanaged.release() }
        var callback = nbd_extent_callback()
        callback.user_data = unmanaged.toOpaque()
        callback.callback = { userData, context, _, entries, count, _ in
            guard let userData, let entries, let context, String(cString: context) == "base:allocation" else { return 0 }
            let box = Unmanaged<Box>.fromOpaque(userData).takeUnretainedValue()
            var index = 0
            while index + 1 < count {
                box.entries.append((entries[index], entries[index + 1]))
                index += 2
            }
            return 0
        }
        try check(nbd_block_status(handle, length, offset, callback, flags))
        return box.entries
    }

    // MARK: - Many requests in flight

    public func startWrite(_ bytes: UnsafeRawBufferPointer, offset: UInt64, flags: UInt32 = 0) throws -> Int64 {
        let cookie = nbd_aio_pwrite(handle, bytes.baseAddress, bytes.count, offset, nbd_completion_callback(), flags)
        if cookie < 0 { throw lastFailure() }
        return cookie
    }

    public func startRead(_ bytes: UnsafeMutableRawBufferPointer, offset: UInt64) throws -> Int64 {
        let cookie = nbd_aio_pread(handle, bytes.baseAddress, bytes.count, offset, nbd_completion_callback(), 0)
        if cookie < 0 { throw lastFailure() }
        return cookie
    }

    public var requestsInFlight: Int32 { nbd_aio_in_flight(handle) }

    /// Waits until every request in flight has completed; throws the first failure.
    public func waitForAll(_ cookies: [Int64]) throws {
        var pending = Set(cookies)
        var rounds = 0
        while !pending.isEmpty {
            for cookie in pending {
                let status = nbd_aio_command_completed(handle, UInt64(cookie))
                if status < 0 { throw lastFailure() }
                if status == 1 { pending.remove(cookie) }
            }
            if pending.isEmpty { break }
            if nbd_poll(handle, 10_000) < 0 { throw lastFailure() }
            rounds += 1
            if rounds > 100_000 { throw Failure(errno: 0, message: "requests never completed") }
        }
    }

    /// Sends NBD_CMD_DISC and waits for the server to close.
    public func shutdown() throws { try check(nbd_shutdown(handle, 0)) }
}

/// Command flags for ``NBDClient`` requests.
public enum NBDFlag {
    public static let fua = UInt32(LIBNBD_CMD_FLAG_FUA)
    public static let noHole = UInt32(LIBNBD_CMD_FLAG_NO_HOLE)
    public static let doNotFragment = UInt32(LIBNBD_CMD_FLAG_DF)
    public static let requestOne = UInt32(LIBNBD_CMD_FLAG_REQ_ONE)
    public static let fastZero = UInt32(LIBNBD_CMD_FLAG_FAST_ZERO)
}
