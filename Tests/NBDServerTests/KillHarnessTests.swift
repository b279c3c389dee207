import Foundation
import NBDClient
import SluiceCache
import XCTest
import SluiceTesting

/// The crash harness: the built `sluice serve` under a mixed workload from several python3-libnbd
/// connections (Resources/crash_client.py), killed with SIGKILL at seeded random instants, in
/// volatile and pmem mode and with its cache mode switched under load; sometimes killed again while it restarts (before it listens, that is
/// while it recovers); after each restart the whole volume is read and checked against the log of
/// what the client issued and what was acknowledged, and how (see crash_client.py for the rules:
/// durable writes are there, every sector holds a value written to it or explainable zeros, never
/// a mix, never another sector's data; in pmem mode every acknowledged write is durable). At the
/// end of each mode a last workload runs to completion and is checked as served, then `sluice
/// drain`, SIGTERM, and the backing file must equal the volume byte for byte.
///
/// `make test` runs a few dozen cycles; `make soak-kill` runs more. Environment:
/// SLUICE_KILL_CYCLES (total, split between volatile, pmem and cache-mode switching; default 36), SLUICE_KILL_SEED (default
/// 2026), SLUICE_KILL_VOLUME_MIB and SLUICE_KILL_CACHE_MIB (default 64 and 32: small, so the
/// ring wraps many times), SLUICE_KILL_MAX_DELAY_MS (the longest workload before a kill; default
/// 1200), SLUICE_KILL_VERBOSE=1 (a line per cycle).
final class KillHarnessTests: XCTestCase {
    private var directory = ""
    private var pmemPaths: [String] = []
    /// Every process a test started, killed in tearDown if a failing test left one running.
    private var processes: [Process] = []
    private let unique = UUID().uuidString.prefix(8)

    override func setUpWithError() throws {
        directory = try TestServer.makeTemporaryDirectory(base: "/tmp")
    }

    override func tearDown() {
        for process in processes where process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        for path in pmemPaths { try? FileManager.default.removeItem(atPath: path) }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Tests/NBDServerTests/Resources/crash_client.py
    private static var clientScript: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Resources/crash_client.py").path
    }

    /// SLUICE_KILL_VERBOSE=1 prints every cycle's checks and restarts.
    private static let verbose = ProcessInfo.processInfo.environment["SLUICE_KILL_VERBOSE"] == "1"

    private static func environment(_ name: String, default value: Int) -> Int {
        ProcessInfo.processInfo.environment[name].flatMap { Int($0) } ?? value
    }

    private struct Totals {
        var cycles = 0
        var pmemCycles = 0
        var killedDuringRecovery = 0
        var killedAfterListening = 0
        var violations = 0
        var requests = 0
        var bytesWritten = 0
        var problems: [String] = []

        mutating func report(_ count: Int, _ what: String) {
            guard count > 0 else { return }
            violations += count
            if problems.count < 20 { problems.append(what) }
            print("kill harness: VIOLATION: \(what)")
        }
    }

    func testKillNineAtRandomInstantsKeepsEveryDurableWriteInBothModes() throws {
        let cycles = Self.environment("SLUICE_KILL_CYCLES", default: 36)
        let seed = Self.environment("SLUICE_KILL_SEED", default: 2026)
        var totals = Totals()
        var generator = SplitMix64(seed: UInt64(seed))
        let started = Date()
        let pmemCycles = cycles * 2 / 5
        let modeCycles = cycles / 5
        try runMode(pmem: false, cycles: cycles - pmemCycles - modeCycles, seed: seed, generator: &generator, totals: &totals)
        try runMode(pmem: true, cycles: pmemCycles, seed: seed, generator: &generator, totals: &totals)
        try runMode(pmem: false, switchCacheModes: true, cycles: modeCycles, seed: seed, generator: &generator, totals: &totals)
        print("kill harness: seed \(seed), \(totals.requests) requests, \(totals.bytesWritten >> 20) MiB written, "
              + "\(totals.killedAfterListening) restarts killed after they listened, \(Int(Date().timeIntervalSince(started))) s")
        print("kill harness: \(totals.cycles) cycles (\(totals.pmemCycles) in pmem mode, \(totals.killedDuringRecovery) killed during recovery), "
              + "\(totals.violations) violations")
        XCTAssertEqual(totals.violations, 0, "seed \(seed): \(totals.problems.joined(separator: "\n"))")
    }

