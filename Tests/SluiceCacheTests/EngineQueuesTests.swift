import SluiceFormat
import SluiceTesting
import SluiceVolume
import XCTest

@testable import SluiceCache

/// The engine's small queues and state machines: the re-entrant pass every loop of the engine
/// runs in, the waiting queue, superblock records, cache-device sync numbers, barriers and pmem
/// group commits.
final class EngineQueuesTests: XCTestCase {
    // MARK: ReentrantPass

    /// A loop whose rounds re-enter it (as media completing within the call do).
    private final class Loop {
        var pass = ReentrantPass()
        var inRound = false
        var rounds = 0
        var roundsThatReentered = 0
        var nested = false
        var reenteredThisRound = false
        /// Called once per round; calls ``drive()`` from inside the round when it likes.
        var round: (Loop) -> Void = { _ in }

        func drive() {
            if inRound { reenteredThisRound = true }
            guard pass.begin() else { return }
            repeat {
                if inRound { nested = true }
                inRound = true
                reenteredThisRound = false
                rounds += 1
                round(self)
                if reenteredThisRound { roundsThatReentered += 1 }
                inRound = false
            } while pass.again()
        }
    }

    /// Re-entering calls never nest a round; each round that was re-entered (once or several
    /// times) is followed by exactly one more, and a round that was not ends the pass.
    func testReentrantCallsGoRoundOnceMoreInsteadOfNesting() {
        for seed in 1...20 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            let loop = Loop()
            loop.round = { loop in
                guard loop.rounds < 40, random.chance(60) else { return }
                for _ in 0..<random.range(1...3) { loop.drive() }
            }
            loop.drive()
            XCTAssertFalse(loop.nested, "seed \(seed): a round ran inside another")
            XCTAssertEqual(loop.rounds, 1 + loop.roundsThatReentered, "seed \(seed)")
            XCTAssertFalse(loop.pass.isRunning, "seed \(seed): the pass must be over")
            // And the next call starts a new pass.
            loop.round = { _ in }
            let rounds = loop.rounds
            loop.drive()
            XCTAssertEqual(loop.rounds, rounds + 1, "seed \(seed)")
        }
    }

    /// `end()` stops a pass at once (a failure), even one asked to go round again.
    func testEndStopsThePass() {
        var pass = ReentrantPass()
        XCTAssertTrue(pass.begin())
        XCTAssertFalse(pass.begin())
        XCTAssertEqual(pass.state, .runAgain)
        pass.end()
        XCTAssertFalse(pass.isRunning)
        XCTAssertFalse(pass.again(), "an ended pass does not go round")
        XCTAssertTrue(pass.begin())
    }

    // MARK: BoundedQueue

    /// Random appends, removals, head replacements and drains against an array: first in, first
    /// out, and the head can be written back in place (the engine stores a blocked head's progress).
    func testBoundedQueueIsFirstInFirstOutUnderRandomOperations() {
        for seed in 1...10 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            var queue = BoundedQueue<Int>()
            var model: [Int] = []
            var next = 0
            for step in 0..<3_000 {
                switch random.below(10) {
                case 0..<5:
                    queue.append(next)
                    model.append(next)
                    next += 1
                case 5..<8:
                    guard !model.isEmpty else { continue }
                    XCTAssertEqual(queue.removeFirst(), model.removeFirst(), "seed \(seed) step \(step)")
                case 8:
                    guard !model.isEmpty else { continue }
                    queue.first = -next
                    model[0] = -next
                default:
                    guard random.chance(20) else { continue }
                    XCTAssertEqual(queue.removeAll(), model, "seed \(seed) step \(step)")
                    model.removeAll()
                }
                XCTAssertEqual(queue.count, model.count, "seed \(seed) step \(step)")
                XCTAssertEqual(queue.isEmpty, model.isEmpty, "seed \(seed) step \(step)")
                XCTAssertEqual(queue.first, model.first, "seed \(seed) step \(step)")
            }
        }
    }

    /// The bound turns a runaway producer into a crash instead of unbounded memory: one element
    /// past it is refused.
    func testBoundedQueueRefusesAnElementPastItsBound() throws {
        try assertRefused(childTestName(), message: "waiting queue beyond its bound") {
            var queue = BoundedQueue<UInt8>()
            for _ in 0..<BoundedQueue<UInt8>.capacityMax { queue.append(0) }
            XCTAssertEqual(queue.count, BoundedQueue<UInt8>.capacityMax)
            queue.append(0)
        }
    }

    // MARK: RecordWriter

    private func record(sequence: UInt64, retired: UInt64, flushed: UInt64) -> SuperblockRecord {
        SuperblockRecord(sequence: sequence, lastRetiredSegmentID: retired, lastFlushedSegmentID: flushed, cleanShutdown: false)
    }

    private func request(retire: UInt64?, clean: Bool = false, tag: Int = 0, into log: Log? = nil) -> RecordWriter.Request {
        RecordWriter.Request(retireThroughID: retire, cleanShutdown: clean, completions: [{ _ in log?.tags.append(tag) }])
    }

    private final class Log { var tags: [Int] = [] }

    /// The next record: the following sequence (so the other record slot: the current record is
    /// never overwritten), never retiring less than the current one, and flushed at least as far
    /// as it retires.
    func testTheNextRecordNeverRetiresBackwards() {
        let writer = RecordWriter(current: record(sequence: 5, retired: 10, flushed: 12))
        let keep = writer.next(for: request(retire: nil), syncedThroughID: 15)
        XCTAssertEqual(keep, SuperblockRecord(sequence: 6, lastRetiredSegmentID: 10, lastFlushedSegmentID: 15, cleanShutdown: false))
        XCTAssertNotEqual(keep.blockOffset, writer.current.blockOffset)
        XCTAssertEqual(writer.next(for: request(retire: 8), syncedThroughID: 15).lastRetiredSegmentID, 10, "retiring backwards")
        let ahead = writer.next(for: request(retire: 20, clean: true), syncedThroughID: 15)
        XCTAssertEqual(ahead, SuperblockRecord(sequence: 6, lastRetiredSegmentID: 20, lastFlushedSegmentID: 20, cleanShutdown: true))
    }

    /// Only a durable write becomes the current record; after a failed one the next record takes
    /// the same sequence again, so it still goes to the slot the current record is not in.
    func testOnlyADurableRecordBecomesCurrent() {
        var writer = RecordWriter(current: record(sequence: 5, retired: 10, flushed: 12))
        let failing = writer.next(for: request(retire: 11), syncedThroughID: 12)
        writer.started(failing)
        XCTAssertFalse(writer.isIdle)
        writer.finished(durable: false)
        XCTAssertTrue(writer.isIdle)
        XCTAssertEqual(writer.current.sequence, 5)
        let retry = writer.next(for: request(retire: 11), syncedThroughID: 12)
        XCTAssertEqual(retry.sequence, 6)
        writer.started(retry)
        writer.finished(durable: true)
        XCTAssertEqual(writer.current, retry)
    }

    /// Requests merged while a record is written: the furthest retirement, every completion in
    /// arrival order, and the later request's clean-shutdown flag.
    func testMergedRequestsKeepTheFurthestRetirementAndEveryCompletion() {
        let log = Log()
        var merged = request(retire: nil, tag: 1, into: log)
        merged.merge(request(retire: 7, tag: 2, into: log))
        XCTAssertEqual(merged.retireThroughID, 7)
        merged.merge(request(retire: nil, tag: 3, into: log))
        XCTAssertEqual(merged.retireThroughID, 7, "a request without a retirement keeps the one merged before")
        merged.merge(request(retire: 5, clean: true, tag: 4, into: log))
        XCTAssertEqual(merged.retireThroughID, 7, "never backwards")
        XCTAssertTrue(merged.cleanShutdown)
        for completion in merged.completions { completion(.success(())) }
        XCTAssertEqual(log.tags, [1, 2, 3, 4])
    }

    /// Random requests, merges and outcomes: every current record has a higher sequence than the
    /// one before, retires at least as much, and each write goes to the slot the current one is not in.
    func testRecordsNeverGoBackUnderRandomWrites() {
        for seed in 1...10 as ClosedRange<UInt64> {
            var random = SplitMix64(seed: seed)
            var writer = RecordWriter(current: record(sequence: 1, retired: 0, flushed: 0))
            var synced: UInt64 = 0
            var reclaimed: UInt64 = 0
            for step in 0..<500 {
                synced += UInt64(random.below(3))
                reclaimed = min(synced, reclaimed + UInt64(random.below(3)))
                var pending = request(retire: random.chance(50) ? UInt64(random.below(Int(reclaimed) + 1)) : nil)
                for _ in 0..<random.below(3) { pending.merge(request(retire: random.chance(50) ? UInt64(random.below(Int(reclaimed) + 1)) : nil)) }
                let before = writer.current
                let next = writer.next(for: pending, syncedThroughID: synced)
                let context = "seed \(seed) step \(step)"
                XCTAssertEqual(next.sequence, before.sequence + 1, context)
                XCTAssertNotEqual(next.blockOffset, before.blockOffset, context)
                XCTAssertGreaterThanOrEqual(next.lastRetiredSegmentID, before.lastRetiredSegmentID, context)
                XCTAssertEqual(next.lastRetiredSegmentID, max(before.lastRetiredSegmentID, pending.retireThroughID ?? 0), context)
                XCTAssertGreaterThanOrEqual(next.lastFlushedSegmentID, next.lastRetiredSegmentID, context)
                writer.started(next)
                writer.finished(durable: random.chance(80))
                XCTAssertTrue(writer.current == before || writer.current == next, context)
            }
        }
    }

    // MARK: CacheSyncs

    /// Sync numbers: a write that completes while a sync is in flight is covered only by the next
    /// one, whose number `nextNumber` names; numbers never repeat.
    func testSyncNumbersNameTheSyncThatCoversAWriteCompletedNow() {
        var syncs = CacheSyncs()
        XCTAssertTrue(syncs.isIdle)
        XCTAssertEqual(syncs.nextNumber, 1)
        let first = syncs.issue(coversThroughID: 4)
        XCTAssertEqual(first, 1)
        XCTAssertFalse(syncs.isIdle)
        guard case .syncing(let covers, let number) = syncs.state else { return XCTFail("\(syncs.state)") }
        XCTAssertEqual(covers, 4)
        XCTAssertEqual(number, 1)
        XCTAssertEqual(syncs.nextNumber, 2, "the sync in flight was issued before this write completed")
        syncs.state = .idle
        XCTAssertEqual(syncs.nextNumber, 2)
        XCTAssertEqual(syncs.issue(coversThroughID: 4), 2)
    }

    // MARK: BarrierQueue and PersistQueue

    /// The first waiter schedules the barrier and later ones join it; taking hands every waiter
    /// out in order once, and the next waiter schedules a new barrier.
    func testBarrierWaitersGatherUntilTaken() {
        var barriers = BarrierQueue()
        let log = Log()
        XCTAssertTrue(barriers.take().isEmpty)
        XCTAssertTrue(barriers.add { _ in log.tags.append(1) })
        XCTAssertTrue(barriers.isGathering)
        XCTAssertFalse(barriers.add { _ in log.tags.append(2) })
        XCTAssertFalse(barriers.add { _ in log.tags.append(3) })
        let taken = barriers.take()
        XCTAssertFalse(barriers.isGathering)
        for waiter in taken { waiter(.done) }
        XCTAssertEqual(log.tags, [1, 2, 3])
        XCTAssertTrue(barriers.take().isEmpty, "taken waiters are not taken again")
        XCTAssertTrue(barriers.add { _ in }, "a waiter after the take schedules the next barrier")
    }

    /// Group commit: taking the waiters hands out exactly those added since the last take, in
    /// order, and a recycled array comes back empty.
    func testPersistWaitersAreTakenOnceInOrder() {
        var persists = PersistQueue()
        let log = Log()
        persists.add { _ in log.tags.append(1) }
        persists.add { _ in log.tags.append(2) }
        let first = persists.takeWaiters()
        XCTAssertTrue(persists.waiters.isEmpty)
        for waiter in first { waiter(.done) }
        persists.recycle(first)
        persists.add { _ in log.tags.append(3) }
        let second = persists.takeWaiters()
        XCTAssertEqual(second.count, 1, "a recycled array must not bring old waiters back")
        for waiter in second { waiter(.done) }
        XCTAssertEqual(log.tags, [1, 2, 3])
    }
}
