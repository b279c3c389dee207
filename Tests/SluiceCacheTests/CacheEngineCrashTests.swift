import Foundation
import NIOCore
import SluiceFormat
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Power failures at random points of random workloads. After recovery every sector must show a
/// value written to it at or after its newest durable one (acknowledged with FUA, or acknowledged
/// before a flush that was acknowledged), never a torn, mixed or misplaced sector.
final class CacheEngineCrashTests: XCTestCase {
    static let cacheBytes = 1 << 20
    static let backingBytes = 2 << 20
    static let sectorCount = backingBytes / 512

    /// Seeds per test; `SLUICE_CRASH_SEEDS=2000 swift test ...` soaks longer, and
    /// `SLUICE_CRASH_FIRST_SEED` moves the window. Seed N of the reordered test is N + 1000, so
    /// `SLUICE_CRASH_FIRST_SEED=7 SLUICE_CRASH_SEEDS=1` replays seed 7 (in order) and 1007 (reordered).
    static var seedCount: UInt64 { UInt64(ProcessInfo.processInfo.environment["SLUICE_CRASH_SEEDS"].flatMap(Int.init) ?? 150) }
    /// Seeds per pmem-mode test: more than volatile mode's, since pmem mode is what Sluice is for
    /// (`SLUICE_CRASH_SEEDS` sets both).
    static var pmemSeedCount: UInt64 { UInt64(ProcessInfo.processInfo.environment["SLUICE_CRASH_SEEDS"].flatMap(Int.init) ?? 350) }
    static var firstSeed: UInt64 { UInt64(ProcessInfo.processInfo.environment["SLUICE_CRASH_FIRST_SEED"].flatMap(Int.init) ?? 1) }
    /// Extra weight on trims and write-zeroes (percent each), for soaks.
    static var discardPercent: Int? { ProcessInfo.processInfo.environment["SLUICE_CRASH_DISCARD_PERCENT"].flatMap(Int.init) }

    struct Outcome {
        var crashes = 0
        var interruptedRecoveries = 0
        var cutsAtMediaOperations = 0
        var failedSeeds: [UInt64] = []
        /// Pmem mode: recoveries that wrote sealed segments from pmem, and that replayed an open one.
        var sealedSegmentRecoveries = 0
        var openSegmentReplays = 0
        /// What the engines were doing at the power failures, and what their cleaners did.
        var cuts = EngineHarness.CutStatistics()

        mutating func add(_ seen: EngineHarness.CutStatistics) {
            cuts.duringRelocation += seen.duringRelocation
            cuts.whileWritersWaitForSpace += seen.whileWritersWaitForSpace
            cuts.duringWriteback += seen.duringWriteback
            cuts.withRetirementPending += seen.withRetirementPending
            cuts.whileCleaning += seen.whileCleaning
            cuts.counters.add(seen.counters)
        }

        var cleanerSummary: String {
            "power cuts while relocating \(cuts.duringRelocation), while writers waited for space \(cuts.whileWritersWaitForSpace), "
                + "during writeback \(cuts.duringWriteback), with retirements pending \(cuts.withRetirementPending), "
                + "while cleaning \(cuts.whileCleaning); cleaners: \(cuts.counters.cleaningRounds) rounds, "
                + "\(cuts.counters.relocatedBlocks) blocks relocated, \(cuts.counters.segmentsReclaimed) segments reclaimed "
                + "(\(cuts.counters.segmentsReclaimedWithoutIO) without I/O), \(cuts.counters.segmentsRetired) retired"
        }

