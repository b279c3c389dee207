import Foundation
import NIOCore
import SluiceCache
import SluiceRAMDisk
import SluiceTesting
import SluiceVolume
import XCTest

@testable import SluiceEPRD

/// An EPRD serves its backing store's bytes as they are, matches a byte array under random
/// writes and write-zeroes, writes back exactly its dirty sectors, and keeps its promise at a
/// simulated power failure: with barriers on, everything a FLUSH or FUA covered survives and no
/// sector reads as anything but a value written to it; with barriers off, a commit does.
final class EPRDVolumeTests: XCTestCase {
    private let chunk = SparseMemory.chunkBytes

    private func rig(_ medium: any SynchronousBlockMedium, barriers: Bool = true, intervalMs: UInt64 = 0, sector: UInt32 = 512) throws -> EPRDRig {
        try EPRDRig(medium: medium, configuration: .init(commitIntervalMs: intervalMs, barriers: barriers, sectorBytes: sector))
    }

    func testAttachingServesTheBackingStoreAsItIsAndWritesNothing() throws {
        let size = 5 * chunk + 3 * 512
        let original = seededBytes(size, seed: 7)
        let medium = SimulatedMedium(durableBytes: original)
        let rig = try rig(medium)
        defer { rig.shutDown() }
        XCTAssertEqual(rig.volume.sizeBytes, UInt64(size))
        XCTAssertEqual(try rig.read(chunk - 1024, 4096), Array(original[(chunk - 1024)..<(chunk + 3072)]), "a read across two chunks")
        XCTAssertEqual(try rig.read(0, size), original, "the whole disk, its short last chunk too")
        XCTAssertEqual(try rig.perform(.flush).isDone, true)
        try rig.volume.close()
        let (writes, syncs, durable) = try rig.onIOLoop { (medium.writeCount, medium.syncCount, medium.durable) }
        XCTAssertEqual(writes, 0, "nothing dirty: nothing written")
        XCTAssertEqual(syncs, 0)
        XCTAssertEqual(durable, original)
    }

    func testRandomOperationsMatchAByteArrayAndACommitWritesBackExactlyTheImage() throws {
        let size = 6 * chunk + 2048
        var generator = SplitMix64(seed: 11)
        for round in 0..<4 {
            var model = seededBytes(size, seed: UInt64(round))
            let medium = SimulatedMedium(durableBytes: model)
            let rig = try rig(medium, barriers: round % 2 == 0)
            defer { rig.shutDown() }
            for step in 0..<150 {
                let offset = generator.below(size / 512) * 512
                let length = min(size - offset, (1 + generator.below(3 * chunk / 512)) * 512)
                let what = "round \(round) step \(step): \(offset)+\(length)"
                switch generator.below(10) {
                case 0..<5:
                    let bytes = seededBytes(length, seed: generator.next())
                    XCTAssertTrue(try rig.write(offset, bytes, fua: generator.below(4) == 0).isDone, what)
                    model.replaceSubrange(offset..<(offset + length), with: bytes)
                case 5:
                    XCTAssertTrue(try rig.perform(.writeZeroes(offset: UInt64(offset), lengthBytes: UInt32(length), flags: [])).isDone, what)
                    model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
                case 6:
                    XCTAssertTrue(try rig.perform(.flush).isDone, what)
                default:
                    XCTAssertEqual(try rig.read(offset, length), Array(model[offset..<(offset + length)]), what)
                }
            }
            XCTAssertEqual(try rig.read(0, size), model, "round \(round): the whole image")
            _ = try rig.volume.writeBackAll().wait()
            XCTAssertEqual(rig.volume.dirtyBytes, 0)
            let (durable, writes) = try rig.onIOLoop { (medium.durable, medium.writeCount) }
            XCTAssertEqual(durable, model, "round \(round): the backing store after a write-back")
            _ = try rig.volume.writeBackAll().wait()
            XCTAssertEqual(try rig.onIOLoop { medium.writeCount }, writes, "round \(round): a second write-back has nothing to write")
        }
    }

    func testAWriteCoveringAChunkWholeLoadsNothingAndAPartialOneLoadsItsChunk() throws {
        let medium = SimulatedMedium(durableBytes: seededBytes(4 * chunk, seed: 3))
        let rig = try rig(medium)
        defer { rig.shutDown() }
        XCTAssertTrue(try rig.write(chunk, [UInt8](repeating: 9, count: chunk)).isDone)
        XCTAssertEqual(rig.volume.lock.withLock { rig.volume.counters.loadedBytes }, 0, "a whole chunk replaces what was there")
        XCTAssertTrue(try rig.write(3 * chunk + 512, [UInt8](repeating: 8, count: 512)).isDone)
        XCTAssertEqual(rig.volume.lock.withLock { rig.volume.counters.loadedBytes }, UInt64(chunk), "a sector's write loads its chunk first")
        XCTAssertEqual(rig.volume.dirtyBytes, UInt64(chunk + 512), "dirty is counted in sectors")
        XCTAssertEqual(rig.volume.residentBytes, UInt64(2 * chunk))
    }

