import XCTest
import SluiceTesting

@testable import SluiceCache

/// The batcher decides whether a writeback batch starts, why, which blocks it takes and how many.
/// Its input is a ``WritebackBatcher/Situation``; these tests set one condition at a time.
final class WritebackBatcherTests: XCTestCase {
    private let second: UInt64 = 1_000_000_000
    private let blocksPerSegment = 100

    /// A situation in which nothing asks for writeback: one dirty block of 1,000, the backing
    /// store fully busy (no opportunistic writeback), `max_age` off.
    private func calm(nowNs: UInt64 = 100 * 1_000_000_000) -> WritebackBatcher.Situation {
        WritebackBatcher.Situation(nowNs: nowNs, dirtyBlocks: 1, cacheBlocks: 1_000, writeBackAll: false, tailNeedsWriteback: false,
                                   oldestDirtyOpenedAtNs: nowNs, backingBusyPercent: 100, discardPassingDown: false,
                                   blocksPerSegment: blocksPerSegment, tunables: CacheTunables())
    }

    /// Every trigger's condition at once: 60% dirty (over the default 50% target), a tail that
    /// needs writeback, a segment past a 5 s `max_age`, an idle backing store, and write back all.
    private func everything(nowNs: UInt64 = 100 * 1_000_000_000) -> WritebackBatcher.Situation {
        var situation = calm(nowNs: nowNs)
        situation.writeBackAll = true
        situation.tailNeedsWriteback = true
        situation.tunables.maxAgeSeconds = 5
        situation.oldestDirtyOpenedAtNs = nowNs - 60 * second
        situation.dirtyBlocks = 600
        situation.backingBusyPercent = 0
        return situation
    }

    /// Each trigger wins over every one after it: write back everything > ring tail > max_age >
    /// dirty_target > backing idle; taking the winner's condition away lets the next one through.
    func testTriggersTakePrecedenceInOrder() {
        var batcher = WritebackBatcher()
        batcher.sweptThrough(41)
        var situation = everything()
        let now = situation.nowNs
        var seen: [WritebackBatcher.Trigger?] = []
        var selections: [WritebackBatcher.Selection?] = []
        for remove in 0...5 {
            let next = batcher.next(situation)
            seen.append(next?.trigger)
            selections.append(next?.selection)
            switch remove {
            case 0: situation.writeBackAll = false
            case 1: situation.tailNeedsWriteback = false
            case 2: situation.oldestDirtyOpenedAtNs = now
            case 3: situation.dirtyBlocks = 500
            case 4: situation.backingBusyPercent = 100
            default: break
            }
        }
        XCTAssertEqual(seen, [.writeBackAll, .ringTail, .maxAge, .dirtyTarget, .backingIdle, nil])
        // The tail and max_age take the oldest segments' blocks; the others sweep in block order
        // from where the last sweep stopped.
        XCTAssertEqual(selections, [.blockOrder(from: 42), .oldest(openedBeforeNs: nil), .oldest(openedBeforeNs: now - 5 * second),
                                    .blockOrder(from: 42), .blockOrder(from: 42), nil])
        XCTAssertEqual(batcher.lastTrigger, .backingIdle, "a nil answer leaves the last trigger as it was")
    }

    /// Nothing dirty, a discard being passed down, or a retry time not yet reached: no batch, not
    /// even for write back everything.
    func testNoBatchWithNothingDirtyWhileADiscardIsPassedDownOrBeforeTheRetryTime() {
        var batcher = WritebackBatcher()
        var situation = everything()
        situation.dirtyBlocks = 0
        XCTAssertNil(batcher.next(situation))
        situation = everything()
        situation.discardPassingDown = true
        XCTAssertNil(batcher.next(situation), "old data must not land after the discard")
        situation = everything()
        let failedAt = situation.nowNs
        batcher.failed(nowNs: failedAt)
        XCTAssertEqual(batcher.retryNotBeforeNs, failedAt + second)
        situation.nowNs = failedAt + second - 1
        XCTAssertNil(batcher.next(situation), "a failed batch is retried a second later, not sooner")
        situation.nowNs = failedAt + second
        XCTAssertEqual(batcher.next(situation)?.trigger, .writeBackAll)
    }

