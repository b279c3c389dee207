import Foundation
import NIOCore
import NIOPosix
import SluiceCache
import SluiceTesting
import SluiceVolume

@testable import SluiceEPRD

/// Collects one request's reply for a test that waits for it.
final class ReplyCatcher: VolumeCompletionSink {
    let promise: EventLoopPromise<VolumeReply>
    init(promise: EventLoopPromise<VolumeReply>) { self.promise = promise }
    func volumeRequestCompleted(tag: UInt32, reply: consuming VolumeReply) { promise.succeed(reply) }
    func volumeCompletionBurstEnded() {}
}

/// A simulated backing store that loses power at its `cutAt`-th write or sync (counting both):
/// that operation and all after it fail, and what was not synced survives or not, torn at sector
/// boundaries, as the seed decides. Reads count nothing, so loads never move the cut.
final class CuttingMedium: SynchronousBlockMedium {
    let inner: SimulatedMedium
    let cutAt: Int
    let seed: UInt64
    private(set) var operations = 0
    private(set) var isCut = false

    init(_ inner: SimulatedMedium, cutAt: Int, seed: UInt64) {
        self.inner = inner
        self.cutAt = cutAt
        self.seed = seed
    }

    var sizeBytes: UInt64 { inner.sizeBytes }

    /// Cuts the power now if it has not been cut.
    func cut() {
        guard !isCut else { return }
        isCut = true
        inner.powerFail(seed: seed)
    }

    private func counted() {
        operations += 1
        if operations == cutAt { cut() }
    }

    func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        inner.read(offset: offset, count: count, completion: completion)
    }
    func readBytes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try inner.readBytes(offset: offset, into: buffer)
    }
    func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        counted()
        inner.write(offset: offset, bytes: bytes, completion: completion)
    }
    func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        counted()
        inner.discard(offset: offset, count: count, zeroes: zeroes, completion: completion)
    }
    func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        counted()
        inner.synchronize(completion: completion)
    }
}

/// An EPRD on a medium, its sessions on one loop and its loads and commits on another (one loop
/// for both, as the simulated medium is not thread-safe).
final class EPRDRig {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let sessionLoop: any EventLoop
    let ioLoop: any EventLoop
    let volume: EPRDVolume
    let session: any VolumeSession

    init(medium: any SynchronousBlockMedium, configuration: EPRDVolume.Configuration) throws {
        // Two threads, handed out in turn: the loops differ.
        sessionLoop = group.next()
        ioLoop = group.next()
        volume = try EPRDVolume(medium: medium, configuration: configuration,
                                commitLoop: ioLoop, loadLoop: ioLoop, managementLoop: sessionLoop)
        let loop = sessionLoop
        let volume = volume
        session = try loop.submit { try volume.openSession(on: loop) }.wait()
    }

    /// Submits `request` and waits for its reply.
    func perform(_ request: VolumeRequest) throws -> VolumeReply {
        let promise = sessionLoop.makePromise(of: VolumeReply.self)
        let session = session
        sessionLoop.execute {
            session.submit(request, tag: 1, sink: ReplyCatcher(promise: promise))
            session.submitBatch()
        }
        return try promise.futureResult.wait()
    }

    func read(_ offset: Int, _ count: Int) throws -> [UInt8]? {
        guard case .data(let buffer) = try perform(.read(offset: UInt64(offset), lengthBytes: UInt32(count), buffer: ByteBuffer())) else { return nil }
        return Array(buffer.readableBytesView)
    }

    func write(_ offset: Int, _ bytes: [UInt8], fua: Bool = false) throws -> VolumeReply {
        try perform(.write(offset: UInt64(offset), data: ByteBuffer(bytes: bytes), fua: fua))
    }

    /// Runs `body` on the io loop, between commits and loads (each runs whole in one task there).
    func onIOLoop<T>(_ body: @escaping () -> T) throws -> T {
        try ioLoop.submit(body).wait()
    }

    func shutDown() {
        let loop = sessionLoop
        let session = session
        try? loop.submit { session.close() }.wait()
        try? group.syncShutdownGracefully()
    }
}

extension VolumeReply {
    var isDone: Bool {
        if case .done = self { return true }
        return false
    }
}

/// Random bytes from a seed.
func seededBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    var bytes = [UInt8](repeating: 0, count: count)
    for index in stride(from: 0, to: count, by: 8) {
        withUnsafeBytes(of: generator.next()) { word in
            for byte in 0..<min(8, count - index) { bytes[index + byte] = word[byte] }
        }
    }
    return bytes
}
