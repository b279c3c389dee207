import Dispatch
import Foundation

/// Reads a sequence of ranges of a recovery device ahead of the one the caller is looking at, into
/// buffers it reuses. While the caller verifies the checksum of one range, up to `depth − 1` reads
/// of the next ones are in flight on reader threads, so the device never waits for the CPU and no
/// segment is copied into a fresh array. A read's failure is thrown only if its range is taken:
/// a failed read ahead of the log's end changes nothing.
///
/// Recovery never writes while a read is in flight (it calls `quiesce()` first), so a device need
/// only allow concurrent reads of different ranges.
final class ReadAhead {
    typealias Request = (offset: UInt64, count: Int)

    private final class Lane {
        let buffer: UnsafeMutableRawBufferPointer
        let ready = DispatchSemaphore(value: 0)
        var sequence = -1
        var count = 0
        /// Set by the reader thread before it signals `ready`; read by the caller after waiting.
        var failure: Error?
        /// Caller's side: issued and not yet waited for.
        var pending = false

        init(bytes: Int) {
            // 4 KiB-aligned, so a device may read into it with O_DIRECT.
            buffer = .allocate(byteCount: max(bytes, 1), alignment: 4096)
        }

        deinit { buffer.deallocate() }
    }

    private let device: any RecoveryDevice
    private let request: (Int) -> Request?
    private let horizon: (Int) -> Int
    private let lanes: [Lane]
    private let threads: ReaderThreads
    private var issued = 0
    private var taken = 0
    private var exhausted = false
    private var finished = false
    /// Bytes the device returned, taken or not.
    private(set) var bytesRead: UInt64 = 0

    /// Reads `request(0)`, `request(1)`, … until it returns nil; no request exceeds `bufferBytes`.
    /// Once `taken` ranges have been taken, ranges up to `horizon(taken)` (exclusive) may have been
    /// issued, and no more than `depth` are ever in flight: a horizon holds back reads that are
    /// likely wasted (whole segments past the end of a log shut down cleanly).
    init(device: any RecoveryDevice, depth: Int, threads: Int, bufferBytes: Int,
         horizon: @escaping (Int) -> Int = { _ in .max }, request: @escaping (Int) -> Request?) {
        precondition(depth >= 1 && threads >= 1)
        self.device = device
        self.request = request
        self.horizon = horizon
        lanes = (0..<depth).map { _ in Lane(bytes: bufferBytes) }
        self.threads = ReaderThreads(count: min(threads, depth))
        issue(upTo: min(depth, max(horizon(0), 1)))
    }

    deinit { finish() }

    /// The bytes of range `sequence`, which must follow the one taken before; valid until the next
    /// call. Taking it frees the previous range's buffer for the next read.
    func take(_ sequence: Int) throws -> UnsafeRawBufferPointer {
        precondition(sequence == taken && !finished, "ranges are taken in order")
        taken += 1
        issue(upTo: min(sequence + lanes.count, max(horizon(taken), sequence + 1)))
        let lane = lanes[sequence % lanes.count]
        precondition(lane.sequence == sequence, "range \(sequence) was not requested")
        wait(lane)
        if let failure = lane.failure { throw failure }
        return UnsafeRawBufferPointer(rebasing: lane.buffer[0..<lane.count])
    }

    /// Waits for every read in flight; the ranges they read can still be taken.
    func quiesce() {
        lanes.forEach(wait)
    }

    /// Waits for the reads in flight and stops the reader threads.
    func finish() {
        guard !finished else { return }
        finished = true
        quiesce()
        threads.stop()
    }

    private func wait(_ lane: Lane) {
        guard lane.pending else { return }
        lane.ready.wait()
        lane.pending = false
        if lane.failure == nil { bytesRead += UInt64(lane.count) }
    }

    /// Issues reads until `limit` ranges have been issued (or there are no more): the lane of range
    /// `limit − 1` is free once the range `depth` before it was taken.
    private func issue(upTo limit: Int) {
        while !exhausted && issued < limit {
            guard let next = request(issued) else { return exhausted = true }
            let lane = lanes[issued % lanes.count]
            precondition(!lane.pending && next.count <= lane.buffer.count)
            lane.sequence = issued
            lane.count = next.count
            lane.failure = nil
            lane.pending = true
            let device = self.device
            threads.submit {
                do {
                    try device.readBytes(offset: next.offset, into: UnsafeMutableRawBufferPointer(rebasing: lane.buffer[0..<next.count]))
                } catch {
                    lane.failure = error
                }
                lane.ready.signal()
            }
            issued += 1
        }
    }
}

/// A fixed set of threads running blocking jobs in the order given. Dispatch's pool is as wide as
/// the machine has cores and does not grow promptly for threads blocked in `pread`, which would
/// leave the device with two reads in flight on a two-core machine.
final class ReaderThreads {
    private let condition = NSCondition()
    private var jobs: [() -> Void] = []
    private var head = 0
    private var stopping = false
    private let exited = DispatchSemaphore(value: 0)
    private let count: Int

    init(count: Int) {
        self.count = count
        for _ in 0..<count {
            let thread = Thread { [self] in run() }
            thread.name = "recovery-read"
            thread.start()
        }
    }

    func submit(_ job: @escaping () -> Void) {
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    /// Runs the jobs already submitted, then ends every thread and waits for them.
    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
        for _ in 0..<count { exited.wait() }
    }

    private func run() {
        while true {
            condition.lock()
            while head == jobs.count && !stopping { condition.wait() }
            guard head < jobs.count else {
                condition.unlock()
                exited.signal()
                return
            }
            let job = jobs[head]
            head += 1
            if head == jobs.count {
                jobs.removeAll(keepingCapacity: true)
                head = 0
            }
            condition.unlock()
            job()
        }
    }
}
