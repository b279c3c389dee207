import XCTest
import SluiceTesting

@testable import SluiceCache

/// The ring keeps five positions of the log (retired ≤ reclaimed ≤ written < next, synced ≤
/// written) and maps ids to slots; the engine moves the positions. These tests drive it with the
/// events the engine sends, in orders the engine can produce (segment writes complete out of
/// order), against a model that keeps the same positions the obvious way.
final class SegmentRingTests: XCTestCase {
    /// What the ring should say, kept plainly: sets of ids instead of positions.
    private struct Model {
        let segmentCount: Int
        var retired: UInt64
        var reclaimed: UInt64
        var next: UInt64
        var written: Set<UInt64>
        var synced: UInt64

        /// Every id up to `writtenFloor` counts as written (the recovered log, and retired ids,
        /// which leave `written`); beyond it, the ids in `written`.
        var writtenFloor: UInt64
        /// Every id up to here is written, and the next one is not.
        var writtenThrough: UInt64 {
            var id = writtenFloor
            while written.contains(id + 1) { id += 1 }
            return id
        }

        var live: Int { Int(next - 1 - retired) }
        func slot(of id: UInt64) -> Int { Int((id - 1) % UInt64(segmentCount)) }
    }

    private func check(_ ring: SegmentRing, _ model: Model, _ context: @autoclosure () -> String,
                       file: StaticString = #filePath, line: UInt = #line) {
        let where_ = context()
        XCTAssertEqual(ring.retiredThroughID, model.retired, "retired, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.reclaimedThroughID, model.reclaimed, "reclaimed, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.writtenThroughID, model.writtenThrough, "written, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.syncedThroughID, model.synced, "synced, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.nextSegmentID, model.next, "next, \(where_)", file: file, line: line)
        // The order the whole engine relies on.
        XCTAssertTrue(ring.retiredThroughID <= ring.reclaimedThroughID && ring.reclaimedThroughID <= ring.writtenThroughID
                      && ring.writtenThroughID < ring.nextSegmentID && ring.syncedThroughID <= ring.writtenThroughID,
                      "order broken, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.liveSegments, model.live, "live, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.freeSegments, model.segmentCount - model.live, "free, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.occupancyPercent, model.live * 100 / model.segmentCount, "occupancy, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.reclaimedNotRetired, Int(model.reclaimed - model.retired), "reclaimed not retired, \(where_)", file: file, line: line)
        XCTAssertEqual(ring.reclaimableTailID, model.reclaimed + 1 <= model.writtenThrough ? model.reclaimed + 1 : nil,
                       "reclaimable tail, \(where_)", file: file, line: line)
        // Every slot: the live segment the model puts there, or none.
        var expected = [UInt64?](repeating: nil, count: model.segmentCount)
        if model.live > 0 {
            for id in (model.retired + 1)..<model.next {
                XCTAssertNil(expected[model.slot(of: id)], "two live segments in one slot, \(where_)", file: file, line: line)
                expected[model.slot(of: id)] = id
            }
        }
        for slot in 0..<model.segmentCount {
            XCTAssertEqual(ring.segmentID(inSlot: slot), expected[slot], "segment in slot \(slot), \(where_)", file: file, line: line)
        }
    }

