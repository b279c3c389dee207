import Foundation
import NIOCore

/// What the management endpoint may ask of a volume, and nothing more: its status, a change of
/// one setting, and a writeback of everything it holds dirty. The endpoint knows no volume kind;
/// each kind answers for itself, with JSON, on any event loop.
public protocol ManagedVolume: AnyObject, Sendable {
    /// The volume's status as a JSON object.
    func statusJSON() -> EventLoopFuture<Data>

    /// Changes the setting `key` to `value` (its text, as a client sent it); answers with the new
    /// status. A key or value the volume does not accept fails with
    /// ``ManagementError/badRequest(_:)``, whose message says what it accepts.
    func set(_ key: String, to value: String) -> EventLoopFuture<Data>

    /// Writes every dirty block back and makes it durable there; answers with the status once
    /// nothing is dirty. A volume that holds nothing dirty answers at once.
    func writeBackAll() -> EventLoopFuture<Data>
}

/// Why a management request was refused.
public enum ManagementError: Error, Equatable, CustomStringConvertible {
    /// The request names a key or value the volume does not accept (HTTP 400).
    case badRequest(String)

    public var description: String {
        switch self {
        case .badRequest(let message): return message
        }
    }
}
