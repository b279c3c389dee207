import Foundation
import Logging
import NIOCore
import SluiceFormat
import SluiceIO

/// Where a cache's backing store is: a local file or block device, or a remote NBD export.
public enum BackingLocation: Equatable, Sendable {
    case file(path: String)
    case nbd(uri: String)

    /// Parses a `--backing` argument: `nbd://…` or `nbd+unix://…` (and the TLS variants) is a
    /// remote export; anything else is a path.
    public init(_ text: String) {
        let lowered = text.lowercased()
        if lowered.hasPrefix("nbd://") || lowered.hasPrefix("nbd+unix://") || lowered.hasPrefix("nbds://")
            || lowered.hasPrefix("nbds+unix://") || lowered.hasPrefix("nbd+vsock://") {
            self = .nbd(uri: text)
        } else {
            self = .file(path: text)
        }
    }

    /// The identity recorded in the superblock so that a wrong backing store is refused: the
    /// canonical path of a file or device, or the URI of an export.
    public var identity: String {
        switch self {
        case .file(let path): return URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        case .nbd(let uri): return uri
        }
    }
}

/// A backing store opened for a cache: its size, and how the engine reaches it.
public final class OpenedBacking {
    public let location: BackingLocation
    public let sizeBytes: UInt64
    let file: BlockFile?
    let nbd: NBDMedium?

    /// Opens (and locks) a file or device, or connects to an export whose completions go to
    /// `eventLoop`. An export that does not advertise flush is refused unless
    /// `durableOnAcknowledgement` (`--backing-durable-on-ack`) says its writes are durable once
    /// acknowledged; a file or device is always synced, so the flag means nothing for it.
    public init(_ location: BackingLocation, eventLoop: any EventLoop, durableOnAcknowledgement: Bool = false) throws {
        self.location = location
        switch location {
        case .file(let path):
            let file = try BlockFile(path: path, readOnly: false)
            self.file = file
            nbd = nil
            sizeBytes = file.sizeBytes
        case .nbd(let uri):
            let medium = try NBDMedium(uri: uri, eventLoop: eventLoop, durableOnAcknowledgement: durableOnAcknowledgement)
            nbd = medium
            file = nil
            sizeBytes = medium.sizeBytes
        }
    }

    /// `backing_flush` in `sluice status` when syncing the backing store flushes it (fdatasync,
    /// or NBD_CMD_FLUSH).
    public static let flushes = "flush"

    /// How writeback makes this backing store durable, as `sluice status` shows it.
    public var flushPolicy: String {
        guard let nbd, !nbd.supportsFlush else { return Self.flushes }
        return "none (durable on acknowledgement, by --backing-durable-on-ack)"
    }

    public func close() {
        nbd?.close()
        file?.close()
    }
}

extension BackingLocation {
    /// The help of `--backing-durable-on-ack`, shared by `sluice` and `sluice-recover`.
    public static let durableOnAcknowledgementHelp =
        "The --backing export does not advertise flush, but every write it acknowledges is already durable "
        + "(for example a server with no volatile write cache): accept it, and treat syncing it as a no-op. "
        + "Without this flag such an export is refused, because writeback could not make what it writes durable."

    /// Why `--backing-durable-on-ack` does not apply to this backing store, if it does not: only a
    /// remote export can lack flush; a file or block device is always synced with fdatasync.
    public func durableOnAcknowledgementMisuse() -> String? {
        guard case .file(let path) = self else { return nil }
        return "--backing-durable-on-ack is for a remote NBD export that does not advertise flush; \(path) is a file "
            + "or block device, which Sluice always syncs: leave the flag out"
    }
}

extension CacheVolume {
    /// Opens a formatted cache device in front of its backing store: checks both, recovers the log,
    /// and starts the engine on `eventLoop`. Blocking; call it before serving, off the event loop.
    public static func open(
        cachePath: String, backing: BackingLocation, backingDurableOnAcknowledgement: Bool = false, pmemPath: String? = nil,
        eventLoop: any EventLoop, tunables: CacheTunables, logger: Logger
    ) throws -> CacheVolume {
        let cacheFile = try BlockFile(path: cachePath, readOnly: false)
        let opened = try OpenedBacking(backing, eventLoop: eventLoop, durableOnAcknowledgement: backingDurableOnAcknowledgement)
        do {
            let pmem = try pmemPath.map { PmemAttachment(memory: try PmemFile.open(path: $0), path: $0) }
            let expectation = CacheSuperblock.Expectation(backingIdentity: backing.identity, backingSizeBytes: opened.sizeBytes,
                                                          mode: pmem == nil ? .volatile : .pmem)
            let recovered = try CacheStartup.recover(cacheFile: cacheFile, expectation: expectation, pmem: pmem)
            let report = recovered.report
            logger.info("recovered the cache log", metadata: [
                "clean_shutdown": "\(report.cleanShutdown)", "segments": "\(report.chain.segments.count)",
                "end": "\(report.chain.end)", "dirty_blocks": "\(recovered.state.index.count)",
                "erased_stale_segments": "\(report.erasedSlots.count)",
                "pmem_sealed_segments_written": "\(report.pmemSealedSegmentsWritten.count)",
                "pmem_open_entries_written": "\(report.pmemOpenEntries)",
                "seconds": "\(String(format: "%.3f", recovered.durationSeconds))",
                // The scan rate, to hold against the device's sequential read rate.
                "bytes_read": "\(report.bytesRead)", "scan_seconds": "\(String(format: "%.3f", report.seconds))",
                "scan_gb_per_s": "\(String(format: "%.2f", report.gigabytesPerSecond))",
                "replay_seconds": "\(String(format: "%.3f", recovered.replaySeconds))",
            ])
            var placement = CacheEngine.BufferPlacement.volatile
            if let pmem, let layout = recovered.pmemLayout { placement = .persistent(memory: pmem.memory, layout: layout) }
            let engine = try eventLoop.submit { () throws -> CacheEngine in
                let driver = try IOUringDrivers.shared.driver(for: eventLoop)
                let cacheMedium = UringFileMedium(file: cacheFile, driver: driver, direct: true)
                let backingMedium: any BlockMedium = opened.nbd ?? UringFileMedium(file: opened.file!, driver: driver)
                return CacheEngine(eventLoop: eventLoop, cacheDevice: cacheMedium, backingStore: backingMedium,
                                   opened: recovered.opened, recovered: recovered.state, tunables: tunables, logger: logger,
                                   buffers: placement)
            }.wait()
            try eventLoop.flatSubmit { engine.start() }.wait()
            let volume = CacheVolume(engine: engine, backingFlush: opened.flushPolicy)
            volume.onClose = {
                opened.close()
                cacheFile.close()
            }
            return volume
        } catch {
            opened.close()
            cacheFile.close()
            throw error
        }
    }
}
