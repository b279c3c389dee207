import NIOCore
import SluiceCache
import SluiceRAMDisk
import SluiceVolume

extension EPRDVolume {
    /// What became of a request tried inline.
    enum Outcome {
        /// Done; reply now.
        case reply(VolumeReply)
        /// These chunks must be loaded first; then try again.
        case load([UInt64])
        /// Done in memory; reply once a commit covering it has synced (barriers on).
        case replyAfterCommit(VolumeReply)
    }

    /// Carries out `request` if every chunk it needs is in memory (the session checked nothing).
    func perform(_ request: VolumeRequest) -> Outcome {
        lock.lock()
        defer { lock.unlock() }
        guard !isClosed else { return .reply(.failed(.shuttingDown)) }
        if let range = request.range {
            let (end, overflow) = range.offset.addingReportingOverflow(range.lengthBytes)
            guard !overflow, end <= sizeBytes else { return .reply(.failed(.outOfRange)) }
            let missing = missingChunks(offset: range.offset, lengthBytes: Int(range.lengthBytes),
                                        wholeChunksMayBeMissing: request.isWrite)
            if !missing.isEmpty { return .load(missing) }
        }
        do {
            switch request {
            case .read(let offset, let length, var buffer):
                buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { target in
                    image.read(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: target[0..<Int(length)]))
                    return Int(length)
                }
                return .reply(.data(buffer))
            case .write(let offset, let data, let fua):
                try data.withUnsafeReadableBytes { try image.write(offset: offset, from: $0, limitBytes: .max) }
                dirty.mark(offset: offset, lengthBytes: data.readableBytes)
                return afterWriteLocked(fua: fua)
            case .writeZeroes(let offset, let length, let flags):
                try image.zero(offset: offset, lengthBytes: Int(length), keepAllocated: true, limitBytes: .max)
                dirty.mark(offset: offset, lengthBytes: Int(length))
                return afterWriteLocked(fua: flags.contains(.fua))
            case .flush:
                return afterWriteLocked(fua: true)
            case .cache:
                return .reply(.done)
            case .trim, .blockStatus:
                return .reply(.failed(.notSupported))
            }
        } catch let error as VolumeError {
            return .reply(.failed(error))
        } catch {
            return .reply(.failed(.io(errno: 5)))
        }
    }

    private func afterWriteLocked(fua: Bool) -> Outcome {
        guard fua, barriersOn else { return .reply(.done) }
        return .replyAfterCommit(.done)
    }

    /// The chunks of the range that are not in memory and must be: all of them for a read; for a
    /// write, only those it covers in part (a chunk it covers whole is replaced whole).
    private func missingChunks(offset: UInt64, lengthBytes: Int, wholeChunksMayBeMissing: Bool) -> [UInt64] {
        var missing: [UInt64] = []
        SparseMemory.forEachPiece(offset: offset, lengthBytes: lengthBytes) { chunk, _, length, _ in
            if wholeChunksMayBeMissing && length == SparseMemory.chunkBytes { return }
            if !image.holdsChunk(chunk) { missing.append(chunk) }
        }
        return missing
    }

    /// Reads `chunks` (ascending) from the backing store into the image, on the load loop, and
    /// calls `completion` there. A chunk that arrived in the meantime (another request loaded it,
    /// or a write replaced it whole) is kept: it is newer than what was read.
    func load(_ chunks: [UInt64], completion: @escaping (Result<Void, MediumError>) -> Void) {
        loadLoop.execute {
            var first = 0
            while first < chunks.count {
                var end = first + 1
                while end < chunks.count, end - first < Self.chunksPerLoad, chunks[end] == chunks[end - 1] + 1 { end += 1 }
                if case .failure(let error) = self.loadRun(chunks[first..<end]) {
                    self.lock.withLock {
                        self.counters.loadErrors += 1
                        self.counters.lastError = "loading from the backing store: \(error)"
                    }
                    return completion(.failure(error))
                }
                first = end
            }
            completion(.success(()))
        }
    }

    /// Loads consecutive chunks with one read; the part of the last one past the end reads as zeros.
    private func loadRun(_ chunks: ArraySlice<UInt64>) -> Result<Void, MediumError> {
        let chunkBytes = SparseMemory.chunkBytes
        let start = chunks.first! * UInt64(chunkBytes)
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunks.count * chunkBytes, alignment: 4096)
        defer { bytes.deallocate() }
        let readable = Int(min(UInt64(bytes.count), sizeBytes - start))
        bytes.initializeMemory(as: UInt8.self, repeating: 0)
        do {
            try medium.readBytes(offset: start, into: UnsafeMutableRawBufferPointer(rebasing: bytes[0..<readable]))
        } catch let error as MediumError {
            return .failure(error)
        } catch {
            return .failure(.inputOutput(errno: 5))
        }
        lock.withLock {
            for (position, chunk) in chunks.enumerated() {
                let slice = UnsafeRawBufferPointer(rebasing: bytes[(position * chunkBytes)..<((position + 1) * chunkBytes)])
                image.installChunk(chunk, from: slice)
            }
            counters.loadedBytes += UInt64(readable)
        }
        return .success(())
    }
}