    // MARK: - One mode

    /// `switchCacheModes`: a volatile cache whose cache mode (writeback, writethrough, writearound,
    /// passthrough) is switched with `sluice set cache_mode` halfway to every kill, under load;
    /// restarts keep the last mode recorded. Plain writes are checked as in volatile mode: one that
    /// went straight to the backing store is durable with FUA or a FLUSH.
    private func runMode(pmem: Bool, switchCacheModes: Bool = false, cycles: Int, seed: Int, generator: inout SplitMix64,
                         totals: inout Totals) throws {
        let mode = pmem ? "pmem" : switchCacheModes ? "cache-modes" : "volatile"
        let volumeBytes = Self.environment("SLUICE_KILL_VOLUME_MIB", default: 64) << 20
        let cacheBytes = Self.environment("SLUICE_KILL_CACHE_MIB", default: 32) << 20
        let maxDelayMs = Self.environment("SLUICE_KILL_MAX_DELAY_MS", default: 1200)
        let backing = try SluiceBinary.makeFile("\(directory)/\(mode)-backing.img", sizeBytes: volumeBytes)
        let cache = try SluiceBinary.makeFile("\(directory)/\(mode)-cache.img", sizeBytes: cacheBytes)
        // What every sector held at the last verification (the initial zeros, at first).
        let image = try SluiceBinary.makeFile("\(directory)/\(mode)-image.img", sizeBytes: volumeBytes)
        let socket = "\(directory)/\(mode).sock"
        var buffer = ["--volatile"]
        var format = ["format", "--cache", cache, "--backing", backing, "--segment-size", pmem ? "256K" : "1M"]
        if pmem {
            let path = "/dev/shm/sluice-test-\(getpid())-\(unique)-kill.pmem"
            pmemPaths.append(path)
            buffer = ["--pmem", path]
            format += ["--pmem", path]
        }
        let formatted = try SluiceBinary.run(format)
        XCTAssertEqual(formatted.status, 0, formatted.errors)
        // Tunables drawn for every start: writeback only when urged, or paced by the backing
        // store's load or the dirty share; the cleaner from "reclaim whatever it can" to "only
        // when writers wait"; small and large writeback batches; FUA and FLUSH sharing a barrier
        // for a while (volatile mode); automatic barriers and max_age every second, sometimes.
        var serveCount = 0
        func serveArguments() -> [String] {
            func pick(_ values: [Int]) -> String { "\(values[Int.random(in: 0..<values.count, using: &generator)])" }
            return ["serve", "--cache", cache, "--backing", backing] + buffer
                + ["--socket", socket, "--log-level", "warning", "--writeback-threshold", pick([0, 0, 20, 70, 100]),
                   "--nr-max-batched-writeback", pick([1, 4, 32, 32]), "--barrier-deadline-ms", pick([0, 0, 0, 2]),
                   "--sync-data-interval", pick([0, 0, 0, 1]), "--dirty-target", pick([0, 10, 100]),
                   "--max-age", pick([0, 0, 1])]
                + [["--high-watermark", "5", "--low-watermark", "0"], ["--high-watermark", "50", "--low-watermark", "45"],
                   ["--high-watermark", "90", "--low-watermark", "60"]][Int.random(in: 0..<3, using: &generator)]
        }
        var startupSeconds = 0.3
        func serve() throws -> Process {
            serveCount += 1
            let begin = Date()
            let server = try SluiceBinary.startServer(serveArguments(), socket: socket, log: "\(directory)/\(mode)-server-\(serveCount).log")
            processes.append(server)
            startupSeconds = Date().timeIntervalSince(begin)
            return server
        }
        func killServer(_ server: Process) {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
            // A server killed by SIGKILL leaves its socket file; the next one must not be taken
            // as listening before it does.
            try? FileManager.default.removeItem(atPath: socket)
        }
        let uri = "nbd+unix:///?socket=\(socket)"
        // Request ids (stamped into the data) never repeat, over both modes.
        var nextID = (pmem ? 2 : switchCacheModes ? 3 : 1) * 1_000_000_000
        // Workload profiles (FUA share of the writes, FLUSH share of the requests): barriers
        // often, FUA only, flushes only, and barriers rare (the buffer fills whole segments and
        // much is in flight or not yet durable at the kill).
        let profiles: [(name: String, fua: Double, flush: Double)] = [("barriers", 0.15, 0.05), ("fua", 0.3, 0), ("flush", 0, 0.04),
                                                                      ("rare barriers", 0.01, 0.003)]

        var server = try serve()
        for cycle in 0..<cycles {
            let log = "\(directory)/\(mode)-\(cycle).log"
            let clientSeed = Int(generator.next() >> 33)
            let profile = profiles[Int.random(in: 0..<profiles.count, using: &generator)]
            let client = try startProgram("/usr/bin/python3", [Self.clientScript, "run", uri, log, "--seed", "\(clientSeed)",
                                                              "--hot-seed", "\(seed)", "--first-id", "\(nextID)", "--seconds", "30",
                                                              "--fua-share", "\(profile.fua)", "--flush-share", "\(profile.flush)"],
                                          output: "\(log).out")
            let delayMs = Int.random(in: 100...max(101, maxDelayMs), using: &generator)
            if switchCacheModes {
                usleep(UInt32(delayMs / 2) * 1000)
                let target = ["writeback", "writethrough", "writearound", "passthrough"][Int.random(in: 0..<4, using: &generator)]
                let switched = try SluiceBinary.run(["set", "--socket", socket, "cache_mode", target])
                totals.report(switched.status == 0 ? 0 : 1, "\(mode) cycle \(cycle): set cache_mode \(target) failed: \(switched.errors)")
                usleep(UInt32(delayMs - delayMs / 2) * 1000)
            } else {
                usleep(UInt32(delayMs) * 1000)
            }
            killServer(server)
            let summary = try finish(client, "\(mode) cycle \(cycle): the workload")
            totals.requests += summary["issued"] as? Int ?? 0
            totals.bytesWritten += summary["bytes"] as? Int ?? 0
            nextID = (summary["last_id"] as? Int ?? nextID) + 1
            totals.report(summary["server_errors"] as? Int ?? 0,
                          "\(mode) cycle \(cycle): the server failed requests on a live connection: \(summary["error_examples"] ?? "")")

            // Sometimes kill the restart too, at a random instant before it would listen.
            if Int.random(in: 0..<100, using: &generator) < 35 {
                let restartLog = "\(directory)/\(mode)-server-killed-\(cycle).log"
                let restart = try startProgram(SluiceBinary.path, serveArguments(), output: restartLog).process
                // The last start's time to listen (measured by polling, so a little long) bounds the delay.
                usleep(UInt32(Double.random(in: 0...max(0.02, startupSeconds * 0.9), using: &generator) * 1_000_000))
                let listened = FileManager.default.fileExists(atPath: socket)
                let exited = !restart.isRunning
                killServer(restart)
                if Self.verbose {
                    print("kill harness: \(mode) cycle \(cycle): restart killed \(listened ? "after it listened" : "before it listened") "
                          + "(the last start took \(Int(startupSeconds * 1000)) ms)")
                }
                if exited {
                    let logged = (try? String(contentsOfFile: restartLog, encoding: .utf8)) ?? ""
                    totals.report(1, "\(mode) cycle \(cycle): the restart exited by itself (status \(restart.terminationStatus)): \(logged)")
                } else if listened {
                    totals.killedAfterListening += 1
                } else {
                    totals.killedDuringRecovery += 1
                }
            }

            server = try serve()
            try verify(uri: uri, image: image, logs: [log], durable: pmem ? "pmem" : "volatile",
                       "\(mode) cycle \(cycle) (\(profile.name), killed after \(delayMs) ms)", totals: &totals)
            totals.cycles += 1
            if pmem { totals.pmemCycles += 1 }
        }

        // A last workload that runs to completion, checked as served (every reply counts).
        let log = "\(directory)/\(mode)-final.log"
        let client = try startProgram("/usr/bin/python3", [Self.clientScript, "run", uri, log, "--final", "--ops", "1500",
                                                          "--seed", "\(generator.next() >> 33)", "--hot-seed", "\(seed)", "--first-id", "\(nextID)"],
                                      output: "\(log).out")
        let summary = try finish(client, "\(mode): the final workload")
        totals.report((summary["failed"] as? Int ?? 1) + (summary["server_errors"] as? Int ?? 0),
                      "\(mode): the final workload had failed requests: \(summary)")
        totals.requests += summary["issued"] as? Int ?? 0
        totals.bytesWritten += summary["bytes"] as? Int ?? 0
        try verify(uri: uri, image: image, logs: [log], durable: "live", "\(mode): after the final workload", totals: &totals)

        let status = try SluiceBinary.run(["status", "--json", "--socket", socket])
        let state = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(status.output.utf8)) as? [String: Any], status.output + status.errors)
        let segmentCount = state["segment_count"] as? Int ?? 0
        let segmentID = state["current_segment_id"] as? Int ?? 0
        print("kill harness: \(mode): \(cycles) cycles, \(serveCount) server starts, segment id \(segmentID) on a ring of \(segmentCount) "
              + "(\(segmentCount > 0 ? segmentID / segmentCount : 0) laps)")
        XCTAssertGreaterThan(segmentID, segmentCount, "\(mode): the ring wrapped")

        let drained = try SluiceBinary.run(["drain", "--socket", socket])
        XCTAssertEqual(drained.status, 0, drained.errors)
        XCTAssertTrue(drained.output.contains("drained: 0 dirty blocks"), drained.output)
        let status0 = SluiceBinary.stop(server)
        XCTAssertEqual(server.terminationReason, .exit)
        XCTAssertEqual(status0, 0, "\(mode): SIGTERM stops the server cleanly")
        let compared = try runJSON("/usr/bin/python3", [Self.clientScript, "compare", backing, image], "\(mode): compare")
        totals.report(compared["differing_sectors"] as? Int ?? 1,
                      "\(mode): after a drain the backing file differs from the volume as served: \(compared["examples"] ?? "")")
    }

    // MARK: - Helpers

    /// Reads the whole volume and checks it (crash_client.py verify); counts its violations.
    @discardableResult
    private func verify(uri: String, image: String, logs: [String], durable: String, _ context: String,
                        totals: inout Totals) throws -> [String: Any] {
        let summary = try runJSON("/usr/bin/python3", [Self.clientScript, "verify", uri, image] + logs + ["--durable", durable], context)
        let violations = summary["violations"] as? Int ?? 1
        if Self.verbose {
            let keys = ["requests", "durable", "unacknowledged", "acked_flushes", "logged_writes", "zeros", "base", "changed_chunks", "seconds"]
            print("kill harness: \(context): " + keys.map { "\($0) \(summary[$0] ?? "-")" }.joined(separator: ", "))
        }
        totals.report(violations, "\(context): \(violations) sectors: \((summary["examples"] as? [String] ?? []).joined(separator: "; "))")
        return summary
    }

    /// A program running with its standard output and error going to a file.
    private struct Started {
        let process: Process
        let output: String
    }

    /// Starts a program with its standard output and error in `output` (a file, so nothing blocks).
    private func startProgram(_ executable: String, _ arguments: [String], output: String) throws -> Started {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        processes.append(process)
        return Started(process: process, output: output)
    }

    /// Waits (at most two minutes) for a client started by `startProgram` and parses the JSON
    /// summary it printed last.
    private func finish(_ started: Started, _ context: String, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let process = started.process
        let deadline = Date().addingTimeInterval(120)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            XCTFail("\(context) did not finish", file: file, line: line)
        }
        process.waitUntilExit()
        let output = (try? String(contentsOfFile: started.output, encoding: .utf8)) ?? ""
        XCTAssertEqual(process.terminationStatus, 0, "\(context) failed: \(output)", file: file, line: line)
        let last = output.split(separator: "\n").last.map(String.init) ?? ""
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(last.utf8)) as? [String: Any], "\(context): \(output)", file: file, line: line)
    }

    /// Runs a program to completion and parses the JSON it printed.
    private func runJSON(_ executable: String, _ arguments: [String], _ context: String,
                         file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
        let result = try SluiceBinary.runProgram(executable, arguments, timeoutSeconds: 300, file: file, line: line)
        XCTAssertEqual(result.status, 0, "\(context) failed: \(result.errors)", file: file, line: line)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any],
                             "\(context): \(result.output) \(result.errors)", file: file, line: line)
    }
}
