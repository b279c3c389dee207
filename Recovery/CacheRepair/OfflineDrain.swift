import Dispatch
import Foundation
import Logging
import NIOCore
import NIOPosix
import SluiceCache
import SluiceFormat
import SluiceIO

/// Drains a cache without a server: recovers it exactly as `sluice serve` would (the same
/// recover_cache, pmem reconciliation and engine), writes every dirty block back to the backing
/// store (sorted, merged, synced before anything is marked clean), and shuts down cleanly.
/// Interrupted at any point, it is simply run again: the next run recovers and goes on.
public enum OfflineDrain {
    static let detachedMagic = "SLUICE-DETACHED\n"

    /// What a detached device's first block says, if it is one.
    static func detachedNote(_ bytes: [UInt8]) -> String? {
        let magic = Array(detachedMagic.utf8)
        guard bytes.count >= magic.count, Array(bytes[0..<magic.count]) == magic else { return nil }
        let text = bytes[magic.count...].prefix { $0 != 0 }
        return "not a cache any more: \(String(decoding: text, as: UTF8.self)) (its data was drained first); format it to use it again"
    }

    /// Where a drain stands.
    public struct Progress: Sendable {
        public var dirtyBlocksAtStart: Int
        public var dirtyBlocks: Int
        public var elapsedSeconds: Double

        public var doneBytes: UInt64 { UInt64(max(0, dirtyBlocksAtStart - dirtyBlocks)) * UInt64(CacheGeometry.blockBytes) }
        public var totalBytes: UInt64 { UInt64(dirtyBlocksAtStart) * UInt64(CacheGeometry.blockBytes) }
        public var bytesPerSecond: Double { elapsedSeconds > 0 ? Double(doneBytes) / elapsedSeconds : 0 }
        public var etaSeconds: Double? {
            guard bytesPerSecond > 0 else { return nil }
            return Double(totalBytes - doneBytes) / bytesPerSecond
        }
    }

    public struct Result: Sendable {
        public var dirtyBlocksAtStart: Int
        public var writtenBackBlocks: UInt64
        public var backingWriteRequests: UInt64
        public var seconds: Double
    }

    /// Drains the cache at `cachePath` into `backing`. `progress` is called about every
    /// `progressIntervalSeconds` from a background thread.
    public static func drain(cachePath: String, backing: BackingLocation, pmemPath: String?, logger: Logger,
                             progressIntervalSeconds: Double = 1, progress: @escaping (Progress) -> Void) throws -> Result {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let started = DispatchTime.now()
        func elapsed() -> Double { Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9 }
        var tunables = CacheTunables()
        // No background pacing: a drain wants the backing store's full speed.
        tunables.writebackThresholdPercent = 100
        let volume = try CacheVolume.open(cachePath: cachePath, backing: backing, pmemPath: pmemPath, eventLoop: group.next(),
                                          tunables: tunables, logger: logger)
        var closed = false
        defer { if !closed { try? volume.close() } }
        let atStart = try volume.withEngine { $0.dirtyBlocks }.wait()
        let drained = volume.withEngine { engine -> EventLoopFuture<Void> in
            let promise = engine.eventLoop.makePromise(of: Void.self)
            engine.writeBackAll { promise.completeWith($0) }
            return promise.futureResult
        }.flatMap { $0 }
        let finished = DispatchSemaphore(value: 0)
        drained.whenComplete { _ in finished.signal() }
        while finished.wait(timeout: .now() + progressIntervalSeconds) == .timedOut {
            let dirty = (try? volume.withEngine { $0.dirtyBlocks }.wait()) ?? 0
            progress(Progress(dirtyBlocksAtStart: atStart, dirtyBlocks: dirty, elapsedSeconds: elapsed()))
        }
        try drained.wait()
        let counters = try volume.withEngine { $0.counters }.wait()
        progress(Progress(dirtyBlocksAtStart: atStart, dirtyBlocks: 0, elapsedSeconds: elapsed()))
        closed = true
        try volume.close()
        return Result(dirtyBlocksAtStart: atStart, writtenBackBlocks: counters.writtenBackBlocks,
                      backingWriteRequests: counters.backingWriteRequests, seconds: elapsed())
    }

    /// Drains, then makes the cache device (and pmem file) unusable as this backing store's cache:
    /// its superblock header is erased, so it can never be attached again by mistake and the
    /// backing store is complete on its own.
    public static func detach(cachePath: String, backing: BackingLocation, pmemPath: String?, logger: Logger,
                              progress: @escaping (Progress) -> Void) throws -> Result {
        let result = try drain(cachePath: cachePath, backing: backing, pmemPath: pmemPath, logger: logger, progress: progress)
        let file = try BlockFile(path: cachePath, readOnly: false)
        defer { file.close() }
        let device = FileMedium(file: file)
        // The header block becomes a detached marker: no Sluice superblock (so `serve` refuses the
        // device as unformatted), and a note for `check` saying what happened.
        var marker = [UInt8](repeating: 0, count: CacheGeometry.blockBytes)
        let note = Array((detachedMagic + "detached from \(backing.identity) at \(Int(Date().timeIntervalSince1970)) s since 1970").utf8)
        marker.replaceSubrange(0..<min(note.count, marker.count), with: note.prefix(marker.count))
        try device.writeBytes(offset: 0, bytes: marker)
        try device.synchronizeBytes()
        if let pmemPath { PmemFile.invalidate(try PmemFile.open(path: pmemPath)) }
        return result
    }
}
