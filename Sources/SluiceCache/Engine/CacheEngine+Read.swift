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
    func submitRead(offset: UInt64, lengthBytes: Int, buffer: ByteBuffer, completion: @escaping (VolumeReply) -> Void) {
        eventLoop.preconditionInEventLoop()
        precondition(offset % 512 == 0 && lengthBytes % 512 == 0, "the server passes only sector-aligned reads")
        guard offset + UInt64(lengthBytes) <= volumeSizeBytes else { return completion(.failed(.outOfRange)) }
        var reply = buffer
        let base = reply.writerIndex
        // Every byte of the range is filled below (from a buffer, the cache device or the backing store).
        reply.writeWithUnsafeMutableBytes(minimumWritableBytes: lengthBytes) { _ in lengthBytes }
        counters.userBytesRead += UInt64(lengthBytes)

        var fetches: [ReadFetch] = []
        var backingRun: ReadFetch?
        var deviceRun: ReadFetch?
        var deviceRunNextPosition: CacheIndex.Position = 0

        for piece in BlockSplit(offset: offset, lengthBytes: UInt64(lengthBytes)) {
            let firstSector = piece.sectorMask.trailingZeroBitCount
            // Request offset of sector 0 of this block (may lie before the request for its first block).
            let blockRequestOffset = piece.requestOffset - firstSector * CacheGeometry.sectorBytes
            var backingMask = piece.sectorMask
            if let entry = index.lookup(piece.blockNumber) {
                let position = entry.position
                let covered = entry.sectorMask & piece.sectorMask
                backingMask = piece.sectorMask & ~entry.sectorMask
                let cacheSlot = self.slot(of: position)
                let dataIndex = self.dataIndex(of: position)
                let memory = ring.segmentID(inSlot: cacheSlot).flatMap { buffers.inMemory(slot: cacheSlot, segmentID: $0) }
                counters.count(write: false, hit: true, inBuffer: memory != nil, fullBlock: piece.sectorMask == 0xFF)
                if covered != 0 {
                    if let memory {
                        memory.withBlock(at: dataIndex) { block in
                            forEachSectorRun(covered) { sector, count in
                                reply.setBytes(UnsafeRawBufferPointer(rebasing: block[(sector * 512)..<((sector + count) * 512)]),
                                               at: base + blockRequestOffset + sector * 512)
                            }
                        }
                    } else {
                        // Coalesce with the previous block when it is the next position on the device.
                        if deviceRun == nil || deviceRunNextPosition != position || deviceRun!.slot != cacheSlot {
                            if let run = deviceRun { fetches.append(run) }
                            deviceRun = ReadFetch(fromBacking: false, mediumOffset: geometry.offset(ofDataBlock: dataIndex, inSlot: cacheSlot),
                                                  count: 0, slot: cacheSlot)
                        }
                        let fetchOffset = deviceRun!.count
                        deviceRun!.count += CacheGeometry.blockBytes
                        forEachSectorRun(covered) { sector, count in
                            deviceRun!.addSpan(source: fetchOffset + sector * 512, target: blockRequestOffset + sector * 512, length: count * 512)
                        }
                        deviceRunNextPosition = position + 1
                    }
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
            if backingMask != 0 {
                let blockOffset = piece.blockNumber * UInt64(CacheGeometry.blockBytes)
                if let run = backingRun, run.mediumOffset + UInt64(run.count) != blockOffset {
                    fetches.append(run)
                    backingRun = nil
                }
                if backingRun == nil {
                    backingRun = ReadFetch(fromBacking: true, mediumOffset: blockOffset, count: 0, slot: -1)
                }
                let fetchOffset = backingRun!.count
                backingRun!.count += CacheGeometry.blockBytes
                forEachSectorRun(backingMask) { sector, count in
                    backingRun!.addSpan(source: fetchOffset + sector * 512, target: blockRequestOffset + sector * 512, length: count * 512)
                }
            } else if let run = backingRun {
                fetches.append(run)
                backingRun = nil
            }
        }
        if let run = deviceRun { fetches.append(run) }
        if let run = backingRun { fetches.append(run) }
        guard !fetches.isEmpty else { return completion(.data(reply)) }

        let assembly = ReadAssembly(reply: reply, base: base, outstanding: fetches.count, completion: completion)
        for fetch in fetches {
            // Backing reads cover whole blocks; the last one may pass the end of a volume whose size
            // is not a multiple of 4 KiB.
            let count = fetch.fromBacking ? Int(min(UInt64(fetch.count), volumeSizeBytes - fetch.mediumOffset)) : fetch.count
            if fetch.fromBacking {
                backingLoad.begin(nowNs: clock.nowNs)
            } else {
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
                }
                assembly.fetched(fetch, result: result)
            }
        }
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

    mutating func addSpan(source: Int, target: Int, length: Int) {
        if let last = spans.last, last.source + last.length == source, last.target + last.length == target {
            spans[spans.count - 1].length += length
        } else {
            spans.append((source, target, length))
        }
    }
}

/// Gathers the parts of one client read and completes it when the last arrives.
final class ReadAssembly {
    private var reply: ByteBuffer
    private let base: Int
    private var outstanding: Int
    private var failure: MediumError?
    private let completion: (VolumeReply) -> Void

    init(reply: ByteBuffer, base: Int, outstanding: Int, completion: @escaping (VolumeReply) -> Void) {
        self.reply = reply
        self.base = base
        self.outstanding = outstanding
        self.completion = completion
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
        guard outstanding == 0 else { return }
        if let failure {
            completion(.failed(.io(errno: failure.errnoValue)))
        } else {
            completion(.data(reply))
        }
    }
}
