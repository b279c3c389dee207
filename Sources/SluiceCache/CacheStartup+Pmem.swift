import Foundation
import RecoverCache
import SluiceFormat
import SluiceIO

/// A pmem file handed to startup: the mapped memory and the path it came from (for messages).
public struct PmemAttachment {
    public var memory: any PersistentMemory
    public var path: String

    public init(memory: any PersistentMemory, path: String) {
        self.memory = memory
        self.path = path
    }

    /// The file's layout, after checking that it is a Sluice pmem file, undamaged, and the one
    /// the cache device's superblock names.
    public func checkedLayout(for opened: CacheSuperblock.Opened) throws -> PmemLayout {
        guard memory.sizeBytes >= PmemLayout.headerBytes else {
            throw PmemError.notFormatted(path: path)
        }
        let layout = try PmemLayout(decodingHeader: UnsafeRawBufferPointer(start: memory.baseAddress, count: PmemLayout.headerBytes), path: path)
        try layout.check(belongsTo: opened.header, geometry: opened.geometry, fileBytes: memory.sizeBytes, path: path)
        return layout
    }
}

/// Creating and opening pmem files.
public enum PmemFile {
    /// Creates (or, with `force`, replaces) the pmem file at `path` for `layout`: the header, and
    /// every area free. Refuses a file that already holds a Sluice write buffer without `force`.
    @discardableResult
    public static func create(path: String, layout: PmemLayout, geometry: CacheGeometry, force: Bool) throws -> MappedPersistentMemory {
        if FileManager.default.fileExists(atPath: path) {
            // Mapping takes the file's lock: a pmem file a server is using is refused, even with
            // force. A file that cannot be mapped at all (empty, say) holds no write buffer.
            do {
                let existing = try MappedPersistentMemory(path: path)
                if !force, existing.sizeBytes >= PmemLayout.magic.count,
                   Array(UnsafeRawBufferPointer(start: existing.baseAddress, count: PmemLayout.magic.count)) == PmemLayout.magic {
                    throw StartupError.pmemAlreadyFormatted(path: path)
                }
            } catch let error as MappedPersistentMemory.MappingError where !error.isInUse {
                // Not mappable: nothing in it to protect.
            }
            guard unlink(path) == 0 else {
                throw MappedPersistentMemory.MappingError(description: "cannot replace the pmem file \(path): \(String(cString: strerror(errno)))")
            }
        }
        let memory = try MappedPersistentMemory(path: path, createBytes: layout.fileBytes(for: geometry))
        // A new file reads as zeros, so every area is free; the zeroing is made durable anyway,
        // because a file that existed before may keep old contents on real pmem.
        for area in 0..<layout.areaCount {
            memory.storeWord(0, at: layout.areaOffset(area, geometry: geometry))
            memory.flush(offset: layout.areaOffset(area, geometry: geometry), count: 8)
        }
        memory.drain()
        layout.encodedHeader().withUnsafeBytes { memory.copyAndFlush(to: 0, from: $0) }
        memory.drain()
        return memory
    }

    /// Maps an existing pmem file.
    public static func open(path: String) throws -> MappedPersistentMemory {
        try MappedPersistentMemory(path: path)
    }

    /// Makes a pmem file unusable as a write buffer (after its cache left pmem mode), so it can
    /// never be attached to a cache again by mistake.
    public static func invalidate(_ memory: any PersistentMemory) {
        memory.copyAndFlushZeros(count: PmemLayout.headerBytes)
        memory.drain()
    }
}

extension PersistentMemory {
    func copyAndFlushZeros(count: Int) {
        [UInt8](repeating: 0, count: count).withUnsafeBytes { copyAndFlush(to: 0, from: $0) }
    }
}

extension CacheStartup {
    /// What a mode switch did.
    public struct ModeSwitch {
        public var from: SuperblockHeader.Mode
        public var to: SuperblockHeader.Mode
        public var report: RecoveryReport
    }