    func testBarriersOffAcknowledgeFlushAtOnceAndTheCommitTimerWritesBack() throws {
        let medium = SimulatedMedium(sizeBytes: 4 * chunk)
        let rig = try rig(medium, barriers: false, intervalMs: 20)
        defer { rig.shutDown() }
        let bytes = seededBytes(8192, seed: 5)
        XCTAssertTrue(try rig.write(4096, bytes, fua: true).isDone)
        XCTAssertTrue(try rig.perform(.flush).isDone)
        let status = try JSONSerialization.jsonObject(with: rig.volume.statusJSON().wait()) as! [String: Any]
        XCTAssertEqual(status["barriers"] as? String, "off")
        XCTAssertEqual(status["durable"] as? Bool, false)
        XCTAssertTrue((status["durability"] as? String ?? "").contains("unsafe"), "\(status)")
        // Checked on the io loop, between commits: nothing dirty there means written and synced.
        var synced = false
        for _ in 0..<500 where !synced {
            synced = try rig.onIOLoop { rig.volume.dirtyBytes == 0 }
            if !synced { usleep(10_000) }
        }
        XCTAssertTrue(synced, "the commit timer wrote the data back")
        let durable = try rig.onIOLoop { medium.durable }
        XCTAssertEqual(Array(durable[4096..<(4096 + 8192)]), bytes)
    }

    func testAFailedWriteBackFailsTheFlushKeepsTheDataDirtyAndTheNextOneWritesIt() throws {
        let medium = SimulatedMedium(sizeBytes: 4 * chunk)
        let rig = try rig(medium)
        defer { rig.shutDown() }
        let bytes = seededBytes(4096, seed: 9)
        XCTAssertTrue(try rig.write(chunk, bytes).isDone)
        try rig.onIOLoop { medium.failNextWrites = 1 }
        guard case .failed(.io) = try rig.perform(.flush) else { return XCTFail("a flush whose write-back failed must fail") }
        XCTAssertEqual(rig.volume.dirtyBytes, 4096, "still dirty")
        try rig.onIOLoop { medium.failNextSyncs = 1 }
        guard case .failed(.io) = try rig.perform(.flush) else { return XCTFail("a flush whose sync failed must fail") }
        XCTAssertEqual(rig.volume.dirtyBytes, 4096, "a write not known synced is dirty again")
        XCTAssertTrue(try rig.perform(.flush).isDone)
        XCTAssertEqual(Array(try rig.onIOLoop { medium.durable }[chunk..<(chunk + 4096)]), bytes)
        XCTAssertEqual(rig.volume.lock.withLock { rig.volume.counters.commitErrors }, 2)
    }

    func testAFailedLoadFailsTheRequestAndTheNextOneLoads() throws {
        let original = seededBytes(2 * chunk, seed: 4)
        let medium = SimulatedMedium(durableBytes: original)
        let rig = try rig(medium)
        defer { rig.shutDown() }
        try rig.onIOLoop { medium.failNextReads = 1 }
        guard case .failed(.io) = try rig.perform(.read(offset: 0, lengthBytes: 512, buffer: ByteBuffer())) else { return XCTFail("a failed load fails the read") }
        try rig.onIOLoop { medium.failNextReads = 1 }
        guard case .failed(.io) = try rig.write(512, [UInt8](repeating: 1, count: 512)) else { return XCTFail("a failed load fails a partial write") }
        XCTAssertEqual(rig.volume.dirtyBytes, 0, "and changes nothing")
        XCTAssertEqual(try rig.read(0, 2 * chunk), original, "nothing changed, and reads load again")
    }

    func testSectorSizesFrom512To4096AreAdvertisedAndOthersRefused() throws {
        let medium = SimulatedMedium(sizeBytes: 4 * chunk + 1536)
        let rig = try rig(medium, sector: 4096)
        defer { rig.shutDown() }
        XCTAssertEqual(rig.volume.blockSizes.minimumBytes, 4096)
        XCTAssertEqual(rig.volume.sizeBytes, UInt64(4 * chunk), "a partial last sector is not served")
        for bad: UInt32 in [256, 768, 8192] {
            XCTAssertThrowsError(try EPRDVolume(medium: medium, configuration: .init(sectorBytes: bad), commitLoop: rig.ioLoop,
                                                loadLoop: rig.ioLoop, managementLoop: rig.sessionLoop), "sector \(bad)")
        }
    }

    func testManagementChangesBarriersAndTheIntervalAndRefusesBadValues() throws {
        let rig = try rig(SimulatedMedium(sizeBytes: chunk))
        defer { rig.shutDown() }
        _ = try rig.volume.set("barriers", to: "off").wait()
        XCTAssertFalse(rig.volume.barriers)
        _ = try rig.volume.set("commit_interval", to: "0.5").wait()
        XCTAssertEqual(rig.volume.commitInterval, 500)
        for (key, value) in [("barriers", "maybe"), ("commit_interval", "-1"), ("commit_interval", "soon"), ("size", "1G")] {
            XCTAssertThrowsError(try rig.volume.set(key, to: value).wait(), "\(key)=\(value)") { error in
                guard case ManagementError.badRequest(let message) = error else { return XCTFail("\(error)") }
                XCTAssertTrue(message.contains(key), message)
            }
        }
    }

    func testTrimAndBlockStatusAreNotOffered() throws {
        let rig = try rig(SimulatedMedium(sizeBytes: chunk))
        defer { rig.shutDown() }
        XCTAssertFalse(rig.volume.capabilities.contains(.trim))
        XCTAssertFalse(rig.volume.capabilities.contains(.blockStatus))
        guard case .failed(.notSupported) = try rig.perform(.trim(offset: 0, lengthBytes: 512, fua: false)) else { return XCTFail("trim must be refused") }
        guard case .failed(.outOfRange) = try rig.perform(.read(offset: UInt64(chunk), lengthBytes: 512, buffer: ByteBuffer())) else { return XCTFail("past the end") }
    }
}
