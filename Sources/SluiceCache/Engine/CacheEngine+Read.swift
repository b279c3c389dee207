import NIOCore
import SluiceVolume
import SluiceFormat

extension CacheEngine {
    /// Reads `lengthBytes` at `offset` into `buffer` (appended at its writer index). Each block comes
    /// from the newest copy: the open or a sealed buffer in memory, the cache device, or the backing
    /// store; a partially cached block takes its cached sectors over the backing store's.
    ///
    /// Cached data in memory is copied before this returns and copies on the cache device cannot be
    /// overwritten while being read, so a read racing a write sees each block either wholly before
    /// or wholly after it.
    func submitRead(offset: UInt64, lengthBytes: Int, buffer: consuming ByteBuffer, completion: @escaping (consuming VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        precondition(offset % 512 == 0 && lengthBytes % 512 == 0, "the server passes only sector-aligned reads")
        guard offset + UInt64(lengthBytes) <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        // Taken over, not shared: the reply is filled in place, without copying the buffer.
        var reply = consume buffer
        let base = reply.writerIndex
        // Every byte of the range is filled below (from a buffer, the cache device or the backing store).
        reply.writeWithUnsafeMutableBytes(minimumWritableBytes: lengthBytes) { _ in lengthBytes }
        counters.userBytesRead += UInt64(lengthBytes)

        var plan = ReadPlan()
        if tunables.readPromoteHits == 0 || !effectiveCacheMode.cachesReads {
            plan.fillPolicy = .off
        } else if readAdmission.isSequential(offset: offset, lengthBytes: UInt64(lengthBytes), cutoffBytes: UInt64(tunables.sequentialCutoffBytes)) {
            plan.fillPolicy = .sequential
        } else {
            plan.fillPolicy = .admitted
        }
        let inline = readWholeBlocksInline(offset: offset, lengthBytes: lengthBytes, into: &reply, base: base)
        if inline == .done { return completion(.data(consume reply)) }
        for piece in BlockSplit(offset: offset, lengthBytes: UInt64(lengthBytes)) {
            planBlock(piece, into: &plan, reply: &reply, base: base)
        }
        let fetches = plan.finished()
        guard !fetches.isEmpty else { return completion(.data(consume reply)) }
        let fills = plan.fills
        var finish = completion
        if !fills.isEmpty {
            finish = { (reply: consuming VolumeReply) in
                self.completeFills(fills, reply: reply, base: base, source: .read)
                completion(consume reply)
            }
        }
        // The page cache lacked the blocks a moment ago: asking again would only cost a call.
        submitFetches(fetches, assembly: ReadAssembly(reply: reply, base: base, outstanding: fetches.count, completion: finish),
                      tryInline: inline != .notInMemory)
    }

    /// What ``readWholeBlocksInline(offset:lengthBytes:into:base:)`` did.
    private enum InlineRead {
        case done
        /// Not every block is cached whole on the cache device in one run of positions.
        case notEligible
        /// They are, but the medium did not have them in memory.
        case notInMemory
    }

    /// The common hit, without a plan: every block of the read is cached whole on the cache device
    /// at consecutive positions of one ring slot, and the medium has them in memory, so one
    /// system call copies them into the reply. Otherwise it changes nothing but the reply's bytes,
    /// which the plan then fills.
    private func readWholeBlocksInline(offset: UInt64, lengthBytes: Int, into reply: inout ByteBuffer, base: Int) -> InlineRead {
        guard lengthBytes > 0, offset % UInt64(CacheGeometry.blockBytes) == 0, lengthBytes % CacheGeometry.blockBytes == 0 else { return .notEligible }
        let firstBlock = offset / UInt64(CacheGeometry.blockBytes)
        let blockCount = lengthBytes / CacheGeometry.blockBytes
        guard let first = index.lookup(firstBlock), first.sectorMask == 0xFF else { return .notEligible }
        let cacheSlot = slot(of: first.position)
        guard bufferInMemory(ofSlot: cacheSlot) == nil,
              dataIndex(of: first.position) + blockCount <= geometry.dataBlocksPerSegment else { return .notEligible }
        for block in 1..<blockCount {
            guard let entry = index.lookup(firstBlock + UInt64(block)), entry.sectorMask == 0xFF,
                  entry.position == first.position + CacheIndex.Position(block) else { return .notEligible }
        }
        let mediumOffset = geometry.offset(ofDataBlock: dataIndex(of: first.position), inSlot: cacheSlot)
        let start = base - reply.readerIndex
        let done = reply.withUnsafeMutableReadableBytes { raw in
            cacheDevice.readIfCached(offset: mediumOffset, into: UnsafeMutableRawBufferPointer(rebasing: raw[start..<(start + lengthBytes)]))
        }
        guard done else { return .notInMemory }
        for block in 0..<blockCount {
            counters.count(write: false, hit: true, inBuffer: false, fullBlock: true)
            index.noteHit(at: first.position + CacheIndex.Position(block))
        }
        counters.cacheBytesRead += UInt64(lengthBytes)
        counters.cacheReadsInline += 1
        return .done
    }

    /// Serves one block of a read: sectors cached in memory are copied into the reply now, sectors
    /// on the cache device or the backing store join the plan's fetches, and sectors whose trim is
    /// being passed down read as zeros.
    private func planBlock(_ piece: BlockSplit.Piece, into plan: inout ReadPlan, reply: inout ByteBuffer, base: Int) {
        let firstSector = piece.sectorMask.trailingZeroBitCount
        // Request offset of sector 0 of this block (may lie before the request for its first block).
        let blockRequestOffset = piece.requestOffset - firstSector * CacheGeometry.sectorBytes
        var backingMask = piece.sectorMask
        if let entry = index.lookup(piece.blockNumber) {
            let covered = entry.sectorMask & piece.sectorMask
            backingMask = piece.sectorMask & ~entry.sectorMask
            let cacheSlot = slot(of: entry.position)
            let dataIndex = self.dataIndex(of: entry.position)
            let memory = bufferInMemory(ofSlot: cacheSlot)
            counters.count(write: false, hit: true, inBuffer: memory != nil, fullBlock: piece.sectorMask == 0xFF)
            index.noteHit(at: entry.position)
            if covered != 0, let memory {
                memory.withBlock(at: dataIndex) { block in
                    forEachSectorRun(covered) { sector, count in
                        reply.setBytes(UnsafeRawBufferPointer(rebasing: block[(sector * 512)..<((sector + count) * 512)]),
                                       at: base + blockRequestOffset + sector * 512)
                    }
                }
            } else if covered != 0 {
                plan.addDeviceBlock(piece.blockNumber, isClean: !entry.isDirty, position: entry.position, slot: cacheSlot,
                                    mediumOffset: geometry.offset(ofDataBlock: dataIndex, inSlot: cacheSlot),
                                    sectors: covered, blockRequestOffset: blockRequestOffset)
            }
        } else {
            counters.count(write: false, hit: false, inBuffer: false, fullBlock: piece.sectorMask == 0xFF)
        }
        if backingMask != 0, discards.isBeingDiscarded(piece.blockNumber) {
            // A trim or write-zeroes of this block is being passed down: zeros, not the
            // backing store's old data.
            forEachSectorRun(backingMask) { sector, count in
                reply.setRepeatingByte(0, count: count * 512, at: base + blockRequestOffset + sector * 512)
            }
            backingMask = 0
        }
        if backingMask == 0xFF {
            considerFill(piece.blockNumber, replyOffset: blockRequestOffset, plan: &plan)
        }
        if backingMask != 0 {
            plan.addBackingBlock(mediumOffset: piece.blockNumber * UInt64(CacheGeometry.blockBytes),
                                 sectors: backingMask, blockRequestOffset: blockRequestOffset)
        } else {
            plan.endBackingRun()
        }
    }

    /// Submits a read's fetches; the assembly replies once the last has arrived.
    private func submitFetches(_ fetches: [ReadFetch], assembly: ReadAssembly, tryInline: Bool = true) {
        for fetch in fetches {
            // Backing reads cover whole blocks; the last one may pass the end of a volume whose size
            // is not a multiple of 4 KiB.
            let count = fetch.fromBacking ? Int(min(UInt64(fetch.count), volumeSizeBytes - fetch.mediumOffset)) : fetch.count
            if fetch.fromBacking {
                backingLoad.begin(nowNs: clock.nowNs)
            } else {
                if tryInline, assembly.readInline(fetch, from: cacheDevice) {
                    counters.cacheBytesRead += UInt64(count)
                    counters.cacheReadsInline += 1
                    continue
                }
                ring.readerStarted(slot: fetch.slot)
            }
            let medium = fetch.fromBacking ? backingStore : cacheDevice
            medium.read(offset: fetch.mediumOffset, count: count) { result in
                if fetch.fromBacking {
                    self.backingLoad.end(nowNs: self.clock.nowNs)
                    self.counters.backingBytesRead += UInt64(count)
                } else {
                    self.readerFinished(slot: fetch.slot)
                    self.counters.cacheBytesRead += UInt64(count)
                    if case .failure(let error) = result {
                        self.cacheDeviceFailed(error, doing: "reading cached blocks for a client read")
                        if fetch.allClean, !fetch.blocks.isEmpty, !self.lifecycle.isPoweredOff { return self.retryFromBacking(fetch, assembly: assembly) }
                    }
                }
                assembly.fetched(fetch, result: result)
            }
        }
    }
}

/// The fetches of one client read, built block by block: blocks at consecutive positions of one
/// ring slot on the cache device, and consecutive blocks of the backing store, each share one fetch.
struct ReadPlan {
    private var fetches: [ReadFetch] = []
    /// Whole blocks read from the backing store that may become clean copies, and where their
    /// data is in the reply.
    private(set) var fills: [(blockNumber: UInt64, replyOffset: Int)] = []
    /// Whether this read may cache what it misses.
    enum FillPolicy {
        /// Read caching is off (`read_promote_hits` 0).
        case off
        /// The read is part of a stream beyond the sequential cutoff.
        case sequential
        /// Misses may be cached, as promotion decides.
        case admitted
    }

