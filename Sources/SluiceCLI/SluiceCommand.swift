import ArgumentParser

/// The `sluice` command line.
@main
struct SluiceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sluice",
        abstract: "A write-back block cache served over NBD.",
        discussion: """
            Sluice serves block devices over the Network Block Device protocol (NBD). Any NBD \
            client can use it: nbdinfo, nbdcopy, nbdfuse, qemu-img and qemu-io, fio's nbd engine, \
            or the kernel's nbd-client.

            Start with `sluice serve --help`.
            """,
        subcommands: [ServeCommand.self, FormatCommand.self, ModeCommand.self, StatusCommand.self, SetCommand.self, DrainCommand.self]
    )
}
