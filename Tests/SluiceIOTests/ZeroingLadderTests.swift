import CLibURing
import Glibc
import XCTest
import SluiceIO

/// The one zeroing ladder, as a table: for each purpose and what each step returns, the steps it
/// takes and how it ends.
final class ZeroingLadderTests: XCTestCase {
    private let punch = ZeroingLadder.Action.fallocate(mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
    private let zeroRange = ZeroingLadder.Action.fallocate(mode: FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
    private let allocate = ZeroingLadder.Action.fallocate(mode: 0)

    /// Runs the ladder, answering each step with the next of `results`; returns every action.
    private func climb(_ purpose: ZeroingLadder.Purpose, _ results: [Int32]) -> [ZeroingLadder.Action] {
        var ladder = ZeroingLadder(purpose)
        var actions = [ladder.firstAction()]
        var answers = results[...]
        while let answer = answers.popFirst() {
            switch actions.last! {
            case .fallocate: actions.append(ladder.fallocateCompleted(result: answer))
            case .writeZeros: actions.append(ladder.zerosWritten(result: answer))
            case .succeeded, .failed: XCTFail("\(purpose): answers left after the end: \(results)")
            }
        }
        return actions
    }

    func testEveryPurposeAndOutcome() {
        let unsupported = -EOPNOTSUPP
        let cases: [(String, ZeroingLadder.Purpose, [Int32], [ZeroingLadder.Action])] = [
            ("trim punches", .trim, [0], [punch, .succeeded]),
            ("a trim the medium cannot do keeps the data", .trim, [unsupported], [punch, .succeeded]),
            ("a trim that fails fails", .trim, [-EIO], [punch, .failed(errno: EIO)]),
            ("zeroes punch first", .zeroes, [0], [punch, .succeeded]),
            ("then zero the range", .zeroes, [-ENOTTY, 0], [punch, zeroRange, .succeeded]),
            ("then write zeros (no punch-and-allocate once punching is unsupported)", .zeroes, [-EINVAL, -ENOSYS, 0],
             [punch, zeroRange, .writeZeros, .succeeded]),
            ("zeros that cannot be written fail", .zeroes, [unsupported, unsupported, -ENOSPC],
             [punch, zeroRange, .writeZeros, .failed(errno: ENOSPC)]),
            ("an error is not a reason to try the next rung", .zeroes, [-EIO], [punch, .failed(errno: EIO)]),
            ("NO_HOLE zeroes the range first", .zeroesKeepingAllocation, [0], [zeroRange, .succeeded]),
            ("then punches and allocates again (tmpfs)", .zeroesKeepingAllocation, [unsupported, 0, 0],
             [zeroRange, punch, allocate, .succeeded]),
            ("a hole that cannot be allocated again is written", .zeroesKeepingAllocation, [unsupported, 0, unsupported, 0],
             [zeroRange, punch, allocate, .writeZeros, .succeeded]),
            ("no punching either: written", .zeroesKeepingAllocation, [unsupported, unsupported, 0],
             [zeroRange, punch, .writeZeros, .succeeded]),
            ("a failed allocation fails", .zeroesKeepingAllocation, [unsupported, 0, -ENOSPC],
             [zeroRange, punch, allocate, .failed(errno: ENOSPC)]),
        ]
        for (label, purpose, results, expected) in cases {
            XCTAssertEqual(climb(purpose, results), expected, label)
        }
    }
}