    /// Switches a cache between volatile and pmem mode, offline.
    ///
    /// - pmem to volatile: recovery reconciles the pmem file with the log, so every segment it
    ///   held, the open one included, is written to the cache device and synced; only then does the
    ///   superblock say volatile, and the pmem file is invalidated.
    /// - volatile to pmem: recovery runs as for serving, a new pmem file is created, and then the
    ///   superblock names it.
    ///
    /// A crash at any point leaves a cache that the old mode (before the superblock write) or the
    /// new one (after it) recovers completely.
    public static func switchMode(cacheFile: BlockFile, expectation: CacheSuperblock.Expectation, to target: SuperblockHeader.Mode,
                                  pmemPath: String?, force: Bool) throws -> ModeSwitch {
        let device = FileMedium(file: cacheFile)
        let recorded = try CacheSuperblock.decode(try device.readBytes(offset: 0, count: CacheSuperblock.bytes),
                                                  deviceBytes: device.sizeBytes).header
        guard recorded.mode != target else { throw StartupError.alreadyInMode("\(target)") }
        switch target {
        case .volatile:
            guard let pmemPath else { throw FormatError.wrongMode(recorded: "pmem", requested: "volatile") }
            if !FileManager.default.fileExists(atPath: pmemPath) {
                return try leavePmemWithoutItsFile(device: device, expectation: expectation, pmemPath: pmemPath, force: force)
            }
            let memory = try PmemFile.open(path: pmemPath)
            let recovered = try recover(device: device, expectation: expectation, pmem: PmemAttachment(memory: memory, path: pmemPath))
            var header = recovered.opened.header
            header.mode = .volatile
            header.pmemUUID = [UInt8](repeating: 0, count: 16)
            try rewrite(device, header: header)
            PmemFile.invalidate(memory)
            return ModeSwitch(from: .pmem, to: .volatile, report: recovered.report)
        case .pmem:
            guard let pmemPath else { throw FormatError.wrongMode(recorded: "volatile", requested: "pmem") }
            let recovered = try recover(device: device, expectation: expectation)
            var header = recovered.opened.header
            header.mode = .pmem
            header.pmemUUID = newUUID()
            try PmemFile.create(path: pmemPath, layout: PmemLayout(cacheUUID: header.uuid, pmemUUID: header.pmemUUID,
                                                                   segmentBytes: recovered.opened.geometry.segmentBytes),
                                geometry: recovered.opened.geometry, force: force)
            try rewrite(device, header: header)
            return ModeSwitch(from: .volatile, to: .pmem, report: recovered.report)
        }
    }

    /// Leaves pmem mode when the pmem file is gone (a tmpfs emulation after a reboot). After a
    /// clean shutdown that loses nothing: the open segment was written to the cache device and
    /// synced before the clean record. After a crash the acknowledged writes that were only in
    /// the pmem file are lost, so that takes `force`.
    private static func leavePmemWithoutItsFile(device: FileMedium, expectation: CacheSuperblock.Expectation, pmemPath: String,
                                                force: Bool) throws -> ModeSwitch {
        var expectation = expectation
        expectation.mode = .pmem
        var openResult: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.open(device, expectation: expectation) { openResult = $0 }
        let opened = try openResult!.get()
        guard opened.record.cleanShutdown || force else { throw StartupError.pmemLostAfterCrash(path: pmemPath) }
        var header = opened.header
        header.mode = .volatile
        header.pmemUUID = [UInt8](repeating: 0, count: 16)
        try rewrite(device, header: header)
        expectation.mode = .volatile
        let recovered = try recover(device: device, expectation: expectation)
        return ModeSwitch(from: .pmem, to: .volatile, report: recovered.report)
    }

    private static func rewrite(_ device: FileMedium, header: SuperblockHeader) throws {
        var result: Result<Void, Error>?
        CacheSuperblock.rewriteHeader(device, header: header) { result = $0 }
        try result!.get()
    }
}