    /// dirty_target: strictly more than that share of the cache dirty; 0 makes any dirty block
    /// count, 100 never triggers.
    func testDirtyTargetTriggersStrictlyAboveItsShare() {
        var batcher = WritebackBatcher()
        var situation = calm()
        situation.dirtyBlocks = 500
        XCTAssertNil(batcher.next(situation), "exactly 50% is not above 50%")
        situation.dirtyBlocks = 501
        XCTAssertEqual(batcher.next(situation)?.trigger, .dirtyTarget)
        situation.dirtyBlocks = 1
        situation.tunables.dirtyTargetPercent = 0
        XCTAssertEqual(batcher.next(situation)?.trigger, .dirtyTarget)
        situation.dirtyBlocks = 1_000
        situation.tunables.dirtyTargetPercent = 100
        XCTAssertNil(batcher.next(situation))
    }

    /// writeback_threshold: opportunistic batches only while the store is busy less than that
    /// share; 0 turns them off even on an idle store, 100 allows them whenever it is not always busy.
    func testWritebackThresholdZeroDisablesOpportunisticWriteback() {
        var batcher = WritebackBatcher()
        var situation = calm()
        situation.backingBusyPercent = 0
        situation.tunables.writebackThresholdPercent = 0
        XCTAssertNil(batcher.next(situation))
        situation.tunables.writebackThresholdPercent = 70
        situation.backingBusyPercent = 70
        XCTAssertNil(batcher.next(situation), "busy exactly the threshold is not below it")
        situation.backingBusyPercent = 69
        XCTAssertEqual(batcher.next(situation)?.trigger, .backingIdle)
        situation.tunables.writebackThresholdPercent = 100
        situation.backingBusyPercent = 99
        XCTAssertEqual(batcher.next(situation)?.trigger, .backingIdle)
        situation.backingBusyPercent = 100
        XCTAssertNil(batcher.next(situation))
    }

    /// max_age 0 is off, however old the data.
    func testMaxAgeZeroIsOff() {
        var batcher = WritebackBatcher()
        var situation = calm()
        situation.oldestDirtyOpenedAtNs = 0
        XCTAssertNil(batcher.next(situation))
        situation.tunables.maxAgeSeconds = 1
        XCTAssertEqual(batcher.next(situation)?.trigger, .maxAge)
        situation.oldestDirtyOpenedAtNs = nil
        XCTAssertNil(batcher.next(situation), "no dirty segment, no age")
    }

    /// The engine takes a max_age batch from the oldest segments opened strictly before
    /// `openedBeforeNs`, so whenever max_age triggers, the segment that made it trigger must be
    /// among them; checked on either side of the boundary. Otherwise the trigger fires, the batch
    /// comes out empty, and nothing is written back until time moves on.
    func testAMaxAgeBatchAlwaysAdmitsTheSegmentThatTriggeredIt() {
        let maxAge: UInt64 = 5
        for age in [maxAge * second - 1, maxAge * second, maxAge * second + 1, 3 * maxAge * second] {
            var batcher = WritebackBatcher()
            var situation = calm()
            situation.tunables.maxAgeSeconds = Int(maxAge)
            let oldest = situation.nowNs - age
            situation.oldestDirtyOpenedAtNs = oldest
            guard let next = batcher.next(situation) else {
                XCTAssertLessThanOrEqual(age, maxAge * second, "dirty for \(age) ns, longer than max_age, and no batch")
                continue
            }
            XCTAssertEqual(next.trigger, .maxAge, "age \(age) ns")
            guard case .oldest(let openedBefore?) = next.selection else { return XCTFail("age \(age) ns: \(next.selection)") }
            XCTAssertLessThan(oldest, openedBefore, "dirty for \(age) ns: max_age triggered but its batch excludes that segment")
        }
    }

    /// A segment whose open time is ahead of the engine's clock (a clock that is not the one the
    /// ring was stamped with) is not old, and must not bring max_age down with an underflow.
    func testASegmentOpenedAfterNowIsNotOld() {
        var batcher = WritebackBatcher()
        var situation = calm(nowNs: 3 * second)
        situation.tunables.maxAgeSeconds = 5
        situation.oldestDirtyOpenedAtNs = 4 * second
        XCTAssertNil(batcher.next(situation))
    }

