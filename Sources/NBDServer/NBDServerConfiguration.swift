import NIOCore

/// How a server listens and what it allows each connection.
public struct NBDServerConfiguration: Sendable {
    /// A Unix socket path to listen on, if any.
    public var unixSocketPath: String?
    /// A TCP address to listen on, if any.
    public var tcpHost: String?
    public var tcpPort: Int
    /// Requests a connection may have in flight before the server stops reading from it.
    public var inFlightRequestsMax: Int
    /// Payload and read bytes a connection may have in flight before the server stops reading.
    /// A single request larger than this is still served when it is the only one in flight.
    public var inFlightBytesMax: Int
    /// Reply bytes a connection may have queued for a client that is slow to read them before the
    /// server stops reading its requests (resuming below half of it).
    public var replyQueueBytesMax: Int
    /// How long a client may take to finish negotiating.
    public var handshakeTimeout: TimeAmount
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    public var shutdownGracePeriod: TimeAmount

    public init(
        unixSocketPath: String? = nil, tcpHost: String? = nil, tcpPort: Int = 10809,
        inFlightRequestsMax: Int = 256, inFlightBytesMax: Int = 64 * 1024 * 1024, replyQueueBytesMax: Int = 32 * 1024 * 1024,
        handshakeTimeout: TimeAmount = .seconds(30), shutdownGracePeriod: TimeAmount = .seconds(30)
    ) {
        self.unixSocketPath = unixSocketPath
        self.tcpHost = tcpHost
        self.tcpPort = tcpPort
        self.inFlightRequestsMax = inFlightRequestsMax
        self.inFlightBytesMax = inFlightBytesMax
        self.replyQueueBytesMax = replyQueueBytesMax
        self.handshakeTimeout = handshakeTimeout
        self.shutdownGracePeriod = shutdownGracePeriod
    }
}
