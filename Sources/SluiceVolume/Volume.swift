import NIOCore

/// A block volume that a server exports: a fixed-size array of bytes with read, write, flush,
/// trim, write-zeroes, cache and block-status operations.
///
/// A volume is shared by every connection of every server that exports it. Each connection opens
/// its own ``VolumeSession`` bound to the event loop that owns the connection, so completions are
/// delivered on that loop without a thread hop.
///
/// Servers validate every request at their edge (range, alignment, size limits, read-only) before
/// it reaches a volume; volumes still check ranges and fail with ``VolumeError`` rather than trust
/// them, because a volume must never touch bytes outside itself.
public protocol Volume: AnyObject, Sendable {
    /// The size of the volume in bytes. It does not change while the volume is open.
    var sizeBytes: UInt64 { get }

    /// What the volume supports; servers advertise exactly this.
    var capabilities: VolumeCapabilities { get }

    /// The block sizes the volume wants clients to honour.
    var blockSizes: VolumeBlockSizes { get }

    /// Opens a session whose requests are submitted from, and completed on, `eventLoop`.
    func openSession(on eventLoop: any EventLoop) throws -> any VolumeSession

    /// Makes everything written so far durable and releases the volume's resources.
    ///
    /// Called once, after every session has been closed.
    func close() throws
}

/// One client's channel into a volume, confined to a single event loop.
///
/// Every method must be called on the session's event loop, and every completion is delivered there.
/// A completion may be delivered synchronously from inside ``submit(_:tag:sink:)`` or ``submitBatch()``.
public protocol VolumeSession: AnyObject {
    /// Queues one request. Its result reaches `sink` exactly once, tagged with `tag`.
    ///
    /// The request may not start until ``submitBatch()`` is called: sessions batch submissions so
    /// that a burst of requests costs one system call.
    func submit(_ request: consuming VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink)

    /// Starts every queued request.
    func submitBatch()

    /// The number of requests submitted and not yet completed.
    var requestsInFlight: Int { get }

    /// Closes the session. Requests still in flight complete first; their results are still delivered.
    func close()
}

/// Receives the results of a session's requests on the session's event loop.
public protocol VolumeCompletionSink: AnyObject {
    /// One request finished.
    func volumeRequestCompleted(tag: UInt32, reply: consuming VolumeReply)

    /// A burst of completions has been delivered; a network server flushes its replies here.
    func volumeCompletionBurstEnded()
}
