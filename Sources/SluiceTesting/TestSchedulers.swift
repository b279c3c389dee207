import NIOCore
import SluiceCache
import SluiceVolume

// MARK: - One wrapper for every test medium

/// A simulated medium whose every operation passes through `interpose` first: the one place the
/// test media below decide when an operation takes effect (later, in a shuffled order; when a
/// test releases it; never, after a power cut).
open class InterposedMedium: BlockMedium {
    public enum Kind: Equatable { case read, write, discard, sync }
    public let inner: SimulatedMedium

    public init(_ inner: SimulatedMedium) {
        self.inner = inner
    }

    public var sizeBytes: UInt64 { inner.sizeBytes }

    /// Performs the operation (`perform`) now, later or never. The default performs it now.
    open func interpose(_ kind: Kind, offset: UInt64, count: Int, _ perform: @escaping () -> Void) {
        perform()
    }

    public func read(offset: UInt64, count: Int, completion: @escaping (Result<ByteBuffer, MediumError>) -> Void) {
        interpose(.read, offset: offset, count: count) { self.inner.read(offset: offset, count: count, completion: completion) }
    }

    public func write(offset: UInt64, bytes: ByteBuffer, completion: @escaping (Result<Void, MediumError>) -> Void) {
        interpose(.write, offset: offset, count: bytes.readableBytes) { self.inner.write(offset: offset, bytes: bytes, completion: completion) }
    }

    public func discard(offset: UInt64, count: Int, zeroes: Bool, completion: @escaping (Result<Void, MediumError>) -> Void) {
        interpose(.discard, offset: offset, count: count) { self.inner.discard(offset: offset, count: count, zeroes: zeroes, completion: completion) }
    }

    public func synchronize(completion: @escaping (Result<Void, MediumError>) -> Void) {
        interpose(.sync, offset: 0, count: 0) { self.inner.synchronize(completion: completion) }
    }

    /// An inline page-cache read happens now or not at all: nothing to defer. A wrapper that must
    /// see or hold every read declines it (the engine then reads through ``read(offset:count:completion:)``).
    open func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool {
        inner.readIfCached(offset: offset, into: bytes)
    }

    public func allocation(offset: UInt64, lengthBytes: UInt32, maximumExtents: Int, completion: @escaping ([BlockStatusExtent]) -> Void) {
        inner.allocation(offset: offset, lengthBytes: lengthBytes, maximumExtents: maximumExtents, completion: completion)
    }
}

// MARK: - Media whose completions come later, in a seeded random order

/// Holds the operations of both media of an engine and performs them one at a time, in a seeded
/// random order, each on its own turn of the event loop: completions arrive later than the call
/// and in any order, as io_uring and libnbd deliver them. An operation takes effect when it is
/// performed, so a sync covers only the writes performed before it.
public final class ShuffledScheduler {
    public let loop: any EventLoop
    private var rng: SplitMix64
    private var pending: [() -> Void] = []
    public private(set) var performed = 0
    public var pendingCount: Int { pending.count }

    public init(loop: any EventLoop, seed: UInt64) {
        self.loop = loop
        rng = SplitMix64(seed: seed)
    }

    public func enqueue(_ operation: @escaping () -> Void) {
        pending.append(operation)
        loop.execute { self.performOne() }
    }

    private func performOne() {
        guard !pending.isEmpty else { return }
        let chosen = rng.below(pending.count)
        pending.swapAt(chosen, pending.count - 1)
        let operation = pending.removeLast()
        performed += 1
        operation()
    }

    /// Wraps both media of a harness.
    public static func wrapper(seed: UInt64) -> (SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium) {
        var generation: UInt64 = 0
        return { cache, backing, loop in
            generation += 1
            let scheduler = ShuffledScheduler(loop: loop, seed: seed &+ generation &* 0x1000_0001)
            return (DeferredMedium(cache, scheduler), DeferredMedium(backing, scheduler))
        }
    }
}

public final class DeferredMedium: InterposedMedium {
    public let scheduler: ShuffledScheduler
    public init(_ inner: SimulatedMedium, _ scheduler: ShuffledScheduler) {
        self.scheduler = scheduler
        super.init(inner)
    }

    override public func interpose(_ kind: Kind, offset: UInt64, count: Int, _ perform: @escaping () -> Void) {
        scheduler.enqueue(perform)
    }
}

