import Logging
import NIOCore
import NIOPosix
import RecoverCache
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Runs a ``CacheEngine`` on simulated media, on a real event loop, and drives it from the test
/// thread with blocking calls. `crash(seed:)` cuts the power of both media (dropping or tearing
/// what was not synced, decided by the seed) and recovers a new engine from what survived.
final class EngineHarness {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: any EventLoop { group.next() }
    private(set) var cache: SimulatedMedium
    private(set) var backing: SimulatedMedium
    private(set) var engine: CacheEngine!
    private(set) var lastRecovery: CacheStartup.Recovered?
    let segmentBytes: Int
    var tunables: CacheTunables
    let expectation: CacheSuperblock.Expectation
    /// Wraps the simulated media the engine talks to (recovery always reads the simulated media
    /// directly). Called again for every engine started, with the media it runs on.
    let wrapMedia: ((_ cache: SimulatedMedium, _ backing: SimulatedMedium, _ loop: any EventLoop) -> (any BlockMedium, any BlockMedium))?
    /// The media the current engine talks to (the simulated ones, or their wrappers).
    private(set) var cacheMedium: (any BlockMedium)!
    private(set) var backingMedium: (any BlockMedium)!
    /// What the engines were doing when the power failed, over the harness's life.
    private(set) var cutsSeen = CutStatistics()
    /// The counters of every engine that ran, summed (taken at each power failure or restart).
    var countersSeen: CacheCounters { cutsSeen.counters }

    /// What the engines were doing when the power failed.
    struct CutStatistics {
        var duringRelocation = 0
        var whileWritersWaitForSpace = 0
        var duringWriteback = 0
        var withRetirementPending = 0
        var whileCleaning = 0
        var counters = CacheCounters()

        mutating func record(_ engine: CacheEngine) {
            if engine.relocation != nil { duringRelocation += 1 }
            if engine.updates.headWait.isForSlot { whileWritersWaitForSpace += 1 }
            if engine.batch != nil { duringWriteback += 1 }
            if !engine.cleaner.fences.isEmpty || !engine.records.isIdle { withRetirementPending += 1 }
            if engine.cleaner.phase == .cleaning { whileCleaning += 1 }
            counters.add(engine.counters)
        }
    }

    /// What survived the last power failure (set by ``powerFailOnLoop(seed:)``).
    private var survivors: (cache: [UInt8], backing: [UInt8])?

    /// Whether engines run on the event loop's real clock, their 100 ms periodic work (writeback
    /// pacing, cleaning, record refresh) firing by wall-clock time. Off, they run on ``clock``,
    /// a simulated clock that moves only when the test advances it (``advanceTime(byNs:)``), so a
    /// run depends on nothing but its seeds.
    let periodicWork: Bool
    /// The simulated clock of engines started with `periodicWork` off (one for the harness's life,
    /// so time never goes back across restarts).
    private(set) var clock: SimulatedClock?

    /// Pmem mode: the simulated persistent memory holding the write buffers (nil in volatile mode),
    /// which at a power failure keeps what was drained and a seeded choice of every other word.
    private(set) var pmem: SimulatedPersistentMemory?
    private var pmemSurvivor: [UInt8]?
    static let pmemPath = "simulated.pmem"
    /// Every second cache-device read the engine tries inline finds its data in "memory", so
    /// every engine test runs the inline read paths and the asynchronous ones side by side.
    static let cacheDeviceReadsCachedEvery = 2

    init(cacheBytes: Int = 4 << 20, backingBytes: Int = 8 << 20, segmentBytes: Int = 64 * 1024,
         tunables: CacheTunables = CacheTunables(), periodicWork: Bool = true, pmemMode: Bool = false, pmemAreas: Int = 8,
         wrapMedia: ((SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium))? = nil) throws {
        cache = SimulatedMedium(sizeBytes: cacheBytes)
        cache.readsCachedEvery = Self.cacheDeviceReadsCachedEvery
        backing = SimulatedMedium(sizeBytes: backingBytes)
        self.segmentBytes = segmentBytes
        self.tunables = tunables
        self.periodicWork = periodicWork
        self.wrapMedia = wrapMedia
        expectation = CacheSuperblock.Expectation(backingIdentity: "simulated-backing", backingSizeBytes: UInt64(backingBytes),
                                                  mode: pmemMode ? .pmem : .volatile)
        let uuid = [UInt8](repeating: 0x5A, count: 16)
        var pmemUUID = [UInt8](repeating: 0, count: 16)
        if pmemMode {
            pmemUUID = [UInt8](repeating: 0xA5, count: 16)
            let geometry = try CacheGeometry(segmentBytes: segmentBytes, deviceBytes: UInt64(cacheBytes))
            let layout = PmemLayout(cacheUUID: uuid, pmemUUID: pmemUUID, segmentBytes: segmentBytes, areaCount: pmemAreas)
            let memory = SimulatedPersistentMemory(sizeBytes: layout.fileBytes(for: geometry))
            layout.encodedHeader().withUnsafeBytes { memory.copyAndFlush(to: 0, from: $0) }
            memory.drain()
            pmem = memory
        }
        var formatted: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.format(cache, segmentBytes: segmentBytes, expectation: expectation,
                               uuid: uuid, nowSeconds: 0, pmemUUID: pmemUUID) { formatted = $0 }
        _ = try formatted!.get()
        try startEngine()
    }

