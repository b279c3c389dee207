import SluiceFormat
import XCTest
import SluiceTesting

@testable import SluiceCache

final class CacheSuperblockTests: XCTestCase {
    private let expectation = CacheSuperblock.Expectation(backingIdentity: "file:/srv/disk.img", backingSizeBytes: 1 << 30, mode: .volatile)
    private let uuid: [UInt8] = (0..<16).map { UInt8($0) }

    private func format(_ medium: SimulatedMedium) throws -> CacheSuperblock.Opened {
        var result: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.format(medium, segmentBytes: 1 << 20, expectation: expectation, uuid: uuid, nowSeconds: 1) { result = $0 }
        return try XCTUnwrap(result).get()
    }

    private func open(_ medium: SimulatedMedium, _ expectation: CacheSuperblock.Expectation? = nil) -> Result<CacheSuperblock.Opened, Error> {
        var result: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.open(medium, expectation: expectation ?? self.expectation) { result = $0 }
        return result!
    }

    private func refusal(_ result: Result<CacheSuperblock.Opened, Error>) -> FormatError? {
        if case .failure(let error) = result { return error as? FormatError }
        return nil
    }

    func testFormatThenOpenSurvivesAPowerFailureAfterFormat() throws {
        let medium = SimulatedMedium(sizeBytes: 16 << 20)
        let formatted = try format(medium)
        XCTAssertEqual(formatted.geometry.segmentCount, 15)
        // The format was synced: a power failure right after it keeps it.
        let survivor = SimulatedMedium(durableBytes: medium.powerFail(seed: 7))
        let opened = try open(survivor).get()
        XCTAssertEqual(opened, formatted)
        XCTAssertTrue(opened.record.cleanShutdown)
        XCTAssertEqual(opened.record.lastRetiredSegmentID, 0)
    }

    func testABackingIdentityTooLongToRecordWholeIsRefusedAtFormat() throws {
        // Recorded shortened, it would never match the backing store again: the cache could be
        // formatted but never served.
        let medium = SimulatedMedium(sizeBytes: 16 << 20)
        var long = expectation
        long.backingIdentity = "nbd+unix:///" + String(repeating: "e", count: 1100) + "?socket=/run/disk.sock"
        var result: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.format(medium, segmentBytes: 1 << 20, expectation: long, uuid: uuid, nowSeconds: 1) { result = $0 }
        XCTAssertEqual(refusal(try XCTUnwrap(result)), .backingIdentityTooLong(bytes: long.backingIdentity.utf8.count, maximum: 1024))
        XCTAssertEqual(refusal(open(medium, long)), .notFormatted, "nothing was written")
        long.backingIdentity = String(repeating: "f", count: 1024)
        let exact = SimulatedMedium(sizeBytes: 16 << 20)
        CacheSuperblock.format(exact, segmentBytes: 1 << 20, expectation: long, uuid: uuid, nowSeconds: 1) { result = $0 }
        XCTAssertNoThrow(try XCTUnwrap(result).get())
        XCTAssertNoThrow(try open(exact, long).get(), "1024 bytes are recorded whole and match")
    }

