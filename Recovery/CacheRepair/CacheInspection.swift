import RecoverCache
import SluiceCache
import SluiceFormat
import SluiceIO

/// A read-only look at a cache device (and its pmem file): what recovery finds, and what it would
/// write, without writing anything. `sluice-recover check` and `dump` are built on it.
public struct CacheInspection {
    /// What `check` concludes; the raw values are its exit codes (3 means it could not look: the
    /// cache is in use, or a file is missing).
    public enum Verdict: Int32, Sendable, CustomStringConvertible {
        /// Shut down cleanly and nothing to repair: the cache can be served or drained as it is.
        case clean = 0
        /// Not shut down cleanly (or recovery has work to do), but consistent: recovery will
        /// bring back every durable write.
        case dirty = 1
        /// Something is wrong that recovery would refuse, or data is known to be missing.
        case damaged = 2

        public var description: String {
            switch self {
            case .clean: return "clean"
            case .dirty: return "dirty but consistent"
            case .damaged: return "damaged"
            }
        }
    }

    public var cachePath: String
    public var verdict: Verdict = .clean
    /// Every problem found, each a sentence naming what and where.
    public var problems: [String] = []
    /// Things that are normal after a crash, reported for the operator.
    public var notes: [String] = []
    public var header: SuperblockHeader?
    public var geometry: CacheGeometry?
    /// The two record slots as decoded (nil when a slot does not hold a valid record).
    public var recordSlots: [SuperblockRecord?] = [nil, nil]
    /// The record recovery would use.
    public var record: SuperblockRecord?
    public var report: RecoveryReport?
    /// Writes recovery would make to the cache device (segments from pmem, stale-tail erasures).
    public var recoveryWrites = 0
    public var dirtyBlocks = 0
    public var pmemLayout: PmemLayout?
    public var pmemAreas: [PmemLayout.Area] = []

    /// Inspects the cache device at `cachePath` (locked shared, so a running server, which holds
    /// it exclusively, is refused) and, in pmem mode, the pmem file at `pmemPath`.
    public static func inspect(cachePath: String, pmemPath: String?) throws -> CacheInspection {
        let file = try BlockFile(path: cachePath, readOnly: true)
        defer { file.close() }
        var inspection = CacheInspection(cachePath: cachePath)
        inspection.run(device: FileMedium(file: file), pmemPath: pmemPath)
        return inspection
    }

    private mutating func damaged(_ problem: String) {
        problems.append(problem)
        verdict = .damaged
    }

    private mutating func run(device: FileMedium, pmemPath: String?) {
        guard device.sizeBytes >= UInt64(CacheSuperblock.bytes),
              let first = try? device.readBytes(offset: 0, count: CacheSuperblock.bytes) else {
            return damaged("the cache device holds \(device.sizeBytes) bytes: too small for a superblock")
        }
        if let detached = OfflineDrain.detachedNote(first) {
            notes.append(detached)
            return
        }
        let found: CacheSuperblock.Found
        do {
            found = try CacheSuperblock.decode(first, deviceBytes: device.sizeBytes)
        } catch {
            return damaged("superblock: \(error)")
        }
        let header = found.header
        let geometry = found.geometry
        self.header = header
        self.geometry = geometry
        recordSlots = found.recordSlots
        record = found.record
        guard let record else { return damaged("\(FormatError.noValidRecord)") }
        if recordSlots.contains(where: { $0 == nil }) {
            notes.append("one superblock record slot is not valid (a record write torn by a crash, or a new cache); the other is used")
        }

        var image: PmemImage?
        var memory: MappedPersistentMemory?
        if header.mode == .pmem {
            guard let pmemPath else {
                return damaged("the cache is in pmem mode (pmem file UUID \(UUIDText.format(header.pmemUUID))); give its pmem file with --pmem PATH to check it")
            }
            do {
                let mapped = try PmemFile.open(path: pmemPath)
                memory = mapped
                let layout = try PmemAttachment(memory: mapped, path: pmemPath)
                    .checkedLayout(for: CacheSuperblock.Opened(header: header, geometry: geometry, record: record))
                pmemLayout = layout
                let bytes = UnsafeRawBufferPointer(start: mapped.baseAddress, count: mapped.sizeBytes)
                pmemAreas = (0..<layout.areaCount).map { layout.decodeArea($0, in: bytes, geometry: geometry) }
                image = PmemImage(layout: layout, bytes: bytes, path: pmemPath)
            } catch {
                return damaged("pmem file: \(error)")
            }
        } else if let pmemPath {
            notes.append("the cache is in volatile mode; the pmem file \(pmemPath) was not read")
        }

        // Recovery, on a device that keeps the cache untouched: its writes are counted, not made.
        let dryRun = DryRunRecoveryDevice(device)
        do {
            let report = try withExtendedLifetime(memory) {
                try RecoverCache.recover(device: dryRun, header: header, geometry: geometry, record: record, pmem: image, verifyAll: true)
            }
            self.report = report
            recoveryWrites = dryRun.writesDropped
            dirtyBlocks = RecoveredCache(chain: report.chain, geometry: geometry).index.count
            if !report.cleanShutdown || recoveryWrites > 0 {
                verdict = .dirty
                notes.append(report.cleanShutdown ? "shut down cleanly, but recovery has \(recoveryWrites) writes to make"
                                                  : "not shut down cleanly: the next start (or `sluice-recover drain`) recovers the log")
            }
            if !report.pmemSealedSegmentsWritten.isEmpty {
                notes.append("recovery would write sealed segments \(report.pmemSealedSegmentsWritten) from the pmem file to the cache device")
            }
            if let open = report.pmemOpenSegmentWritten {
                notes.append("recovery would write the open pmem segment \(open) (\(report.pmemOpenEntries) entries) to the cache device")
            }
            if !report.erasedSlots.isEmpty {
                notes.append("recovery would erase \(report.erasedSlots.count) stale segments past the end of the log (slots \(report.erasedSlots))")
            }
            switch report.chain.end {
            case .idJump(let slot, let expected, let found):
                damaged("slot \(slot) should hold segment \(expected) or an older one, and holds segment \(found): the device was damaged or written by something else")
            case .malformed(let slot):
                damaged("slot \(slot), where the log continues, holds a malformed segment header")
            case .checksumMismatch(let slot, let expected):
                notes.append("segment \(expected) in slot \(slot) fails its checksum: a write torn by the crash, not applied")
            default:
                break
            }
        } catch {
            damaged("recovery would refuse this cache: \(error)")
        }
    }
}

/// Recovery's device for a dry run: reads go to the cache device, writes and syncs are counted
/// and dropped. Recovery never reads back what it wrote, so its findings are exact.
final class DryRunRecoveryDevice: RecoveryDevice {
    let device: FileMedium
    private(set) var writesDropped = 0

    init(_ device: FileMedium) {
        self.device = device
    }

    var sizeBytes: UInt64 { device.sizeBytes }
    func readBytes(offset: UInt64, count: Int) throws -> [UInt8] { try device.readBytes(offset: offset, count: count) }
    func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws { try device.readBytes(offset: offset, into: buffer) }
    func writeBytes(offset: UInt64, bytes: [UInt8]) throws { writesDropped += 1 }
    func synchronizeBytes() throws {}
}
