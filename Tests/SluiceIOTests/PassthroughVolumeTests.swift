import Glibc
import NIOCore
import NIOPosix
@testable import SluicePassthrough
import SluiceVolume
import XCTest

@testable import SluiceIO

/// The passthrough volume through its session interface, on memory and disk file systems.
final class PassthroughVolumeTests: XCTestCase {
    private final class Sink: VolumeCompletionSink {
        var replies: [UInt32: VolumeReply] = [:]
        func volumeRequestCompleted(tag: UInt32, reply: consuming VolumeReply) { replies[tag] = reply }
        func volumeCompletionBurstEnded() {}
    }

    private func withVolume(directory: String, sizeBytes: Int = 1 << 20, readOnly: Bool = false,
                            _ body: (PassthroughVolume, any EventLoop) throws -> Void) throws {
        let path = "\(directory)/sluice-volume-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        let descriptor = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        XCTAssertEqual(ftruncate(descriptor, off_t(sizeBytes)), 0)
        close(descriptor)
        defer { unlink(path) }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer {
            try? IOUringDrivers.shared.stopAll(in: group)
            try? group.syncShutdownGracefully()
        }
        let volume = try PassthroughVolume(path: path, readOnly: readOnly)
        defer { try? volume.close() }
        try body(volume, group.next())
    }

    /// Submits requests in one batch and waits for all their replies.
    private func perform(_ requests: [VolumeRequest], on volume: PassthroughVolume, loop: any EventLoop) throws -> [VolumeReply] {
        let sink = Sink()
        let session = try loop.submit { try volume.openSession(on: loop) }.wait()
        try loop.submit {
            for (index, request) in requests.enumerated() { session.submit(request, tag: UInt32(index), sink: sink) }
            session.submitBatch()
        }.wait()
        for _ in 0..<2000 {
            if try loop.submit({ sink.replies.count == requests.count }).wait() { break }
            usleep(1000)
        }
        return try loop.submit { (0..<requests.count).map { sink.replies[UInt32($0)] ?? .failed(.io(errno: -1)) } }.wait()
    }

    private func bytes(_ reply: VolumeReply) -> [UInt8]? {
        if case .data(let buffer) = reply { return Array(buffer.readableBytesView) }
        return nil
    }

    func testEveryRequestKindOnMemoryAndDisk() throws {
        for directory in ["/dev/shm", "/var/tmp"] {
            try withVolume(directory: directory) { volume, loop in
                XCTAssertEqual(volume.sizeBytes, 1 << 20)
                var data = ByteBufferAllocator().buffer(capacity: 8192)
                data.writeBytes((0..<8192).map { UInt8(truncatingIfNeeded: $0 ^ 0x5A) })
                let written = try perform([
                    .write(offset: 0, data: data, fua: false),
                    .write(offset: 65536, data: data, fua: true),
                    .flush,
                ], on: volume, loop: loop)
                for reply in written { guard case .done = reply else { return XCTFail("\(directory): \(reply)") } }
                var prefix = ByteBufferAllocator().buffer(capacity: 8 + 8192)
                prefix.writeInteger(UInt64(0xFEED))
                let read = try perform([.read(offset: 65536, lengthBytes: 8192, buffer: prefix)], on: volume, loop: loop)
                XCTAssertEqual(bytes(read[0]).map { Array($0.dropFirst(8)) }, Array(data.readableBytesView), directory)
                XCTAssertEqual(bytes(read[0]).map { Array($0.prefix(8)) }, [0, 0, 0, 0, 0, 0, 0xFE, 0xED], "the reserved prefix is kept")

                let zeroed = try perform([
                    .writeZeroes(offset: 0, lengthBytes: 4096, flags: [.noHole]),
                    .writeZeroes(offset: 65536, lengthBytes: 8192, flags: [.fua]),
                    .trim(offset: 4096, lengthBytes: 4096, fua: true),
                    .cache(offset: 0, lengthBytes: 65536),
                ], on: volume, loop: loop)
                for reply in zeroed { guard case .done = reply else { return XCTFail("\(directory): \(reply)") } }
                let after = try perform([
                    .read(offset: 0, lengthBytes: 8192, buffer: ByteBuffer()),
                    .read(offset: 65536, lengthBytes: 8192, buffer: ByteBuffer()),
                ], on: volume, loop: loop)
                XCTAssertEqual(bytes(after[0]), [UInt8](repeating: 0, count: 8192), directory)
                XCTAssertEqual(bytes(after[1]), [UInt8](repeating: 0, count: 8192), directory)

                let status = try perform([.blockStatus(offset: 0, lengthBytes: 1 << 20, maximumExtents: 16)], on: volume, loop: loop)
                guard case .extents(let extents) = status[0] else { return XCTFail("\(status[0])") }
                XCTAssertEqual(extents.reduce(UInt64(0)) { $0 + UInt64($1.lengthBytes) }, 1 << 20, directory)
                XCTAssertTrue(extents.contains { $0.flags.contains(.hole) }, "\(directory): \(extents)")
            }
        }
    }

