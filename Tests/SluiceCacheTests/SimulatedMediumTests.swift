import XCTest
import SluiceTesting

@testable import SluiceCache

final class SimulatedMediumTests: XCTestCase {
    private func write(_ medium: SimulatedMedium, _ offset: UInt64, _ bytes: [UInt8]) {
        var result: Result<Void, MediumError>?
        medium.write(offset: offset, bytes: bytes) { result = $0 }
        XCTAssertNoThrow(try XCTUnwrap(result).get())
    }

    private func sync(_ medium: SimulatedMedium) {
        var result: Result<Void, MediumError>?
        medium.synchronize { result = $0 }
        XCTAssertNoThrow(try XCTUnwrap(result).get())
    }

    func testSyncedWritesSurviveAndUnsyncedOnesMayNot() {
        var outcomes = Set<[UInt8]>()
        for seed in 0..<200 as Range<UInt64> {
            let medium = SimulatedMedium(sizeBytes: 4096)
            write(medium, 0, [UInt8](repeating: 1, count: 1024))
            sync(medium)
            write(medium, 1024, [UInt8](repeating: 2, count: 1024))
            let after = medium.powerFail(seed: seed)
            XCTAssertEqual(Array(after[0..<1024]), [UInt8](repeating: 1, count: 1024), "synced data always survives")
            let tail = Array(after[1024..<2048])
            // The unsynced write survives whole, not at all, or torn at a sector boundary.
            let firstZero = tail.firstIndex(of: 0) ?? 1024
            XCTAssertEqual(firstZero % 512, 0)
            XCTAssertTrue(tail[firstZero...].allSatisfy { $0 == 0 })
            outcomes.insert(tail)
        }
        XCTAssertEqual(outcomes.count, 3, "lost, torn and whole writes all happen across seeds")
    }

    func testTheSameSeedReplaysTheSameFailure() {
        func run(_ seed: UInt64) -> [UInt8] {
            let medium = SimulatedMedium(sizeBytes: 65536)
            for index in 0..<16 { write(medium, UInt64(index * 4096), [UInt8](repeating: UInt8(index + 1), count: 4096)) }
            return medium.powerFail(seed: seed)
        }
        XCTAssertEqual(run(42), run(42))
        XCTAssertNotEqual(run(42), run(43))
    }

    func testInjectedFaultsAndPowerOff() {
        let medium = SimulatedMedium(sizeBytes: 4096)
        medium.failNextWrites = 1
        var writeResult: Result<Void, MediumError>?
        medium.write(offset: 0, bytes: [1]) { writeResult = $0 }
        guard case .failure(let error)? = writeResult else { return XCTFail("the injected fault did not fail the write") }
        XCTAssertEqual(error, .inputOutput(errno: 5))
        var outOfRange: Result<[UInt8], MediumError>?
        medium.readBytes(offset: 4000, count: 200) { outOfRange = $0 }
        XCTAssertThrowsError(try XCTUnwrap(outOfRange).get())
        medium.powerFail(seed: 1)
        var afterPower: Result<Void, MediumError>?
        medium.synchronize { afterPower = $0 }
        XCTAssertThrowsError(try XCTUnwrap(afterPower).get())
    }
}
