import NIOCore
import SluiceFormat
import SluiceVolume
import XCTest
import SluiceTesting

@testable import SluiceCache

/// A ring of 15 segments (1 MiB cache, 64 KiB segments, 225 cache blocks) under more writes than it
/// holds: writers wait for writeback and never fail, never deadlock, never reorder.
final class CacheEngineRingTests: XCTestCase {
    static let sectorCount = (2 << 20) / 512

    private func harness(threshold: Int, shuffledSeed: UInt64? = nil, controlled: Bool = false) throws -> EngineHarness {
        var tunables = CacheTunables()
        tunables.writebackThresholdPercent = threshold
        let wrap: ((SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium))?
        if let shuffledSeed { wrap = ShuffledScheduler.wrapper(seed: shuffledSeed) } else if controlled { wrap = ControlledMedium.wrapper() } else { wrap = nil }
        return try EngineHarness(cacheBytes: 1 << 20, backingBytes: 2 << 20, segmentBytes: 64 * 1024, tunables: tunables, wrapMedia: wrap)
    }

    private func checkWholeVolume(_ workload: Workload, _ context: String) throws {
        let bad = try workload.violations(try workload.readAll(), afterCrash: false)
        XCTAssertTrue(bad.isEmpty, "\(context): \(bad.count) sectors wrong; first: \(bad.prefix(3).joined(separator: "\n  "))")
    }

    /// 400 requests in flight at once (writes from 512 B to 64 KiB, rewrites, FUA, flushes), with
    /// writeback only when urged: every request completes, none fails, and the volume reads as the
    /// last write to each sector in arrival order.
    func testHundredsOfRequestsInFlightOnATinyRingAllComplete() throws {
        for (mode, seed) in [("in-order", nil), ("shuffled", UInt64(5)), ("shuffled", UInt64(6))] as [(String, UInt64?)] {
            let harness = try harness(threshold: 0, shuffledSeed: seed)
            defer { harness.close() }
            let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
            var rng = SplitMix64(seed: seed ?? 4)
            var shape = WorkloadShape(sectorCount: Self.sectorCount)
            shape.trimPercent = 0
            shape.zeroPercent = 0
            shape.flushPercent = 3
            for round in 0..<3 {
                try workload.burst((0..<400).map { _ in shape.next(&rng) })
                do { try workload.waitIdle() } catch { return XCTFail("\(mode) media, round \(round): \(error)") }
                XCTAssertEqual(try workload.failures(), [], "\(mode) media, round \(round)")
                try checkWholeVolume(workload, "\(mode) media, round \(round)")
            }
            let counters = try harness.inspect { $0.counters }
            XCTAssertGreaterThan(counters.segmentsWritten, 3 * 15, "\(mode): the ring wrapped several times")
            if seed != nil { XCTAssertGreaterThan(counters.writesThrottled, 0, "\(mode): writers had to wait for writeback") }
            try harness.drain()
            try checkWholeVolume(workload, "\(mode) media, after the drain")
        }
    }

    /// One write larger than the whole cache (1.5 MiB on a 900 KiB ring) completes: it is applied
    /// in parts while writeback frees segments behind it. Also with FUA, and on reordering media.
    func testAWriteLargerThanTheCacheCompletes() throws {
        for (fua, seed) in [(false, nil), (true, nil), (false, UInt64(9)), (true, UInt64(10))] as [(Bool, UInt64?)] {
            let harness = try harness(threshold: 0, shuffledSeed: seed)
            defer { harness.close() }
            let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
            try workload.run(.write(lba: 8, sectors: 3072, fua: fua))
            try workload.run(.write(lba: 1000, sectors: 3000, fua: !fua))
            XCTAssertEqual(try workload.failures(), [], "FUA \(fua), \(seed.map { "shuffled \($0)" } ?? "in order")")
            try checkWholeVolume(workload, "FUA \(fua), \(seed.map { "shuffled \($0)" } ?? "in order")")
        }
    }