// MARK: - A medium whose operations a test holds and releases by hand

/// Passes operations straight through unless a hold matches them; held operations take effect
/// only when released. Use only on the harness's loop.
public final class ControlledMedium: InterposedMedium {
    public struct Held {
        public var kind: Kind
        public var offset: UInt64
        public var count: Int
        public var perform: () -> Void
    }

    /// Every operation both media of a harness performed, in the order performed.
    public final class Journal {
        public var entries: [(isCache: Bool, kind: Kind, offset: UInt64, count: Int)] = []
        public init() {}
    }

    public let isCache: Bool
    public let journal: Journal
    /// Operations for which this returns true are held.
    public var hold: ((Kind, UInt64, Int) -> Bool)?
    public private(set) var held: [Held] = []
    /// Every operation seen, in order (kind, offset, length).
    public private(set) var log: [(kind: Kind, offset: UInt64, count: Int)] = []

    public init(_ inner: SimulatedMedium, isCache: Bool, journal: Journal) {
        self.isCache = isCache
        self.journal = journal
        super.init(inner)
    }

    override public func interpose(_ kind: Kind, offset: UInt64, count: Int, _ perform: @escaping () -> Void) {
        log.append((kind, offset, count))
        if let hold, hold(kind, offset, count) {
            held.append(Held(kind: kind, offset: offset, count: count, perform: { [journal, isCache] in
                journal.entries.append((isCache, kind, offset, count))
                perform()
            }))
        } else {
            journal.entries.append((isCache, kind, offset, count))
            perform()
        }
    }

    /// A read a hold matches is declined, so that it arrives as an operation the test holds;
    /// any other is journalled and logged like every read.
    override public func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool {
        if let hold, hold(.read, offset, bytes.count) { return false }
        guard inner.readIfCached(offset: offset, into: bytes) else { return false }
        log.append((.read, offset, bytes.count))
        journal.entries.append((isCache, .read, offset, bytes.count))
        return true
    }

    /// Performs the held operation at `index` (its completion runs now).
    public func release(_ index: Int) {
        let operation = held.remove(at: index)
        operation.perform()
    }

    public func releaseAll() {
        while !held.isEmpty { release(0) }
    }

    public static func wrapper() -> (SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium) {
        { cache, backing, _ in
            let journal = Journal()
            return (ControlledMedium(cache, isCache: true, journal: journal), ControlledMedium(backing, isCache: false, journal: journal))
        }
    }
}

// MARK: - Power cut at the N-th media operation

/// Counts the operations both media of an engine perform and cuts the power just before the N-th,
/// wherever the engine is: between a backing write and its sync, between a segment write and the
/// record, inside a recovery's writeback...
public final class PowerCut {
    public init() {}

    /// Operations left before the cut; nil: no cut armed.
    public var remaining: Int?
    public var trigger: (() -> Void)?
    /// Set at the cut: the machine is dead, so the media of that engine answer nothing any more
    /// (what the dead engine would do next does not matter, and must not crash the test run).
    public private(set) var isCut = false

    /// Counts one operation; returns false when the power is off and the operation must vanish.
    public func count() -> Bool {
        guard !isCut else { return false }
        guard let left = remaining else { return true }
        if left <= 1 {
            remaining = nil
            isCut = true
            trigger?()
            return false
        }
        remaining = left - 1
        return true
    }

    /// A new engine starts on new media: the power is back.
    public func powerRestored() { isCut = false }

    public func wrapper() -> (SimulatedMedium, SimulatedMedium, any EventLoop) -> (any BlockMedium, any BlockMedium) {
        { cache, backing, _ in
            self.powerRestored()
            return (CuttingMedium(cache, self), CuttingMedium(backing, self))
        }
    }
}

public final class CuttingMedium: InterposedMedium {
    public let cut: PowerCut
    public init(_ inner: SimulatedMedium, _ cut: PowerCut) {
        self.cut = cut
        super.init(inner)
    }

    override public func interpose(_ kind: Kind, offset: UInt64, count: Int, _ perform: @escaping () -> Void) {
        guard cut.count() else { return }
        perform()
    }

    /// After the cut the machine is dead: nothing is read, inline or not.
    override public func readIfCached(offset: UInt64, into bytes: UnsafeMutableRawBufferPointer) -> Bool {
        guard !cut.isCut else { return false }
        return super.readIfCached(offset: offset, into: bytes)
    }
}