        /// The crashes hit the cleaner in the states that matter. On in-order media a relocation
        /// or a writer's wait for space usually begins and ends within one call, so only reordered
        /// media are held to catching the power failing in the middle of them.
        func checkCleanerCoverage(reordered: Bool, file: StaticString = #filePath, line: UInt = #line) {
            XCTAssertGreaterThan(cuts.counters.relocatedBlocks, 0, "the cleaner never relocated", file: file, line: line)
            if reordered {
                XCTAssertGreaterThan(cuts.duringRelocation, 0, "no power cut while the cleaner relocated", file: file, line: line)
                XCTAssertGreaterThan(cuts.whileWritersWaitForSpace, 0, "no power cut while writers waited for space", file: file, line: line)
            }
            XCTAssertGreaterThan(cuts.withRetirementPending, 0, "no power cut while reclaimed segments waited for their record", file: file, line: line)
            XCTAssertGreaterThan(cuts.counters.cleaningRounds, 0, "no engine crossed its high watermark", file: file, line: line)
            XCTAssertGreaterThan(cuts.counters.segmentsReclaimedWithoutIO, 0, "no segment was reclaimed without I/O", file: file, line: line)
        }
    }

    /// One seed: a few rounds of (some completed bursts, then a burst cut by a power failure at a
    /// random turn of the loop), each followed by recovery and a check of every sector; sometimes
    /// a power failure during recovery, or a second one right after it.
    @discardableResult
    func runCrashSeed(_ seed: UInt64, shuffled: Bool, rounds: Int, pmemMode: Bool = false, switchModes: Bool = false,
                      outcome: inout Outcome) throws -> Bool {
        var statistics = EngineHarness.CutStatistics()
        defer { outcome.add(statistics) }
        return try runCrashRounds(seed, shuffled: shuffled, rounds: rounds, pmemMode: pmemMode, switchModes: switchModes,
                                  outcome: &outcome, statistics: &statistics)
    }

