import Foundation
import NIOCore
import SluiceVolume

/// The RAM disk as the management endpoint sees it: its size, memory and lock as JSON, and three
/// settings: `size` (resize), `locked` and `limit`. Nothing is ever dirty, so writing back is done
/// at once.
extension RAMDiskVolume: ManagedVolume {
    /// The status JSON's fields.
    struct Status: Encodable {
        var kind = "ramdisk"
        var sizeBytes: UInt64
        var allocatedBytes: UInt64
        var limitBytes: UInt64
        var locked: Bool
        var durable = false
        var durability = RAMDiskVolume.durabilityNote

        enum CodingKeys: String, CodingKey {
            case kind, locked, durable, durability
            case sizeBytes = "size_bytes"
            case allocatedBytes = "allocated_bytes"
            case limitBytes = "limit_bytes"
        }
    }

    /// The settings `set` takes.
    public static let settingKeys = ["size", "locked", "limit"]

    public func statusJSON() -> EventLoopFuture<Data> {
        managementLoop.makeSucceededFuture(encodedStatus())
    }

    public func set(_ key: String, to value: String) -> EventLoopFuture<Data> {
        do {
            try apply(key, value)
            return managementLoop.makeSucceededFuture(encodedStatus())
        } catch {
            return managementLoop.makeFailedFuture(error)
        }
    }

    public func writeBackAll() -> EventLoopFuture<Data> {
        managementLoop.makeSucceededFuture(encodedStatus())
    }

    private func apply(_ key: String, _ value: String) throws {
        switch key {
        case "size":
            guard let bytes = ByteCount.parse(value) else {
                throw ManagementError.badRequest("size takes a size such as 1073741824, 512M or 4G, not \"\(value)\"")
            }
            do { try resize(toBytes: bytes) } catch let refusal as Refusal { throw ManagementError.badRequest(refusal.description) }
        case "locked":
            switch value.lowercased() {
            case "1", "true", "on", "yes": setLocked(true)
            case "0", "false", "off", "no": setLocked(false)
            default: throw ManagementError.badRequest("locked takes 1 (read-only) or 0, not \"\(value)\"")
            }
        case "limit":
            if value == "0" || value.lowercased() == "size" { return setLimit(nil) }
            guard let bytes = ByteCount.parse(value) else {
                throw ManagementError.badRequest("limit takes a size such as 512M, or 0 for the disk's size, not \"\(value)\"")
            }
            setLimit(bytes)
        default:
            throw ManagementError.badRequest("a RAM disk has no setting \"\(key)\"; its settings are \(Self.settingKeys.joined(separator: ", "))")
        }
    }

    func encodedStatus() -> Data {
        let status = Status(sizeBytes: sizeBytes, allocatedBytes: allocatedBytes, limitBytes: limitBytes, locked: locked)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return (try? encoder.encode(status)) ?? Data("{}".utf8)
    }
}
