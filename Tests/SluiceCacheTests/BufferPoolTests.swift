import SluiceFormat
import SluiceTesting
import XCTest

@testable import SluiceCache

/// Where each segment buffer is (open, sealed and being written, waiting for a sync, free), and
/// the durability policies' answers. A buffer handed back too early is a segment's only copy
/// overwritten (pmem mode); one found for the wrong segment serves another lap's data.
final class BufferPoolTests: XCTestCase {
    private let uuid = [UInt8](repeating: 0x5A, count: 16)

    private func geometry() throws -> CacheGeometry {
        try CacheGeometry(segmentBytes: 64 * 1024, deviceBytes: 1 << 20)
    }

    /// A buffer opened for `id` holding one block.
    private func take(_ pool: inout BufferPool, id: UInt64) -> any WriteBuffer {
        let buffer = pool.free.removeLast()
        buffer.open(segmentID: id)
        [UInt8](repeating: UInt8(truncatingIfNeeded: id), count: 4096).withUnsafeBytes {
            _ = buffer.write(blockNumber: id, sectorMask: 0xFF, block: $0)
        }
        return buffer
    }

    /// Volatile mode: open, sealed, written, free again; found in memory only for its own segment
    /// id (the slot's next segment is another lap's), and written only once.
    func testABufferGoesFromOpenToSealedToFreeAndIsFoundOnlyForItsSegment() throws {
        let geometry = try geometry()
        var pool = BufferPool(free: (0..<3).map { _ in SegmentBuffer(geometry: geometry) })
        XCTAssertEqual(pool.total, 3)
        let buffer = take(&pool, id: 1)
        pool.open = buffer
        XCTAssertTrue(pool.inMemory(slot: 0, segmentID: 1) === buffer)
        XCTAssertNil(pool.inMemory(slot: 0, segmentID: 1 + UInt64(geometry.segmentCount)), "another lap's segment in the same slot")
        pool.open = nil
        pool.sealed(buffer, slot: 0, bytes: buffer.seal(cacheUUID: uuid, isPartial: false))
        XCTAssertEqual(pool.unsyncedCount, 1)
        XCTAssertTrue(pool.inMemory(slot: 0, segmentID: 1) === buffer, "a sealed segment is served from memory until written")
        XCTAssertTrue(pool.takeWriteReady(slot: 0)?.buffer === buffer)
        XCTAssertNil(pool.takeWriteReady(slot: 0), "a segment's write is started once")
        XCTAssertTrue(pool.inMemory(slot: 0, segmentID: 1) === buffer, "still in memory while its write is in flight")
        pool.written(slot: 0, segmentID: 1, waitsForSync: false)
        XCTAssertEqual(pool.free.count, 3)
        XCTAssertEqual(pool.unsyncedCount, 0)
        XCTAssertNil(pool.inMemory(slot: 0, segmentID: 1))
        XCTAssertTrue(buffer.isEmpty, "a freed buffer is reset")
    }

