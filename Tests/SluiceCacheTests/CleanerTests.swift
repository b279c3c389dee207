import XCTest
import SluiceTesting

@testable import SluiceCache

/// The cleaner decides what to do with the ring's tail from a ``Cleaner/Situation`` and keeps the
/// fences that hold each reclaimed segment's retirement back until its live blocks are durable
/// elsewhere. A slot reused too early loses acknowledged data, so the fence tests matter most.
final class CleanerTests: XCTestCase {
    private let blocksPerSegment = 100

    /// A ring at `occupancy` percent with plenty of free slots, nobody waiting, and a tail with
    /// `dirty` dirty blocks (nil: no written tail).
    /// `writersWaitedNs` says how long the writers waited when `writersWait` (a moment by default).
    private func situation(occupancy: Int, dirty: Int? = 0, free: Int = 40, reserve: Int = 2, writersWait: Bool = false, writersWaitedNs: UInt64 = 1_000_000,
                           reclaimClean: Bool = false, blocksPerSegment: Int? = nil) -> Cleaner.Situation {
        Cleaner.Situation(occupancyPercent: occupancy, freeSegments: free, reserveSegments: reserve, writersWaitedForSpaceNs: writersWait ? writersWaitedNs : nil,
                          reclaimCleanSegments: reclaimClean, tail: dirty.map { Cleaner.Tail(id: 7, dirtyBlocks: $0) },
                          blocksPerSegment: blocksPerSegment ?? self.blocksPerSegment)
    }

    private func cleaner(high: Int = 50, low: Int = 45) -> Cleaner {
        Cleaner(settings: Cleaner.Settings(highWatermarkPercent: high, lowWatermarkPercent: low))
    }

    // MARK: Phase

    /// Cleaning starts only above the high watermark, goes on anywhere above the low one, and stops
    /// at the low one; inside the band the phase stays what it was, whichever way it got there.
    func testPhaseHasHysteresisBetweenTheWatermarks() {
        var cleaner = cleaner()
        let steps: [(occupancy: Int, phase: Cleaner.Phase)] = [
            (40, .resting), (50, .resting), (47, .resting),  // at the high watermark is not above it
            (51, .cleaning), (50, .cleaning), (46, .cleaning),  // inside the band: still cleaning
            (45, .resting), (46, .resting), (50, .resting),  // down at the low one: rest, and inside the band stay resting
            (100, .cleaning), (0, .resting),
        ]
        for (step, (occupancy, phase)) in steps.enumerated() {
            _ = cleaner.decide(situation(occupancy: occupancy))
            XCTAssertEqual(cleaner.phase, phase, "step \(step): occupancy \(occupancy)%")
        }
    }

    /// The phase follows occupancy even while a relocation runs or no tail is written, so the
    /// decision after it sees the right phase.
    func testPhaseFollowsOccupancyWhileNothingCanBeDecided() {
        var cleaner = cleaner()
        _ = cleaner.decide(situation(occupancy: 80, dirty: nil))
        XCTAssertEqual(cleaner.phase, .cleaning)
        cleaner.relocationStarted(7)
        _ = cleaner.decide(situation(occupancy: 10))
        XCTAssertEqual(cleaner.phase, .resting)
    }

    /// Equal watermarks (the tunables allow them) leave no band: above is cleaning, at or below is
    /// resting.
    func testEqualWatermarksSwitchAtOnePoint() {
        var cleaner = cleaner(high: 60, low: 60)
        for (occupancy, phase) in [(61, Cleaner.Phase.cleaning), (60, .resting), (61, .cleaning), (59, .resting)] {
            _ = cleaner.decide(situation(occupancy: occupancy))
            XCTAssertEqual(cleaner.phase, phase, "occupancy \(occupancy)%")
        }
    }

    // MARK: Decisions

    /// A tail with no dirty block costs nothing to reclaim, but is reclaimed only when space is
    /// wanted (cleaning, or urgent) or when every clean segment is to go (closing, draining).
    func testACleanTailIsReclaimedWithoutIOOnlyWhenWanted() {
        var resting = cleaner()
        XCTAssertEqual(resting.decide(situation(occupancy: 30)), .rest)
        XCTAssertEqual(resting.decide(situation(occupancy: 30, reclaimClean: true)), .reclaimWithoutIO(7))
        XCTAssertEqual(resting.decide(situation(occupancy: 30, writersWait: true)), .reclaimWithoutIO(7), "writers wait for a slot")
        XCTAssertEqual(resting.decide(situation(occupancy: 30, free: 2, reserve: 2)), .reclaimWithoutIO(7), "free slots down to the reserve")
        XCTAssertEqual(resting.decide(situation(occupancy: 30, free: 3, reserve: 2)), .rest, "one slot above the reserve is not urgent")
        XCTAssertEqual(resting.phase, .resting)
        var cleaning = cleaner()
        XCTAssertEqual(cleaning.decide(situation(occupancy: 70)), .reclaimWithoutIO(7))
    }

