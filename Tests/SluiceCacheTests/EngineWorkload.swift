import NIOCore
import SluiceVolume
import XCTest
import SluiceTesting
import SluiceFormat

@testable import SluiceCache

/// One request of a random workload. Ranges are in 512-byte sectors.
enum WorkloadOp: CustomStringConvertible {
    case write(lba: Int, sectors: Int, fua: Bool)
    case flush
    case trim(lba: Int, sectors: Int, fua: Bool)
    case zero(lba: Int, sectors: Int, fua: Bool)
    case drain
    /// `sluice set cache_mode`: later requests take the mode's path.
    case setMode(CacheMode)

    var description: String {
        switch self {
        case .write(let lba, let n, let fua): return "write(sector \(lba), \(n) sectors\(fua ? ", FUA" : ""))"
        case .flush: return "flush"
        case .trim(let lba, let n, let fua): return "trim(sector \(lba), \(n) sectors\(fua ? ", FUA" : ""))"
        case .zero(let lba, let n, let fua): return "write-zeroes(sector \(lba), \(n) sectors\(fua ? ", FUA" : ""))"
        case .drain: return "drain"
        case .setMode(let mode): return "cache mode \(mode.rawValue)"
        }
    }
}

/// How a random workload is shaped.
struct WorkloadShape {
    var sectorCount: Int
    /// Half the writes go to the first `hotSectors` sectors, so blocks are rewritten often.
    var hotSectors = 512
    var fuaPercent = 10
    var flushPercent = 6
    var trimPercent = 4
    var zeroPercent = 4
    var drainPercent = 0
    var maxWriteSectors = 128

    func next(_ rng: inout SplitMix64) -> WorkloadOp {
        var roll = rng.below(100)
        if roll < flushPercent { return .flush }
        roll -= flushPercent
        if roll < trimPercent || roll < trimPercent + zeroPercent {
            let aligned = rng.chance(50)
            var sectors = aligned ? 8 * rng.range(1...8) : rng.range(1...64)
            var lba = rng.below(sectorCount)
            if aligned { lba -= lba % 8 }
            sectors = min(sectors, sectorCount - lba)
            return roll < trimPercent ? .trim(lba: lba, sectors: sectors, fua: rng.chance(20))
                                      : .zero(lba: lba, sectors: sectors, fua: rng.chance(30))
        }
        roll -= trimPercent + zeroPercent
        if roll < drainPercent { return .drain }
        let region = rng.chance(50) ? min(hotSectors, sectorCount) : sectorCount
        var lba = rng.below(region)
        var sectors: Int
        switch rng.below(10) {
        case 0..<4: sectors = rng.range(1...7)                 // sub-4K, anywhere in a block
        case 4..<6: sectors = 8; lba -= lba % 8                 // one whole block
        case 6..<8: sectors = 8 * rng.range(2...16); lba -= lba % 8
        case 8: sectors = rng.range(1...maxWriteSectors)        // unaligned, up to 64 KiB
        default: sectors = 1
        }
        sectors = max(1, min(sectors, sectorCount - lba))
        return .write(lba: lba, sectors: sectors, fua: rng.chance(fuaPercent))
    }
}

/// Drives random requests into a harness's engine and keeps, per sector, the history of values and
/// which are durable. Everything but the blocking helpers runs on the harness's loop.
final class Workload {
    let harness: EngineHarness
    let sectorCount: Int
    var history: SectorHistory
    /// What every operation was, for failure reports.
    private(set) var operations: [WorkloadOp] = []
    private var ranges: [Int: Range<Int>] = [:]
    private var nextTag: UInt32 = 1
    /// Acknowledged operations not yet known durable, in acknowledgement order.
    private var ackedNotDurable: [Int] = []
    private var outstanding = 0
    private var idleWaiters: [EventLoopPromise<Void>] = []
    private var powerFailureWaiters: [EventLoopPromise<Void>] = []
    /// Set at a power failure; replies after it are not acknowledgements.
    private(set) var crashed = false
    /// Replies that should not have failed (engine running, media healthy).
    private(set) var unexpectedFailures: [String] = []
    /// Operations acknowledged since tracking began (for statistics).
    private(set) var acknowledged = 0

    /// Pmem mode's stronger promise: every acknowledged write (not only FUA ones and those before
    /// an acknowledged flush) is durable the moment it is acknowledged.
    let everyAcknowledgementIsDurable: Bool

    init(harness: EngineHarness, sectorCount: Int, everyAcknowledgementIsDurable: Bool = false) {
        self.harness = harness
        self.sectorCount = sectorCount
        self.everyAcknowledgementIsDurable = everyAcknowledgementIsDurable
        history = SectorHistory(sectorCount: sectorCount)
    }

