import Foundation
import NIOCore
import RecoverCache
import SluiceFormat
import SluiceIO

/// Opens a formatted cache device before serving: checks the superblock against what the caller
/// expects, runs recover_cache, and rebuilds the index. Blocking; runs before the engine starts.
public enum CacheStartup {
    public struct Recovered {
        public var opened: CacheSuperblock.Opened
        public var state: RecoveredCache
        public var report: RecoveryReport
        public var durationSeconds: Double
        /// Of which rebuilding (and checking) the index from the chain.
        public var replaySeconds: Double
        /// Pmem mode: the pmem file's layout, checked against the superblock.
        public var pmemLayout: PmemLayout?
    }

    public static func recover(cacheFile: BlockFile, expectation: CacheSuperblock.Expectation,
                               pmem: PmemAttachment? = nil) throws -> Recovered {
        try recover(device: FileMedium(file: cacheFile), expectation: expectation, pmem: pmem)
    }

    /// Recovers from any medium whose completions run before its calls return. In pmem mode the
    /// pmem file is checked against the superblock and reconciled with the log.
    public static func recover<Device: SynchronousBlockMedium>(device: Device, expectation: CacheSuperblock.Expectation,
                                                               pmem: PmemAttachment? = nil) throws -> Recovered {
        let started = Date()
        var expectation = expectation
        expectation.mode = pmem == nil ? .volatile : .pmem
        var openResult: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.open(device, expectation: expectation) { openResult = $0 }
        let opened = try openResult!.get()
        var image: PmemImage?
        if let pmem {
            let layout = try pmem.checkedLayout(for: opened)
            image = PmemImage(layout: layout, bytes: UnsafeRawBufferPointer(start: pmem.memory.baseAddress, count: pmem.memory.sizeBytes),
                              path: pmem.path)
        }
        let report = try RecoverCache.recover(device: device, header: opened.header, geometry: opened.geometry, record: opened.record, pmem: image)
        let replayStarted = Date()
        let state = RecoveredCache(chain: report.chain, geometry: opened.geometry)
        return Recovered(opened: opened, state: state, report: report, durationSeconds: Date().timeIntervalSince(started),
                         replaySeconds: Date().timeIntervalSince(replayStarted), pmemLayout: image?.layout)
    }

    /// Formats `cacheFile` for `expectation`. Refuses a device that already holds a Sluice cache
    /// unless `force` is set, so a cache with dirty data is never erased by mistake.
    /// Formats `cacheFile` for `expectation`, with its write buffer in a new pmem file at
    /// `pmemPath` if one is given (pmem mode). Refuses a device or pmem file that already holds a
    /// Sluice cache unless `force` is set, so a cache with dirty data is never erased by mistake.
    public static func format(cacheFile: BlockFile, segmentBytes: Int, expectation: CacheSuperblock.Expectation,
                              force: Bool, pmemPath: String? = nil, cacheMode: CacheMode = .writeback) throws -> CacheSuperblock.Opened {
        try expectation.checkRecordable()
        let device = FileMedium(file: cacheFile)
        if !force, device.sizeBytes >= 4096 {
            let first = try device.readBytes(offset: 0, count: 4096)
            if Array(first[0..<SuperblockHeader.magic.count]) == SuperblockHeader.magic {
                throw StartupError.alreadyFormatted(path: cacheFile.path)
            }
        }
        let uuid = newUUID()
        var expectation = expectation
        expectation.mode = pmemPath == nil ? .volatile : .pmem
        var pmemUUID = [UInt8](repeating: 0, count: 16)
        if let pmemPath {
            // The pmem file first: a superblock never names a pmem file that does not exist.
            let geometry = try CacheGeometry(segmentBytes: segmentBytes, deviceBytes: device.sizeBytes)
            pmemUUID = newUUID()
            try PmemFile.create(path: pmemPath, layout: PmemLayout(cacheUUID: uuid, pmemUUID: pmemUUID, segmentBytes: segmentBytes),
                                geometry: geometry, force: force)
        }
        var result: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.format(device, segmentBytes: segmentBytes, expectation: expectation, uuid: uuid,
                               nowSeconds: UInt64(Date().timeIntervalSince1970), pmemUUID: pmemUUID, cacheMode: cacheMode) { result = $0 }
        return try result!.get()
    }

