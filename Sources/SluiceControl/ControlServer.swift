import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import SluiceVolume

/// The local control endpoint of a volume: HTTP/1.1 with JSON on a Unix socket beside the NBD
/// socket. It is where `sluice status`, `sluice set` and `sluice drain` talk to a running server,
/// and where the management API grows from. It talks to the volume only through
/// ``ManagedVolume``, never to a volume kind's internals.
///
/// Routes:
/// - `GET /status` — the volume's status as JSON.
/// - `POST /set?key=K&value=V` — changes a setting; answers with the new status.
/// - `POST /drain` — writes every dirty block back, syncs the backing store, and answers when
///   nothing is dirty.
public final class ControlServer {
    private let volume: any ManagedVolume
    private let group: any EventLoopGroup
    private let logger: Logger
    public let socketPath: String
    private var channel: (any Channel)?

    public init(volume: any ManagedVolume, socketPath: String, group: any EventLoopGroup, logger: Logger) {
        self.volume = volume
        self.socketPath = socketPath
        self.group = group
        self.logger = logger
    }

    /// Starts listening. A stale socket file from a crashed server is replaced; one a live server
    /// answers on is refused.
    public func start() throws {
        if FileManager.default.fileExists(atPath: socketPath) {
            if (try? ControlClient(socketPath: socketPath).request(method: "GET", path: "/status")) != nil {
                throw ControlError.inUse(socketPath)
            }
            try? FileManager.default.removeItem(atPath: socketPath)
        }
        let volume = self.volume
        let logger = self.logger
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 16)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMap {
                    channel.pipeline.addHandler(ControlHandler(volume: volume, logger: logger))
                }
            }
            .bind(unixDomainSocketPath: socketPath).wait()
    }

    public func stop() {
        try? channel?.close().wait()
        try? FileManager.default.removeItem(atPath: socketPath)
    }
}

public enum ControlError: Error, CustomStringConvertible {
    case inUse(String)
    case unreachable(String, String)
    case failed(Int, String)

    public var description: String {
        switch self {
        case .inUse(let path): return "a running server already answers on \(path)"
        case .unreachable(let path, let reason): return "cannot reach a Sluice server at \(path): \(reason); is `sluice serve --cache …` running?"
        case .failed(let status, let message): return "the server answered \(status): \(message)"
        }
    }
}

/// Answers one control request per HTTP request.
private final class ControlHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let volume: any ManagedVolume
    private let logger: Logger
    private var head: HTTPRequestHead?

    init(volume: any ManagedVolume, logger: Logger) {
        self.volume = volume
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): self.head = head
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            route(head, context: context)
        }
    }

    private func route(_ head: HTTPRequestHead, context: ChannelHandlerContext) {
        let components = URLComponents(string: head.uri)
        let path = components?.path ?? head.uri
        var query: [String: String] = [:]
        for item in components?.queryItems ?? [] { query[item.name] = item.value ?? "" }
        let loop = context.eventLoop
        switch (head.method, path) {
        case (.GET, "/status"):
            answer(volume.statusJSON(), head: head, context: context, loop: loop)
        case (.POST, "/set"):
            guard let key = query["key"], let value = query["value"] else {
                return respond(.failure(ControlError.failed(400, "give a key and a value: /set?key=K&value=V")),
                               status: .badRequest, head: head, context: context)
            }
            let changed = volume.set(key, to: value)
            changed.whenSuccess { _ in self.logger.notice("setting changed", metadata: ["key": "\(key)", "value": "\(value)"]) }
            answer(changed, head: head, context: context, loop: loop)
        case (.POST, "/drain"):
            answer(volume.writeBackAll(), head: head, context: context, loop: loop)
        default:
            respond(.failure(ControlError.failed(404, "unknown request \(head.method) \(path); try GET /status, POST /set, POST /drain")),
                    status: .notFound, head: head, context: context)
        }
    }

    /// Responds with what the volume answered: its JSON, 400 for a request it refused, 500 else.
    private func answer(_ future: EventLoopFuture<Data>, head: HTTPRequestHead, context: ChannelHandlerContext, loop: any EventLoop) {
        future.hop(to: loop).whenComplete { result in
            if case .failure(let error as ManagementError) = result {
                return self.respond(.failure(ControlError.failed(400, error.description)), status: .badRequest, head: head, context: context)
            }
            self.respond(result, head: head, context: context)
        }
    }

    private func respond(_ result: Result<Data, Error>, status: HTTPResponseStatus = .internalServerError,
                         head: HTTPRequestHead, context: ChannelHandlerContext) {
        let body: Data
        let code: HTTPResponseStatus
        switch result {
        case .success(let data):
            body = data
            code = .ok
        case .failure(let error):
            let message = (error as? ControlError).map { error -> String in
                if case .failed(_, let text) = error { return text }
                return "\(error)"
            } ?? "\(error)"
            body = (try? JSONSerialization.data(withJSONObject: ["error": message])) ?? Data()
            code = status
        }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: code, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: body)))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }
}