    var loop: any EventLoop { harness.loop }

    // MARK: On the loop

    /// Submits `op` to the current engine. On the loop.
    func issue(_ op: WorkloadOp) {
        loop.preconditionInEventLoop()
        precondition(!crashed)
        let id = operations.count
        operations.append(op)
        let engine = harness.engine!
        outstanding += 1
        switch op {
        case .write(let lba, let sectors, let fua):
            let tag = nextTag
            nextTag += 1
            history.record(.data(tag), sectors: lba..<(lba + sectors), operation: id)
            ranges[id] = lba..<(lba + sectors)
            let data = ByteBuffer(bytes: SectorCodec.bytes(tag: tag, firstLBA: lba, sectors: sectors))
            engine.submitWrite(offset: UInt64(lba * 512), data: data, fua: fua) { self.completed(id, op, $0, fua: fua) }
        case .zero(let lba, let sectors, let fua):
            history.record(.data(0), sectors: lba..<(lba + sectors), operation: id)
            ranges[id] = lba..<(lba + sectors)
            engine.submitDiscard(offset: UInt64(lba * 512), lengthBytes: UInt64(sectors * 512), zeroes: true, fua: fua) {
                self.completed(id, op, $0, fua: fua)
            }
        case .trim(let lba, let sectors, let fua):
            history.record(.trimmed, sectors: lba..<(lba + sectors), operation: id)
            ranges[id] = lba..<(lba + sectors)
            engine.submitDiscard(offset: UInt64(lba * 512), lengthBytes: UInt64(sectors * 512), zeroes: false, fua: fua) {
                self.completed(id, op, $0, fua: fua)
            }
        case .flush:
            let covered = ackedNotDurable
            engine.submitFlush { reply in
                guard !self.crashed else { return }
                if case .done = reply {
                    self.makeDurable(Set(covered))
                } else {
                    self.unexpectedFailures.append("operation \(id) \(op): \(reply)")
                }
                self.finishedOne()
            }
        case .setMode(let mode):
            engine.setCacheMode(mode) { result in
                guard !self.crashed else { return }
                if case .failure(let error) = result { self.unexpectedFailures.append("operation \(id) \(op): \(error)") }
                self.finishedOne()
            }
        case .drain:
            engine.writeBackAll { result in
                guard !self.crashed else { return }
                if case .failure(let error) = result { self.unexpectedFailures.append("operation \(id) drain: \(error)") }
                self.finishedOne()
            }
        }
    }

    private func completed(_ id: Int, _ op: WorkloadOp, _ reply: VolumeReply, fua: Bool) {
        guard !crashed else { return }
        if case .done = reply {
            acknowledged += 1
            if fua || everyAcknowledgementIsDurable { makeDurable([id]) } else { ackedNotDurable.append(id) }
        } else {
            unexpectedFailures.append("operation \(id) \(op): \(reply)")
        }
        finishedOne()
    }

    private func makeDurable(_ ids: Set<Int>) {
        for id in ids {
            guard let range = ranges[id] else { continue }
            for sector in range {
                for index in history.sectors[sector].indices.reversed() where history.sectors[sector][index].operation == id {
                    history.sectors[sector][index].durable = true
                    break
                }
            }
        }
        ackedNotDurable.removeAll { ids.contains($0) }
    }

    private func finishedOne() {
        outstanding -= 1
        if outstanding == 0 {
            let waiters = idleWaiters
            idleWaiters.removeAll()
            for waiter in waiters { waiter.succeed(()) }
        }
    }

    /// Cuts the power after `hops` more turns of the loop, so the failure lands among the engine's
    /// own scheduled work and media completions.
    func powerFail(afterHops hops: Int, seed: UInt64) {
        guard !crashed else { return }
        if hops == 0 {
            crashed = true
            harness.powerFailOnLoop(seed: seed)
            let waiters = idleWaiters + powerFailureWaiters
            idleWaiters.removeAll()
            powerFailureWaiters.removeAll()
            for waiter in waiters { waiter.succeed(()) }
        } else {
            loop.execute { self.powerFail(afterHops: hops - 1, seed: seed) }
        }
    }

    // MARK: From the test thread

    /// Issues `ops` in one turn of the loop (they are all in flight together).
    func burst(_ ops: [WorkloadOp], thenPowerFailAfterHops hops: Int? = nil, seed: UInt64 = 0) throws {
        try loop.submit {
            // A power cut at a media operation may strike while the burst is being issued.
            for op in ops where !self.crashed { self.issue(op) }
            if let hops { self.powerFail(afterHops: hops, seed: seed) }
        }.wait()
    }

