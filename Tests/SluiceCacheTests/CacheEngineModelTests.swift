import NIOCore
import SluiceFormat
import XCTest
import SluiceTesting

@testable import SluiceCache

/// Random workloads checked against a model of what each sector must read, on a tiny cache (1 MiB,
/// 64 KiB segments: 15 slots of 15 data blocks) so the ring wraps many times. Every failure names
/// its seed; rerun a single seed by putting it first in the seed list.
final class CacheEngineModelTests: XCTestCase {
    static let cacheBytes = 1 << 20
    static let backingBytes = 2 << 20
    static let sectorCount = backingBytes / 512

    private func makeHarness(threshold: Int, async seed: UInt64? = nil) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = threshold
        return try EngineHarness(cacheBytes: Self.cacheBytes, backingBytes: Self.backingBytes, segmentBytes: 64 * 1024,
                                 tunables: tunables, periodicWork: false, wrapMedia: seed.map { ShuffledScheduler.wrapper(seed: $0) })
    }

    /// Reads `sectors` at `lba` and checks them against the model; returns false on a mismatch.
    private func check(_ workload: Workload, lba: Int, sectors: Int, _ context: @autoclosure () -> String) throws -> Bool {
        let bytes = try workload.harness.read(at: UInt64(lba * 512), count: sectors * 512)
        let bad = try workload.violations(SectorCodec.decodeAll(bytes, firstLBA: lba), firstLBA: lba, afterCrash: false)
        guard bad.isEmpty else {
            XCTFail("\(context()): \(bad.count) sectors wrong; first: \(bad.prefix(4).joined(separator: "\n  "))")
            return false
        }
        return true
    }

    /// Checks the backing store after a drain holds every sector's current value.
    private func checkBacking(_ workload: Workload, _ context: @autoclosure () -> String) throws -> Bool {
        XCTAssertEqual(try workload.harness.inspect { $0.dirtyBlocks }, 0, "\(context()): blocks still dirty after a drain")
        let bytes = try workload.harness.backingBytes(at: 0, count: Self.backingBytes)
        let bad = try workload.violations(SectorCodec.decodeAll(bytes, firstLBA: 0), afterCrash: false)
        guard bad.isEmpty else {
            XCTFail("\(context()): backing store differs from the model after a drain in \(bad.count) sectors; first: \(bad.prefix(4).joined(separator: "\n  "))")
            return false
        }
        return true
    }

    /// One op at a time with reads, drains and clean restarts in between.
    private func runSequential(seed: UInt64, threshold: Int, operations: Int, switchModes: Bool = false) throws {
        let harness = try makeHarness(threshold: threshold)
        defer { harness.close() }
        let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
        var rng = SplitMix64(seed: seed)
        let shape = WorkloadShape(sectorCount: Self.sectorCount)
        let tag = "seed \(seed), writeback_threshold \(threshold)\(switchModes ? ", cache modes switched" : "")"
        for step in 0..<operations {
            if switchModes && rng.chance(5) { try workload.run(.setMode(CacheMode.allCases[rng.below(4)])) }
            let op = shape.next(&rng)
            try workload.run(op)
            let failures = try workload.failures()
            guard failures.isEmpty else { return XCTFail("\(tag), step \(step): request failed: \(failures)") }
            if rng.chance(15) {
                let lba = rng.below(Self.sectorCount)
                let sectors = min(rng.range(1...128), Self.sectorCount - lba)
                guard try check(workload, lba: lba, sectors: sectors, "\(tag), step \(step) after \(op), read \(lba)+\(sectors)") else { return }
            }
            if rng.chance(1) {
                try harness.drain()
                guard try checkBacking(workload, "\(tag), step \(step)") else { return }
            }
            if rng.chance(1) {
                try harness.restartCleanly()
                try workload.everythingAcknowledgedIsDurable()
                XCTAssertEqual(harness.lastRecovery?.report.cleanShutdown, true, "\(tag), step \(step): restart after a clean shutdown")
            }
            if step % 200 == 0 { try workload.compact() }
        }
        guard try check(workload, lba: 0, sectors: Self.sectorCount, "\(tag), whole volume at the end") else { return }
        try harness.drain()
        guard try checkBacking(workload, "\(tag), final drain") else { return }
        try harness.restartCleanly()
        guard try check(workload, lba: 0, sectors: Self.sectorCount, "\(tag), whole volume after a clean restart") else { return }
        try harness.shutdown()
    }

    func testSequentialRandomWorkloadMatchesModel() throws {
        for seed: UInt64 in [1, 2, 3] {
            try runSequential(seed: seed, threshold: 70, operations: 700)
        }
    }

    func testSequentialRandomWorkloadMatchesModelWithUrgedWritebackOnly() throws {
        for seed: UInt64 in [11, 12, 13] {
            try runSequential(seed: seed, threshold: 0, operations: 700)
        }
    }

    /// Bursts of concurrent requests on media that complete in a seeded random order.
    private func runBursts(seed: UInt64, threshold: Int, bursts: Int, switchModes: Bool = false) throws {
        let harness = try makeHarness(threshold: threshold, async: seed)
        defer { harness.close() }
        let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
        var rng = SplitMix64(seed: seed ^ 0xB0B)
        var shape = WorkloadShape(sectorCount: Self.sectorCount)
        shape.drainPercent = 1
        let tag = "seed \(seed) (shuffled completions), writeback_threshold \(threshold)\(switchModes ? ", cache modes switched" : "")"
        for burst in 0..<bursts {
            var ops = (0..<rng.range(1...40)).map { _ in shape.next(&rng) }
            if switchModes { ops.insert(.setMode(CacheMode.allCases[rng.below(4)]), at: rng.below(ops.count + 1)) }
            try workload.burst(ops)
            do { try workload.waitIdle() } catch { return XCTFail("\(tag), burst \(burst): \(error)") }
            let failures = try workload.failures()
            guard failures.isEmpty else { return XCTFail("\(tag), burst \(burst): request failed: \(failures)") }
            if burst % 4 == 3 {
                guard try check(workload, lba: 0, sectors: Self.sectorCount, "\(tag), after burst \(burst)") else { return }
                try workload.compact()
            }
            if rng.chance(3) {
                try harness.restartCleanly()
                try workload.everythingAcknowledgedIsDurable()
            }
        }
        guard try check(workload, lba: 0, sectors: Self.sectorCount, "\(tag), whole volume at the end") else { return }
        try harness.drain()
        guard try checkBacking(workload, "\(tag), final drain") else { return }
        try harness.shutdown()
    }

    func testConcurrentBurstsOnReorderingMediaMatchModel() throws {
        for seed: UInt64 in [21, 22, 23] {
            try runBursts(seed: seed, threshold: 70, bursts: 40)
        }
        for seed: UInt64 in [31, 32] {
            try runBursts(seed: seed, threshold: 0, bursts: 40)
        }
    }

    /// Every cache mode, switched at random between requests (with reads of random ranges between
    /// them, which cache clean copies in the modes that cache reads) and inside bursts on
    /// reordering media: every read matches the model, and after a drain so does the backing store.
    func testWorkloadsAcrossCacheModeSwitchesMatchModel() throws {
        for seed: UInt64 in [51, 52] { try runSequential(seed: seed, threshold: 70, operations: 700, switchModes: true) }
        try runSequential(seed: 53, threshold: 0, operations: 700, switchModes: true)
        for seed: UInt64 in [61, 62] { try runBursts(seed: seed, threshold: 70, bursts: 40, switchModes: true) }
        try runBursts(seed: 63, threshold: 0, bursts: 40, switchModes: true)
    }

    /// After a drain the backing store equals the model's image byte for byte (writes and
    /// write-zeroes, no trims), nothing is dirty, and a power failure right after changes nothing:
    /// everything a drain wrote back is synced.
    func testDrainLeavesTheBackingStoreEqualToTheModelByteForByte() throws {
        for (threshold, seed) in [(0, nil), (70, nil), (0, UInt64(41)), (100, UInt64(42))] as [(Int, UInt64?)] {
            let harness = try makeHarness(threshold: threshold, async: seed)
            defer { harness.close() }
            let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
            var rng = SplitMix64(seed: 40 &+ UInt64(threshold) &+ (seed ?? 0))
            var shape = WorkloadShape(sectorCount: Self.sectorCount)
            shape.trimPercent = 0
            let tag = "writeback_threshold \(threshold), \(seed.map { "shuffled \($0)" } ?? "in order")"
            for round in 0..<4 {
                try workload.burst((0..<150).map { _ in shape.next(&rng) })
                try workload.waitIdle()
                XCTAssertEqual(try workload.failures(), [], tag)
                try harness.drain()
                XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 0, "\(tag), round \(round)")
                let expected = try workload.currentTags().enumerated().flatMap { sector, tags -> [UInt8] in
                    SectorCodec.bytes(tag: tags[0], firstLBA: sector, sectors: 1)
                }
                let backing = try harness.backingBytes(at: 0, count: Self.backingBytes)
                if backing != expected {
                    let first = (0..<Self.sectorCount).first { backing[($0 * 512)..<($0 * 512 + 512)] != expected[($0 * 512)..<($0 * 512 + 512)] }!
                    XCTFail("\(tag), round \(round): the backing store differs from the model after a drain, first at sector \(first)")
                    return
                }
            }
            try harness.crash(seed: 77)
            let after = try workload.readAll()
            let bad = try workload.violations(after, afterCrash: false)
            XCTAssertTrue(bad.isEmpty, "\(tag): a power failure right after the drain changed data: \(bad.prefix(3).joined(separator: "\n  "))")
        }
    }
}
