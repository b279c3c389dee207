import Foundation
import Logging
import NIOCore
import NIOPosix
import SluiceControl
import SluiceVolume
import XCTest

/// The control endpoint knows volumes only through `ManagedVolume`: a volume kind of the test's
/// own answers every route, and refusals map to 400, failures to 500, unknown routes to 404.
final class ControlServerTests: XCTestCase {
    private final class RecordingVolume: ManagedVolume, @unchecked Sendable {
        let loop: any EventLoop
        var settings: [String: String] = ["mode": "fast"]
        var writeBacks = 0
        init(loop: any EventLoop) { self.loop = loop }

        private func json() -> Data { try! JSONSerialization.data(withJSONObject: ["settings": settings, "write_backs": writeBacks]) }
        func statusJSON() -> EventLoopFuture<Data> { loop.submit { self.json() } }
        func set(_ key: String, to value: String) -> EventLoopFuture<Data> {
            loop.submit {
                switch key {
                case "mode" where ["fast", "safe"].contains(value): self.settings[key] = value
                case "mode": throw ManagementError.badRequest("mode is fast or safe, not \"\(value)\"")
                case "broken": throw POSIXError(.EIO)
                default: throw ManagementError.badRequest("no setting \(key)")
                }
                return self.json()
            }
        }
        func writeBackAll() -> EventLoopFuture<Data> { loop.submit { self.writeBacks += 1; return self.json() } }
    }

    func testEveryRouteGoesThroughTheNarrowInterface() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let volume = RecordingVolume(loop: group.next())
        let path = NSTemporaryDirectory() + "sluice-control-\(getpid()).sock"
        let server = ControlServer(volume: volume, socketPath: path, group: group, logger: Logger(label: "test"))
        try server.start()
        defer { server.stop() }
        let client = ControlClient(socketPath: path)
        func object(_ data: Data) throws -> [String: Any] { try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any]) }
        func refusal(_ method: String, _ path: String) -> (Int, String)? {
            do { _ = try client.request(method: method, path: path); return nil } catch ControlError.failed(let status, let message) {
                return (status, message)
            } catch { return (-1, "\(error)") }
        }

        XCTAssertEqual(try object(client.request(method: "GET", path: "/status"))["settings"] as? [String: String], ["mode": "fast"])
        XCTAssertEqual(try object(client.request(method: "POST", path: "/set?key=mode&value=safe"))["settings"] as? [String: String], ["mode": "safe"])
        XCTAssertEqual(refusal("POST", "/set?key=mode&value=sideways")?.0, 400)
        XCTAssertEqual(refusal("POST", "/set?key=mode&value=sideways")?.1, "mode is fast or safe, not \"sideways\"")
        XCTAssertEqual(refusal("POST", "/set?key=mode")?.0, 400, "no value")
        XCTAssertEqual(refusal("POST", "/set?key=elsewhere&value=1")?.0, 400)
        XCTAssertEqual(refusal("POST", "/set?key=broken&value=1")?.0, 500, "a failure that is not a refusal")
        XCTAssertEqual(refusal("GET", "/nowhere")?.0, 404)
        XCTAssertEqual(try object(client.request(method: "POST", path: "/drain"))["write_backs"] as? Int, 1)
        XCTAssertEqual(try group.next().submit { volume.settings }.wait(), ["mode": "safe"], "refused requests changed nothing")
    }
}
