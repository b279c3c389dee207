import Foundation
import NIOCore
import SluiceCache
import SluiceTesting
import SluiceVolume
import XCTest

@testable import SluiceEPRD

/// Seeded power failures under an EPRD with barriers on: the backing store loses power at its
/// N-th write or sync, mid-commit or between commits, and forgets (or tears at sector boundaries)
/// what was not synced. Afterwards every sector must read as a value written to it at or after
/// the newest one a FLUSH or FUA acknowledged — never older, never a mix, never another sector's.
/// Any failing seed replays: the message names it.
final class EPRDPowerFailureTests: XCTestCase {
    private let sectorBytes = 512
    private let sectors = (5 * 64 * 1024 + 3 * 512) / 512

    /// A sector's contents for `version` (0: what the disk held before; every version differs).
    private func pattern(sector: Int, version: Int) -> [UInt8] {
        var word = UInt64(sector) << 32 | UInt64(version) | 1 << 63
        return (0..<(sectorBytes / 8)).flatMap { _ in withUnsafeBytes(of: &word) { Array($0) } }
    }

    func testEverythingAFlushOrFUACoveredSurvivesAPowerCut() throws {
        for seed in UInt64(1)...120 {
            try runOne(seed: seed)
        }
    }

    private func runOne(seed: UInt64) throws {
        var generator = SplitMix64(seed: seed)
        let initial = (0..<sectors).flatMap { pattern(sector: $0, version: 0) }
        let medium = CuttingMedium(SimulatedMedium(durableBytes: initial), cutAt: 1 + generator.below(40), seed: seed)
        let rig = try EPRDRig(medium: medium, configuration: .init(commitIntervalMs: 0, barriers: true))
        defer { rig.shutDown() }
        // Per sector: the versions written, and the lowest one a crash may leave.
        var latest = [Int](repeating: 0, count: sectors)
        var floor = [Int](repeating: 0, count: sectors)
        var nextVersion = 1
        for _ in 0..<60 {
            if generator.below(5) == 0 {
                guard case .done = try rig.perform(.flush) else { break }
                floor = latest
                continue
            }
            let first = generator.below(sectors)
            let count = min(sectors - first, 1 + generator.below(40))
            let fua = generator.below(6) == 0
            let bytes = (first..<(first + count)).flatMap { pattern(sector: $0, version: nextVersion) }
            let reply = try rig.write(first * sectorBytes, bytes, fua: fua)
            // The write is in the image either way; a FUA whose commit failed promised nothing.
            for sector in first..<(first + count) { latest[sector] = nextVersion }
            nextVersion += 1
            if fua {
                guard case .done = reply else { break }
                for sector in first..<(first + count) { floor[sector] = latest[sector] }
            }
        }
        let survivor: [UInt8] = try rig.onIOLoop {
            medium.cut()
            return medium.inner.durable
        }
        for sector in 0..<sectors {
            let bytes = Array(survivor[(sector * sectorBytes)..<((sector + 1) * sectorBytes)])
            let allowed = (floor[sector]...latest[sector]).contains { bytes == pattern(sector: sector, version: $0) }
            // Versions between floor and latest that were overwritten in the image before any commit
            // took them never reach the medium; reading one of them is still a value written.
            XCTAssertTrue(allowed, "seed \(seed): sector \(sector) holds neither a value at or after version \(floor[sector]) nor up to \(latest[sector])")
            if !allowed { return }
        }
    }
}