    /// Waits until every issued operation has replied (or the power failed). Fails the test
    /// instead of hanging if the engine stops making progress.
    func waitIdle(file: StaticString = #filePath, line: UInt = #line) throws {
        let promise = loop.makePromise(of: Void.self)
        var done = false
        try loop.submit {
            if self.outstanding == 0 || self.crashed {
                done = true
                promise.succeed(())
            } else {
                self.idleWaiters.append(promise)
            }
        }.wait()
        if done { return try waitQuiescent() }
        let timeout = loop.scheduleTask(in: .seconds(30)) {
            if let index = self.idleWaiters.firstIndex(where: { $0.futureResult === promise.futureResult }) {
                self.idleWaiters.remove(at: index)
                let state = self.harness.engine.stuckReport()
                promise.fail(HarnessError.failed("requests still outstanding after 30 s: the engine is stuck; \(state)"))
            }
        }
        defer { timeout.cancel() }
        try promise.futureResult.wait()
        try waitQuiescent()
    }

    /// On reordering media, waits until no media operation is pending and the loop has nothing
    /// left that changes the engine, so the next burst starts from a state set by the seeds alone
    /// (not by when the test thread happened to submit it).
    private func waitQuiescent() throws {
        guard let scheduler = (harness.cacheMedium as? DeferredMedium)?.scheduler else { return }
        var lastPerformed = -1
        var quietChecks = 0
        while quietChecks < 2 {
            let (pending, performed) = try loop.submit { (scheduler.pendingCount, scheduler.performed) }.wait()
            quietChecks = pending == 0 && performed == lastPerformed ? quietChecks + 1 : 0
            lastPerformed = performed
        }
    }

    /// Waits for the power failure that ``burst(_:thenPowerFailAfterHops:seed:)`` scheduled.
    func waitForPowerFailure() throws {
        try loop.flatSubmit {
            if self.crashed { return self.loop.makeSucceededVoidFuture() }
            let promise = self.loop.makePromise(of: Void.self)
            self.powerFailureWaiters.append(promise)
            return promise.futureResult
        }.wait()
    }

    func run(_ op: WorkloadOp) throws {
        try burst([op])
        try waitIdle()
    }

    /// After a clean shutdown every acknowledged operation is durable.
    func everythingAcknowledgedIsDurable() throws {
        try loop.submit { self.makeDurable(Set(self.ackedNotDurable)) }.wait()
    }

    /// After recovery: the engine is new; replies of the old one are ignored from now on.
    func resumeAfterCrash(observed: [UInt32]) throws {
        try loop.submit {
            self.crashed = false
            self.outstanding = 0
            self.ackedNotDurable.removeAll()
            self.ranges.removeAll()
            self.history.reset(to: observed)
        }.wait()
    }

    func failures() throws -> [String] { try loop.submit { self.unexpectedFailures }.wait() }

    /// Reads the whole volume and decodes every sector.
    func readAll() throws -> [UInt32?] {
        SectorCodec.decodeAll(try harness.read(at: 0, count: sectorCount * 512), firstLBA: 0)
    }

    /// Sectors whose value is not allowed; `afterCrash` chooses the rule.
    func violations(_ observed: [UInt32?], firstLBA: Int = 0, afterCrash: Bool) throws -> [String] {
        try loop.submit {
            var found: [String] = []
            for (offset, tag) in observed.enumerated() {
                let sector = firstLBA + offset
                let allowed = afterCrash ? self.history.allowedAfterCrash(sector) : self.history.allowedNow(sector)
                guard let tag, allowed.contains(tag) else {
                    let entries = self.history.sectors[sector].map { entry -> String in
                        let value: String
                        switch entry.value {
                        case .data(let tag): value = tag == 0 ? "zeros" : "#\(tag)"
                        case .trimmed: value = "trim"
                        }
                        let op = entry.operation >= 0 ? " op \(entry.operation) \(self.operations[entry.operation])" : " (initial)"
                        return value + (entry.durable ? " durable" : "") + op
                    }
                    found.append("sector \(sector) (block \(sector / 8)): read \(describe(tag)); history: \(entries.joined(separator: "; "))")
                    continue
                }
            }
            return found
        }.wait()
    }

    func compact() throws { try loop.submit { self.history.compact() }.wait() }

    /// The tag each sector must hold now (only valid without trims outstanding in history).
    func currentTags() throws -> [[UInt32]] {
        try loop.submit { (0..<self.sectorCount).map { self.history.allowedNow($0) } }.wait()
    }
}