    /// Random sequences of every event, each only when the engine could send it, over many laps of
    /// a small ring and from logs recovered at various places (including mid-lap and empty).
    func testPositionsKeepTheirOrderAndAgreeWithAModelUnderRandomEvents() {
        for seed in 1...12 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let segmentCount = random.range(2...7)
            let retired = UInt64(random.below(3)) * UInt64(segmentCount) + UInt64(random.below(segmentCount))
            let next = retired + 1 + UInt64(random.below(segmentCount + 1))
            var ring = SegmentRing(segmentCount: segmentCount, retiredThroughID: retired, nextSegmentID: next, nowNs: 0)
            var model = Model(segmentCount: segmentCount, retired: retired, reclaimed: retired, next: next, written: [],
                              synced: next - 1, writtenFloor: next - 1)
            check(ring, model, "seed \(seed) after recovery")
            var opened: [UInt64] = []  // opened, not yet written
            for step in 0..<1_500 {
                let context = "seed \(seed) step \(step) (\(segmentCount) slots)"
                switch random.below(6) {
                case 0, 1:
                    guard ring.freeSegments > 0 else { continue }
                    let id = ring.open(nowNs: UInt64(step))
                    XCTAssertEqual(id, model.next, context)
                    XCTAssertEqual(ring.openedAtNs(of: id), UInt64(step), context)
                    model.next += 1
                    opened.append(id)
                case 2:
                    // Writes complete in any order.
                    guard !opened.isEmpty else { continue }
                    let id = opened.remove(at: random.below(opened.count))
                    ring.written(id)
                    model.written.insert(id)
                case 3:
                    // A sync covers what was written when it was issued: any id up to there.
                    let through = model.writtenThrough
                    guard through > 0 else { continue }
                    let id = UInt64(random.below(Int(through) + 1))
                    ring.synced(through: id)
                    model.synced = max(model.synced, id)
                case 4:
                    guard let tail = ring.reclaimableTailID else { continue }
                    ring.reclaimed(tail)
                    model.reclaimed = tail
                default:
                    guard model.reclaimed > model.retired else { continue }
                    let id = model.retired + 1 + UInt64(random.below(Int(model.reclaimed - model.retired)))
                    ring.retired(through: id)
                    model.retired = id
                    model.written = model.written.filter { $0 > id }
                    model.writtenFloor = max(model.writtenFloor, id)
                }
                check(ring, model, context)
            }
            XCTAssertGreaterThan(model.next, UInt64(4 * segmentCount), "seed \(seed): the run should go round the ring several times")
        }
    }

    /// Written out of order: the written position waits for the gap and then jumps over every
    /// segment that completed ahead of it.
    func testWrittenWaitsForTheGapThenJumpsOverSegmentsWrittenAhead() {
        var ring = SegmentRing(segmentCount: 8, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
        for _ in 1...5 { _ = ring.open(nowNs: 0) }
        ring.written(3)
        ring.written(5)
        XCTAssertEqual(ring.writtenThroughID, 0, "segments 1 and 2 are not on the device yet")
        XCTAssertNil(ring.reclaimableTailID, "nothing is reclaimable before the tail is written")
        ring.written(2)
        XCTAssertEqual(ring.writtenThroughID, 0)
        ring.written(1)
        XCTAssertEqual(ring.writtenThroughID, 3, "1 fills the gap; 2 and 3 were ahead; 4 is still missing")
        XCTAssertEqual(ring.reclaimableTailID, 1)
        ring.written(4)
        XCTAssertEqual(ring.writtenThroughID, 5)
    }

    /// A sync never moves the synced position back, and one that covers less than is synced
    /// already changes nothing.
    func testSyncedNeverGoesBack() {
        var ring = SegmentRing(segmentCount: 4, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
        for _ in 1...3 { ring.written(ring.open(nowNs: 0)) }
        ring.synced(through: 3)
        ring.synced(through: 1)
        XCTAssertEqual(ring.syncedThroughID, 3)
    }

    /// Free, live and occupancy count reclaimed segments as occupying their slot until retired,
    /// and the open one too; occupancy rounds down.
    func testFreeLiveAndOccupancyCountEverySlotUntilItsSegmentIsRetired() {
        var ring = SegmentRing(segmentCount: 3, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.occupancyPercent], [0, 3, 0])
        ring.written(ring.open(nowNs: 0))
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.occupancyPercent], [1, 2, 33])
        _ = ring.open(nowNs: 0)  // open, not written
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.occupancyPercent], [2, 1, 66])
        ring.reclaimed(1)
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.reclaimedNotRetired], [2, 1, 1],
                       "a reclaimed segment keeps its slot until a record retires it")
        ring.written(2)
        _ = ring.open(nowNs: 0)
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.occupancyPercent], [3, 0, 100])
        ring.retired(through: 1)
        XCTAssertEqual([ring.liveSegments, ring.freeSegments, ring.reclaimedNotRetired], [2, 1, 0])
        XCTAssertNil(ring.segmentID(inSlot: 0), "segment 1's slot is free")
        XCTAssertEqual(ring.segmentID(inSlot: 1), 2)
        XCTAssertEqual(ring.segmentID(inSlot: 2), 3)
        // The next lap reuses slot 0.
        XCTAssertEqual(ring.open(nowNs: 0), 4)
        XCTAssertEqual(ring.slot(of: 4), 0)
        XCTAssertEqual(ring.segmentID(inSlot: 0), 4)
    }

    /// A log recovered far into its life (ids in the millions) maps slots as one that got there
    /// lap by lap, including a full ring whose oldest segment is not in slot 0.
    func testSegmentIDInSlotForALogRecoveredManyLapsOn() {
        let count = 5
        for retired in [UInt64(1_000_000), 1_000_002, 1_000_004] {
            let ring = SegmentRing(segmentCount: count, retiredThroughID: retired, nextSegmentID: retired + 1 + UInt64(count), nowNs: 0)
            XCTAssertEqual(ring.freeSegments, 0)
            for id in (retired + 1)...(retired + UInt64(count)) {
                XCTAssertEqual(ring.segmentID(inSlot: ring.slot(of: id)), id, "retired through \(retired)")
                XCTAssertEqual(ring.slot(of: id), Int((id - 1) % UInt64(count)))
            }
            let empty = SegmentRing(segmentCount: count, retiredThroughID: retired, nextSegmentID: retired + 1, nowNs: 0)
            XCTAssertEqual((0..<count).compactMap { empty.segmentID(inSlot: $0) }, [], "an empty log has no segment in any slot")
        }
    }

    /// Device reads per slot: a slot has readers until the last one finishes, and each slot
    /// counts its own.
    func testReadersAreCountedPerSlot() {
        var ring = SegmentRing(segmentCount: 4, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
        ring.readerStarted(slot: 2)
        ring.readerStarted(slot: 2)
        ring.readerStarted(slot: 3)
        XCTAssertEqual((0..<4).map { ring.hasReaders(slot: $0) }, [false, false, true, true])
        XCTAssertFalse(ring.readerFinished(slot: 2), "one read of slot 2 is still in flight")
        XCTAssertTrue(ring.hasReaders(slot: 2))
        XCTAssertTrue(ring.readerFinished(slot: 2))
        XCTAssertTrue(ring.readerFinished(slot: 3))
        XCTAssertEqual((0..<4).map { ring.hasReaders(slot: $0) }, [false, false, false, false])
    }

    // MARK: Refused events

    /// A second completion for the same segment write would move the written position over a
    /// segment that may not be on the device: refused.
    func testASegmentWrittenTwiceIsRefused() throws {
        try assertRefused(childTestName(), message: "segment 2 written twice") {
            var ring = SegmentRing(segmentCount: 4, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
            for _ in 1...3 { _ = ring.open(nowNs: 0) }
            ring.written(2)  // ahead of 1
            ring.written(2)
        }
    }

    /// Reclaiming a segment that is not on the device yet (its data would be nowhere once the slot
    /// is reused) is refused, as is skipping ahead of the tail.
    func testReclaimingASegmentNotYetWrittenIsRefused() throws {
        try assertRefused(childTestName(), message: "segment 2 reclaimed out of order") {
            var ring = SegmentRing(segmentCount: 4, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
            ring.written(ring.open(nowNs: 0))
            _ = ring.open(nowNs: 0)
            ring.reclaimed(1)
            ring.reclaimed(2)
        }
    }

    /// Retiring beyond what the cleaner reclaimed would free slots still holding dirty blocks.
    func testRetiringBeyondTheReclaimedIsRefused() throws {
        try assertRefused(childTestName(), message: "retiring segments that were not reclaimed") {
            var ring = SegmentRing(segmentCount: 4, retiredThroughID: 0, nextSegmentID: 1, nowNs: 0)
            ring.written(ring.open(nowNs: 0))
            ring.written(ring.open(nowNs: 0))
            ring.reclaimed(1)
            ring.retired(through: 2)
        }
    }
}