    var fillPolicy = FillPolicy.off
    private var backingRun: ReadFetch?
    private var deviceRun: ReadFetch?
    private var deviceRunNextPosition: CacheIndex.Position = 0

    mutating func addDeviceBlock(_ blockNumber: UInt64, isClean: Bool, position: CacheIndex.Position, slot: Int, mediumOffset: UInt64,
                                 sectors: UInt8, blockRequestOffset: Int) {
        if deviceRun == nil || deviceRunNextPosition != position || deviceRun!.slot != slot {
            if let run = deviceRun { fetches.append(run) }
            deviceRun = ReadFetch(fromBacking: false, mediumOffset: mediumOffset, count: 0, slot: slot)
        }
        deviceRun!.addBlock(sectors: sectors, blockRequestOffset: blockRequestOffset)
        deviceRun!.blocks.append((blockNumber, sectors, blockRequestOffset))
        if !isClean { deviceRun!.allClean = false }
        deviceRunNextPosition = position + 1
    }

    mutating func addBackingBlock(mediumOffset: UInt64, sectors: UInt8, blockRequestOffset: Int) {
        if let run = backingRun, run.mediumOffset + UInt64(run.count) != mediumOffset {
            endBackingRun()
        }
        if backingRun == nil {
            backingRun = ReadFetch(fromBacking: true, mediumOffset: mediumOffset, count: 0, slot: -1)
        }
        backingRun!.addBlock(sectors: sectors, blockRequestOffset: blockRequestOffset)
    }