    private func runCrashRounds(_ seed: UInt64, shuffled: Bool, rounds: Int, pmemMode: Bool, switchModes: Bool, outcome: inout Outcome,
                                statistics: inout EngineHarness.CutStatistics) throws -> Bool {
        var rng = SplitMix64(seed: seed &* 0x2545_F491_4F6C_DD1D)
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = [0, 70, 100][rng.below(3)]
        // The cleaner and writeback anywhere in their range: watermarks from "clean whatever you
        // can" (1%) to nearly full, dirty_target from "always write back" to "never for that",
        // max_age off or one second (the simulated clock advances between bursts).
        tunables.highWatermarkPercent = [1, 30, 50, 90][rng.below(4)]
        tunables.lowWatermarkPercent = rng.below(tunables.highWatermarkPercent + 1)
        tunables.dirtyTargetPercent = [0, 10, 50, 100][rng.below(4)]
        tunables.maxAgeSeconds = rng.chance(20) ? 1 : 0
        // In-order media complete within the call, so most of the engine's work happens inside the
        // turn that issues a burst: the power is cut at a random media operation instead.
        let cut = PowerCut()
        let harness = try EngineHarness(cacheBytes: Self.cacheBytes, backingBytes: Self.backingBytes, segmentBytes: 64 * 1024,
                                        tunables: tunables, periodicWork: false, pmemMode: pmemMode, pmemAreas: pmemMode ? 2 + rng.below(7) : 8,
                                        wrapMedia: shuffled ? ShuffledScheduler.wrapper(seed: seed) : cut.wrapper())
        defer {
            statistics = harness.cutsSeen
            harness.close()
        }
        // A write that goes straight to the backing store is durable with FUA or a FLUSH, as the
        // backing store's own writes are, even in pmem mode.
        let workload = Workload(harness: harness, sectorCount: Self.sectorCount, everyAcknowledgementIsDurable: pmemMode && !switchModes)
        // Mode switches: between bursts and inside them, so requests of one burst take different
        // paths and a switch's superblock record races the power failure.
        func withModeSwitches(_ ops: [WorkloadOp]) -> [WorkloadOp] {
            guard switchModes else { return ops }
            var mixed: [WorkloadOp] = []
            for op in ops {
                if rng.chance(4) { mixed.append(.setMode(CacheMode.allCases[rng.below(4)])) }
                mixed.append(op)
            }
            return mixed
        }
        var cutSeed: UInt64 = 0
        cut.trigger = { workload.powerFail(afterHops: 0, seed: cutSeed) }
        var shape = WorkloadShape(sectorCount: Self.sectorCount)
        shape.fuaPercent = rng.range(5...30)
        shape.flushPercent = rng.range(2...12)
        shape.drainPercent = rng.chance(30) ? 2 : 0
        if let discard = Self.discardPercent {
            shape.trimPercent = discard
            shape.zeroPercent = discard
        }
        let tag = "seed \(seed)\(shuffled ? " (shuffled completions)" : "")\(pmemMode ? " (pmem mode)" : "")\(switchModes ? " (cache modes)" : ""), tunables \(tunables.summary)"

        for round in 0..<rounds {
            for _ in 0..<rng.below(4) {
                try workload.burst(withModeSwitches((0..<rng.range(1...60)).map { _ in shape.next(&rng) }))
                do { try workload.waitIdle() } catch { XCTFail("\(tag), round \(round): \(error)"); return false }
                if rng.chance(40) { try harness.advanceTime(byNs: UInt64(rng.range(1...1500)) * 1_000_000) }
            }
            if rng.chance(10) {
                try harness.restartCleanly()
                try workload.everythingAcknowledgedIsDurable()
            }
            let crashSeed = rng.next()
            // Sometimes a flood: more in flight than the ring holds, so writers wait for space while
            // the cleaner relocates and writeback cleans the tail.
            let ops = withModeSwitches((0..<(rng.chance(25) ? rng.range(100...300) : rng.range(1...40))).map { _ in shape.next(&rng) })
            if !shuffled {
                cutSeed = crashSeed
                let armed = rng.range(1...(3 * ops.count + 8))
                try harness.loop.submit { cut.remaining = armed }.wait()
            }
            // Without a cut at a media operation (reordered media, or fewer operations than armed),
            // the power fails after some turns of the loop.
            try workload.burst(ops, thenPowerFailAfterHops: rng.below(shuffled ? 120 : 12), seed: crashSeed)
            try workload.waitForPowerFailure()
            let failures = try workload.failures()
            guard failures.isEmpty else { XCTFail("\(tag), round \(round): a request failed before the crash: \(failures)"); return false }
            if try harness.loop.submit({ cut.isCut }).wait() { outcome.cutsAtMediaOperations += 1 }
            try harness.loop.submit { cut.remaining = nil }.wait()
            let interrupt = rng.chance(25) ? rng.below(3) : nil
            if try harness.recoverFromPowerFailure(interruptRecoveryAfterWrites: interrupt, seed: rng.next()) {
                outcome.interruptedRecoveries += 1
            }
            outcome.crashes += 1
            if let report = harness.lastRecovery?.report {
                if !report.pmemSealedSegmentsWritten.isEmpty { outcome.sealedSegmentRecoveries += 1 }
                if report.pmemOpenSegmentWritten != nil { outcome.openSegmentReplays += 1 }
            }
            let observed = try workload.readAll()
            let bad = try workload.violations(observed, afterCrash: true)
            guard bad.isEmpty else {
                XCTFail("""
                    \(tag), round \(round) (power-failure seed \(crashSeed)): \(bad.count) sectors wrong after recovery \
                    (chain end: \(String(describing: harness.lastRecovery?.report.chain.end))); first:
                      \(bad.prefix(3).joined(separator: "\n  "))
                    """)
                return false
            }
            let tags = observed.map { $0! }
            try workload.resumeAfterCrash(observed: tags)
            if rng.chance(30) {
                // A second power failure right after recovery (and the engine's start) must change nothing.
                try harness.crash(seed: rng.next())
                let again = try workload.readAll()
                let changed = again.indices.filter { again[$0] != tags[$0] }
                guard changed.isEmpty else {
                    XCTFail("\(tag), round \(round): a power failure right after recovery changed \(changed.count) sectors, first sector \(changed[0]): \(describe(tags[changed[0]])) became \(describe(again[changed[0]]))")
                    return false
                }
            }
        }
        return true
    }

