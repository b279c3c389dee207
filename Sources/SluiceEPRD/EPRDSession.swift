import NIOCore
import SluiceCache
import SluiceVolume

/// One client's session on an ``EPRDVolume``. A request whose chunks are in memory completes
/// within ``submit(_:tag:sink:)`` (its burst ends at ``submitBatch()``); one that needs a load or,
/// with barriers on, a commit completes later on the session's loop, a burst of its own.
final class EPRDSession: VolumeSession {
    private let volume: EPRDVolume
    private let eventLoop: any EventLoop
    private var burst = CompletionBurst()
    private(set) var requestsInFlight = 0

    init(volume: EPRDVolume, eventLoop: any EventLoop) {
        self.volume = volume
        self.eventLoop = eventLoop
    }

    func submit(_ request: consuming VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink) {
        eventLoop.preconditionInEventLoop()
        requestsInFlight += 1
        run(request, tag: tag, sink: sink, isInline: true)
    }

    private func run(_ request: VolumeRequest, tag: UInt32, sink: any VolumeCompletionSink, isInline: Bool) {
        switch volume.perform(request) {
        case .reply(let reply):
            finish(tag: tag, reply: reply, sink: sink, isInline: isInline)
        case .load(let chunks):
            // Chunks stay in memory once loaded, so the second try never needs another load.
            guard isInline else { return finish(tag: tag, reply: .failed(.io(errno: 5)), sink: sink, isInline: false) }
            volume.load(chunks) { result in
                self.eventLoop.execute {
                    switch result {
                    case .success: self.run(request, tag: tag, sink: sink, isInline: false)
                    case .failure(let error): self.finish(tag: tag, reply: .failed(.io(errno: error.errnoValue)), sink: sink, isInline: false)
                    }
                }
            }
        case .replyAfterCommit(let reply):
            volume.requestCommit { result in
                self.eventLoop.execute {
                    switch result {
                    case .success: self.finish(tag: tag, reply: reply, sink: sink, isInline: false)
                    case .failure(let error): self.finish(tag: tag, reply: .failed(.io(errno: error.errnoValue)), sink: sink, isInline: false)
                    }
                }
            }
        }
    }

    private func finish(tag: UInt32, reply: VolumeReply, sink: any VolumeCompletionSink, isInline: Bool) {
        requestsInFlight -= 1
        sink.volumeRequestCompleted(tag: tag, reply: reply)
        if isInline {
            burst.note(sink)
        } else {
            sink.volumeCompletionBurstEnded()
        }
    }

    func submitBatch() {
        eventLoop.preconditionInEventLoop()
        burst.end()
    }

    func close() {
        submitBatch()
    }
}