    func testOutOfRangeAndReadOnlyAreRefused() throws {
        try withVolume(directory: "/var/tmp") { volume, loop in
            var data = ByteBufferAllocator().buffer(capacity: 512)
            data.writeRepeatingByte(1, count: 512)
            let replies = try perform([
                .write(offset: (1 << 20) - 256, data: data, fua: false),
                .read(offset: UInt64.max - 10, lengthBytes: 512, buffer: ByteBuffer()),
            ], on: volume, loop: loop)
            for reply in replies {
                guard case .failed(.outOfRange) = reply else { return XCTFail("expected outOfRange, got \(reply)") }
            }
        }
        try withVolume(directory: "/var/tmp", readOnly: true) { volume, loop in
            XCTAssertTrue(volume.capabilities.contains(.readOnly))
            var data = ByteBufferAllocator().buffer(capacity: 512)
            data.writeRepeatingByte(1, count: 512)
            let replies = try perform([.write(offset: 0, data: data, fua: false), .trim(offset: 0, lengthBytes: 512, fua: false)],
                                      on: volume, loop: loop)
            for reply in replies {
                guard case .failed(.readOnly) = reply else { return XCTFail("expected readOnly, got \(reply)") }
            }
        }
    }

    func testBackingFilesAreLockedAndValidated() throws {
        try withVolume(directory: "/var/tmp") { volume, _ in
            XCTAssertThrowsError(try PassthroughVolume(path: volume.file.path, readOnly: false)) { error in
                XCTAssertEqual(error as? BlockFileError, .inUse(path: volume.file.path))
            }
        }
        XCTAssertThrowsError(try PassthroughVolume(path: "/var/tmp/definitely-missing-\(getpid()).img", readOnly: false))
        XCTAssertThrowsError(try PassthroughVolume(path: "/var/tmp", readOnly: false)) { error in
            XCTAssertEqual(error as? BlockFileError, .notAFileOrBlockDevice(path: "/var/tmp"))
        }
        let tiny = "/var/tmp/sluice-tiny-\(getpid()).img"
        FileManager.default.createFile(atPath: tiny, contents: Data(count: 100))
        defer { unlink(tiny) }
        XCTAssertThrowsError(try PassthroughVolume(path: tiny, readOnly: false))
    }
}

/// Rounding allocation extents to whole sectors never calls data a hole.
final class BlockStatusRoundingTests: XCTestCase {
    private func extents(_ pairs: [(UInt32, BlockStatusFlags)]) -> [BlockStatusExtent] {
        pairs.map { BlockStatusExtent(lengthBytes: $0.0, flags: $0.1) }
    }