    mutating func addFill(_ blockNumber: UInt64, replyOffset: Int) {
        fills.append((blockNumber, replyOffset))
    }

    /// A block that needs nothing from the backing store ends its run there.
    mutating func endBackingRun() {
        if let run = backingRun { fetches.append(run) }
        backingRun = nil
    }

    mutating func finished() -> [ReadFetch] {
        if let run = deviceRun { fetches.append(run) }
        endBackingRun()
        deviceRun = nil
        return fetches
    }
}

/// One read from a medium for a client read, and where its bytes go in the reply.
struct ReadFetch {
    var fromBacking: Bool
    var mediumOffset: UInt64
    var count: Int
    var slot: Int
    /// (offset in the fetched bytes, offset in the request, length), merged when contiguous.
    var spans: [(source: Int, target: Int, length: Int)] = []
    /// A cache-device fetch: its blocks, and whether every one is a clean copy (the backing store
    /// holds the same data, so a failed read is retried there).
    var blocks: [(blockNumber: UInt64, sectors: UInt8, blockRequestOffset: Int)] = []
    var allClean = true

    /// Appends one whole block to the fetch; `sectors` of it go into the reply.
    mutating func addBlock(sectors: UInt8, blockRequestOffset: Int) {
        let fetchOffset = count
        count += CacheGeometry.blockBytes
        forEachSectorRun(sectors) { sector, sectorCount in
            addSpan(source: fetchOffset + sector * 512, target: blockRequestOffset + sector * 512, length: sectorCount * 512)
        }
    }