    /// With the backing store stalled and superblock records held (so no reclaimed segment is
    /// ever retired), the ring fills completely: writers take all but the cleaner's reserve, and
    /// the cleaner's relocations take the rest. A power failure then leaves a log that fills the
    /// whole ring. Recovery takes all of it (chain end: ring full), and the new engine, which
    /// starts with no free slot, writes it back.
    func testARingFullOfDirtySegmentsRecoversAndDrains() throws {
        let harness = try harness(threshold: 0, controlled: true)
        defer { harness.close() }
        let backingMedium = harness.backingMedium as! ControlledMedium
        let cacheMedium = harness.cacheMedium as! ControlledMedium
        let firstSegmentOffset = try harness.inspect { $0.geometry.firstSegmentOffset }
        try harness.loop.submit {
            backingMedium.hold = { kind, _, _ in kind == .write }
            cacheMedium.hold = { kind, offset, _ in kind == .write && offset < firstSegmentOffset }
        }.wait()
        let workload = Workload(harness: harness, sectorCount: Self.sectorCount)
        // FUA writes of 4 blocks, each in a burst of its own, so each seals a partial segment:
        // writers fill all but the reserve; then the cleaner compacts the tail's partial segments
        // into the reserve, and with records held nothing is retired.
        for index in 0..<20 {
            try workload.burst([.write(lba: index * 32, sectors: 32, fua: true)])
            for _ in 0..<5 { try harness.loop.submit {}.wait() }
        }
        for _ in 0..<20 { try harness.loop.submit {}.wait() }
        let state = try harness.inspect { ($0.freeSegments, $0.updates.waiting.count, $0.counters.relocatedBlocks) }
        let report = try harness.inspect { $0.stuckReport() }
        XCTAssertEqual(state.0, 0, "every slot holds a live segment; \(report)")
        XCTAssertGreaterThan(state.1, 0, "writers wait for a free slot")
        XCTAssertGreaterThan(state.2, 0, "the cleaner relocated blocks into its reserve")
        try workload.burst([], thenPowerFailAfterHops: 0, seed: 11)
        try workload.waitForPowerFailure()
        try harness.recoverFromPowerFailure()
        XCTAssertEqual(harness.lastRecovery?.report.chain.end, .ringFull)
        XCTAssertEqual(harness.lastRecovery?.report.chain.segments.count, 15, "every slot's segment was replayed")
        let observed = try workload.readAll()
        let bad = try workload.violations(observed, afterCrash: true)
        XCTAssertTrue(bad.isEmpty, "after recovery of a full ring: \(bad.prefix(3).joined(separator: "\n  "))")
        try harness.drain()
        XCTAssertEqual(try harness.inspect { $0.dirtyBlocks }, 0)
        XCTAssertEqual(SectorCodec.decodeAll(try harness.backingBytes(at: 0, count: 2 << 20), firstLBA: 0), observed,
                       "the backing store holds what recovery found")
    }

    /// BUG (pacing): with writeback_threshold 0 ("stops background writeback; it still runs when
    /// urged or drained"), a segment filled by a write is written back at once although 14 of 15
    /// slots are free and nobody waits. `kickWriteback` counts `!waitingUpdates.isEmpty` as urgent,
    /// and the write that filled the segment is still the head of `waitingUpdates` while it is being
    /// applied (the segment write completes inside `applyWrite` on media that complete at once).
    /// The same happens for every trim or write-zeroes (the discard is the queue head when its
    /// completion kicks writeback), which is what exposes the durability bug in
    /// `CacheEngineDurabilityTests`.
    /// Expected: 15 dirty blocks, no writeback batch. Actual: 0 dirty, 1 batch.
    func testThresholdZeroDoesNotWriteBackAFullSegmentUntilUrged() throws {
        let harness = try harness(threshold: 0)
        defer { harness.close() }
        for blockNumber in 0..<15 {
            try harness.write(SectorCodec.bytes(tag: UInt32(blockNumber + 1), firstLBA: blockNumber * 8, sectors: 8),
                              at: UInt64(blockNumber * 4096))
        }
        let state = try harness.inspect { ($0.dirtyBlocks, $0.counters.writebackBatches, $0.updates.waiting.count) }
        XCTAssertEqual(state.2, 0, "nobody waits")
        XCTAssertEqual(state.0, 15, "the full segment stays dirty: writeback is not urged")
        XCTAssertEqual(state.1, 0, "no writeback batch ran")
    }
}
