import XCTest

@testable import SluiceCache

/// The sequencer keeps a discard's stage (passing down, passed down, markers placed) and answers
/// the two questions the engine asks of a block: is a discard of it under way (reads of an
/// uncached block return zeros, writeback takes no filler from it), and does the backing store
/// already have it (writeback and relocation treat the block as clean). A wrong "no" lets old
/// data land over a discard; a wrong "yes" after the markers loses a write.
final class DiscardSequencerTests: XCTestCase {
    private func answers(_ discards: DiscardSequencer, _ blocks: ClosedRange<UInt64>) -> (being: [UInt64], onBacking: [UInt64]) {
        (blocks.filter { discards.isBeingDiscarded($0) }, blocks.filter { discards.isDiscardedOnBacking($0) })
    }

    /// Through every stage of one discard of blocks 10..<20, checked at and just outside its ends.
    func testADiscardGoesFromPassingDownToPassedDownToMarkersPlaced() {
        var discards = DiscardSequencer()
        XCTAssertEqual(answers(discards, 0...30).being, [])
        let id = discards.passDown(10..<20)
        XCTAssertTrue(discards.isPassingDown)
        XCTAssertEqual(answers(discards, 0...30).being, Array(10...19))
        XCTAssertEqual(answers(discards, 0...30).onBacking, [], "the backing store does not have it yet")
        discards.passedDown(id, succeeded: true)
        XCTAssertFalse(discards.isPassingDown, "writeback may start again while the markers are placed")
        XCTAssertEqual(answers(discards, 0...30).being, Array(10...19), "reads still see zeros until the markers are placed")
        XCTAssertEqual(answers(discards, 0...30).onBacking, Array(10...19))
        discards.markersPlaced(id)
        XCTAssertEqual(answers(discards, 0...30).being, [])
        XCTAssertEqual(answers(discards, 0...30).onBacking, [])
        XCTAssertTrue(discards.rangesInFlight.isEmpty)
        XCTAssertNil(discards.passedDownRange)
        // The next discard gets a new id, and the blocks of the last one are left alone.
        let second = discards.passDown(0..<1)
        XCTAssertNotEqual(second, id)
        XCTAssertEqual(answers(discards, 0...30).being, [0])
    }

    /// A pass-down the backing store failed: nothing of it is in flight any more, nothing counts as
    /// discarded on the backing store, and the next discard may go.
    func testAFailedPassDownLeavesNothingBehind() {
        var discards = DiscardSequencer()
        let id = discards.passDown(5..<8)
        discards.passedDown(id, succeeded: false)
        XCTAssertFalse(discards.isPassingDown)
        XCTAssertEqual(answers(discards, 0...10).being, [])
        XCTAssertEqual(answers(discards, 0...10).onBacking, [], "a failed discard must never make writeback skip a block")
        let next = discards.passDown(5..<8)
        discards.passedDown(next, succeeded: true)
        XCTAssertEqual(answers(discards, 0...10).onBacking, [5, 6, 7])
    }

    /// Abandoned (a medium failure) at any stage: nothing of it stays, and abandoning a discard that
    /// is already gone, or another one, changes nothing about the one at the head.
    func testAbandoningAtAnyStageLeavesNothingBehind() {
        for stage in 0..<4 {
            var discards = DiscardSequencer()
            let id = discards.passDown(3..<6)
            if stage >= 1 { discards.passedDown(id, succeeded: stage != 3) }
            if stage == 2 { discards.markersPlaced(id) }
            discards.abandoned(id)
            XCTAssertFalse(discards.isPassingDown, "stage \(stage)")
            XCTAssertEqual(answers(discards, 0...8).being, [], "stage \(stage)")
            XCTAssertEqual(answers(discards, 0...8).onBacking, [], "stage \(stage)")
            // A new discard may go, and abandoning the old one again leaves it alone.
            let next = discards.passDown(3..<6)
            discards.abandoned(id)
            XCTAssertTrue(discards.isPassingDown, "stage \(stage)")
            discards.passedDown(next, succeeded: true)
            discards.abandoned(id)
            XCTAssertEqual(answers(discards, 0...8).onBacking, [3, 4, 5], "stage \(stage): abandoning a stale id dropped the head discard")
        }
    }

    /// One discard at the head of the queue at a time: a second one while the first one's markers
    /// are still being placed would let a block's marker and its pass-down race. Refused.
    func testASecondDiscardWhileMarkersArePlacedIsRefused() throws {
        try assertRefused(childTestName(), message: "two discards at the head of the queue") {
            var discards = DiscardSequencer()
            discards.passedDown(discards.passDown(0..<4), succeeded: true)
            _ = discards.passDown(8..<9)
        }
    }

    /// Markers placed for a discard the backing store never did would say the backing store has a
    /// discard it does not: the engine's order (pass down, then markers) must be enforced. Refused.
    func testMarkersForADiscardNeverPassedDownAreRefused() throws {
        try assertRefused(childTestName(), message: "markers placed for a discard that is not the passed-down one") {
            var discards = DiscardSequencer()
            discards.markersPlaced(1)
        }
    }
}