    var pmemAttachment: PmemAttachment? { pmem.map { PmemAttachment(memory: $0, path: Self.pmemPath) } }

    private var isClosed = false

    deinit {
        if !isClosed { try? group.syncShutdownGracefully() }
    }

    /// Stops the event loop (from the test thread). Engines, media and closures left on the loop
    /// may then be released anywhere, so a harness released on its own loop does not stop it there.
    func close() {
        guard !isClosed else { return }
        isClosed = true
        try? group.syncShutdownGracefully()
    }

    /// Recovers the cache from the media as they are and starts a new engine on them.
    func startEngine() throws {
        let recovered = try CacheStartup.recover(device: cache, expectation: expectation, pmem: pmemAttachment)
        lastRecovery = recovered
        var placement = CacheEngine.BufferPlacement.volatile
        if let pmem, let layout = recovered.pmemLayout { placement = .persistent(memory: pmem, layout: layout) }
        if let wrapMedia {
            (cacheMedium, backingMedium) = wrapMedia(cache, backing, loop)
        } else {
            (cacheMedium, backingMedium) = (cache, backing)
        }
        if !periodicWork && clock == nil { clock = SimulatedClock(loop: loop) }
        let engine = try loop.submit {
            CacheEngine(eventLoop: self.loop, cacheDevice: self.cacheMedium, backingStore: self.backingMedium, opened: recovered.opened,
                        recovered: recovered.state, tunables: self.tunables, logger: Logger(label: "test-engine"), buffers: placement,
                        clock: self.clock)
        }.wait()
        try loop.flatSubmit { engine.start() }.wait()
        self.engine = engine
    }

    /// Cuts the power: each medium keeps what was synced plus a seeded choice of the rest. Then
    /// recovers and starts a new engine.
    func crash(seed: UInt64) throws {
        try loop.submit { self.powerFailOnLoop(seed: seed) }.wait()
        try recoverFromPowerFailure()
    }

    /// Cuts the power of both media right now; call on the loop, at any point of the engine's work.
    /// The engine keeps running against dead media until ``recoverFromPowerFailure()``.
    func powerFailOnLoop(seed: UInt64) {
        loop.preconditionInEventLoop()
        cutsSeen.record(engine)
        engine.powerFailed()
        let cacheBytes = cache.powerFail(seed: seed)
        let backingBytes = backing.powerFail(seed: seed &* 31 &+ 7)
        survivors = (cacheBytes, backingBytes)
        pmemSurvivor = pmem?.powerFail(seed: seed &* 131 &+ 3)
    }

    /// Puts what survived the last ``powerFailOnLoop(seed:)`` on fresh media, recovers and starts a
    /// new engine.
    ///
    /// With `interruptRecoveryAfterWrites`, a first recovery runs and loses power after that many
    /// of its writes to the cache device (what it wrote unsynced survives per `seed`); the real
    /// recovery then starts from what that left. Returns whether the first recovery was cut short.
    @discardableResult
    func recoverFromPowerFailure(interruptRecoveryAfterWrites: Int? = nil, seed: UInt64 = 0) throws -> Bool {
        guard var survivors else { throw HarnessError.failed("no power failure to recover from") }
        self.survivors = nil
        if let pmemSurvivor {
            // The next engine (and any recovery) runs on what persistent memory kept.
            pmem = SimulatedPersistentMemory(persistentBytes: pmemSurvivor)
            self.pmemSurvivor = nil
        }
        var interrupted = false
        if let limit = interruptRecoveryAfterWrites {
            let medium = SimulatedMedium(durableBytes: survivors.cache)
            var openResult: Result<CacheSuperblock.Opened, Error>?
            CacheSuperblock.open(medium, expectation: expectation) { openResult = $0 }
            let opened = try openResult!.get()
            let device = InterruptingRecoveryDevice(medium, writesBeforePowerFailure: limit)
            do {
                var image: PmemImage?
                if let pmem {
                    let layout = try pmemAttachment!.checkedLayout(for: opened)
                    image = PmemImage(layout: layout, bytes: UnsafeRawBufferPointer(start: pmem.baseAddress, count: pmem.sizeBytes), path: Self.pmemPath)
                }
                _ = try RecoverCache.recover(device: device, header: opened.header, geometry: opened.geometry, record: opened.record, pmem: image)
            } catch is InterruptingRecoveryDevice.PowerFailed {
                interrupted = true
            }
            survivors.cache = medium.powerFail(seed: seed)
        }
        cache = SimulatedMedium(durableBytes: survivors.cache)
        cache.readsCachedEvery = Self.cacheDeviceReadsCachedEvery
        backing = SimulatedMedium(durableBytes: survivors.backing)
        try startEngine()
        return interrupted
    }

