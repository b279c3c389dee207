import SluiceFormat

/// Formats a cache device and opens a formatted one, refusing anything that is not exactly the
/// cache the caller expects: unformatted, another format version, damaged, truncated, or bound to
/// another backing store or mode. Nothing is ever formatted implicitly.
public enum CacheSuperblock {
    /// What a cache device holds when it is opened.
    public struct Opened: Equatable, Sendable {
        public var header: SuperblockHeader
        public var geometry: CacheGeometry
        public var record: SuperblockRecord

        public init(header: SuperblockHeader, geometry: CacheGeometry, record: SuperblockRecord) {
            self.header = header
            self.geometry = geometry
            self.record = record
        }
    }

    /// What the caller expects to find.
    public struct Expectation: Sendable {
        public var backingIdentity: String
        public var backingSizeBytes: UInt64
        public var mode: SuperblockHeader.Mode

        public init(backingIdentity: String, backingSizeBytes: UInt64, mode: SuperblockHeader.Mode) {
            self.backingIdentity = backingIdentity
            self.backingSizeBytes = backingSizeBytes
            self.mode = mode
        }

        /// Throws unless the superblock can record this backing store's identity whole: a
        /// shortened one would never match again, so the cache could never be served.
        public func checkRecordable() throws {
            let bytes = backingIdentity.utf8.count
            guard bytes <= SuperblockHeader.backingIdentityBytesMax else {
                throw FormatError.backingIdentityTooLong(bytes: bytes, maximum: SuperblockHeader.backingIdentityBytesMax)
            }
        }
    }

    /// Writes a new superblock (header and a first record) for `expectation` and syncs it. Old
    /// segments on the device carry the previous cache's UUID and are never read as this cache's.
    public static func format(
        _ medium: any BlockMedium, segmentBytes: Int, expectation: Expectation, uuid: [UInt8], nowSeconds: UInt64,
        pmemUUID: [UInt8] = [UInt8](repeating: 0, count: 16), cacheMode: CacheMode = .writeback,
        completion: @escaping (Result<Opened, Error>) -> Void
    ) {
        let geometry: CacheGeometry
        do {
            try expectation.checkRecordable()
            geometry = try CacheGeometry(segmentBytes: segmentBytes, deviceBytes: medium.sizeBytes)
        } catch {
            return completion(.failure(error))
        }
        let header = SuperblockHeader(uuid: uuid, geometry: geometry, mode: expectation.mode,
                                      backingSizeBytes: expectation.backingSizeBytes,
                                      backingIdentity: expectation.backingIdentity, pmemUUID: pmemUUID, createdSeconds: nowSeconds)
        // Both record slots are written, the second one newer, so no stale record of an earlier
        // format can ever win.
        let first = SuperblockRecord(sequence: 1, lastRetiredSegmentID: 0, lastFlushedSegmentID: 0, cleanShutdown: true, cacheMode: cacheMode)
        let second = SuperblockRecord(sequence: 2, lastRetiredSegmentID: 0, lastFlushedSegmentID: 0, cleanShutdown: true, cacheMode: cacheMode)
        medium.write(offset: 0, bytes: header.encoded() + first.encodedForSlot(at: first.blockOffset, pairedWith: second)) { written in
            if case .failure(let error) = written { return completion(.failure(error)) }
            medium.synchronize { synced in
                switch synced {
                case .failure(let error): completion(.failure(error))
                case .success: completion(.success(Opened(header: header, geometry: geometry, record: second)))
                }
            }
        }
    }

    /// Rewrites the header block (for a mode switch) and syncs it. The records are left alone.
    public static func rewriteHeader(_ medium: any BlockMedium, header: SuperblockHeader, completion: @escaping (Result<Void, Error>) -> Void) {
        medium.write(offset: 0, bytes: header.encoded()) { written in
            if case .failure(let error) = written { return completion(.failure(error)) }
            medium.synchronize { synced in completion(synced.mapError { $0 as Error }) }
        }
    }

    /// What the first three blocks of a cache device hold, checked for themselves (magic,
    /// version, checksums, geometry, device size) but not against what a caller expects.
    public struct Found: Sendable {
        public var header: SuperblockHeader
        public var geometry: CacheGeometry
        /// Both record slots as decoded (nil where a slot holds no valid record).
        public var recordSlots: [SuperblockRecord?]
        /// The newer valid record, if any.
        public var record: SuperblockRecord?
    }

    /// Bytes of the superblock: the header block and the two record slots.
    public static let bytes = 3 * CacheGeometry.blockBytes

    /// Decodes the superblock from the first ``bytes`` of a device of `deviceBytes`.
    public static func decode(_ bytes: [UInt8], deviceBytes: UInt64) throws -> Found {
        guard bytes.count >= Self.bytes else { throw FormatError.notFormatted }
        return try bytes.withUnsafeBytes { raw in
            let header = try SuperblockHeader(decoding: UnsafeRawBufferPointer(rebasing: raw[0..<4096]))
            let geometry = try CacheGeometry(header: header)
            guard geometry.deviceBytesNeeded <= deviceBytes else {
                throw FormatError.truncated(deviceBytes: deviceBytes, neededBytes: geometry.deviceBytesNeeded)
            }
            let slotA = UnsafeRawBufferPointer(rebasing: raw[4096..<8192])
            let slotB = UnsafeRawBufferPointer(rebasing: raw[8192..<12288])
            return Found(header: header, geometry: geometry,
                         recordSlots: [SuperblockRecord(decoding: slotA), SuperblockRecord(decoding: slotB)],
                         record: SuperblockRecord.current(slotA: slotA, slotB: slotB))
        }
    }

    /// Reads and checks the superblock.
    public static func open(_ medium: any BlockMedium, expectation: Expectation, completion: @escaping (Result<Opened, Error>) -> Void) {
        guard medium.sizeBytes >= UInt64(Self.bytes) else {
            return completion(.failure(FormatError.notFormatted))
        }
        medium.readBytes(offset: 0, count: Self.bytes) { result in
            completion(Result {
                let found = try decode(try result.get(), deviceBytes: medium.sizeBytes)
                let header = found.header
                guard header.backingIdentity == expectation.backingIdentity else {
                    throw FormatError.wrongBacking(expected: header.backingIdentity, found: expectation.backingIdentity)
                }
                guard header.backingSizeBytes == expectation.backingSizeBytes else {
                    throw FormatError.backingSizeChanged(expected: header.backingSizeBytes, found: expectation.backingSizeBytes)
                }
                guard header.mode == expectation.mode else {
                    throw FormatError.wrongMode(recorded: "\(header.mode)", requested: "\(expectation.mode)")
                }
                guard let record = found.record else { throw FormatError.noValidRecord }
                return Opened(header: header, geometry: found.geometry, record: record)
            })
        }
    }
}

extension SuperblockRecord {
    /// The two record slots (8 KiB) with `self` in its slot and `other` in the other one.
    func encodedForSlot(at offset: UInt64, pairedWith other: SuperblockRecord) -> [UInt8] {
        precondition(offset != other.blockOffset, "two records for the same slot")
        return offset == Self.blockOffsets[0] ? encoded() + other.encoded() : other.encoded() + encoded()
    }
}
