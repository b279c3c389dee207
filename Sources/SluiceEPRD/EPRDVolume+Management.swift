import Foundation
import NIOCore
import SluiceVolume

/// The EPRD as the management endpoint sees it: its image, dirty data and commits as JSON, and
/// two settings, `commit_interval` (seconds, 0 = only barriers and write-back commit) and
/// `barriers` (on/off). Write-back commits at once.
extension EPRDVolume: ManagedVolume {
    struct Status: Encodable {
        var kind = "eprd"
        var sizeBytes: UInt64
        var sectorBytes: UInt32
        var residentBytes: UInt64
        var dirtyBytes: UInt64
        var commitIntervalSeconds: Double
        var barriers: String
        var durable: Bool
        var durability: String
        var commits: UInt64
        var commitRunning: Bool
        var commitErrors: UInt64
        var committedBytes: UInt64
        var lastCommitMs: UInt64
        var loadedBytes: UInt64
        var loadErrors: UInt64
        var lastError: String?

        enum CodingKeys: String, CodingKey {
            case kind, barriers, durable, durability, commits
            case sizeBytes = "size_bytes"
            case sectorBytes = "sector_bytes"
            case residentBytes = "resident_bytes"
            case dirtyBytes = "dirty_bytes"
            case commitIntervalSeconds = "commit_interval"
            case commitRunning = "commit_running"
            case commitErrors = "commit_errors"
            case committedBytes = "committed_bytes"
            case lastCommitMs = "last_commit_ms"
            case loadedBytes = "loaded_bytes"
            case loadErrors = "load_errors"
            case lastError = "last_error"
        }
    }

    /// The settings `set` takes.
    public static let settingKeys = ["commit_interval", "barriers"]

    public func statusJSON() -> EventLoopFuture<Data> {
        managementLoop.makeSucceededFuture(encodedStatus())
    }

    public func set(_ key: String, to value: String) -> EventLoopFuture<Data> {
        switch key {
        case "commit_interval":
            guard let seconds = Double(value), seconds >= 0, seconds <= 86_400 else {
                return managementLoop.makeFailedFuture(ManagementError.badRequest(
                    "commit_interval takes seconds from 0 (commit only for barriers and write-back) to 86400, such as 5 or 0.5, not \"\(value)\""))
            }
            let intervalMs = UInt64((seconds * 1000).rounded())
            lock.withLock { commitIntervalMs = intervalMs }
            return commitLoop.submit { self.scheduleTimer(intervalMs: intervalMs) }
                .hop(to: managementLoop).map { self.encodedStatus() }
        case "barriers":
            switch value.lowercased() {
            case "on", "1", "true", "yes": lock.withLock { barriersOn = true }
            case "off", "0", "false", "no": lock.withLock { barriersOn = false }
            default:
                return managementLoop.makeFailedFuture(ManagementError.badRequest("barriers takes on or off, not \"\(value)\""))
            }
            return managementLoop.makeSucceededFuture(encodedStatus())
        default:
            return managementLoop.makeFailedFuture(ManagementError.badRequest(
                "an EPRD has no setting \"\(key)\"; its settings are \(Self.settingKeys.joined(separator: ", "))"))
        }
    }

    /// Commits everything dirty now and answers with the status once it is written back and synced.
    public func writeBackAll() -> EventLoopFuture<Data> {
        let promise = managementLoop.makePromise(of: Data.self)
        requestCommit { result in
            switch result {
            case .success: promise.succeed(self.encodedStatus())
            case .failure(let error): promise.fail(error)
            }
        }
        return promise.futureResult
    }

    func encodedStatus() -> Data {
        let status: Status = lock.withLock {
            Status(sizeBytes: sizeBytes, sectorBytes: blockSizes.minimumBytes, residentBytes: image.allocatedBytes,
                   dirtyBytes: dirty.bytes, commitIntervalSeconds: Double(commitIntervalMs) / 1000,
                   barriers: barriersOn ? "on" : "off", durable: barriersOn,
                   durability: Self.durabilityNote(barriers: barriersOn, commitIntervalMs: commitIntervalMs),
                   commits: counters.commits, commitRunning: counters.isCommitting, commitErrors: counters.commitErrors, committedBytes: counters.committedBytes,
                   lastCommitMs: counters.lastCommitMs, loadedBytes: counters.loadedBytes, loadErrors: counters.loadErrors,
                   lastError: counters.lastError)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return (try? encoder.encode(status)) ?? Data("{}".utf8)
    }
}