    /// `reclaimCleanSegments` is about clean segments only: a dirty tail is left alone while
    /// resting, since relocating it would rewrite data for no space anyone needs.
    func testReclaimingCleanSegmentsNeverRelocatesADirtyTail() {
        var cleaner = cleaner()
        XCTAssertEqual(cleaner.decide(situation(occupancy: 30, dirty: 1, reclaimClean: true)), .rest)
    }

    /// Relocation pays only while the tail holds at least 12% dead or clean blocks; below that the
    /// cleaner asks writeback to clean the oldest blocks instead, even when writers wait (a ring full
    /// of dirty data would otherwise be rewritten lap after lap). Checked at the boundary for
    /// segments of 100 and 255 data blocks, and over every dirty count.
    func testADirtyTailIsRelocatedAboveTheYieldAndWaitsForWritebackBelowIt() {
        // 12% of 100 blocks is 12: 88 dirty frees 12, 89 frees 11. 12% of 255 is 30.6: 224 dirty
        // frees 31, 225 frees 30.
        for (perSegment, lastRelocated) in [(100, 88), (255, 224)] {
            for urgent in [false, true] {
                var cleaner = cleaner()
                for dirty in 1...perSegment {
                    let decision = cleaner.decide(situation(occupancy: 80, dirty: dirty, writersWait: urgent, blocksPerSegment: perSegment))
                    let expected: Cleaner.Decision = dirty <= lastRelocated ? .relocate(7) : .waitForWriteback(7)
                    XCTAssertEqual(decision, expected, "\(dirty) of \(perSegment) dirty, writers wait: \(urgent)")
                    XCTAssertEqual(cleaner.lastDecision, decision)
                }
            }
        }
    }

