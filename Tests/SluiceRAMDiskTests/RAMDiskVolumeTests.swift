import Foundation
import NIOCore
import NIOPosix
import SluiceVolume
import XCTest

@testable import SluiceRAMDisk

/// A RAM disk is checked against a plain byte array under random writes, trims, write-zeroes and
/// reads; its memory is counted chunk by chunk; resizes, locks and limits refuse what they must.
final class RAMDiskVolumeTests: XCTestCase {
    private struct ReadFailed: Error { var reply: String }

    private var group: MultiThreadedEventLoopGroup!
    private var loop: any EventLoop { group.next() }
    private let chunk = SparseMemory.chunkBytes

    override func setUp() { group = MultiThreadedEventLoopGroup(numberOfThreads: 1) }
    override func tearDown() { try? group.syncShutdownGracefully() }

    private func disk(_ size: Int, limit: UInt64? = nil) throws -> RAMDiskVolume {
        try RAMDiskVolume(sizeBytes: UInt64(size), limitBytes: limit, managementLoop: loop)
    }

    private func read(_ disk: RAMDiskVolume, _ offset: Int, _ count: Int) throws -> [UInt8] {
        let reply = disk.perform(.read(offset: UInt64(offset), lengthBytes: UInt32(count), buffer: ByteBuffer()))
        guard case .data(let buffer) = reply else { throw ReadFailed(reply: "\(reply)") }
        return Array(buffer.readableBytesView)
    }

    private func write(_ disk: RAMDiskVolume, _ offset: Int, _ bytes: [UInt8]) -> VolumeReply {
        disk.perform(.write(offset: UInt64(offset), data: ByteBuffer(bytes: bytes), fua: false))
    }

    func testRandomOperationsMatchAByteArray() throws {
        let size = 8 * chunk + 4096
        var generator = SystemRandomNumberGenerator()
        for round in 0..<6 {
            let disk = try disk(size)
            var model = [UInt8](repeating: 0, count: size)
            for step in 0..<200 {
                let offset = Int.random(in: 0..<(size / 512), using: &generator) * 512
                let length = min(size - offset, Int.random(in: 1...(3 * chunk / 512), using: &generator) * 512)
                let what = "round \(round) step \(step): \(offset)+\(length)"
                switch Int.random(in: 0..<10, using: &generator) {
                case 0..<5:
                    // Each sector its own non-zero byte: a sector landing in the wrong place shows.
                    let tag = UInt8.random(in: 1...255, using: &generator)
                    var bytes: [UInt8] = []
                    bytes.reserveCapacity(length)
                    for sector in 0..<(length / 512) { bytes.append(contentsOf: repeatElement(tag &+ UInt8(truncatingIfNeeded: sector) | 1, count: 512)) }
                    guard case .done = write(disk, offset, bytes) else { return XCTFail("write failed, \(what)") }
                    model.replaceSubrange(offset..<(offset + length), with: bytes)
                case 5, 6:
                    guard case .done = disk.perform(.trim(offset: UInt64(offset), lengthBytes: UInt32(length), fua: false)) else { return XCTFail(what) }
                    model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
                case 7:
                    let flags: WriteZeroesFlags = Bool.random(using: &generator) ? [.noHole] : []
                    guard case .done = disk.perform(.writeZeroes(offset: UInt64(offset), lengthBytes: UInt32(length), flags: flags)) else { return XCTFail(what) }
                    model.replaceSubrange(offset..<(offset + length), with: repeatElement(0, count: length))
                default:
                    XCTAssertEqual(try read(disk, offset, length), Array(model[offset..<(offset + length)]), what)
                }
            }
            XCTAssertEqual(try read(disk, 0, size), model, "round \(round): the whole disk")
            // Memory is taken only for chunks holding something, give or take zeroed ones kept.
            let holding = stride(from: 0, to: size, by: chunk).filter { model[$0..<min(size, $0 + chunk)].contains { $0 != 0 } }.count
            XCTAssertGreaterThanOrEqual(disk.allocatedBytes, UInt64(holding * chunk), "round \(round)")
        }
    }