    /// Shuts down cleanly and starts again on the same media.
    func restartCleanly() throws {
        try shutdown()
        try startEngine()
    }

    func shutdown() throws {
        let engine = self.engine!
        try loop.flatSubmit {
            let promise = self.loop.makePromise(of: Void.self)
            engine.shutdown { promise.completeWith($0) }
            return promise.futureResult
        }.wait()
    }

    func perform(_ body: @escaping (CacheEngine, @escaping (consuming VolumeReply) -> Void) -> Void) throws -> VolumeReply {
        let engine = self.engine!
        return try loop.flatSubmit {
            let promise = self.loop.makePromise(of: VolumeReply.self)
            body(engine) { promise.succeed($0) }
            return promise.futureResult
        }.wait()
    }

    /// Starts a request without waiting; the reply goes to `completion` on the loop.
    func start(_ body: @escaping (CacheEngine, @escaping (consuming VolumeReply) -> Void) -> Void, completion: @escaping (consuming VolumeReply) -> Void) {
        let engine = self.engine!
        loop.execute { body(engine, completion) }
    }

    func write(_ bytes: [UInt8], at offset: UInt64, fua: Bool = false) throws {
        let reply = try perform { $0.submitWrite(offset: offset, data: ByteBuffer(bytes: bytes), fua: fua, completion: $1) }
        guard case .done = reply else { throw HarnessError.failed("write at \(offset): \(reply)") }
    }

    func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        let reply = try perform { $0.submitRead(offset: offset, lengthBytes: count, buffer: ByteBuffer(), completion: $1) }
        guard case .data(let buffer) = reply else { throw HarnessError.failed("read at \(offset): \(reply)") }
        return Array(buffer.readableBytesView)
    }

    func flush() throws {
        let reply = try perform { $0.submitFlush(completion: $1) }
        guard case .done = reply else { throw HarnessError.failed("flush: \(reply)") }
    }

    func discard(at offset: UInt64, count: Int, zeroes: Bool, fua: Bool = false) throws {
        let reply = try perform { $0.submitDiscard(offset: offset, lengthBytes: UInt64(count), zeroes: zeroes, fua: fua, completion: $1) }
        guard case .done = reply else { throw HarnessError.failed("discard at \(offset): \(reply)") }
    }

    func drain() throws {
        let engine = self.engine!
        try loop.flatSubmit {
            let promise = self.loop.makePromise(of: Void.self)
            engine.writeBackAll { promise.completeWith($0) }
            return promise.futureResult
        }.wait()
    }

    /// Moves the simulated clock forward (engines started with `periodicWork` off), firing the
    /// engine's timers that fall due.
    func advanceTime(byNs delayNs: UInt64) throws {
        guard let clock else { throw HarnessError.failed("the harness runs on the real clock") }
        try loop.submit { clock.advance(byNs: delayNs) }.wait()
    }

    /// Reads engine state on its loop.
    func inspect<T>(_ body: @escaping (CacheEngine) -> T) throws -> T {
        let engine = self.engine!
        return try loop.submit { body(engine) }.wait()
    }

    /// Runs `body` on the loop with the simulated media (to inject faults or inspect them).
    func onMedia<T>(_ body: @escaping (_ cache: SimulatedMedium, _ backing: SimulatedMedium) -> T) throws -> T {
        try loop.submit { body(self.cache, self.backing) }.wait()
    }

    /// The backing medium's visible bytes.
    func backingBytes(at offset: Int, count: Int) throws -> [UInt8] {
        try loop.submit { Array(self.backing.visible[offset..<(offset + count)]) }.wait()
    }
}

/// A recovery device that loses power after a number of writes.
final class InterruptingRecoveryDevice: RecoveryDevice {
    struct PowerFailed: Error {}
    let medium: SimulatedMedium
    var writesLeft: Int
    init(_ medium: SimulatedMedium, writesBeforePowerFailure: Int) {
        self.medium = medium
        writesLeft = writesBeforePowerFailure
    }

    var sizeBytes: UInt64 { medium.sizeBytes }
    func readBytes(offset: UInt64, count: Int) throws -> [UInt8] { try medium.readBytes(offset: offset, count: count) }
    func writeBytes(offset: UInt64, bytes: [UInt8]) throws {
        guard writesLeft > 0 else { throw PowerFailed() }
        writesLeft -= 1
        try medium.writeBytes(offset: offset, bytes: bytes)
    }
    func synchronizeBytes() throws { try medium.synchronizeBytes() }
}

enum HarnessError: Error {
    case failed(String)
}

/// A deterministic byte pattern: `count` bytes for a write tagged `tag`, different per sector.
func pattern(_ tag: UInt32, count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    for sector in 0..<(count / 512) {
        let stamp = tag &* 2_654_435_761 &+ UInt32(sector)
        for i in 0..<512 { bytes[sector * 512 + i] = UInt8(truncatingIfNeeded: stamp >> UInt32((i % 4) * 8)) &+ UInt8(truncatingIfNeeded: i / 4) }
    }
    return bytes
}
