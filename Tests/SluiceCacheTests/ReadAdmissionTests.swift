import XCTest
@testable import SluiceCache

/// The sequential cutoff's stream table: streams are found by where they continue, survive random
/// reads between their requests, and the table stays bounded.
final class ReadAdmissionTests: XCTestCase {
    private let cutoffBytes: UInt64 = 64 << 10
    private let chunkBytes: UInt64 = 16 << 10

    func testAStreamCrossesTheCutoffDespiteRandomReadsBetweenItsRequests() {
        var admission = ReadAdmission()
        var random = SystemRandomNumberGenerator()
        var offset: UInt64 = 1 << 40
        var verdicts: [Bool] = []
        for _ in 0..<12 {
            verdicts.append(admission.isSequential(offset: offset, lengthBytes: chunkBytes, cutoffBytes: cutoffBytes))
            offset += chunkBytes
            // Fewer random reads than the table has streams between two requests of the stream.
            for _ in 0..<(ReadAdmission.streamCount - 2) {
                let randomOffset = UInt64.random(in: 0..<(1 << 30), using: &random) & ~4095
                XCTAssertFalse(admission.isSequential(offset: randomOffset, lengthBytes: 4096, cutoffBytes: cutoffBytes))
            }
        }
        // 16 KiB requests: the fifth takes the stream past 64 KiB.
        XCTAssertEqual(verdicts, [false, false, false, false, true, true, true, true, true, true, true, true])
    }

    func testAsManyStreamsAsTheTableHoldsAreEachDetected() {
        var admission = ReadAdmission()
        let streams = ReadAdmission.streamCount
        var sequentialReads = 0
        for round in 0..<8 {
            for stream in 0..<streams {
                let offset = UInt64(stream) << 32 + UInt64(round) * chunkBytes
                if admission.isSequential(offset: offset, lengthBytes: chunkBytes, cutoffBytes: cutoffBytes) { sequentialReads += 1 }
            }
        }
        // Rounds 4 to 7 of every stream are past the cutoff.
        XCTAssertEqual(sequentialReads, 4 * streams)
    }

    func testOneStreamMoreThanTheTableHoldsEvictsOneAndIsBounded() {
        var admission = ReadAdmission()
        let streams = ReadAdmission.streamCount + 1
        var sequentialReads = 0
        for round in 0..<8 {
            for stream in 0..<streams {
                let offset = UInt64(stream) << 32 + UInt64(round) * chunkBytes
                if admission.isSequential(offset: offset, lengthBytes: chunkBytes, cutoffBytes: cutoffBytes) { sequentialReads += 1 }
            }
        }
        // Cycling through one stream more than the table holds replaces, every time, the stream
        // about to continue (as least-recently-used replacement would): the table stays bounded
        // and no stream is ever followed.
        XCTAssertEqual(sequentialReads, 0)
        XCTAssertFalse(admission.isSequential(offset: 1 << 50, lengthBytes: cutoffBytes * 2 - 1, cutoffBytes: 0), "no cutoff: never sequential")
        XCTAssertTrue(admission.isSequential(offset: 1 << 51, lengthBytes: cutoffBytes + 512, cutoffBytes: cutoffBytes),
                      "one read longer than the cutoff is a stream on its own")
    }
}