    func testMemoryIsTakenOnFirstWriteAndGivenBackByTrim() throws {
        let disk = try disk(16 * chunk)
        XCTAssertEqual(disk.allocatedBytes, 0)
        XCTAssertEqual(try read(disk, 0, 4096), [UInt8](repeating: 0, count: 4096), "never written: zeros")
        _ = write(disk, chunk + 512, [UInt8](repeating: 7, count: 512))
        XCTAssertEqual(disk.allocatedBytes, UInt64(chunk))
        // A trim that covers only part of the chunk zeroes that part and keeps the chunk.
        _ = disk.perform(.trim(offset: UInt64(chunk), lengthBytes: 4096, fua: false))
        XCTAssertEqual(disk.allocatedBytes, UInt64(chunk))
        XCTAssertEqual(try read(disk, chunk, 4096), [UInt8](repeating: 0, count: 4096))
        // One that covers it whole gives it back; NO_HOLE zeroes keep (and take) chunks.
        _ = disk.perform(.trim(offset: 0, lengthBytes: UInt32(4 * chunk), fua: false))
        XCTAssertEqual(disk.allocatedBytes, 0)
        _ = disk.perform(.writeZeroes(offset: 0, lengthBytes: UInt32(2 * chunk), flags: [.noHole]))
        XCTAssertEqual(disk.allocatedBytes, UInt64(2 * chunk))
        guard case .extents(let extents) = disk.perform(.blockStatus(offset: 0, lengthBytes: UInt32(4 * chunk), maximumExtents: 8)) else { return XCTFail() }
        XCTAssertEqual(extents, [BlockStatusExtent(lengthBytes: UInt32(2 * chunk), flags: []),
                                 BlockStatusExtent(lengthBytes: UInt32(2 * chunk), flags: [.hole, .zero])])
        guard case .extents(let one) = disk.perform(.blockStatus(offset: 0, lengthBytes: UInt32(4 * chunk), maximumExtents: 1)) else { return XCTFail() }
        XCTAssertEqual(one, [BlockStatusExtent(lengthBytes: UInt32(2 * chunk), flags: [])], "at most the extents asked for, from the start")
    }

    func testLimitRefusesNewMemoryWithoutChangingAnything() throws {
        let disk = try disk(16 * chunk, limit: UInt64(2 * chunk))
        XCTAssertEqual(disk.limitBytes, UInt64(2 * chunk))
        guard case .done = write(disk, 0, [UInt8](repeating: 1, count: 2 * chunk)) else { return XCTFail() }
        // A write needing a third chunk fails whole, even its part in chunks already taken.
        guard case .failed(.noSpace) = write(disk, chunk, [UInt8](repeating: 2, count: 2 * chunk)) else { return XCTFail("not refused") }
        XCTAssertEqual(try read(disk, chunk, chunk), [UInt8](repeating: 1, count: chunk), "nothing of the refused write landed")
        // Rewrites of taken chunks go on; a trim makes room.
        guard case .done = write(disk, 0, [UInt8](repeating: 3, count: 512)) else { return XCTFail() }
        _ = disk.perform(.trim(offset: UInt64(chunk), lengthBytes: UInt32(chunk), fua: false))
        guard case .done = write(disk, 5 * chunk, [UInt8](repeating: 4, count: 512)) else { return XCTFail() }
        disk.setLimit(nil)
        XCTAssertEqual(disk.limitBytes, UInt64(16 * chunk), "no limit: the size, in whole chunks")
    }

    func testRequestsOutsideTheDiskAndWritesWhileLockedFail() throws {
        let disk = try disk(4 * chunk)
        guard case .failed(.outOfRange) = write(disk, 4 * chunk - 512, [UInt8](repeating: 1, count: 1024)) else { return XCTFail() }
        guard case .failed(.outOfRange) = disk.perform(.read(offset: UInt64.max - 511, lengthBytes: 1024, buffer: ByteBuffer())) else { return XCTFail("overflow") }
        disk.setLocked(true)
        XCTAssertTrue(disk.capabilities.contains(.readOnly))
        guard case .failed(.readOnly) = write(disk, 0, [UInt8](repeating: 1, count: 512)) else { return XCTFail() }
        guard case .failed(.readOnly) = disk.perform(.trim(offset: 0, lengthBytes: 512, fua: false)) else { return XCTFail() }
        XCTAssertEqual(try read(disk, 0, 512), [UInt8](repeating: 0, count: 512), "reads go on while locked")
        XCTAssertThrowsError(try disk.resize(toBytes: UInt64(8 * chunk)), "no resize while locked")
        disk.setLocked(false)
        XCTAssertFalse(disk.capabilities.contains(.readOnly))
        try disk.close()
        guard case .failed(.shuttingDown) = disk.perform(.flush) else { return XCTFail("closed") }
    }