    /// Writers that waited past the deadline get a relocation of a tail below the yield, as long as
    /// it frees at least one block; a tail all dirty still waits for writeback (relocating it would
    /// free nothing), and so does one writers waited for less long.
    func testWritersWaitingLongGetARelocationBelowTheYield() {
        let deadline = Cleaner.stalledWritersRelocateAfterNs
        for (dirty, waitedNs, expected) in [(99, deadline, Cleaner.Decision.relocateForStalledWriters(7)),
                                            (95, deadline * 3, .relocateForStalledWriters(7)),
                                            (100, deadline * 3, .waitForWriteback(7)),
                                            (99, deadline - 1, .waitForWriteback(7)),
                                            (88, deadline, .relocate(7))] {
            var cleaner = cleaner()
            XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: dirty, free: 2, writersWait: true, writersWaitedNs: waitedNs)), expected,
                           "\(dirty) of 100 dirty, writers waited \(waitedNs) ns")
        }
        var cleaner = cleaner()
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: 99, free: 2)), .waitForWriteback(7), "no writer waits")
    }

    /// Urgency alone (resting, below the watermarks) is enough to relocate a tail above the yield.
    func testUrgencyRelocatesWhileResting() {
        var cleaner = cleaner()
        XCTAssertEqual(cleaner.decide(situation(occupancy: 10, dirty: 10, writersWait: true)), .relocate(7))
        XCTAssertEqual(cleaner.phase, .resting)
        XCTAssertEqual(cleaner.decide(situation(occupancy: 10, dirty: 10)), .rest)
    }

    /// No tail written yet, or a relocation running: nothing to decide, however urgent.
    func testNoDecisionWithoutATailOrWhileARelocationRuns() {
        var cleaner = cleaner()
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: nil, writersWait: true)), .rest)
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: 10)), .relocate(7))
        cleaner.relocationStarted(7)
        XCTAssertEqual(cleaner.relocatingID, 7)
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: 0, writersWait: true)), .rest)
        XCTAssertEqual(cleaner.lastDecision, .rest, "the last decision is what decide answered last")
        cleaner.reclaimed(7, fenceID: 9)
        XCTAssertNil(cleaner.relocatingID)
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: 0)), .reclaimWithoutIO(7))
    }

    /// An abandoned relocation (a graceful close) leaves the segment unreclaimed: no fence, and the
    /// cleaner may decide again.
    func testAnAbandonedRelocationLeavesNoFence() {
        var cleaner = cleaner()
        cleaner.relocationStarted(7)
        cleaner.relocationAbandoned(7)
        XCTAssertNil(cleaner.relocatingID)
        XCTAssertNil(cleaner.oldestFenceID)
        XCTAssertNil(cleaner.retirable(durableThroughID: .max))
        XCTAssertEqual(cleaner.decide(situation(occupancy: 99, dirty: 10)), .relocate(7))
    }

    // MARK: Fences

    /// Each reclaim waits for its own fence; the answer is the newest reclaimed segment all of
    /// whose predecessors' fences passed too, and never one whose fence has not.
    func testRetirableIsTheNewestReclaimWhoseFencePassed() {
        var cleaner = cleaner()
        cleaner.reclaimed(1, fenceID: 3)
        cleaner.reclaimed(2, fenceID: 3)
        cleaner.reclaimed(3, fenceID: 5)
        cleaner.reclaimed(4, fenceID: 9)
        XCTAssertEqual(cleaner.oldestFenceID, 3)
        XCTAssertNil(cleaner.retirable(durableThroughID: 2), "no fence has passed")
        XCTAssertEqual(cleaner.retirable(durableThroughID: 4), 2, "1 and 2 share fence 3; 3 waits for 5")
        XCTAssertEqual(cleaner.oldestFenceID, 5)
        XCTAssertNil(cleaner.retirable(durableThroughID: 4), "what was answered is not answered again")
        XCTAssertEqual(cleaner.retirable(durableThroughID: 8), 3)
        XCTAssertEqual(cleaner.retirable(durableThroughID: .max), 4)
        XCTAssertNil(cleaner.oldestFenceID)
        XCTAssertNil(cleaner.retirable(durableThroughID: .max))
    }

    /// Random reclaims (fences never go back, as the newest appended segment never does) and
    /// random durability reports, against a model: the answer is always the newest reclaim among
    /// a prefix whose fences all passed, every reclaim is answered exactly once in order, and none
    /// is answered before its fence passed.
    func testFencesAgreeWithAModelUnderRandomReclaimsAndSyncs() {
        for seed in 1...20 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            var cleaner = cleaner()
            var waiting: [(id: UInt64, fence: UInt64)] = []
            var nextID: UInt64 = 1
            var fence: UInt64 = 1
            var durable: UInt64 = 0
            var lastAnswered: UInt64 = 0
            for step in 0..<2_000 {
                if random.chance(50) {
                    fence += UInt64(random.below(3))
                    cleaner.reclaimed(nextID, fenceID: fence)
                    waiting.append((nextID, fence))
                    nextID += 1
                } else {
                    // Durability mostly grows; sometimes a caller reports less than before.
                    durable = random.chance(10) ? UInt64(random.below(Int(durable) + 1)) : durable + UInt64(random.below(3))
                    var expected: UInt64?
                    while let first = waiting.first, first.fence <= durable {
                        expected = first.id
                        waiting.removeFirst()
                    }
                    let answer = cleaner.retirable(durableThroughID: durable)
                    XCTAssertEqual(answer, expected, "seed \(seed) step \(step): durable through \(durable)")
                    if let answer {
                        XCTAssertGreaterThan(answer, lastAnswered, "seed \(seed) step \(step): retirement went back")
                        lastAnswered = answer
                    }
                }
                XCTAssertEqual(cleaner.oldestFenceID, waiting.first?.fence, "seed \(seed) step \(step)")
                XCTAssertEqual(cleaner.fences.count, waiting.count, "seed \(seed) step \(step)")
            }
        }
    }

    /// A failed retirement record puts its segments back first in line, retirable at once by any
    /// durability report (their fences had passed), and holds the next record back a second.
    func testARetryPutsTheFailedRetirementBackFirstInLine() {
        var cleaner = cleaner()
        cleaner.reclaimed(1, fenceID: 4)
        cleaner.reclaimed(2, fenceID: 4)
        cleaner.reclaimed(3, fenceID: 8)
        XCTAssertEqual(cleaner.retirable(durableThroughID: 5), 2)
        XCTAssertEqual(cleaner.retryNotBeforeNs, 0)
        cleaner.retryRetirement(through: 2, nowNs: 7_000)
        XCTAssertEqual(cleaner.retryNotBeforeNs, 1_000_007_000)
        XCTAssertEqual(cleaner.oldestFenceID, 0, "the failed record's fences had passed")
        XCTAssertEqual(cleaner.retirable(durableThroughID: 0), 2, "retirable again whatever is durable")
        cleaner.retryRetirement(through: 2, nowNs: 9_000)
        XCTAssertEqual(cleaner.retirable(durableThroughID: 8), 3, "a retry and a newer reclaim whose fence passed go together")
        // A retry with nothing else waiting, then a newer reclaim: still in order.
        cleaner.retryRetirement(through: 3, nowNs: 10_000)
        cleaner.reclaimed(4, fenceID: 9)
        XCTAssertEqual(cleaner.retirable(durableThroughID: 8), 3)
        XCTAssertEqual(cleaner.retirable(durableThroughID: 9), 4)
    }

    /// A reclaim whose fence is older than the previous one's would let a record retire a segment
    /// before copies appended earlier are durable: refused.
    func testAReclaimWithAnOlderFenceIsRefused() throws {
        try assertRefused(childTestName(), message: "reclaims out of order") {
            var cleaner = cleaner()
            cleaner.reclaimed(1, fenceID: 5)
            cleaner.reclaimed(2, fenceID: 4)
        }
    }

    /// Relocation runs one segment at a time; a second start would interleave two tails' appends.
    func testTwoRelocationsAtOnceAreRefused() throws {
        try assertRefused(childTestName(), message: "two segments relocated at once") {
            var cleaner = cleaner()
            cleaner.relocationStarted(1)
            cleaner.relocationStarted(2)
        }
    }
}
