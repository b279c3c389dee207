import ArgumentParser
import Foundation
import Logging
import NBDServer
import NIOCore
import NIOPosix
import SluiceCache
import SluiceControl
import SluiceIO
import SluicePassthrough
import SluiceRAMDisk
import SluiceVolume

/// `sluice serve`: export one or more backing files or block devices over NBD.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve a file or block device over NBD, directly or through a write-back cache.",
        discussion: """
            Without --cache every request goes straight to the backing file or block device (a \
            passthrough volume), through io_uring. With --cache, writes land in a memory buffer, \
            are packed into segments on the cache device, and are written back later, sorted and \
            merged, to the backing store, which may also be a remote NBD export (nbd://… or \
            nbd+unix://…). Format the cache device first with `sluice format`. Clients connect over \
            a Unix socket (--socket) or TCP (--listen); with neither, Sluice listens on \
            127.0.0.1:10809. A cache's control endpoint (for `sluice status`, `set` and `drain`) \
            listens beside the NBD socket at SOCKET.control, or at --control PATH.

            A remote backing export must advertise flush: writeback syncs the backing store \
            before it marks anything clean. One that does not is refused, unless \
            --backing-durable-on-ack says every write it acknowledges is already durable.

            Examples:
              sluice serve --backing disk.img --socket /tmp/sluice.sock
                  then: nbdinfo 'nbd+unix:///?socket=/tmp/sluice.sock'
              sluice serve --backing disk.img --listen 127.0.0.1:10809
                  then: nbdinfo nbd://127.0.0.1
              sluice serve --export a --backing a.img --export b --backing b.img --socket /tmp/s.sock
                  then: nbdinfo 'nbd+unix:///b?socket=/tmp/s.sock'
              sluice format --cache ssd.img --backing 'nbd+unix:///?socket=/tmp/hdd.sock'
              sluice serve --cache ssd.img --backing 'nbd+unix:///?socket=/tmp/hdd.sock' --volatile --socket /tmp/s.sock
                  then: sluice status --socket /tmp/s.sock
              sluice format --cache ssd.img --backing disk.img --pmem /dev/shm/sluice.pmem
              sluice serve --cache ssd.img --backing disk.img --pmem /dev/shm/sluice.pmem --socket /tmp/s.sock
              sluice serve --ramdisk 4G --socket /tmp/ram.sock
                  then: sluice set --socket /tmp/ram.sock size 8G   (or locked 1, limit 2G)

            A RAM disk (--ramdisk SIZE) holds its data in memory only, taken on first write and \
            given back on trim: FLUSH and FUA are accepted, but a crash, kill or restart loses \
            everything written. Its export description and status say so.

            SIGINT or SIGTERM stops accepting clients, finishes the requests in flight, \
            flushes the backing store and exits 0.
            """
    )

    @Option(name: .long, help: ArgumentHelp("A backing file or block device to serve. Repeat to serve several exports.", valueName: "path"))
    var backing: [String] = []

    @Option(name: .long, help: ArgumentHelp(
        "Serve a RAM disk of this size (512M, 4G, ...) instead of a backing file: sparse, resizable and lockable at run time with `sluice set`; not durable.",
        valueName: "size"))
    var ramdisk: String?

    @Option(name: .customLong("ramdisk-limit"), help: ArgumentHelp("The most memory the RAM disk's data may take (default: its size).", valueName: "size"))
    var ramdiskLimit: String?

    @Option(name: .long, help: ArgumentHelp("Listen on this Unix socket.", valueName: "path"))
    var socket: String?

    @Option(name: .long, help: ArgumentHelp(
        "Listen on TCP at this address (default 127.0.0.1:10809 when no --socket is given). Use 0.0.0.0 only on a trusted network: NBD has no authentication.",
        valueName: "host:port"))
    var listen: String?

    @Option(name: .long, help: ArgumentHelp(
        "The export name of the matching --backing (in order). The first export also answers to the empty name.",
        valueName: "name"))
    var export: [String] = []

    @Option(name: .long, help: ArgumentHelp("A description clients can read (nbdinfo shows it).", valueName: "text"))
    var description: String = ""

    @Flag(name: .long, help: "Serve read-only: writes, trims and write-zeroes fail with EPERM.")
    var readOnly = false

    @Option(name: .long, help: ArgumentHelp("Serve through a write-back cache on this formatted cache device (file or block device).", valueName: "path"))
    var cache: String?

    @Flag(name: .long, help: "Keep the write buffer in DRAM (volatile mode): FUA and FLUSH seal a partial segment and sync the cache device.")
    var volatile = false

    @Option(name: .long, help: ArgumentHelp(
        "Keep the write buffer in this pmem file (pmem mode; the file the cache was formatted with): a write is durable once persisted there, so FUA and FLUSH cost a drain and segments are always full.",
        valueName: "path"))
    var pmem: String?

    @Option(name: .long, help: ArgumentHelp("The control endpoint's Unix socket (default: the NBD socket's path + .control).", valueName: "path"))
    var control: String?

    @Flag(name: .customLong("backing-durable-on-ack"), help: ArgumentHelp(BackingLocation.durableOnAcknowledgementHelp))
    var backingDurableOnAck = false

    @OptionGroup(title: "Cache tunables (also changeable at run time with `sluice set`)")
    var tunableOptions: TunableOptions

    @Option(name: .long, help: ArgumentHelp("Log level: trace, debug, info, notice, warning, error or critical.", valueName: "level"))
    var logLevel: String = "info"

    @Option(name: .long, help: ArgumentHelp("Event-loop threads (default: one per core; one with --cache, whose engine owns a single loop).", valueName: "count"))
    var threads: Int?

    func validate() throws {
        if let ramdisk {
            guard backing.isEmpty, cache == nil else { throw ValidationError("--ramdisk serves a RAM disk of its own; leave out --backing and --cache") }
            guard let bytes = ByteCount.parse(ramdisk), bytes % 512 == 0 else {
                throw ValidationError("--ramdisk takes a size that is a multiple of 512 bytes, such as 512M or 4G, not '\(ramdisk)'")
            }
            if let ramdiskLimit, ByteCount.parse(ramdiskLimit) == nil { throw ValidationError("--ramdisk-limit takes a size such as 1G, not '\(ramdiskLimit)'") }
            guard export.count <= 1 else { throw ValidationError("a RAM disk is one export: give at most one --export NAME") }
            if volatile || pmem != nil || backingDurableOnAck { throw ValidationError("--volatile, --pmem and --backing-durable-on-ack apply to a cache, not to a RAM disk") }
            if Logger.Level(rawValue: logLevel) == nil { throw ValidationError("unknown log level '\(logLevel)'") }
            if let listen { _ = try ListenAddress(listen) }
            return
        }
        if ramdiskLimit != nil { throw ValidationError("--ramdisk-limit applies to a RAM disk; give its size with --ramdisk SIZE") }
        guard !backing.isEmpty else {
            throw ValidationError("give the file or block device to serve with --backing PATH, or a RAM disk's size with --ramdisk SIZE")
        }
        if backing.count > 1 && export.count != backing.count {
            throw ValidationError("with several --backing paths, name each one with an --export NAME, in the same order")
        }
        if export.count > backing.count {
            throw ValidationError("there are more --export names than --backing paths")
        }
        if Set(export).count != export.count {
            throw ValidationError("export names must be unique")
        }
        if Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("unknown log level '\(logLevel)'")
        }
        if let listen {
            _ = try ListenAddress(listen)
        }
        if let threads, threads < 1 || threads > 256 {
            throw ValidationError("--threads must be between 1 and 256")
        }
        if cache != nil {
            guard backing.count == 1 else { throw ValidationError("a cache sits in front of exactly one --backing") }
            guard volatile != (pmem != nil) else {
                throw ValidationError("say which buffer the cache uses: --pmem PATH (persistent memory; FUA and FLUSH cost a drain) or --volatile (DRAM; FUA and FLUSH write partial segments), not both")
            }
            _ = try tunableOptions.tunables()
            try validateDurableOnAck(backingDurableOnAck, backing: backing[0])
        } else {
            if volatile || pmem != nil { throw ValidationError("--volatile and --pmem apply to a cache; give the cache device with --cache PATH") }
            if backingDurableOnAck { throw ValidationError("--backing-durable-on-ack applies to a cache's remote backing export; give the cache device with --cache PATH") }
            if control != nil { throw ValidationError("--control applies to a cache; give the cache device with --cache PATH") }
            if backing.contains(where: { if case .nbd = BackingLocation($0) { return true } else { return false } }) {
                throw ValidationError("an NBD export can be a backing store only behind a cache (--cache PATH)")
            }
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "sluice")

        // Signals are caught from here on, so one that arrives while starting still stops cleanly.
        let stop = StopSignal()
        // A cache's engine owns one event loop, and a connection on any other loop would hop to it
        // and back for every request (measured: nearly half the throughput at QD1 and QD32). So a
        // cache is served from one loop unless --threads says otherwise.
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads ?? (cache == nil ? System.coreCount : 1))
        var exports: [NBDServerExport] = []
        var volumes: [any Volume] = []
        var controlServer: ControlServer?
        if let cache {
            let volume: CacheVolume
            do {
                volume = try CacheVolume.open(cachePath: cache, backing: BackingLocation(backing[0]),
                                              backingDurableOnAcknowledgement: backingDurableOnAck, pmemPath: pmem,
                                              eventLoop: group.next(), tunables: try tunableOptions.tunables(), logger: logger)
            } catch {
                logger.critical("\(error)")
                try? group.syncShutdownGracefully()
                throw ExitCode(1)
            }
            exports.append(NBDServerExport(name: export.first ?? "", description: description, volume: volume, readOnly: readOnly))
            volumes.append(volume)
            controlServer = try startControl(for: volume, group: group, logger: logger)
        }
        if let ramdisk {
            let volume: RAMDiskVolume
            do {
                volume = try RAMDiskVolume(sizeBytes: ByteCount.parse(ramdisk)!, limitBytes: ramdiskLimit.flatMap(ByteCount.parse),
                                           locked: readOnly, managementLoop: group.next())
            } catch {
                logger.critical("\(error)")
                try? group.syncShutdownGracefully()
                throw ExitCode(1)
            }
            logger.warning("\(RAMDiskVolume.durabilityNote)")
            let shown = description.isEmpty ? RAMDiskVolume.durabilityNote : "\(description) (\(RAMDiskVolume.durabilityNote))"
            exports.append(NBDServerExport(name: export.first ?? "", description: shown, volume: volume, readOnly: false))
            volumes.append(volume)
            controlServer = try startControl(for: volume, group: group, logger: logger)
        }
        for (index, path) in backing.enumerated() where cache == nil {
            let volume: PassthroughVolume
            do {
                volume = try PassthroughVolume(path: path, readOnly: readOnly)
            } catch {
                logger.critical("\(error)")
                throw ExitCode(1)
            }
            if volume.file.ignoredTailBytes > 0 {
                logger.warning("the last \(volume.file.ignoredTailBytes) bytes of \(path) do not fill a 512-byte sector and are not served")
            }
            let name = index < export.count ? export[index] : ""
            exports.append(NBDServerExport(name: name, description: description, volume: volume, readOnly: readOnly))
            volumes.append(volume)
        }

        var configuration = NBDServerConfiguration()
        if let socket {
            configuration.unixSocketPath = URL(fileURLWithPath: socket).path
        }
        if let listen {
            let address = try ListenAddress(listen)
            configuration.tcpHost = address.host
            configuration.tcpPort = address.port
        } else if socket == nil {
            configuration.tcpHost = "127.0.0.1"
            configuration.tcpPort = 10809
        }

        let server = NBDServer(exports: exports, configuration: configuration, group: group, logger: logger)
        do {
            try server.start()
        } catch {
            logger.critical("cannot listen: \(error)")
            controlServer?.stop()
            for volume in volumes { try? volume.close() }
            try? group.syncShutdownGracefully()
            throw ExitCode(1)
        }
        printWelcome(exports: exports, configuration: configuration, server: server)

        stop.wait()
        logger.info("shutting down: finishing requests in flight")
        server.shutdown()
        controlServer?.stop()
        var failed = false
        for volume in volumes {
            do {
                try volume.close()
            } catch {
                logger.error("could not shut down cleanly: \(error)")
                failed = true
            }
        }
        try? IOUringDrivers.shared.stopAll(in: group)
        try? group.syncShutdownGracefully()
        logger.info("stopped")
        if failed { throw ExitCode(1) }
    }

    /// The control endpoint of a managed volume, beside the NBD socket or at --control; nil (with a
    /// warning) when there is neither. A failure to listen closes the volume and exits.
    private func startControl(for volume: any ManagedVolume & Volume, group: MultiThreadedEventLoopGroup, logger: Logger) throws -> ControlServer? {
        guard let path = control ?? socket.map({ URL(fileURLWithPath: $0).path + ".control" }) else {
            logger.warning("no control endpoint: give --socket or --control to use `sluice status`, `set` and `drain`")
            return nil
        }
        let server = ControlServer(volume: volume, socketPath: path, group: group, logger: logger)
        do {
            try server.start()
            return server
        } catch {
            logger.critical("cannot start the control endpoint at \(path): \(error)")
            try? volume.close()
            try? group.syncShutdownGracefully()
            throw ExitCode(1)
        }
    }

    private func printWelcome(exports: [NBDServerExport], configuration: NBDServerConfiguration, server: NBDServer) {
        var lines: [String] = []
        for export in exports {
            let size = export.volume.sizeBytes
            let encodedName = export.name.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? export.name
            if let path = configuration.unixSocketPath {
                lines.append("export '\(export.name)' (\(size) bytes): nbd+unix:///\(encodedName)?socket=\(path)")
            }
            if let host = configuration.tcpHost {
                let shownHost = host.contains(":") ? "[\(host)]" : host
                lines.append("export '\(export.name)' (\(size) bytes): nbd://\(shownHost):\(configuration.tcpPort)/\(encodedName)")
            }
        }
        if let path = configuration.unixSocketPath {
            lines.append("try: nbdinfo 'nbd+unix:///?socket=\(path)'")
        } else if let host = configuration.tcpHost {
            lines.append("try: nbdinfo nbd://\(host):\(configuration.tcpPort)")
        }
        FileHandle.standardError.write((lines.joined(separator: "\n") + "\n").data(using: .utf8)!)
    }
}

/// A `host:port` given to `--listen`.
struct ListenAddress {
    var host: String
    var port: Int

    init(_ text: String) throws {
        // "[::1]:10809", "127.0.0.1:10809", "localhost:10809", or just a host.
        var host = text
        var port = 10809
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { throw ValidationError("bad --listen address '\(text)'") }
            host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            if rest.hasPrefix(":") {
                guard let value = Int(rest.dropFirst()) else { throw ValidationError("bad port in --listen '\(text)'") }
                port = value
            }
        } else if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon])
            guard let value = Int(text[text.index(after: colon)...]) else { throw ValidationError("bad port in --listen '\(text)'") }
            port = value
        }
        guard (0...65535).contains(port), !host.isEmpty else { throw ValidationError("bad --listen address '\(text)'") }
        self.host = host
        self.port = port
    }
}

/// Blocks until SIGINT or SIGTERM arrives.
final class StopSignal {
    private let semaphore = DispatchSemaphore(value: 0)
    private var sources: [DispatchSourceSignal] = []

    init() {
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { [semaphore] in semaphore.signal() }
            source.resume()
            sources.append(source)
        }
    }

    func wait() {
        semaphore.wait()
    }
}
