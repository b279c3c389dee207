import Foundation
import NIOCore
import SluiceFormat
import SluiceVolume

/// The cache as the management endpoint sees it: ``CacheStatus`` as JSON, `cache_mode` and the
/// integer tunables as settings, and writeback of everything.
extension CacheVolume: ManagedVolume {
    public func statusJSON() -> EventLoopFuture<Data> {
        withEngine { self.encode($0.status()) }
    }

    public func set(_ key: String, to value: String) -> EventLoopFuture<Data> {
        let engine = self.engine
        if key == "cache_mode" {
            guard let mode = CacheMode(rawValue: value) else {
                return engine.eventLoop.makeFailedFuture(ManagementError.badRequest("cache_mode is one of \(CacheMode.names), not \"\(value)\""))
            }
            return onEngine { engine, promise in
                engine.setCacheMode(mode) { result in promise.completeWith(result.map { self.encode(engine.status()) }) }
            }
        }
        guard let number = Int(value) else {
            return engine.eventLoop.makeFailedFuture(ManagementError.badRequest("\(key) takes an integer value, not \"\(value)\""))
        }
        return engine.eventLoop.submit {
            do {
                try engine.setTunable(key, to: number)
            } catch {
                throw ManagementError.badRequest("\(error)")
            }
            return self.encode(engine.status())
        }
    }

    public func writeBackAll() -> EventLoopFuture<Data> {
        onEngine { engine, promise in
            engine.writeBackAll { result in promise.completeWith(result.map { self.encode(engine.status()) }) }
        }
    }

    /// The status as JSON, with what only the volume knows: how its backing store is synced.
    func encode(_ status: CacheStatus) -> Data {
        var status = status
        status.backingFlush = backingFlush
        return (try? CacheStatus.jsonEncoder().encode(status)) ?? Data("{}".utf8)
    }
}