    func testEveryWrongCacheIsRefusedWithItsReason() throws {
        XCTAssertEqual(refusal(open(SimulatedMedium(sizeBytes: 16 << 20))), .notFormatted)
        XCTAssertEqual(refusal(open(SimulatedMedium(sizeBytes: 4096))), .notFormatted)

        let medium = SimulatedMedium(sizeBytes: 16 << 20)
        _ = try format(medium)
        var other = expectation
        other.backingIdentity = "file:/srv/other.img"
        XCTAssertEqual(refusal(open(medium, other)), .wrongBacking(expected: "file:/srv/disk.img", found: "file:/srv/other.img"))
        other = expectation
        other.backingSizeBytes = 2 << 30
        XCTAssertEqual(refusal(open(medium, other)), .backingSizeChanged(expected: 1 << 30, found: 2 << 30))
        other = expectation
        other.mode = .pmem
        XCTAssertEqual(refusal(open(medium, other)), .wrongMode(recorded: "volatile", requested: "pmem"))

        // Truncated: the same superblock on a smaller device.
        let truncated = SimulatedMedium(durableBytes: Array(medium.visible[0..<(8 << 20)]))
        XCTAssertEqual(refusal(open(truncated)), .truncated(deviceBytes: 8 << 20, neededBytes: 16 << 20))

        // A damaged header, and damaged record slots.
        var damaged = medium.visible
        damaged[200] ^= 1
        guard case .corruptSuperblock = refusal(open(SimulatedMedium(durableBytes: damaged))) else { return XCTFail("a damaged header must be refused") }
        var noRecord = medium.visible
        noRecord[4096 + 10] ^= 1
        noRecord[8192 + 10] ^= 1
        XCTAssertEqual(refusal(open(SimulatedMedium(durableBytes: noRecord))), .noValidRecord)
        // One damaged slot: the other one is used. Record 2 (the newer) is in slot A at 4 KiB.
        var oneSlot = medium.visible
        oneSlot[4096 + 10] ^= 1
        XCTAssertEqual(try open(SimulatedMedium(durableBytes: oneSlot)).get().record.sequence, 1)
        XCTAssertEqual(try open(medium).get().record.sequence, 2)
    }

    func testAFormatThatWasNotSyncedMayVanishButNeverHalfExists() throws {
        // The sync itself fails: format reports it, and what a power failure leaves either opens
        // as the new cache or is refused as not formatted / damaged, never opened as something else.
        for seed in 0..<50 as Range<UInt64> {
            let medium = SimulatedMedium(sizeBytes: 16 << 20)
            medium.failNextSyncs = 1
            var result: Result<CacheSuperblock.Opened, Error>?
            CacheSuperblock.format(medium, segmentBytes: 1 << 20, expectation: expectation, uuid: uuid, nowSeconds: 1) { result = $0 }
            XCTAssertThrowsError(try XCTUnwrap(result).get())
            let after = open(SimulatedMedium(durableBytes: medium.powerFail(seed: seed)))
            switch after {
            case .success(let opened): XCTAssertEqual(opened.header.uuid, uuid)
            case .failure(let error):
                let formatError = error as? FormatError
                XCTAssertTrue(formatError == .notFormatted || formatError == .noValidRecord || { if case .corruptSuperblock = formatError { return true }; return false }(),
                              "seed \(seed): \(error)")
            }
        }
    }
}

/// The same superblock logic on a real file.
final class FileMediumTests: XCTestCase {
    func testFormatAndOpenAFile() throws {
        let path = "/var/tmp/sluice-file-medium-\(getpid()).img"
        FileManager.default.createFile(atPath: path, contents: nil)
        defer { unlink(path) }
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.truncate(atOffset: 8 << 20)
        try handle.close()
        let expectation = CacheSuperblock.Expectation(backingIdentity: "file:/x", backingSizeBytes: 1 << 20, mode: .volatile)
        var formatted: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.format(try FileMedium(path: path), segmentBytes: 1 << 20, expectation: expectation,
                               uuid: [UInt8](repeating: 3, count: 16), nowSeconds: 5) { formatted = $0 }
        let created = try XCTUnwrap(formatted).get()
        var opened: Result<CacheSuperblock.Opened, Error>?
        CacheSuperblock.open(try FileMedium(path: path), expectation: expectation) { opened = $0 }
        XCTAssertEqual(try XCTUnwrap(opened).get(), created)
        var outOfRange: Result<[UInt8], MediumError>?
        try FileMedium(path: path).readBytes(offset: (8 << 20) - 10, count: 20) { outOfRange = $0 }
        XCTAssertThrowsError(try XCTUnwrap(outOfRange).get())
        XCTAssertThrowsError(try FileMedium(path: "/var/tmp/missing-\(getpid())"))
    }
}
