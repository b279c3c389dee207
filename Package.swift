// swift-tools-version:5.10
import PackageDescription

/// Sluice: a log-structured write-back block cache served over NBD.
///
/// Dependencies point one way: `sluice` (CLI) → `NBDServer` → `SluiceVolume` ← `SluicePassthrough` → `SluiceIO`.
/// The NBD layers know only the volume interface; volumes know nothing of NBD.
/// Release builds drop the runtime exclusivity checks on the hot path (they cost several percent
/// of CPU per request); debug builds, and therefore every test run, keep them on.
let hotPathSettings: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "Sluice",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "sluice", targets: ["SluiceCLI"]),
        .executable(name: "sluice-recover", targets: ["SluiceRecover"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
    ],
    targets: [
        // System libraries: one module map and one shim header each, found through pkg-config.
        .systemLibrary(name: "CLibURing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
        .systemLibrary(name: "CLibPmem", pkgConfig: "libpmem", providers: [.apt(["libpmem-dev"])]),
        .systemLibrary(name: "CLibNBD", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),
        .systemLibrary(name: "CISAL", pkgConfig: "libisal", providers: [.apt(["libisal-dev"])]),

        // The volume interface and the types shared by servers and volumes.
        .target(
            name: "SluiceVolume",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: hotPathSettings
        ),
        // io_uring-backed block I/O, driven from the caller's event loop.
        .target(
            name: "SluiceIO",
            dependencies: [
                "CLibURing",
                "SluiceVolume",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: hotPathSettings
        ),
        // The first volume kind: every request goes straight to a backing file or block device.
        .target(
            name: "SluicePassthrough",
            dependencies: [
                "CLibURing",
                "SluiceVolume",
                "SluiceIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: hotPathSettings
        ),
        // RAM disks: sparse memory volumes, resized and locked at run time. Not durable.
        .target(
            name: "SluiceRAMDisk",
            dependencies: [
                "SluiceVolume",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: hotPathSettings
        ),
        // The eventually persistent RAM disk: a RAM image of a backing store, written back on a
        // commit interval and, with barriers on, for every FLUSH and FUA.
        .target(
            name: "SluiceEPRD",
            dependencies: [
                "SluiceVolume",
                "SluiceRAMDisk",
                "SluiceCache",
                "SluiceFormat",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: hotPathSettings
        ),
        // The on-media format of a cache device: superblock, records, segment headers, CRC-32C.
        .target(
            name: "SluiceFormat",
            dependencies: ["CISAL"]
        ),
        // The write-back cache engine: index, buffers, segment log, writeback (being built).
        .target(
            name: "SluiceCache",
            dependencies: [
                "SluiceFormat", "SluiceVolume", "SluiceIO", "RecoverCache", "CLibURing", "CLibNBD", "CLibPmem",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: hotPathSettings
        ),
        // recover_cache: finds the log a crash left behind and rebuilds the cache state from it.
        .target(
            name: "RecoverCache",
            dependencies: ["SluiceFormat"],
            path: "Recovery/RecoverCache"
        ),
        // The offline recovery tool's work: check, dump, drain and detach a cache without a
        // server, on the same recovery code the server runs.
        .target(
            name: "CacheRepair",
            dependencies: [
                "SluiceCache", "RecoverCache", "SluiceFormat", "SluiceIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Recovery/CacheRepair"
        ),
        // `sluice-recover`, the offline recovery tool.
        .executableTarget(
            name: "SluiceRecover",
            dependencies: [
                "CacheRepair", "SluiceCache", "SluiceFormat",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Recovery/SluiceRecover"
        ),
        // The control endpoint of a running cache (HTTP+JSON on a Unix socket) and its client.
        .target(
            name: "SluiceControl",
            dependencies: [
                "SluiceVolume",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // NBD wire layouts, pure decoders and the handshake state machine. No I/O.
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: hotPathSettings
        ),
        // The NBD server: SwiftNIO channel handlers mapping NBD commands onto the volume interface.
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol",
                "SluiceVolume",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: hotPathSettings
        ),
        // A small libnbd client for tests and load generators.
        .target(name: "NBDClient", dependencies: ["CLibNBD"]),
        .executableTarget(
            name: "SluiceCLI",
            dependencies: [
                "NBDServer",
                "SluiceVolume",
                "SluiceIO",
                "SluicePassthrough",
                "SluiceRAMDisk",
                "SluiceEPRD",
                "SluiceCache",
                "SluiceControl",
                "SluiceFormat",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),

        // Simulators and test schedulers: simulated media and persistent memory that forget what
        // was not persisted at a simulated power failure, seeded schedulers that reorder or hold
        // media operations, and a clock the tests drive. Only test targets link it.
        .target(
            name: "SluiceTesting",
            dependencies: ["SluiceCache", "SluiceVolume", .product(name: "NIOCore", package: "swift-nio")]
        ),

        .testTarget(
            name: "NBDProtocolTests",
            dependencies: ["NBDProtocol", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .testTarget(
            name: "SluiceCacheTests",
            dependencies: ["SluiceCache", "SluiceTesting", "SluiceFormat", "RecoverCache"]
        ),
        .testTarget(
            name: "RecoverCacheTests",
            dependencies: ["RecoverCache", "SluiceFormat"]
        ),
        .testTarget(
            name: "SluiceRAMDiskTests",
            dependencies: ["SluiceRAMDisk", "SluiceVolume", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")]
        ),
        .testTarget(
            name: "SluiceEPRDTests",
            dependencies: ["SluiceEPRD", "SluiceVolume", "SluiceCache", "SluiceTesting", "SluiceRAMDisk",
                           .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio")]
        ),
        .testTarget(
            name: "SluiceFormatTests",
            dependencies: ["SluiceFormat"]
        ),
        .testTarget(
            name: "SluiceIOTests",
            dependencies: [
                "SluiceIO", "SluiceVolume", "SluicePassthrough", "CLibURing",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer", "NBDProtocol", "SluiceVolume", "SluicePassthrough", "SluiceRAMDisk", "SluiceIO", "NBDClient", "SluiceCache", "SluiceFormat", "SluiceTesting",
                "SluiceControl",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            // crash_client.py, the kill harness's python3-libnbd client, run from where it lies.
            exclude: ["Resources"]
        ),
    ]
)