    /// Pmem mode: a written segment's buffer stays (it may be the only durable copy) until a sync
    /// covers it, and a sync frees only the segments it covers.
    func testAWrittenBufferWaitingForASyncIsFreedOnlyByASyncCoveringIt() throws {
        let geometry = try geometry()
        var pool = BufferPool(free: (0..<4).map { _ in SegmentBuffer(geometry: geometry) })
        for id in 1...3 as ClosedRange<UInt64> {
            let buffer = take(&pool, id: id)
            let slot = Int(id - 1)
            pool.sealed(buffer, slot: slot, bytes: buffer.seal(cacheUUID: uuid, isPartial: false))
            _ = pool.takeWriteReady(slot: slot)
        }
        pool.written(slot: 1, segmentID: 2, waitsForSync: true)
        pool.written(slot: 0, segmentID: 1, waitsForSync: true)
        XCTAssertEqual(pool.free.count, 1)
        XCTAssertEqual(pool.unsyncedCount, 3, "two waiting for a sync, one still being written")
        XCTAssertTrue(pool.needsSync(writtenThroughID: 2, syncedThroughID: 0))
        XCTAssertTrue(pool.needsSync(writtenThroughID: 2, syncedThroughID: 1))
        XCTAssertFalse(pool.needsSync(writtenThroughID: 2, syncedThroughID: 2), "everything waiting is synced")
        XCTAssertFalse(pool.needsSync(writtenThroughID: 0, syncedThroughID: 0), "a sync now would cover nothing waiting")
        XCTAssertNotNil(pool.inMemory(slot: 1, segmentID: 2), "a buffer waiting for its sync still serves reads")
        XCTAssertFalse(pool.releaseSynced(through: 0))
        XCTAssertTrue(pool.releaseSynced(through: 1))
        XCTAssertEqual(pool.free.count, 2)
        XCTAssertNil(pool.inMemory(slot: 0, segmentID: 1))
        XCTAssertNotNil(pool.inMemory(slot: 1, segmentID: 2), "segment 2 is not synced yet")
        pool.written(slot: 2, segmentID: 3, waitsForSync: true)
        XCTAssertTrue(pool.releaseSynced(through: 3))
        XCTAssertEqual(pool.free.count, 4)
        XCTAssertEqual(pool.unsyncedCount, 0)
    }

    // MARK: Durability policies

    /// Volatile mode: only a barrier makes anything durable.
    func testVolatileRepliesWaitForABarrierOnlyForFUAAndFlush() {
        let policy = VolatileDurability()
        XCTAssertEqual(policy.replyWait(fua: false), .none)
        XCTAssertEqual(policy.replyWait(fua: true), .barrier)
        XCTAssertEqual(policy.flushWait(repliesAwaitingPersist: false), .barrier)
        XCTAssertFalse(policy.persistAppended(), "DRAM buffers cannot make appends durable")
        XCTAssertFalse(policy.persistsAppends)
        XCTAssertFalse(policy.buffersWaitForSync)
        XCTAssertFalse(policy.cacheDeviceSynced(through: 9))
    }

    /// Pmem mode: every reply waits for a drain; a flush only while some reply still waits for
    /// one; the synced word only grows, and is durable once set.
    func testPmemRepliesWaitForADrainAndTheSyncedWordOnlyGrows() throws {
        let geometry = try geometry()
        let layout = PmemLayout(cacheUUID: uuid, pmemUUID: [UInt8](repeating: 0xA5, count: 16), segmentBytes: geometry.segmentBytes, areaCount: 2)
        let memory = SimulatedPersistentMemory(sizeBytes: layout.fileBytes(for: geometry))
        let policy = PmemDurability(memory: memory, layout: layout)
        XCTAssertEqual(policy.replyWait(fua: false), .persist)
        XCTAssertEqual(policy.replyWait(fua: true), .persist)
        XCTAssertEqual(policy.flushWait(repliesAwaitingPersist: true), .persist)
        XCTAssertEqual(policy.flushWait(repliesAwaitingPersist: false), .none)
        XCTAssertTrue(policy.buffersWaitForSync)
        XCTAssertEqual(policy.makeBuffers(geometry: geometry).count, 2)
        XCTAssertTrue(policy.cacheDeviceSynced(through: 5))
        XCTAssertFalse(policy.cacheDeviceSynced(through: 5), "no new segment synced: nothing to persist")
        XCTAssertFalse(policy.cacheDeviceSynced(through: 3), "the synced word never goes back")
        XCTAssertEqual(memory.loadWord(at: PmemLayout.syncedWordOffset), 5)
        let survivor = memory.powerFail(seed: 1)
        let word = survivor.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: PmemLayout.syncedWordOffset, as: UInt64.self)) }
        XCTAssertEqual(word, 5, "the synced word must be durable when cacheDeviceSynced returns")
    }
}
