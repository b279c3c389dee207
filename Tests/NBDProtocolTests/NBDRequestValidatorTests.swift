import XCTest

@testable import NBDProtocol

final class NBDRequestValidatorTests: XCTestCase {
    private func negotiation(readOnly: Bool = false, structured: Bool = true, blockStatus: Bool = true) -> NBDNegotiation {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache, .sendFastZero]
        if readOnly { flags.insert(.readOnly) }
        if structured { flags.insert(.sendDF) }
        let export = NBDExportDescriptor(
            name: "", description: "", sizeBytes: 1 << 20, transmissionFlags: flags,
            minimumBlockBytes: 512, preferredBlockBytes: 4096, maximumPayloadBytes: 1 << 16, supportsBlockStatus: true)
        return NBDNegotiation(export: export, transmissionFlags: flags, structuredReplies: structured, blockStatusSelected: blockStatus)
    }

    private func check(
        _ command: NBDCommand, offset: UInt64 = 0, length: UInt32 = 4096, flags: NBDCommandFlags = [],
        negotiation: NBDNegotiation? = nil, file: StaticString = #filePath, line: UInt = #line
    ) -> NBDError {
        let header = NBDRequestHeader(flags: flags, command: command, cookie: 1, offset: offset, lengthBytes: length)
        switch NBDRequestValidator.validate(header, negotiation: negotiation ?? self.negotiation()) {
        case .success: return .none
        case .failure(let refusal):
            XCTAssertFalse(refusal.message.isEmpty, file: file, line: line)
            return refusal.error
        }
    }

    func testErrorsFollowTheSpecification() {
        let size: UInt64 = 1 << 20
        // Past the end: reads, trims, caches and block status get EINVAL; writes get ENOSPC.
        XCTAssertEqual(check(.read, offset: size - 512, length: 1024), .invalid)
        XCTAssertEqual(check(.trim, offset: size, length: 512), .invalid)
        XCTAssertEqual(check(.cache, offset: size, length: 512), .invalid)
        XCTAssertEqual(check(.blockStatus, offset: size, length: 512), .invalid)
        XCTAssertEqual(check(.write, offset: size - 512, length: 1024), .noSpace)
        XCTAssertEqual(check(.writeZeroes, offset: size, length: 512), .noSpace)
        XCTAssertEqual(check(.read, offset: UInt64.max - 100, length: 4096), .invalid, "offset + length must not wrap")
        // Exactly up to the end is fine.
        XCTAssertEqual(check(.read, offset: size - 4096, length: 4096), .none)
        XCTAssertEqual(check(.write, offset: size - 4096, length: 4096), .none)
        // Read-only.
        let readOnly = negotiation(readOnly: true)
        XCTAssertEqual(check(.write, negotiation: readOnly), .notPermitted)
        XCTAssertEqual(check(.trim, negotiation: readOnly), .notPermitted)
        XCTAssertEqual(check(.writeZeroes, negotiation: readOnly), .notPermitted)
        XCTAssertEqual(check(.read, negotiation: readOnly), .none)
        // Over the maximum payload.
        XCTAssertEqual(check(.read, length: (1 << 16) + 512), .invalid)
        XCTAssertEqual(check(.write, length: (1 << 16) + 512), .invalid)
        XCTAssertEqual(check(.trim, length: 1 << 19), .none, "TRIM carries no payload; any length inside the export is fine")
        // Alignment to the 512-byte minimum.
        XCTAssertEqual(check(.read, offset: 1, length: 512), .invalid)
        XCTAssertEqual(check(.write, offset: 0, length: 100), .invalid)
        // Unknown commands and flags.
        XCTAssertEqual(check(NBDCommand(rawValue: 42)), .invalid)
        XCTAssertEqual(check(.read, flags: .noHole), .invalid)
        XCTAssertEqual(check(.write, flags: .doNotFragment), .invalid)
        XCTAssertEqual(check(.read, flags: .doNotFragment, negotiation: negotiation(structured: false)), .invalid)
        XCTAssertEqual(check(.read, flags: .doNotFragment), .none)
        // FUA is accepted on every command.
        for command in [NBDCommand.read, .write, .trim, .writeZeroes, .cache, .blockStatus] {
            XCTAssertEqual(check(command, flags: .fua), .none, "FUA on \(command)")
        }
        XCTAssertEqual(check(.flush, length: 0, flags: .fua), .none)
        // FLUSH and DISC.
        XCTAssertEqual(check(.flush, length: 0), .none)
        XCTAssertEqual(check(.flush, offset: 512, length: 0), .invalid)
        XCTAssertEqual(check(.disconnect, length: 0), .none)
        XCTAssertEqual(check(.disconnect, offset: 7, length: 9, flags: [.noHole, .requestOne]), .none, "DISC is never refused")
        // BLOCK_STATUS needs a selected context and a length.
        XCTAssertEqual(check(.blockStatus, negotiation: negotiation(blockStatus: false)), .invalid)
        XCTAssertEqual(check(.blockStatus, length: 0), .invalid)
        XCTAssertEqual(check(.blockStatus, flags: .requestOne), .none)
        // Zero-length requests are answered, not fatal.
        XCTAssertEqual(check(.read, length: 0), .none)
        XCTAssertEqual(check(.write, length: 0), .none)
        XCTAssertEqual(check(.writeZeroes, length: 0, flags: [.noHole, .fastZero]), .none)
    }

    func testValidatedCommandsCarryTheirFlags() {
        let header = NBDRequestHeader(flags: [.fua, .noHole, .fastZero], command: .writeZeroes, cookie: 9, offset: 512, lengthBytes: 1024)
        XCTAssertEqual(try NBDRequestValidator.validate(header, negotiation: negotiation()).get(),
                       .writeZeroes(offset: 512, lengthBytes: 1024, fua: true, noHole: true, fastZero: true))
    }
}