    /// After an opportunistic batch of duration D the next opportunistic one waits 3·D (a quarter
    /// of the store's time); other triggers do not wait, and other batches impose no wait.
    func testOpportunisticBatchesTakeAtMostAQuarterOfTheStoresTime() {
        var batcher = WritebackBatcher()
        var situation = calm()
        situation.backingBusyPercent = 0
        let start = situation.nowNs
        XCTAssertEqual(batcher.next(situation)?.trigger, .backingIdle)
        let duration: UInt64 = 200_000_000
        batcher.finished(blocks: 10, durationNs: duration, nowNs: start + duration)
        let end = start + duration
        XCTAssertEqual(batcher.opportunisticNotBeforeNs, end + 3 * duration)
        situation.nowNs = end + 3 * duration - 1
        XCTAssertNil(batcher.next(situation))
        situation.dirtyBlocks = 501
        XCTAssertEqual(batcher.next(situation)?.trigger, .dirtyTarget, "over the dirty target the duty cycle does not apply")
        // That dirty_target batch finishing sets no opportunistic wait of its own.
        batcher.finished(blocks: 10, durationNs: 10 * duration, nowNs: end + 3 * duration - 1)
        XCTAssertEqual(batcher.opportunisticNotBeforeNs, end + 3 * duration)
        situation.dirtyBlocks = 1
        situation.nowNs = end + 3 * duration
        XCTAssertEqual(batcher.next(situation)?.trigger, .backingIdle)
    }

    // MARK: Batch size

    /// The cap is nr_max_batched_writeback segments' worth of blocks (at least one segment), and
    /// applies to whatever size adaptation reached.
    func testBatchesAreCappedByNrMaxBatchedWriteback() {
        var batcher = WritebackBatcher()
        var situation = everything()
        XCTAssertEqual(batcher.next(situation)?.maxBlocks, WritebackBatcher.batchBlocksInitial)
        situation.tunables.maxBatchedWritebackSegments = 2
        XCTAssertEqual(batcher.next(situation)?.maxBlocks, 200)
        situation.tunables.maxBatchedWritebackSegments = 0
        XCTAssertEqual(batcher.next(situation)?.maxBlocks, 100, "at least one segment")
        for _ in 0..<30 { batcher.finished(blocks: batcher.batchBlocks, durationNs: 1_000_000, nowNs: situation.nowNs) }
        XCTAssertEqual(batcher.batchBlocks, WritebackBatcher.batchBlocksMax)
        situation.tunables.maxBatchedWritebackSegments = 1024
        XCTAssertEqual(batcher.next(situation)?.maxBlocks, 102_400)
    }

    /// A full batch moves the size toward what the store did per half second, at most doubling and
    /// at least halving per step; a batch faster than 1 ms counts as 1 ms.
    func testAFullBatchMovesTheSizeTowardWhatTheStoreDidInHalfASecond() {
        let cases: [(durationNs: UInt64, expected: Int)] = [
            (500_000_000, 256),  // exactly the target
            (250_000_000, 512),  // twice as fast as needed: 512 would take half a second
            (400_000_000, 320),
            (50_000_000, 512),  // ten times faster: at most doubled
            (1_000_000_000, 128),
            (4_000_000_000, 128),  // eight times slower: at least halved
            (0, 512),
        ]
        for (durationNs, expected) in cases {
            var batcher = WritebackBatcher()
            batcher.finished(blocks: 256, durationNs: durationNs, nowNs: 0)
            XCTAssertEqual(batcher.batchBlocks, expected, "256 blocks in \(durationNs) ns")
        }
    }

    /// The size stays within its bounds however fast or slow the store is.
    func testTheSizeStaysBetweenItsBounds() {
        var batcher = WritebackBatcher()
        for _ in 0..<40 { batcher.finished(blocks: batcher.batchBlocks, durationNs: 100 * second, nowNs: 0) }
        XCTAssertEqual(batcher.batchBlocks, WritebackBatcher.batchBlocksMin)
        var sizes: [Int] = []
        for _ in 0..<20 {
            batcher.finished(blocks: batcher.batchBlocks, durationNs: 0, nowNs: 0)
            sizes.append(batcher.batchBlocks)
        }
        XCTAssertEqual(Array(sizes.prefix(3)), [32, 64, 128], "a fast store doubles the size per batch")
        XCTAssertEqual(sizes.last, WritebackBatcher.batchBlocksMax)
    }