    mutating func addSpan(source: Int, target: Int, length: Int) {
        if let last = spans.last, last.source + last.length == source, last.target + last.length == target {
            spans[spans.count - 1].length += length
        } else {
            spans.append((source, target, length))
        }
    }
}

extension CacheEngine {
    /// A cache-device read of clean copies failed: the backing store holds the same data, so each
    /// block is read from there instead (a dirty copy's failure fails the read: its data is only
    /// on the cache device).
    fileprivate func retryFromBacking(_ failed: ReadFetch, assembly: ReadAssembly) {
        var retries: [ReadFetch] = []
        for block in failed.blocks {
            var fetch = ReadFetch(fromBacking: true, mediumOffset: block.blockNumber * UInt64(CacheGeometry.blockBytes), count: 0, slot: -1)
            fetch.addBlock(sectors: block.sectors, blockRequestOffset: block.blockRequestOffset)
            retries.append(fetch)
        }
        counters.readsRetriedFromBacking += UInt64(retries.count)
        assembly.replace(withFetches: retries.count)
        submitFetches(retries, assembly: assembly)
    }
}

/// Gathers the parts of one client read and completes it when the last arrives.
final class ReadAssembly {
    private var reply: ByteBuffer
    private let base: Int
    private var outstanding: Int
    private var failure: MediumError?
    private let completion: (consuming VolumeReply) -> Void

    init(reply: ByteBuffer, base: Int, outstanding: Int, completion: @escaping (consuming VolumeReply) -> Void) {
        self.reply = reply
        self.base = base
        self.outstanding = outstanding
        self.completion = completion
    }

    /// Reads a cache-device fetch that is one contiguous span of the reply straight into the reply,
    /// if the medium has it in memory; true when done (the fetch then counts as arrived).
    func readInline(_ fetch: ReadFetch, from medium: any BlockMedium) -> Bool {
        guard fetch.spans.count == 1, fetch.spans[0].source == 0, fetch.spans[0].length == fetch.count else { return false }
        let start = base + fetch.spans[0].target - reply.readerIndex
        let done = reply.withUnsafeMutableReadableBytes { raw in
            medium.readIfCached(offset: fetch.mediumOffset, into: UnsafeMutableRawBufferPointer(rebasing: raw[start..<(start + fetch.count)]))
        }
        guard done else { return false }
        outstanding -= 1
        if outstanding == 0 { finish() }
        return true
    }

    /// One fetch is replaced by `count` others (a retry from the backing store).
    func replace(withFetches count: Int) {
        outstanding += count - 1
    }

    func fetched(_ fetch: ReadFetch, result: Result<ByteBuffer, MediumError>) {
        switch result {
        case .success(let bytes):
            bytes.withUnsafeReadableBytes { source in
                for span in fetch.spans where span.source < source.count {
                    let length = min(span.length, source.count - span.source)
                    reply.setBytes(UnsafeRawBufferPointer(rebasing: source[span.source..<(span.source + length)]), at: base + span.target)
                }
            }
        case .failure(let error):
            if failure == nil { failure = error }
        }
        outstanding -= 1
        if outstanding == 0 { finish() }
    }

