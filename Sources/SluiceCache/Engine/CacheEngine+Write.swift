import NIOCore
import SluiceVolume
import SluiceFormat

/// Who asks for room in the open buffer: writers may not take the ring's last few free slots,
/// which are the cleaner's, so that relocation can always go on and free space.
enum SpaceClaimant {
    case writer
    case cleaner
    /// A clean copy of a read miss: takes no reserve and never waits.
    case reader
}

extension CacheEngine {
    /// Queues a write. It completes once it is in the buffer, or once it is durable when the
    /// durability policy says it must wait (FUA in volatile mode, every write in pmem mode).
    func submitWrite(offset: UInt64, data: ByteBuffer, fua: Bool, completion: @escaping (consuming VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        guard lifecycle.acceptsRequests else { return completion(.failed(.shuttingDown)) }
        precondition(offset % 512 == 0 && data.readableBytes % 512 == 0, "the server passes only sector-aligned writes")
        guard offset + UInt64(data.readableBytes) <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        updates.waiting.append(PendingUpdate(kind: .write(data: data, fua: fua), offset: offset, completion: completion))
        processWaitingUpdates()
        if updates.headWait.isForSlot { drive() }
    }

    enum ApplyOutcome {
        /// Done; the update's completion is due.
        case applied
        /// Waits for a free segment or a merge read; progress so far is kept in the update.
        case blocked
        /// Taken off the queue and finished elsewhere (a discard that failed).
        case handedOff
    }

    /// Applies waiting writes and discards in arrival order until one blocks. Re-entrant calls (a
    /// medium that completes synchronously) ask the running pass to go round again instead.
    func processWaitingUpdates() {
        guard updates.pass.begin() else { return }
        repeat {
            while !updates.mergeRead.isInFlight, failure == nil, var update = updates.waiting.first {
                let outcome: ApplyOutcome
                switch update.kind {
                case .write(let data, _): outcome = applyWrite(&update, data: data)
                case .discard: outcome = applyDiscard(&update)
                }
                if case .blocked = outcome {
                    updates.waiting.first = update
                    break
                }
                _ = updates.waiting.removeFirst()
                endHeadWait()
                if case .applied = outcome { finish(update) }
            }
        } while updates.pass.again() && failure == nil
        updates.pass.end()
        if failure != nil { failWaitingUpdates() }
    }

    private func finish(_ update: PendingUpdate) {
        updates.unsyncedWritesSinceBarrier = true
        switch update.kind {
        case .write(_, let fua), .discard(_, _, let fua):
            awaitDurability(durability.replyWait(fua: fua), update.completion)
        }
    }

    /// Applies as much of a write as fits, block by block.
    func applyWrite(_ update: inout PendingUpdate, data: ByteBuffer) -> ApplyOutcome {
        let total = data.readableBytes
        if case .undecided = update.writePath {
            update.writePath = chooseWritePath(offset: update.offset, lengthBytes: total)
            if case .undecided = update.writePath { return .blocked }
        }
        if case .bypassing = update.writePath { return applyBypassWrite(&update, data: data) }
        while update.appliedBytes < total {
            let pieceOffset = update.offset + UInt64(update.appliedBytes)
            let blockNumber = pieceOffset / UInt64(CacheGeometry.blockBytes)
            let firstSector = Int(pieceOffset % UInt64(CacheGeometry.blockBytes)) / CacheGeometry.sectorBytes
            let sectorCount = min(CacheGeometry.sectorsPerBlock - firstSector, (total - update.appliedBytes) / CacheGeometry.sectorBytes)
            let piece = WritePiece(blockNumber: blockNumber, sectorMask: UInt8(truncatingIfNeeded: ((1 << sectorCount) - 1) << firstSector),
                                   firstSector: firstSector, start: update.appliedBytes, lengthBytes: sectorCount * CacheGeometry.sectorBytes)
            guard let buffer = openBufferAccepting(blockNumber, for: .writer) else {
                if update.appliedBytes == 0 { counters.writesThrottled += 1 }
                return .blocked
            }
            // A read of this block in flight must not cache what it read (it may be older).
            if !fills.isEmpty { fills.poison(blockNumber) }
            // An old copy fetched for a merge is good only for the piece that asked for it, and only
            // while the index still points at it; any other outcome drops it, so a copy fetched from
            // a slot that is later reused is never merged into anything.
            var fetched: (position: CacheIndex.Position, block: ByteBuffer)?
            if case .fetched(let position, let block) = updates.mergeRead { fetched = (position, block) }
            updates.mergeRead = .none
            let applied: Bool = data.withUnsafeReadableBytes { raw in
                let sectors = UnsafeRawBufferPointer(rebasing: raw[piece.start..<(piece.start + piece.lengthBytes)])
                if buffer.dataIndex(of: blockNumber) != nil {
                    rewriteInOpenBuffer(buffer, piece, sectors)
                    return true
                }
                if let old = index.lookup(blockNumber), old.isDirty, old.sectorMask & ~piece.sectorMask != 0 {
                    return mergeWithOlderCopy(buffer, piece, sectors, old: old, fetched: fetched)
                }
                writeNewCopy(buffer, piece, sectors)
                return true
            }
            guard applied else { return .blocked }
            update.appliedBytes += piece.lengthBytes
            counters.userBytesWritten += UInt64(piece.lengthBytes)
            if buffer.isFull { sealOpenBuffer(isPartial: false) }
        }
        return .applied
    }

    /// One block's part of a write.
    struct WritePiece {
        var blockNumber: UInt64
        var sectorMask: UInt8
        var firstSector: Int
        /// Where the piece's bytes start in the write's data, and how many.
        var start: Int
        var lengthBytes: Int
        var isFullBlock: Bool { sectorMask == 0xFF }
    }

    /// The block is in the open buffer: the DRAM buffer updates it in place (its mask grows); the
    /// pmem buffer appends a merged copy, so the persisted one is never overwritten.
    private func rewriteInOpenBuffer(_ buffer: any WriteBuffer, _ piece: WritePiece, _ sectors: UnsafeRawBufferPointer) {
        let openSlot = ringSlot(of: buffer)
        let previousIndex = buffer.dataIndex(of: piece.blockNumber)!
        let previousPosition = CacheIndex.Position(firstPosition(ofSlot: openSlot) + previousIndex)
        let previousIsLive = index.resident(at: previousPosition) != nil
        let dataIndex = buffer.write(blockNumber: piece.blockNumber, sectorMask: piece.sectorMask, sectors: sectors)
        let position = CacheIndex.Position(firstPosition(ofSlot: openSlot) + dataIndex)
        let newMask = buffer.sectorMask(at: dataIndex)
        // The copy a writeback batch may have read from this place is no longer its data.
        batch?.rewrittenInPlace(piece.blockNumber)
        if dataIndex == previousIndex && previousIsLive {
            index.updateMask(at: position, to: newMask)
        } else {
            // A new copy, or the block was discarded earlier in this segment and is cached again.
            let replaced = index.insert(piece.blockNumber, sectorMask: newMask, at: position)
            precondition(replaced == (previousIsLive ? previousPosition : nil),
                         "a rewrite in the open buffer replaced another copy than the previous one")
        }
        counters.count(write: true, hit: true, inBuffer: true, fullBlock: piece.isFullBlock)
    }

    /// The newest copy is dirty, in a sealed segment, and holds sectors this write does not
    /// cover: merge them into the new copy so the index keeps exactly one, newest copy of the
    /// block. A clean copy needs no merge: the backing store holds its sectors. Returns false when
    /// the old copy must first be read from the cache device (never from the backing store).
    private func mergeWithOlderCopy(_ buffer: any WriteBuffer, _ piece: WritePiece, _ sectors: UnsafeRawBufferPointer,
                                    old: CacheIndex.Entry, fetched: (position: CacheIndex.Position, block: ByteBuffer)?) -> Bool {
        let oldSlot = slot(of: old.position)
        precondition(oldSlot != ringSlot(of: buffer), "a copy in the open buffer was not found there")
        var merged = [UInt8](repeating: 0, count: CacheGeometry.blockBytes)
        if let memory = bufferInMemory(ofSlot: oldSlot) {
            memory.withBlock(at: dataIndex(of: old.position)) { source in merged.withUnsafeMutableBytes { $0.copyMemory(from: source) } }
        } else if let fetched, fetched.position == old.position {
            fetched.block.withUnsafeReadableBytes { source in
                merged.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<CacheGeometry.blockBytes])) }
            }
        } else {
            startMergeRead(position: old.position)
            return false
        }
        merged.withUnsafeMutableBytes { target in
            (target.baseAddress! + piece.firstSector * CacheGeometry.sectorBytes).copyMemory(from: sectors.baseAddress!, byteCount: piece.lengthBytes)
        }
        let newMask = old.sectorMask | piece.sectorMask
        let dataIndex = merged.withUnsafeBytes { buffer.write(blockNumber: piece.blockNumber, sectorMask: newMask, block: $0) }
        let replaced = index.insert(piece.blockNumber, sectorMask: newMask,
                                    at: CacheIndex.Position(firstPosition(ofSlot: ringSlot(of: buffer)) + dataIndex))
        precondition(replaced == old.position, "the merged copy replaced another copy than the one merged")
        counters.count(write: true, hit: true, inBuffer: false, fullBlock: piece.isFullBlock)
        return true
    }

    /// Not cached, cached clean, or the new write covers every sector the old copy holds.
    private func writeNewCopy(_ buffer: any WriteBuffer, _ piece: WritePiece, _ sectors: UnsafeRawBufferPointer) {
        let dataIndex = buffer.write(blockNumber: piece.blockNumber, sectorMask: piece.sectorMask, sectors: sectors)
        let replaced = index.insert(piece.blockNumber, sectorMask: piece.sectorMask,
                                    at: CacheIndex.Position(firstPosition(ofSlot: ringSlot(of: buffer)) + dataIndex))
        counters.count(write: true, hit: replaced != nil, inBuffer: false, fullBlock: piece.isFullBlock)
    }

    /// Reads the old copy at `position` from the cache device for a merge; the head of the queue
    /// waits for it.
    private func startMergeRead(position: CacheIndex.Position) {
        precondition(!updates.mergeRead.isInFlight)
        let slot = slot(of: position)
        updates.mergeRead = .inFlight(position: position)
        ring.readerStarted(slot: slot)
        counters.mergeReads += 1
        cacheDevice.read(offset: geometry.offset(ofDataBlock: dataIndex(of: position), inSlot: slot), count: CacheGeometry.blockBytes) { result in
            self.readerFinished(slot: slot)
            switch result {
            case .success(let block):
                self.counters.cacheBytesRead += UInt64(CacheGeometry.blockBytes)
                self.updates.mergeRead = .fetched(position: position, block: block)
                self.drive()
            case .failure(let error):
                self.updates.mergeRead = .none
                self.fail(error, doing: "reading an old copy from the cache device to merge a partial write")
            }
        }
    }

    /// The open buffer if `blockNumber` fits in it; otherwise opens the next segment, if a ring slot
    /// and a buffer are free for `claimant`. Returns nil when the caller must wait.
    func openBufferAccepting(_ blockNumber: UInt64, for claimant: SpaceClaimant) -> (any WriteBuffer)? {
        if let buffer = buffers.open {
            if buffer.canAccept(blockNumber) { return buffer }
            sealOpenBuffer(isPartial: false)
        }
        return openNextSegment(for: claimant)
    }

    /// Opens segment `nextSegmentID` in its ring slot, if the slot is free and a buffer is idle.
    /// Writers leave the cleaner's reserve of slots alone.
    func openNextSegment(for claimant: SpaceClaimant) -> (any WriteBuffer)? {
        guard failure == nil, buffers.open == nil else { return nil }
        guard !buffers.free.isEmpty else {
            if claimant == .writer { beginHeadWait(forSlot: false) }
            return nil
        }
        guard ring.freeSegments > (claimant == .cleaner ? 0 : reserveSegments) else {
            if claimant == .writer { beginHeadWait(forSlot: true) }
            return nil
        }
        let buffer = buffers.free.removeLast()
        let id = ring.open(nowNs: clock.nowNs)
        let slot = ring.slot(of: id)
        precondition(index.liveBlocks(inSlot: slot) == 0, "segment \(id) reuses slot \(slot) while the index still points into it")
        buffer.open(segmentID: id)
        buffers.open = buffer
        return buffer
    }

    /// Seals the open buffer (if it holds anything) and starts writing it to its slot.
    func sealOpenBuffer(isPartial: Bool) {
        guard let buffer = buffers.open, !buffer.isEmpty else { return }
        buffers.open = nil
        let slot = ringSlot(of: buffer)
        let bytes = buffer.seal(cacheUUID: superblock.uuid, isPartial: isPartial)
        if isPartial { counters.partialSegments += 1 }
        buffers.sealed(buffer, slot: slot, bytes: bytes)
        startSegmentWriteIfReady(slot: slot)
    }

    /// The id of the newest segment holding an append: everything appended so far is durable once
    /// every segment up to it is.
    var newestAppendedSegmentID: UInt64 {
        if let open = buffers.open, !open.isEmpty { return open.segmentID }
        return (buffers.open?.segmentID ?? ring.nextSegmentID) - 1
    }

    /// Writes a sealed segment once no read of the slot's previous segment is in flight.
    func startSegmentWriteIfReady(slot: Int) {
        guard !ring.hasReaders(slot: slot), let (buffer, bytes) = buffers.takeWriteReady(slot: slot) else { return }
        writeSegment(id: buffer.segmentID, slot: slot, bytes: bytes)
    }

    /// Writes a sealed segment from its buffer's own memory, which stays untouched until the
    /// completion releases the buffer.
    private func writeSegment(id: UInt64, slot: Int, bytes: UnsafeRawBufferPointer) {
        let lengthBytes = bytes.count
        cacheDevice.write(offset: geometry.offset(ofSlot: slot), unownedBytes: bytes) { result in
            switch result {
            case .success:
                self.counters.cacheBytesWritten += UInt64(lengthBytes)
                self.counters.segmentsWritten += 1
                self.ring.written(id)
                self.buffers.written(slot: slot, segmentID: id, waitsForSync: self.durability.buffersWaitForSync)
                self.drive()
            case .failure(let error):
                self.fail(error, doing: "writing segment \(id) to the cache device")
            }
        }
    }

    /// A device read of `slot` finished; a segment write waiting for it may go.
    func readerFinished(slot: Int) {
        if ring.readerFinished(slot: slot) { startSegmentWriteIfReady(slot: slot) }
    }

    // MARK: Waiting for space

    /// The head of the queue starts waiting for a ring slot or a buffer.
    func beginHeadWait(forSlot: Bool) {
        switch updates.headWait {
        case .none: updates.headWait = forSlot ? .forSlot(sinceNs: clock.nowNs) : .forBuffer(sinceNs: clock.nowNs)
        case .forSlot(let since), .forBuffer(let since): updates.headWait = forSlot ? .forSlot(sinceNs: since) : .forBuffer(sinceNs: since)
        }
    }

    /// The head of the queue went on: its wait, if it had one, is counted.
    private func endHeadWait() {
        guard let since = updates.headWait.sinceNs else { return }
        updates.headWait = .none
        let waited = clock.nowNs &- since
        counters.writerStalls += 1
        counters.writerStallNs += waited
        counters.writerStallMaxNs = max(counters.writerStallMaxNs, waited)
    }
}