    /// A batch that was not full (the dirty set, or the tail's oldest blocks, had fewer blocks than
    /// the size) says nothing about whether the store could have done more: a fast one leaves the
    /// size as it is. A slow one says the store did less, and lowers it toward what it did.
    func testAShortBatchNeverGrowsTheSizeAndLowersItOnlyIfTheStoreWasSlower() {
        var batcher = WritebackBatcher()
        for _ in 0..<3 { batcher.finished(blocks: batcher.batchBlocks, durationNs: 250_000_000, nowNs: 0) }
        XCTAssertEqual(batcher.batchBlocks, 2_048)
        // 40 blocks (a ring-tail batch) in 5 ms: the store would manage 4,000 in half a second.
        batcher.finished(blocks: 40, durationNs: 5_000_000, nowNs: 0)
        XCTAssertEqual(batcher.batchBlocks, 2_048, "a short, fast batch must not shrink the size")
        // 1,000 blocks in 1 s: 500 per half second, fewer than the size.
        batcher.finished(blocks: 1_000, durationNs: second, nowNs: 0)
        XCTAssertEqual(batcher.batchBlocks, 500)
        // 100 blocks in 10 s: 5 per half second, but at least half the batch, and at least the minimum.
        batcher.finished(blocks: 100, durationNs: 10 * second, nowNs: 0)
        XCTAssertEqual(batcher.batchBlocks, 50)
        batcher.finished(blocks: 10, durationNs: 10 * second, nowNs: 0)
        XCTAssertEqual(batcher.batchBlocks, WritebackBatcher.batchBlocksMin)
        batcher.finished(blocks: 0, durationNs: second, nowNs: 0)
        XCTAssertEqual(batcher.batchBlocks, WritebackBatcher.batchBlocksMin, "an empty batch measures nothing")
    }