    func testPowerFailuresAtRandomPointsKeepEveryDurableWrite() throws {
        var outcome = Outcome()
        for seed in Self.firstSeed..<(Self.firstSeed + Self.seedCount) {
            if try !runCrashSeed(seed, shuffled: false, rounds: 3, outcome: &outcome) { outcome.failedSeeds.append(seed) }
        }
        print("crash test (in-order media): \(outcome.crashes) crashes (\(outcome.cutsAtMediaOperations) at a media operation), \(outcome.interruptedRecoveries) interrupted recoveries, failed seeds: \(outcome.failedSeeds); \(outcome.cleanerSummary)")
        if Self.seedCount >= 100 { outcome.checkCleanerCoverage(reordered: false) }
    }

    func testPowerFailuresWithReorderedCompletionsKeepEveryDurableWrite() throws {
        var outcome = Outcome()
        for seed in (Self.firstSeed + 1000)..<(Self.firstSeed + 1000 + Self.seedCount) {
            if try !runCrashSeed(seed, shuffled: true, rounds: 3, outcome: &outcome) { outcome.failedSeeds.append(seed) }
        }
        print("crash test (reordered media): \(outcome.crashes) crashes, \(outcome.interruptedRecoveries) interrupted recoveries, failed seeds: \(outcome.failedSeeds); \(outcome.cleanerSummary)")
        if Self.seedCount >= 100 { outcome.checkCleanerCoverage(reordered: true) }
    }

    // MARK: Cache modes

    /// Seeds per cache-mode test (`SLUICE_CRASH_SEEDS` sets them too).
    static var modeSeedCount: UInt64 { UInt64(ProcessInfo.processInfo.environment["SLUICE_CRASH_SEEDS"].flatMap(Int.init) ?? 80) }

    /// The four modes, switched at random inside and between bursts, under power failures: writes
    /// that bypass the log, writethrough's clean copies and the markers that void cached copies
    /// keep every durable write, whatever path each request took.
    func testPowerFailuresAcrossCacheModeSwitchesKeepEveryDurableWrite() throws {
        var outcome = Outcome()
        for seed in (Self.firstSeed + 3000)..<(Self.firstSeed + 3000 + Self.modeSeedCount) {
            if try !runCrashSeed(seed, shuffled: seed % 2 == 0, rounds: 3, switchModes: true, outcome: &outcome) { outcome.failedSeeds.append(seed) }
        }
        print("crash test (cache modes): \(outcome.crashes) crashes, failed seeds: \(outcome.failedSeeds); \(outcome.cleanerSummary); bypass writes \(outcome.cuts.counters.bypassWrites), writethrough copies \(outcome.cuts.counters.writeThroughCopies)")
        XCTAssertEqual(outcome.failedSeeds, [])
        XCTAssertGreaterThan(outcome.cuts.counters.bypassWrites, 0, "no write went straight to the backing store")
        XCTAssertGreaterThan(outcome.cuts.counters.writeThroughCopies, 0, "no writethrough write was cached")
    }

    func testPmemPowerFailuresAcrossCacheModeSwitchesKeepEveryDurableWrite() throws {
        var outcome = Outcome()
        for seed in (Self.firstSeed + 4000)..<(Self.firstSeed + 4000 + Self.modeSeedCount) {
            if try !runCrashSeed(seed, shuffled: seed % 2 == 0, rounds: 3, pmemMode: true, switchModes: true, outcome: &outcome) {
                outcome.failedSeeds.append(seed)
            }
        }
        print("crash test (pmem, cache modes): \(outcome.crashes) crashes, failed seeds: \(outcome.failedSeeds); bypass writes \(outcome.cuts.counters.bypassWrites)")
        XCTAssertEqual(outcome.failedSeeds, [])
        XCTAssertGreaterThan(outcome.cuts.counters.bypassWrites, 0, "no write went straight to the backing store")
    }