    func testPartialSectorsCountAsData() {
        let hole: BlockStatusFlags = [.hole, .zero]
        // hole [0,100), data [100,612), hole [612,1024): every sector touched by data is data.
        let rounded = BlockStatusScanner.roundedToSectors(extents([(100, hole), (512, []), (412, hole)]), requestedBytes: 1024)
        XCTAssertEqual(rounded, extents([(1024, [])]))
        // hole [0,1000), data [1000,1100), hole [1100,4096)
        let middle = BlockStatusScanner.roundedToSectors(extents([(1000, hole), (100, []), (2996, hole)]), requestedBytes: 4096)
        XCTAssertEqual(middle, extents([(512, hole), (1024, []), (2560, hole)]))
        // Aligned extents are untouched.
        let aligned = extents([(512, hole), (4096, []), (512, hole)])
        XCTAssertEqual(BlockStatusScanner.roundedToSectors(aligned, requestedBytes: 5120), aligned)
        // Extents that stop short of the request are not stretched over unseen bytes.
        let short = BlockStatusScanner.roundedToSectors(extents([(700, []), (300, hole)]), requestedBytes: 8192)
        XCTAssertEqual(short, extents([(1024, [])]))
    }
}

/// A layer's own data over a lower volume's allocation: data ranges win over holes and zeros.
final class BlockStatusMarkingDataTests: XCTestCase {
    private func extents(_ pairs: [(UInt32, BlockStatusFlags)]) -> [BlockStatusExtent] {
        pairs.map { BlockStatusExtent(lengthBytes: $0.0, flags: $0.1) }
    }

    func testDataRangesSplitHolesAndMerge() {
        let hole: BlockStatusFlags = [.hole, .zero]
        let lower = extents([(8192, hole), (4096, []), (8192, .zero)])
        // Ranges inside a hole, one spanning a hole and data, one running past the end.
        let marked = BlockStatusExtent.markingData(lower, start: 4096, dataRanges: [4096..<5120, 10240..<14336, 20480..<40960],
                                                   maximumExtents: 16)
        XCTAssertEqual(marked, extents([(1024, []), (5120, hole), (6144, []), (4096, .zero), (4096, [])]))
        XCTAssertEqual(marked.reduce(0) { $0 + $1.lengthBytes }, 20480, "the same bytes are described")
        XCTAssertEqual(BlockStatusExtent.markingData(lower, start: 0, dataRanges: [], maximumExtents: 16), lower)
        XCTAssertEqual(BlockStatusExtent.markingData(lower, start: 0, dataRanges: [0..<100_000], maximumExtents: 16), extents([(20480, [])]))
        XCTAssertEqual(BlockStatusExtent.markingData(lower, start: 4096, dataRanges: [4096..<5120, 10240..<14336, 20480..<40960],
                                                     maximumExtents: 2), extents([(1024, []), (5120, hole)]))
    }

    /// Random extents and ranges against a per-sector model.
    func testMatchesASectorModel() {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        func next(_ bound: Int) -> Int {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return Int((state >> 33) % UInt64(bound))
        }
        let choices: [BlockStatusFlags] = [[], .zero, [.hole, .zero]]
        for round in 0..<300 {
            let start = UInt64(next(64) * 512)
            var lower: [BlockStatusExtent] = []
            var model: [BlockStatusFlags] = []
            for _ in 0..<(1 + next(6)) {
                let sectors = 1 + next(10)
                let flags = choices[next(3)]
                lower.append(BlockStatusExtent(lengthBytes: UInt32(sectors * 512), flags: flags))
                model += Array(repeating: flags, count: sectors)
            }
            var ranges: [Range<UInt64>] = []
            var cursor = UInt64(next(8) * 512)
            while cursor < start + UInt64(model.count * 512) + 2048 {
                let length = UInt64((1 + next(6)) * 512)
                ranges.append(cursor..<(cursor + length))
                cursor += length + UInt64((1 + next(6)) * 512)
            }
            for (index, _) in model.enumerated() {
                let sector = start + UInt64(index * 512)
                if ranges.contains(where: { $0.contains(sector) }) { model[index] = [] }
            }
            let marked = BlockStatusExtent.markingData(lower, start: start, dataRanges: ranges, maximumExtents: 1000)
            var expanded: [BlockStatusFlags] = []
            for extent in marked { expanded += Array(repeating: extent.flags, count: Int(extent.lengthBytes) / 512) }
            XCTAssertEqual(expanded, model, "round \(round)")
            for (a, b) in zip(marked, marked.dropFirst()) { XCTAssertNotEqual(a.flags, b.flags, "round \(round): unmerged neighbours") }
        }
    }
}