    /// Random batches against the rules: the size stays in bounds; a full batch's next size is
    /// within half and double of it and on the side of what the store did; a short batch never
    /// grows the size, leaves it alone when the store kept up, and never lowers it below what the
    /// store did (or half the batch).
    func testSizeAdaptationFollowsItsRulesUnderRandomBatches() {
        for seed in 1...10 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            var batcher = WritebackBatcher()
            for step in 0..<2_000 {
                let before = batcher.batchBlocks
                let blocks = random.chance(50) ? before + random.below(3) : random.below(before)
                let durationNs = UInt64(random.range(0...3_000)) * 1_000_000
                batcher.finished(blocks: blocks, durationNs: durationNs, nowNs: 0)
                let after = batcher.batchBlocks
                let context = "seed \(seed) step \(step): \(blocks) blocks in \(durationNs) ns, size \(before) → \(after)"
                let perTarget = Double(blocks) * 5e8 / Double(max(durationNs, 1_000_000))
                XCTAssertTrue((WritebackBatcher.batchBlocksMin...WritebackBatcher.batchBlocksMax).contains(after), context)
                if blocks == 0 {
                    XCTAssertEqual(after, before, context)
                } else if blocks >= before {
                    XCTAssertLessThanOrEqual(after, max(WritebackBatcher.batchBlocksMin, 2 * blocks), context)
                    XCTAssertGreaterThanOrEqual(after, min(WritebackBatcher.batchBlocksMax, max(WritebackBatcher.batchBlocksMin, blocks / 2)), context)
                    if perTarget >= Double(blocks) { XCTAssertGreaterThanOrEqual(after, min(blocks, WritebackBatcher.batchBlocksMax), context) }
                    if perTarget <= Double(blocks) { XCTAssertLessThanOrEqual(after, max(blocks, WritebackBatcher.batchBlocksMin), context) }
                } else {
                    XCTAssertLessThanOrEqual(after, before, context)
                    if perTarget >= Double(before) { XCTAssertEqual(after, before, context) }
                    XCTAssertGreaterThanOrEqual(after, min(before, max(WritebackBatcher.batchBlocksMin, Int(perTarget), blocks / 2)), context)
                }
            }
        }
    }

    // MARK: Backing load

    /// The meter behind `backingBusyPercent`: the share of each second with a foreground request in
    /// flight (overlapping requests count once, a request spanning a window counts in both), and
    /// within a window at least what the last whole window said.
    func testBackingLoadIsTheShareOfEachSecondWithARequestInFlight() {
        let ms: UInt64 = 1_000_000
        var meter = BackingLoadMeter()
        meter.begin(nowNs: 100 * ms)
        meter.begin(nowNs: 200 * ms)
        meter.end(nowNs: 300 * ms)
        meter.end(nowNs: 400 * ms)
        XCTAssertEqual(meter.busyPercent(nowNs: 1_000 * ms), 30, "two overlapping requests busy 100–400 ms")
        meter.begin(nowNs: 1_500 * ms)
        XCTAssertEqual(meter.busyPercent(nowNs: 2_000 * ms), 50, "a request still in flight counts up to now")
        meter.end(nowNs: 2_200 * ms)
        XCTAssertEqual(meter.busyPercent(nowNs: 2_500 * ms), 50, "40% of half a window, but the last window said 50%")
        XCTAssertEqual(meter.busyPercent(nowNs: 3_000 * ms), 20, "the rest of the request, in the next window")
        XCTAssertEqual(meter.busyPercent(nowNs: 4_000 * ms), 0)
    }

    // MARK: Block order

    /// The sweep goes on after the last block the previous batch took, and starts again from 0 when
    /// it wraps; a sweep that ended at the last possible block wraps too.
    func testTheSweepGoesOnWhereTheLastBatchStopped() {
        var batcher = WritebackBatcher()
        var situation = calm()
        situation.dirtyBlocks = 900
        XCTAssertEqual(batcher.next(situation)?.selection, .blockOrder(from: 0))
        batcher.sweptThrough(1_000)
        XCTAssertEqual(batcher.next(situation)?.selection, .blockOrder(from: 1_001))
        batcher.sweepWrapped()
        XCTAssertEqual(batcher.next(situation)?.selection, .blockOrder(from: 0))
        batcher.sweptThrough(.max)
        XCTAssertEqual(batcher.cursor, 0)
    }
    /// Ring-tail batches are sized from their own measurements: the tail's scattered blocks cost a
    /// backing request each, and writers may wait for them, so a slow tail batch shrinks the next
    /// tail batch without touching the block-order size, and a fast block-order batch does not grow
    /// the tail's.
    func testRingTailBatchesAreSizedOnTheirOwn() {
        var batcher = WritebackBatcher()
        var tail = calm()
        tail.tailNeedsWriteback = true
        tail.dirtyBlocks = 900
        let first = batcher.next(tail)
        XCTAssertEqual(first?.trigger, .ringTail)
        XCTAssertEqual(first?.maxBlocks, WritebackBatcher.tailBatchBlocksInitial)
        // 32 scattered blocks at 8 ms each: 0.256 s, about half the target: the size holds.
        batcher.finished(blocks: 32, durationNs: 256_000_000, nowNs: tail.nowNs + second)
        XCTAssertEqual(batcher.next(tail)?.maxBlocks, 62)
        // Slower (2 s for 62): the next tail batch is cut to half, the block-order size untouched.
        batcher.finished(blocks: 62, durationNs: 2 * second, nowNs: tail.nowNs + 3 * second)
        XCTAssertEqual(batcher.tailBatchBlocks, 31)
        XCTAssertEqual(batcher.batchBlocks, WritebackBatcher.batchBlocksInitial)
        var dirty = calm()
        dirty.dirtyBlocks = 900
        XCTAssertEqual(batcher.next(dirty)?.trigger, .dirtyTarget)
        batcher.finished(blocks: 256, durationNs: second / 10, nowNs: dirty.nowNs + 4 * second)
        XCTAssertEqual(batcher.batchBlocks, 512)
        XCTAssertEqual(batcher.tailBatchBlocks, 31, "a fast block-order batch says nothing of the tail")
    }
}
