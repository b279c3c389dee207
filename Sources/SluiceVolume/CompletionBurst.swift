/// The sinks that received completions inline since the last burst ended, for sessions that
/// complete within `submit` and end the burst at `submitBatch`: each sink hears of the end once.
public struct CompletionBurst {
    private var sinks: [any VolumeCompletionSink] = []

    public init() {}

    /// `sink` received a completion in this burst.
    public mutating func note(_ sink: any VolumeCompletionSink) {
        if !sinks.contains(where: { $0 === sink }) { sinks.append(sink) }
    }

    /// Ends the burst: tells every sink noted since the last end.
    public mutating func end() {
        guard !sinks.isEmpty else { return }
        let ended = sinks
        sinks.removeAll(keepingCapacity: true)
        for sink in ended { sink.volumeCompletionBurstEnded() }
    }
}