    /// Records `mode` as the cache mode of a cache no server uses (`sluice mode --cache-mode`):
    /// the next superblock record, written and synced, carries it. Nothing else changes: dirty
    /// blocks stay, and are written back once a server runs in a mode other than writeback.
    public static func setCacheMode(cacheFile: BlockFile, backingIdentity: String, backingSizeBytes: UInt64,
                                    to mode: CacheMode) throws -> (from: CacheMode, to: CacheMode) {
        let device = FileMedium(file: cacheFile)
        guard device.sizeBytes >= UInt64(CacheSuperblock.bytes) else { throw FormatError.notFormatted }
        let found = try CacheSuperblock.decode(try device.readBytes(offset: 0, count: CacheSuperblock.bytes), deviceBytes: device.sizeBytes)
        guard found.header.backingIdentity == backingIdentity else {
            throw FormatError.wrongBacking(expected: found.header.backingIdentity, found: backingIdentity)
        }
        guard found.header.backingSizeBytes == backingSizeBytes else {
            throw FormatError.backingSizeChanged(expected: found.header.backingSizeBytes, found: backingSizeBytes)
        }
        guard var record = found.record else { throw FormatError.noValidRecord }
        let previous = record.cacheMode
        guard previous != mode else { throw StartupError.alreadyInMode("\(mode.rawValue) cache") }
        record.sequence += 1
        record.cacheMode = mode
        try device.writeBytes(offset: record.blockOffset, bytes: record.encoded())
        try device.synchronizeBytes()
        return (previous, mode)
    }

    static func newUUID() -> [UInt8] {
        withUnsafeBytes(of: UUID().uuid) { Array($0) }
    }
}

public enum StartupError: Error, CustomStringConvertible {
    case alreadyFormatted(path: String)
    case pmemAlreadyFormatted(path: String)
    case alreadyInMode(String)
    case pmemLostAfterCrash(path: String)

    public var description: String {
        switch self {
        case .alreadyFormatted(let path):
            return "\(path) already holds a Sluice cache, which may have dirty data; drain it first (`sluice drain`), then format with --force to erase it"
        case .pmemAlreadyFormatted(let path):
            return "the pmem file \(path) already holds a Sluice write buffer, which may have acknowledged data; drain its cache first, then repeat the command with --force to erase it"
        case .pmemLostAfterCrash(let path):
            return "the pmem file \(path) is gone and the cache was not shut down cleanly, so writes acknowledged from it would be lost; restore the file, or give --force to leave pmem mode with what the cache device holds"
        case .alreadyInMode(let mode):
            return "the cache is already in \(mode) mode; nothing to do"
        }
    }
}

/// A ``BlockMedium`` whose completions run before its calls return (``FileMedium``,
/// the testing module's simulated medium), which is what recovery's blocking interface needs.
public protocol SynchronousBlockMedium: BlockMedium, RecoveryDevice {}

extension SynchronousBlockMedium {
    public func readBytes(offset: UInt64, count: Int) throws -> [UInt8] {
        var result: Result<[UInt8], MediumError>?
        readBytes(offset: offset, count: count) { result = $0 }
        return try result!.get()
    }

    public func writeBytes(offset: UInt64, bytes: [UInt8]) throws {
        var result: Result<Void, MediumError>?
        write(offset: offset, bytes: bytes) { result = $0 }
        try result!.get()
    }

    /// Writes the readable bytes of `buffer` at `offset`.
    public func writeBytes(offset: UInt64, buffer: ByteBuffer) throws {
        var result: Result<Void, MediumError>?
        write(offset: offset, bytes: buffer) { result = $0 }
        try result!.get()
    }

    public func synchronizeBytes() throws {
        var result: Result<Void, MediumError>?
        synchronize { result = $0 }
        try result!.get()
    }
}

extension FileMedium: SynchronousBlockMedium {}