    func testResizeGrowsAndShrinksOnlyOverUnwrittenSpace() throws {
        let disk = try disk(4 * chunk)
        _ = write(disk, 3 * chunk + 512, [UInt8](repeating: 9, count: 512))
        try disk.resize(toBytes: UInt64(8 * chunk))
        XCTAssertEqual(disk.sizeBytes, UInt64(8 * chunk))
        guard case .done = write(disk, 7 * chunk, [UInt8](repeating: 1, count: 512)) else { return XCTFail("past the old end after growing") }
        XCTAssertThrowsError(try disk.resize(toBytes: UInt64(7 * chunk))) { error in
            XCTAssertTrue("\(error)".contains("trim it first"), "\(error)")
        }
        _ = disk.perform(.trim(offset: UInt64(7 * chunk), lengthBytes: UInt32(chunk), fua: false))
        // Down to just past the written sector: the data before the new end stays.
        try disk.resize(toBytes: UInt64(3 * chunk + 1024))
        XCTAssertEqual(try read(disk, 3 * chunk + 512, 512), [UInt8](repeating: 9, count: 512))
        guard case .failed(.outOfRange) = write(disk, 3 * chunk + 1024, [UInt8](repeating: 1, count: 512)) else { return XCTFail("past the new end") }
        XCTAssertThrowsError(try disk.resize(toBytes: UInt64(3 * chunk + 512)), "would drop the written sector")
        XCTAssertThrowsError(try disk.resize(toBytes: 1000), "not a multiple of 512")
        XCTAssertThrowsError(try RAMDiskVolume(sizeBytes: 0, managementLoop: loop))
        // A grow after a shrink reads zeros where the dropped chunks were.
        try disk.resize(toBytes: UInt64(8 * chunk))
        XCTAssertEqual(try read(disk, 7 * chunk, 512), [UInt8](repeating: 0, count: 512))
    }

    func testManagementSettingsAndStatus() throws {
        let disk = try disk(4 * chunk)
        let status = try JSONSerialization.jsonObject(with: try disk.set("size", to: "1M").wait()) as? [String: Any]
        XCTAssertEqual(status?["size_bytes"] as? Int, 1 << 20)
        XCTAssertEqual(status?["kind"] as? String, "ramdisk")
        XCTAssertEqual(status?["durable"] as? Bool, false)
        XCTAssertEqual(disk.sizeBytes, 1 << 20)
        _ = try disk.set("locked", to: "1").wait()
        XCTAssertTrue(disk.locked)
        _ = try disk.set("locked", to: "off").wait()
        XCTAssertFalse(disk.locked)
        _ = try disk.set("limit", to: "128K").wait()
        XCTAssertEqual(disk.limitBytes, 128 << 10)
        for (key, value, expected) in [("size", "lots", "size takes a size"), ("locked", "maybe", "locked takes 1"), ("colour", "red", "no setting \"colour\"")] {
            XCTAssertThrowsError(try disk.set(key, to: value).wait()) { error in
                guard case ManagementError.badRequest(let message) = error else { return XCTFail("\(error)") }
                XCTAssertTrue(message.contains(expected), message)
            }
        }
        _ = write(disk, 512 << 10, [UInt8](repeating: 1, count: 512))
        XCTAssertThrowsError(try disk.set("size", to: "256K").wait(), "a shrink over written data is a bad request")
    }

    func testSessionCompletesWithinSubmitAndEndsTheBurstAtSubmitBatch() throws {
        let disk = try disk(4 * chunk)
        final class Sink: VolumeCompletionSink {
            var replies: [(UInt32, VolumeReply)] = []
            var bursts = 0
            func volumeRequestCompleted(tag: UInt32, reply: consuming VolumeReply) { replies.append((tag, reply)) }
            func volumeCompletionBurstEnded() { bursts += 1 }
        }
        try loop.submit {
            let session = try disk.openSession(on: self.loop)
            let sink = Sink()
            session.submit(.write(offset: 0, data: ByteBuffer(bytes: [1, 2, 3, 4] + [UInt8](repeating: 0, count: 508)), fua: true), tag: 1, sink: sink)
            session.submit(.read(offset: 0, lengthBytes: 4, buffer: ByteBuffer()), tag: 2, sink: sink)
            XCTAssertEqual(sink.replies.map(\.0), [1, 2])
            XCTAssertEqual(sink.bursts, 0)
            session.submitBatch()
            XCTAssertEqual(sink.bursts, 1)
            session.submitBatch()
            XCTAssertEqual(sink.bursts, 1, "no completions, no burst")
            guard case .data(let buffer) = sink.replies[1].1 else { return XCTFail() }
            XCTAssertEqual(Array(buffer.readableBytesView), [1, 2, 3, 4])
            XCTAssertEqual(session.requestsInFlight, 0)
            session.close()
        }.wait()
    }

    func testByteCountParsesAndFormatsSizes() {
        for (text, bytes) in [("1048576", UInt64(1 << 20)), ("512K", 512 << 10), ("64M", 64 << 20), ("64MiB", 64 << 20), ("1g", 1 << 30), ("2T", 2 << 40), ("4096B", 4096)] {
            XCTAssertEqual(ByteCount.parse(text), bytes, text)
        }
        for bad in ["", "0", "-1", "1X", "M", "99999999999T"] { XCTAssertNil(ByteCount.parse(bad), bad) }
        XCTAssertEqual(ByteCount.format(64 << 20), "64M")
        XCTAssertEqual(ByteCount.format(1536 << 10), "1536K")
        XCTAssertEqual(ByteCount.format(4097), "4097")
    }
}
