import NIOCore
import SluiceVolume
import SluiceFormat

extension CacheEngine {
    /// Queues a write. It completes once it is in the buffer, or, with `fua`, once a barrier has
    /// made it durable on the cache device.
    func submitWrite(offset: UInt64, data: ByteBuffer, fua: Bool, completion: @escaping (VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        if let failure { return completion(.failed(.io(errno: failure.errnoValue))) }
        if isClosing { return completion(.failed(.shuttingDown)) }
        precondition(offset % 512 == 0 && data.readableBytes % 512 == 0, "the server passes only sector-aligned writes")
        guard offset + UInt64(data.readableBytes) <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        waitingUpdates.append(PendingUpdate(kind: .write(data: data, fua: fua), offset: offset, completion: completion))
        processWaitingUpdates()
    }

    enum ApplyOutcome {
        /// Done; the update's completion is due.
        case applied
        /// Waits for a free segment or a merge read; progress so far is kept in the update.
        case blocked
        /// Taken off the queue and finished elsewhere (a discard waiting for writeback).
        case handedOff
    }

    /// Applies waiting writes and discards in arrival order until one blocks. Re-entrant calls (a
    /// medium that completes synchronously) ask the running pass to go round again instead.
    func processWaitingUpdates() {
        if isProcessingUpdates {
            updatesNeedAnotherPass = true
            return
        }
        isProcessingUpdates = true
        defer { isProcessingUpdates = false }
        repeat {
            updatesNeedAnotherPass = false
            while !mergeReadInFlight, failure == nil, var update = waitingUpdates.first {
                let outcome: ApplyOutcome
                switch update.kind {
                case .write(let data, _): outcome = applyWrite(&update, data: data)
                case .discard: outcome = applyDiscard(&update)
                }
                if case .blocked = outcome {
                    waitingUpdates.first = update
                    break
                }
                _ = waitingUpdates.removeFirst()
                if case .applied = outcome { finish(update) }
            }
        } while updatesNeedAnotherPass && failure == nil
        if failure != nil { failWaitingUpdates() }
        if isClosing { closingProgressed() }
    }

    private func finish(_ update: PendingUpdate) {
        unsyncedWritesSinceBarrier = true
        switch update.kind {
        case .write(_, let fua), .discard(_, _, let fua):
            if isPmemMode {
                // Every write is persisted before its reply, so a FUA write needs nothing more.
                addPersistWaiter(update.completion)
            } else if fua {
                addBarrierWaiter(update.completion)
            } else {
                update.completion(.done)
            }
        }
    }

    /// Applies as much of a write as fits, block by block.
    func applyWrite(_ update: inout PendingUpdate, data: ByteBuffer) -> ApplyOutcome {
        let total = data.readableBytes
        while update.appliedBytes < total {
            let pieceOffset = update.offset + UInt64(update.appliedBytes)
            let blockNumber = pieceOffset / UInt64(CacheGeometry.blockBytes)
            let firstSector = Int(pieceOffset % UInt64(CacheGeometry.blockBytes)) / SegmentBuffer.sectorBytes
            let sectorCount = min(SegmentBuffer.sectorsPerBlock - firstSector, (total - update.appliedBytes) / SegmentBuffer.sectorBytes)
            let mask = UInt8(truncatingIfNeeded: ((1 << sectorCount) - 1) << firstSector)
            let lengthBytes = sectorCount * SegmentBuffer.sectorBytes
            guard let buffer = openBufferAccepting(blockNumber) else {
                if update.appliedBytes == 0 { counters.writesThrottled += 1 }
                return .blocked
            }
            let openSlot = geometry.slot(ofSegment: buffer.segmentID)
            let isFullBlock = mask == 0xFF
            // An old copy fetched for a merge is good only for the piece that asked for it, and only
            // while the index still points at it; any other outcome drops it below, so a copy
            // fetched from a slot that is later reused is never merged into anything.
            let fetched = fetchedOldCopy
            fetchedOldCopy = nil
            let start = data.readerIndex + update.appliedBytes

            let oldCopy = buffer.dataIndex(of: blockNumber) == nil ? index.lookup(blockNumber) : nil
            if let previousIndex = buffer.dataIndex(of: blockNumber) {
                // Still in the open buffer: the DRAM buffer updates it in place; the pmem buffer
                // appends a merged copy, so the persisted one is never overwritten.
                let previousPosition = CacheIndex.Position(firstPosition(ofSlot: openSlot) + previousIndex)
                let previousIsLive = index.resident(at: previousPosition) != nil
                let dataIndex = data.withUnsafeReadableBytes { raw in
                    buffer.write(blockNumber: blockNumber, sectorMask: mask,
                                 sectors: UnsafeRawBufferPointer(rebasing: raw[(start - data.readerIndex)..<(start - data.readerIndex + lengthBytes)]))
                }
                let position = CacheIndex.Position(firstPosition(ofSlot: openSlot) + dataIndex)
                let newMask = buffer.sectorMask(at: dataIndex)
                if dataIndex == previousIndex && previousIsLive {
                    index.updateMask(at: position, to: newMask)
                } else {
                    // A new copy, or the block was discarded earlier in this segment and is cached again.
                    let replaced = index.insert(blockNumber, sectorMask: newMask, at: position)
                    precondition(replaced == (previousIsLive ? previousPosition : nil),
                                 "a rewrite in the open buffer replaced another copy than the previous one")
                }
                counters.count(write: true, hit: true, inBuffer: true, fullBlock: isFullBlock)
            } else if let old = oldCopy, old.sectorMask & ~mask != 0 {
                // The old copy holds sectors this write does not cover: merge them into the new copy
                // so that the index keeps exactly one, newest copy of the block.
                let oldSlot = slot(of: old.position)
                let oldDataIndex = Int(old.position) - firstPosition(ofSlot: oldSlot)
                precondition(oldSlot != openSlot, "a copy in the open buffer was not found there")
                var merged = [UInt8](repeating: 0, count: CacheGeometry.blockBytes)
                if let sealed = sealedBySlot[oldSlot] {
                    sealed.withBlock(at: oldDataIndex) { source in merged.withUnsafeMutableBytes { $0.copyMemory(from: source) } }
                } else if let fetched, fetched.position == old.position {
                    fetched.block.withUnsafeReadableBytes { source in
                        merged.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[0..<CacheGeometry.blockBytes])) }
                    }
                } else {
                    startMergeRead(position: old.position)
                    return .blocked
                }
                data.withUnsafeReadableBytes { raw in
                    merged.withUnsafeMutableBytes { target in
                        (target.baseAddress! + firstSector * SegmentBuffer.sectorBytes)
                            .copyMemory(from: raw.baseAddress! + (start - data.readerIndex), byteCount: lengthBytes)
                    }
                }
                let newMask = old.sectorMask | mask
                let dataIndex = merged.withUnsafeBytes { buffer.write(blockNumber: blockNumber, sectorMask: newMask, block: $0) }
                let replaced = index.insert(blockNumber, sectorMask: newMask,
                                            at: CacheIndex.Position(firstPosition(ofSlot: openSlot) + dataIndex))
                precondition(replaced == old.position, "the merged copy replaced another copy than the one merged")
                counters.count(write: true, hit: true, inBuffer: false, fullBlock: isFullBlock)
            } else {
                // Not cached, or the new write covers every sector the old copy holds.
                let hit = oldCopy != nil
                let dataIndex = data.withUnsafeReadableBytes { raw in
                    buffer.write(blockNumber: blockNumber, sectorMask: mask,
                                 sectors: UnsafeRawBufferPointer(rebasing: raw[(start - data.readerIndex)..<(start - data.readerIndex + lengthBytes)]))
                }
                index.insert(blockNumber, sectorMask: mask, at: CacheIndex.Position(firstPosition(ofSlot: openSlot) + dataIndex))
                counters.count(write: true, hit: hit, inBuffer: false, fullBlock: isFullBlock)
            }
            update.appliedBytes += lengthBytes
            counters.userBytesWritten += UInt64(lengthBytes)
            if buffer.isFull { sealOpenBuffer(isPartial: false) }
        }
        return .applied
    }

    /// Reads the old copy at `position` from the cache device for a merge; the head of the queue
    /// waits for it.
    private func startMergeRead(position: CacheIndex.Position) {
        precondition(!mergeReadInFlight)
        let slot = slot(of: position)
        let dataIndex = Int(position) - firstPosition(ofSlot: slot)
        mergeReadInFlight = true
        readersPerSlot[slot] += 1
        counters.mergeReads += 1
        cacheDevice.read(offset: geometry.offset(ofDataBlock: dataIndex, inSlot: slot), count: CacheGeometry.blockBytes) { result in
            self.readerFinished(slot: slot)
            self.mergeReadInFlight = false
            switch result {
            case .success(let block):
                self.counters.cacheBytesRead += UInt64(CacheGeometry.blockBytes)
                self.fetchedOldCopy = (position, block)
                self.processWaitingUpdates()
            case .failure(let error):
                self.fail(error, doing: "reading an old copy from the cache device to merge a partial write")
            }
        }
    }

    /// The open buffer if `blockNumber` fits in it; otherwise opens the next segment, if a ring slot
    /// and a buffer are free. Returns nil when writes must wait for writeback or a segment write.
    func openBufferAccepting(_ blockNumber: UInt64) -> (any WriteBuffer)? {
        if let buffer = openBuffer {
            if buffer.canAccept(blockNumber) { return buffer }
            sealOpenBuffer(isPartial: false)
        }
        return openNextSegment()
    }

    /// Opens segment `nextSegmentID` in its ring slot, if the slot is free and a buffer is idle.
    func openNextSegment() -> (any WriteBuffer)? {
        guard failure == nil, openBuffer == nil, !freeBuffers.isEmpty else { return nil }
        guard nextSegmentID - lastWrittenBackID <= UInt64(geometry.segmentCount) else {
            // The ring is full: writeback must free the oldest segment first.
            isWaitingForRing = true
            kickWriteback()
            return nil
        }
        isWaitingForRing = false
        let buffer = freeBuffers.removeLast()
        let id = nextSegmentID
        nextSegmentID += 1
        let slot = geometry.slot(ofSegment: id)
        let first = firstPosition(ofSlot: slot)
        for position in first..<(first + geometry.dataBlocksPerSegment) {
            precondition(index.resident(at: CacheIndex.Position(position)) == nil,
                         "segment \(id) reuses slot \(slot) while the index still points into it")
        }
        precondition(sealedBySlot[slot] == nil, "slot \(slot) is still being written")
        buffer.open(segmentID: id)
        openBuffer = buffer
        return buffer
    }

    /// Seals the open buffer (if it holds anything) and starts writing it to its slot.
    func sealOpenBuffer(isPartial: Bool) {
        guard let buffer = openBuffer, !buffer.isEmpty else { return }
        openBuffer = nil
        let id = buffer.segmentID
        let slot = geometry.slot(ofSegment: id)
        let bytes = buffer.seal(cacheUUID: superblock.uuid, isPartial: isPartial)
        if isPartial { counters.partialSegments += 1 }
        sealedBySlot[slot] = buffer
        segmentWritesWaiting[slot] = bytes
        startSegmentWriteIfReady(slot: slot)
    }

    /// Writes a sealed segment once no read of the slot's previous segment is in flight.
    func startSegmentWriteIfReady(slot: Int) {
        guard readersPerSlot[slot] == 0, let buffer = sealedBySlot[slot], segmentWritesWaiting[slot] != nil else { return }
        let bytes = segmentWritesWaiting.removeValue(forKey: slot)!
        writeSegment(id: buffer.segmentID, slot: slot, bytes: bytes)
    }

    /// Writes a sealed segment from its buffer's own memory, which stays untouched until the
    /// completion returns the buffer to the free list.
    func writeSegment(id: UInt64, slot: Int, bytes: UnsafeRawBufferPointer) {
        let lengthBytes = bytes.count
        cacheDevice.write(offset: geometry.offset(ofSlot: slot), unownedBytes: bytes) { result in
            switch result {
            case .success:
                self.counters.cacheBytesWritten += UInt64(lengthBytes)
                self.counters.segmentsWritten += 1
                guard let buffer = self.sealedBySlot.removeValue(forKey: slot) else {
                    preconditionFailure("segment \(id) was written but its buffer is gone")
                }
                precondition(buffer.segmentID == id)
                self.markWritten(id)
                if self.isPmemMode {
                    // The pmem area holds the only durable copy until the device has synced it.
                    self.buffersAwaitingSync.append(buffer)
                } else {
                    buffer.reset()
                    self.freeBuffers.append(buffer)
                }
                self.driveBarriers()
                self.kickWriteback()
                self.processWaitingUpdates()
            case .failure(let error):
                self.fail(error, doing: "writing segment \(id) to the cache device")
            }
        }
    }

    private func markWritten(_ id: UInt64) {
        guard id == writtenThroughID + 1 else {
            precondition(id > writtenThroughID, "segment \(id) written twice")
            writtenAheadIDs.insert(id)
            return
        }
        writtenThroughID = id
        while writtenAheadIDs.remove(writtenThroughID + 1) != nil { writtenThroughID += 1 }
    }

    /// A device read of `slot` finished; a segment write waiting for it may go.
    func readerFinished(slot: Int) {
        precondition(readersPerSlot[slot] > 0)
        readersPerSlot[slot] -= 1
        if readersPerSlot[slot] == 0 { startSegmentWriteIfReady(slot: slot) }
    }
}
