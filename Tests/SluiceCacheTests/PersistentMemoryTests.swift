import Foundation
import XCTest
import SluiceTesting

@testable import SluiceCache

final class PersistentMemoryTests: XCTestCase {
    func testOnlyDrainedStoresAreCertainAndUndrainedWordsSurviveWholeOrNotAtAll() {
        let memory = SimulatedPersistentMemory(sizeBytes: 4096)
        let durable = [UInt8](repeating: 0xAA, count: 64)
        durable.withUnsafeBytes { memory.copyAndFlush(to: 0, from: $0) }
        memory.drain()
        let flushedOnly = [UInt8](repeating: 0xBB, count: 64)
        flushedOnly.withUnsafeBytes { memory.copyAndFlush(to: 64, from: $0) }
        for word in 0..<8 { memory.storeWord(0x1122_3344_5566_7788, at: 128 + word * 8) }

        var sawOld = false
        var sawNew = false
        for seed in UInt64(0)..<64 {
            let survivor = memory.powerFail(seed: seed)
            XCTAssertEqual(Array(survivor[0..<64]), durable, "drained bytes always survive")
            for word in stride(from: 64, to: 192, by: 8) {
                let value = Array(survivor[word..<(word + 8)])
                let old = [UInt8](repeating: 0, count: 8)
                let new = word < 128 ? [UInt8](repeating: 0xBB, count: 8) : withUnsafeBytes(of: UInt64(0x1122_3344_5566_7788).littleEndian) { Array($0) }
                XCTAssertTrue(value == old || value == new, "seed \(seed): word at \(word) is torn")
                if value == old { sawOld = true } else { sawNew = true }
            }
            XCTAssertEqual(memory.powerFail(seed: seed), survivor, "a seed replays")
        }
        XCTAssertTrue(sawOld && sawNew, "undrained words sometimes survive and sometimes do not")
        XCTAssertEqual(memory.loadWord(at: 128), 0x1122_3344_5566_7788)
    }

    func testAMappedFileKeepsWhatWasFlushedAcrossMappings() throws {
        let path = "/dev/shm/sluice-pmem-test-\(getpid()).pmem"
        defer { unlink(path) }
        do {
            let memory = try MappedPersistentMemory(path: path, createBytes: 1 << 20)
            XCTAssertEqual(memory.sizeBytes, 1 << 20)
            let bytes = [UInt8](repeating: 0x5C, count: 4096)
            bytes.withUnsafeBytes { memory.copyAndFlush(to: 8192, from: $0) }
            memory.storeWord(42, at: 0)
            memory.flush(offset: 0, count: 8)
            memory.drain()
        }
        let again = try MappedPersistentMemory(path: path)
        XCTAssertEqual(again.loadWord(at: 0), 42)
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: again.baseAddress + 8192, count: 4096)), [UInt8](repeating: 0x5C, count: 4096))
        XCTAssertThrowsError(try MappedPersistentMemory(path: "/dev/shm/no-such-dir/x.pmem")) { error in
            XCTAssertTrue("\(error)".contains("the pmem file /dev/shm/no-such-dir/x.pmem cannot be opened"), "\(error)")
        }
    }
}