    // MARK: Pmem mode
    //
    // The same power failures with the write buffers in simulated persistent memory, which at a
    // power failure keeps what was drained and a seeded old-or-new choice for every other 8-byte
    // word. The check is stronger: every acknowledged write is durable, FUA or not. Seeds are
    // N + 2000 (in order) and N + 3000 (reordered); the pmem file has 2 to 8 areas.

    func testPmemPowerFailuresAtRandomPointsKeepEveryAcknowledgedWrite() throws {
        try runPmem(shuffled: false, offset: 2000)
    }

    func testPmemPowerFailuresWithReorderedCompletionsKeepEveryAcknowledgedWrite() throws {
        try runPmem(shuffled: true, offset: 3000)
    }

    private func runPmem(shuffled: Bool, offset: UInt64) throws {
        var outcome = Outcome()
        let first = Self.firstSeed + offset
        for seed in first..<(first + Self.pmemSeedCount) {
            if try !runCrashSeed(seed, shuffled: shuffled, rounds: 3, pmemMode: true, outcome: &outcome) { outcome.failedSeeds.append(seed) }
        }
        XCTAssertGreaterThan(outcome.crashes, 0)
        print("pmem crash test (\(shuffled ? "reordered" : "in-order") media): \(outcome.crashes) crashes (\(outcome.cutsAtMediaOperations) at a media operation), \(outcome.interruptedRecoveries) interrupted recoveries, \(outcome.sealedSegmentRecoveries) recoveries wrote sealed segments from pmem, \(outcome.openSegmentReplays) replayed an open one; failed seeds: \(outcome.failedSeeds); \(outcome.cleanerSummary)")
        if Self.pmemSeedCount >= 100 { outcome.checkCleanerCoverage(reordered: shuffled) }
        XCTAssertGreaterThan(outcome.openSegmentReplays, 0, "no recovery replayed an open pmem segment: the test exercises nothing")
    }
}

