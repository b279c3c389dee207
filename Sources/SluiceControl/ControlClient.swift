import Foundation
import Glibc

/// A blocking client for the control endpoint: one HTTP/1.1 request per connection.
public struct ControlClient {
    public let socketPath: String

    public init(socketPath: String) {
        self.socketPath = socketPath
    }

    /// Sends a request and returns the response body; a status other than 200 throws with the
    /// server's message.
    public func request(method: String, path: String) throws -> Data {
        let descriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw ControlError.unreachable(socketPath, String(cString: strerror(errno))) }
        defer { close(descriptor) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw ControlError.unreachable(socketPath, "the path is too long for a Unix socket")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw ControlError.unreachable(socketPath, String(cString: strerror(errno))) }
        let request = Array("\(method) \(path) HTTP/1.1\r\nHost: sluice\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)
        var sent = 0
        while sent < request.count {
            let written = request[sent...].withUnsafeBytes { send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard written > 0 else { throw ControlError.unreachable(socketPath, String(cString: strerror(errno))) }
            sent += written
        }
        var response = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            response.append(contentsOf: chunk[0..<count])
        }
        guard let separator = response.firstRange(of: Array("\r\n\r\n".utf8)) else {
            throw ControlError.unreachable(socketPath, "the server closed the connection without an answer")
        }
        let headerText = String(decoding: response[..<separator.lowerBound], as: UTF8.self)
        let body = Data(response[separator.upperBound...])
        let statusCode = Int(headerText.split(separator: " ").dropFirst().first ?? "") ?? 0
        guard statusCode == 200 else {
            let message = (try? JSONSerialization.jsonObject(with: body) as? [String: Any])?["error"] as? String
            throw ControlError.failed(statusCode, message ?? String(decoding: body, as: UTF8.self))
        }
        return body
    }
}
