import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// An NBD server: listeners on a Unix socket and/or TCP, and one ``NBDConnectionHandler`` per client.
///
/// Every connection shares the same volumes, so a flush on one connection covers writes completed
/// on all of them, which is what `CAN_MULTI_CONN` promises.
public final class NBDServer: Sendable {
    private let exports: [NBDServerExport]
    private let configuration: NBDServerConfiguration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let listeners = NIOLockedValueBox<[any Channel]>([])
    private let connections = NIOLockedValueBox<[ObjectIdentifier: any Channel]>([:])
    private let connectionCounter = NIOLockedValueBox<UInt64>(0)

    /// Creates a server for `exports`; the first export is also the default (empty-name) export.
    public init(exports: [NBDServerExport], configuration: NBDServerConfiguration, group: any EventLoopGroup, logger: Logger) {
        precondition(!exports.isEmpty, "a server needs at least one export")
        precondition(Set(exports.map(\.name)).count == exports.count, "export names must be unique")
        self.exports = exports
        self.configuration = configuration
        self.group = group
        self.logger = logger
    }

    /// The addresses the server listens on, once started.
    public var localAddresses: [SocketAddress] {
        listeners.withLockedValue { $0.compactMap(\.localAddress) }
    }

    /// The number of open client connections.
    public var connectionCount: Int {
        connections.withLockedValue { $0.count }
    }

    /// Binds every configured listener.
    public func start() throws {
        if let path = configuration.unixSocketPath {
            try Self.removeStaleSocket(at: path)
            let channel = try makeBootstrap(tcp: false).bind(unixDomainSocketPath: path).wait()
            listeners.withLockedValue { $0.append(channel) }
            logger.info("listening", metadata: ["socket": "\(path)"])
        }
        if let host = configuration.tcpHost {
            let channel = try makeBootstrap(tcp: true).bind(host: host, port: configuration.tcpPort).wait()
            listeners.withLockedValue { $0.append(channel) }
            logger.info("listening", metadata: ["address": "\(channel.localAddress.map { "\($0)" } ?? host)"])
        }
    }

    /// Stops accepting, lets every connection finish its in-flight requests (new requests get
    /// `ESHUTDOWN`), then closes them. Connections still busy after the grace period are closed anyway.
    public func shutdown() {
        let listening = listeners.withLockedValue { channels -> [any Channel] in
            defer { channels.removeAll() }
            return channels
        }
        for channel in listening {
            try? channel.close().wait()
        }
        if let path = configuration.unixSocketPath {
            unlink(path)
        }
        let open = connections.withLockedValue { Array($0.values) }
        for channel in open {
            channel.pipeline.fireUserInboundEventTriggered(NBDConnectionHandler.DrainEvent())
        }
        let deadline = NIODeadline.now() + configuration.shutdownGracePeriod
        for channel in open {
            let closed = channel.closeFuture
            let timer = channel.eventLoop.scheduleTask(deadline: deadline) {
                channel.close(promise: nil)
            }
            try? closed.wait()
            timer.cancel()
        }
    }

    private func makeBootstrap(tcp: Bool) -> ServerBootstrap {
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.recvAllocator,
                                value: AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 * 1024, maximum: 1024 * 1024))
            // Replies may queue up to 32 MiB (one maximum read) by default before the connection stops
            // reading; NIO's 64 KiB default would pause every burst of a few 4 KiB reads.
            .childChannelOption(ChannelOptions.writeBufferWaterMark,
                                value: ChannelOptions.Types.WriteBufferWaterMark(
                                    low: configuration.replyQueueBytesMax / 2, high: configuration.replyQueueBytesMax))
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let id = connectionCounter.withLockedValue { counter -> UInt64 in
                        counter += 1
                        return counter
                    }
                    var connectionLogger = logger
                    connectionLogger[metadataKey: "connection"] = "\(id)"
                    let handler = NBDConnectionHandler(exports: exports, configuration: configuration, logger: connectionLogger)
                    try channel.pipeline.syncOperations.addHandler(handler)
                    let key = ObjectIdentifier(channel)
                    connections.withLockedValue { $0[key] = channel }
                    channel.closeFuture.whenComplete { [self] _ in
                        _ = connections.withLockedValue { $0.removeValue(forKey: key) }
                    }
                }
            }
        if tcp {
            bootstrap = bootstrap.childChannelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
        }
        return bootstrap
    }

    /// Removes a socket file left behind by a server that is gone, but refuses to take over the
    /// socket of one that is still answering.
    private static func removeStaleSocket(at path: String) throws {
        var status = stat()
        guard lstat(path, &status) == 0 else { return }
        guard (status.st_mode & S_IFMT) == S_IFSOCK else {
            throw NBDServerError.socketPathTaken(path: path)
        }
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { return }
        defer { close(probe) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw NBDServerError.socketPathTooLong(path: path)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if connected == 0 {
            throw NBDServerError.socketInUse(path: path)
        }
        unlink(path)
    }
}

/// Why a server could not start.
public enum NBDServerError: Error, CustomStringConvertible {
    case socketInUse(path: String)
    case socketPathTaken(path: String)
    case socketPathTooLong(path: String)

    public var description: String {
        switch self {
        case .socketInUse(let path):
            return "another server is already listening on \(path); stop it or choose another --socket"
        case .socketPathTaken(let path):
            return "\(path) exists and is not a socket; choose another --socket"
        case .socketPathTooLong(let path):
            return "the socket path \(path) is too long for a Unix socket (108 bytes at most)"
        }
    }
}