/// Minimal, deterministic reproductions of durability bugs found by the random tests.
final class CacheEngineDurabilityTests: XCTestCase {
    /// A 15-slot ring whose cleaner reclaims whatever it can (high watermark 1%), on the
    /// simulated clock: the periodic work runs only when the test advances time.
    private func tinyHarness(threshold: Int = 0) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = threshold
        tunables.lowWatermarkPercent = 0
        tunables.highWatermarkPercent = 1
        return try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables, periodicWork: false)
    }

    private func block(_ tag: UInt32, _ blockNumber: Int) -> [UInt8] {
        SectorCodec.bytes(tag: tag, firstLBA: blockNumber * 8, sectors: 8)
    }

    private func tags(_ harness: EngineHarness, block blockNumber: Int) throws -> [UInt32?] {
        SectorCodec.decodeAll(try harness.read(at: UInt64(blockNumber * 4096), count: 4096), firstLBA: blockNumber * 8)
    }

    /// BUG (of the writeback that retired segments itself, and the rule the cleaner keeps): a
    /// segment whose only copy of a block was superseded by a copy still in the open buffer (not
    /// on the cache device, not synced) holds no live block, but retiring it before the newer
    /// copy is durable would lose both copies at a power failure: the block would read what the
    /// backing store had before the FUA write.
    ///
    /// 1. write block 0 = #1 with FUA (segment 1, sealed partial, synced: durable)
    /// 2. write block 0 = #2, no FUA (goes into the open segment 2, in memory)
    /// 3. the cleaner reclaims segment 1 with no I/O: its fence is segment 2, still open
    /// 4. power failure before the fence passed: segment 1 was not retired
    /// Expected: block 0 reads #1 (durable) or #2. Then, without the power failure: a tick seals
    /// segment 2 (the fence waited), the record retires segment 1, and block 0 reads #2 after one.
    func testDurableCopySupersededByAnUnsyncedCopyIsNotForgottenByTheCleaner() throws {
        for seed: UInt64 in [1, 2, 3] {
            let harness = try tinyHarness()
            defer { harness.close() }
            try harness.write(block(1, 0), at: 0, fua: true)
            try harness.write(block(2, 0), at: 0)
            try harness.inspect { $0.drive() }
            XCTAssertEqual(try harness.inspect { $0.ring.reclaimedThroughID }, 1, "the cleaner reclaimed segment 1 (no live block)")
            XCTAssertEqual(try harness.inspect { $0.ring.retiredThroughID }, 0, "segment 1 is not retired before its fence, segment 2, is durable")
            try harness.crash(seed: seed)
            let after = try tags(harness, block: 0)
            XCTAssertTrue(after.allSatisfy { $0 == 1 || $0 == 2 },
                          "power-failure seed \(seed): block 0 must read #1 (durable) or #2 after the crash, read \(Set(after.map(describe)))")
        }
        let harness = try tinyHarness()
        defer { harness.close() }
        try harness.write(block(1, 0), at: 0, fua: true)
        try harness.write(block(2, 0), at: 0)
        try harness.inspect { $0.drive() }
        try harness.advanceTime(byNs: 150_000_000)
        XCTAssertGreaterThanOrEqual(try harness.inspect { $0.ring.retiredThroughID }, 1, "once segment 2 is synced, segment 1 is retired")
        try harness.crash(seed: 4)
        XCTAssertEqual(try tags(harness, block: 0), Array(repeating: 2, count: 8), "block 0's only copy left is #2, synced before the record")
    }

    /// The same loss through a merge: a sub-block rewrite moves the durable copy into the open buffer
    /// (merged with the new sector), so the old position is superseded and skipped by writeback.
    /// Expected: block 0 reads #1 with sector 3 either #1 or #2. Actual: zeros.
    func testDurableCopyMergedIntoTheOpenBufferIsNotForgottenByWriteback() throws {
        let harness = try tinyHarness()
        defer { harness.close() }
        try harness.write(block(1, 0), at: 0, fua: true)
        try harness.write(SectorCodec.bytes(tag: 2, firstLBA: 3, sectors: 1), at: 3 * 512)
        try harness.discard(at: 100 * 4096, count: 4096, zeroes: false)
        try harness.crash(seed: 7)
        let after = try tags(harness, block: 0)
        for sector in 0..<8 {
            let allowed: [UInt32] = sector == 3 ? [1, 2] : [1]
            XCTAssertTrue(after[sector].map(allowed.contains) ?? false,
                          "sector \(sector) of block 0 must read \(allowed.map { describe($0) }) after the crash, read \(describe(after[sector]))")
        }
    }

    /// BUG: a write-zeroes (no FUA) of a block whose newest copy is durable in the cache removes the
    /// block from the index and passes the zeroing down; the urged writeback that the discard's
    /// completion starts finds segment 1 empty of live blocks and records it as written back
    /// without syncing the backing store. If the power fails before the zeroing is synced, the
    /// block reads the backing store's contents from before the durable write.
    ///
    /// 1. write block 5 = #1, drain (the backing store holds #1, synced)
    /// 2. write block 5 = #2 with FUA (durable in segment 2)
    /// 3. write-zeroes block 5, no FUA
    /// 4. power failure; seeds differ in whether the backing store's unsynced zeroing survives
    /// Expected: #2 (the last durable value) or zeros. Actual, for seeds that drop the zeroing: #1.
    func testUnsyncedWriteZeroesNeverRevealsDataOlderThanTheLastDurableWrite() throws {
        var revealed: [UInt64] = []
        for seed: UInt64 in 0..<12 {
            let harness = try tinyHarness()
            defer { harness.close() }
            try harness.write(block(1, 5), at: 5 * 4096)
            try harness.drain()
            try harness.write(block(2, 5), at: 5 * 4096, fua: true)
            try harness.discard(at: 5 * 4096, count: 4096, zeroes: true)
            try harness.crash(seed: seed)
            let after = try tags(harness, block: 5)
            if !after.allSatisfy({ $0 == 2 || $0 == 0 }) { revealed.append(seed) }
        }
        XCTAssertEqual(revealed, [], "power-failure seeds for which block 5 read older data (#1) than its last durable write (#2)")
    }
}