    private func finish() {
        if let failure {
            completion(.failed(.io(errno: failure.errnoValue)))
        } else {
            // Handed over, not shared: the server then sets the reply's header in place.
            let data = reply
            reply = ByteBuffer()
            completion(.data(consume data))
        }
    }
}

// MARK: - Read caching

extension CacheEngine {
    /// A whole block this read takes from the backing store: it becomes a clean copy once read,
    /// if the admission says so and nothing writes or discards it meanwhile.
    fileprivate func considerFill(_ blockNumber: UInt64, replyOffset: Int, plan: inout ReadPlan) {
        switch plan.fillPolicy {
        case .off: return
        case .sequential:
            counters.readFillsSkippedSequential += 1
            return
        case .admitted: break
        }
        guard !bypass.covers(blockNumber) else {
            counters.readFillsSkippedRaced += 1
            return
        }
        guard readAdmission.promotes(blockNumber, promoteHits: tunables.readPromoteHits) else {
            counters.readFillsSkippedNotPromoted += 1
            return
        }
        fills.begin(blockNumber)
        plan.addFill(blockNumber, replyOffset: replyOffset)
    }

    /// What a clean copy is a copy of.
    enum FillSource {
        /// A read miss.
        case read
        /// A writethrough write, once the backing store has it.
        case writeThrough
    }

    /// The read's (or writethrough write's) data has arrived, or failed: each block not written,
    /// discarded or cached meanwhile is appended to the open buffer as a clean copy, if there is
    /// room without waiting and without taking space writers need.
    func completeFills(_ candidates: [(blockNumber: UInt64, replyOffset: Int)], reply: VolumeReply, base: Int, source: FillSource) {
        eventLoop.preconditionInEventLoop()
        for candidate in candidates {
            let untouched = fills.end(candidate.blockNumber)
            guard case .data(let data) = reply else { continue }
            guard untouched, index.lookup(candidate.blockNumber) == nil else {
                if source == .read { counters.readFillsSkippedRaced += 1 }
                continue
            }
            guard let buffer = bufferForFill(candidate.blockNumber, source: source) else {
                if source == .read { counters.readFillsSkippedNoRoom += 1 }
                continue
            }
            let (_, replaced) = data.withUnsafeReadableBytes { raw in
                let start = base - data.readerIndex + candidate.replyOffset
                return appendCleanCopy(candidate.blockNumber, UnsafeRawBufferPointer(rebasing: raw[start..<(start + CacheGeometry.blockBytes)]),
                                       to: buffer)
            }
            precondition(replaced == nil, "a clean copy of block \(candidate.blockNumber) replaced a copy in the cache")
            switch source {
            case .read: counters.readFills += 1
            case .writeThrough: counters.writeThroughCopies += 1
            }
        }
    }

    /// Appends a whole clean copy of `blockNumber` to `buffer` and indexes it clean (a read's, a
    /// writethrough write's, or one the cleaner moves). Returns its position and the position of
    /// the copy it replaced, if any.
    func appendCleanCopy(_ blockNumber: UInt64, _ block: UnsafeRawBufferPointer, to buffer: any WriteBuffer)
        -> (position: CacheIndex.Position, replaced: CacheIndex.Position?) {
        let dataIndex = buffer.writeClean(blockNumber: blockNumber, block: block)
        let position = CacheIndex.Position(firstPosition(ofSlot: ringSlot(of: buffer)) + dataIndex)
        let replaced = index.insert(blockNumber, sectorMask: 0xFF, at: position)
        index.markClean(at: position)
        if buffer.isFull { sealOpenBuffer(isPartial: false) }
        return (position, replaced)
    }

    /// The open buffer, or a new one, for a clean copy: never while writes wait for space (their
    /// order and their room come first; a read's copy waits for no queued write at all), never
    /// from the cleaner's reserve or the last free slots.
    private func bufferForFill(_ blockNumber: UInt64, source: FillSource) -> (any WriteBuffer)? {
        guard failure == nil, lifecycle.acceptsRequests, updates.headWait.sinceNs == nil else { return nil }
        if source == .read && !updates.waiting.isEmpty { return nil }
        if let open = buffers.open, open.canAccept(blockNumber) { return open }
        guard !spaceIsShort, !buffers.free.isEmpty || buffers.open != nil else { return nil }
        return openBufferAccepting(blockNumber, for: .reader)
    }
}
