import Logging
import NBDProtocol
import NIOCore
import SluiceVolume

/// Serves one NBD client: negotiation, then transmission, mapping each request onto the volume.
///
/// Everything runs on the connection's event loop. Requests are decoded and validated at the edge,
/// submitted to the volume session in a batch per read burst, and answered in completion order
/// (replies may overtake each other, as the protocol allows). Reading pauses while too many
/// requests or bytes are in flight, which bounds the memory one client can make the server hold.
///
/// The handler is inbound-only, so the event loop's per-read `read()` call and every write pass
/// straight to the socket without visiting it; pausing turns the channel's auto-read off instead.
final class NBDConnectionHandler: ChannelInboundHandler, VolumeCompletionSink {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Asks a connection to finish its in-flight requests, refuse new ones and close.
    struct DrainEvent {}

    private enum Phase: Equatable {
        case handshake
        case transmission
        /// The client sent `NBD_CMD_DISC` or the server is draining: close once nothing is in flight.
        case closing
        case closed
    }

    private struct InFlightRequest {
        var cookie: UInt64 = 0
        var command: NBDCommand = .read
        var offset: UInt64 = 0
        var lengthBytes: UInt32 = 0
        var fastZero = false
        var requestOne = false
        var accountedBytes = 0
        var isActive = false
    }

    private let exports: [NBDServerExport]
    private let configuration: NBDServerConfiguration
    private var logger: Logger
    private var phase: Phase = .handshake
    private var handshakeDecoder = NBDHandshakeDecoder()
    private var handshakeMachine: NBDHandshakeStateMachine?
    private var handshakeTimer: Scheduled<Void>?
    private var requestDecoder: NBDRequestDecoder
    private var limits: NBDRequestLimits?
    private var session: (any VolumeSession)?
    private var context: ChannelHandlerContext?

    private var inFlight: [InFlightRequest] = []
    private var freeSlots: [UInt32] = []
    private var inFlightCount = 0
    private var inFlightBytes = 0
    private var readPaused = false
    /// Mirrors the channel's writability, kept from writability events so the per-request check is
    /// a plain load.
    private var channelIsWritable = true
    private var hasUnflushedReplies = false
    /// Small replies (headers, errors, block status) gathered until the next flush, so a burst of
    /// completions costs one buffer and one write. Reused once the socket has taken its bytes.
    private var replyBuffer: ByteBuffer
    /// The buffer handed to the channel by the last flush; reused (without allocating) once the
    /// channel has written it, which it normally has by the time the next flush comes.
    private var spareReplyBuffer: ByteBuffer
    /// A task is scheduled to decode requests that arrived while reading was paused.
    private var leftoverTaskScheduled = false
    private var isDraining = false
    private var structuredReplies = false
    /// Bytes of a header or an option that arrived without the rest of it. The decoders leave an
    /// incomplete unit in the buffer they are given; it waits here for the next read.
    private var leftover: ByteBuffer?

    init(exports: [NBDServerExport], configuration: NBDServerConfiguration, logger: Logger) {
        precondition(!exports.isEmpty)
        self.exports = exports
        self.configuration = configuration
        self.logger = logger
        self.replyBuffer = ByteBufferAllocator().buffer(capacity: 4096)
        self.spareReplyBuffer = ByteBufferAllocator().buffer(capacity: 4096)
        self.requestDecoder = NBDRequestDecoder(maximumPayloadBytes: exports.map(\.volume.blockSizes.maximumPayloadBytes).max()!)
        inFlight.reserveCapacity(configuration.inFlightRequestsMax)
        freeSlots.reserveCapacity(configuration.inFlightRequestsMax)
    }

    // MARK: - Lifecycle

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // The context holds the handler; letting go of it here breaks the cycle.
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        let machine = NBDHandshakeStateMachine(exports: exports.map(\.descriptor), allocator: context.channel.allocator)
        handshakeMachine = machine
        context.writeAndFlush(wrapOutboundOut(machine.greeting()), promise: nil)
        let timeout = configuration.handshakeTimeout
        // A strong capture: the timer is cancelled when negotiation ends or the channel closes, which
        // breaks the cycle. A weak capture would give the handler a side table and make every
        // retain and release of it on the request path take the slow route.
        handshakeTimer = context.eventLoop.scheduleTask(in: timeout) {
            guard case .handshake = self.phase else { return }
            self.fail(context: context, reason: NBDProtocolError.handshakeTimedOut.description)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        phase = .closed
        session?.close()
        logger.debug("connection closed", metadata: ["in-flight": "\(inFlightCount)"])
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.info("connection error, closing it", metadata: ["error": "\(error)"])
        phase = .closed
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is DrainEvent {
            isDraining = true
            switch phase {
            case .handshake:
                phase = .closed
                context.close(promise: nil)
            case .transmission, .closing:
                phase = .closing
                closeIfIdle(context: context)
            case .closed:
                break
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: - Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if var pending = leftover {
            // Rare: only when a read ended inside a header or an option. The copy is one read.
            leftover = nil
            pending.writeBuffer(&buffer)
            buffer = pending
        }
        defer {
            if buffer.readableBytes > 0, phase != .closed, !(phase == .closing && !isDraining) {
                // Keep a compact copy rather than a slice, so the channel can reuse its read buffer.
                var kept = context.channel.allocator.buffer(capacity: buffer.readableBytes)
                kept.writeBuffer(&buffer)
                leftover = kept
            }
        }
        switch phase {
        case .handshake:
            negotiate(context: context, buffer: &buffer)
            if case .transmission = phase, buffer.readableBytes > 0 {
                transmit(context: context, buffer: &buffer)
            }
        case .transmission:
            transmit(context: context, buffer: &buffer)
        case .closing:
            // After NBD_CMD_DISC the client must send nothing; while draining, whole requests
            // are still answered (with ESHUTDOWN) so the client is not left waiting.
            if isDraining { transmit(context: context, buffer: &buffer) }
        case .closed:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        session?.submitBatch()
        flushIfNeeded(context: context)
        context.fireChannelReadComplete()
    }

    private func negotiate(context: ChannelHandlerContext, buffer: inout ByteBuffer) {
        do {
            while case .handshake = phase, let message = try handshakeDecoder.next(from: &buffer) {
                let action = handshakeMachine!.receive(message)
                switch action {
                case .send(let reply):
                    if reply.readableBytes > 0 {
                        context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
                    }
                case .sendAndClose(let reply):
                    phase = .closed
                    context.writeAndFlush(wrapOutboundOut(reply)).whenComplete { _ in context.close(promise: nil) }
                case .close(let reason):
                    fail(context: context, reason: reason)
                case .startTransmission(let reply, let negotiation):
                    startTransmission(context: context, reply: reply, negotiation: negotiation)
                }
            }
        } catch {
            fail(context: context, reason: "\(error)")
        }
    }

    private func startTransmission(context: ChannelHandlerContext, reply: ByteBuffer, negotiation: NBDNegotiation) {
        handshakeTimer?.cancel()
        handshakeTimer = nil
        handshakeMachine = nil
        guard let export = exports.first(where: { $0.name == negotiation.export.name }) else {
            preconditionFailure("negotiation chose an export the handler does not have")
        }
        do {
            session = try export.volume.openSession(on: context.eventLoop)
        } catch {
            fail(context: context, reason: "cannot open the volume: \(error)")
            return
        }
        self.limits = NBDRequestLimits(negotiation: negotiation)
        self.structuredReplies = negotiation.structuredReplies
        logger[metadataKey: "export"] = "\(export.name)"
        logger.debug("transmission started", metadata: [
            "structured-replies": "\(negotiation.structuredReplies)",
            "flags": "0x\(String(negotiation.transmissionFlags.rawValue, radix: 16))",
        ])
        phase = .transmission
        context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
    }

    private func transmit(context: ChannelHandlerContext, buffer: inout ByteBuffer) {
        do {
            // Decoding stops at the limits, not just reading: a single read can hold thousands of
            // request headers, and each READ would allocate its buffer. What is left waits in
            // `leftover` until completions make room.
            while !readPaused, let frame = try requestDecoder.next(from: &buffer, allocator: context.channel.allocator) {
                switch frame {
                case .request(let header, let payload):
                    handle(header, payload: payload, context: context)
                case .oversizedWrite(let header):
                    refuse(header, error: .invalid,
                           message: "WRITE of \(header.lengthBytes) bytes exceeds the maximum payload", context: context)
                }
                if case .closed = phase { return }
                if case .closing = phase, !isDraining { return }
            }
        } catch {
            fail(context: context, reason: "\(error)")
        }
    }

    private func handle(_ header: NBDRequestHeader, payload: ByteBuffer?, context: ChannelHandlerContext) {
        let validated = NBDRequestValidator.validate(header, limits: limits!)
        let command: NBDRequestValidator.Command
        switch validated {
        case .failure(let refusal):
            logger.debug("request refused", metadata: [
                "command": "\(header.command)", "error": "\(refusal.error)", "reason": "\(refusal.message)",
            ])
            refuse(header, error: refusal.error, message: refusal.message, context: context)
            return
        case .success(let valid):
            command = valid
        }
        if case .disconnect = command {
            logger.debug("client disconnected (NBD_CMD_DISC)")
            phase = .closing
            closeIfIdle(context: context)
            return
        }
        if isDraining {
            refuse(header, error: .shutdown, message: "the server is shutting down", context: context)
            return
        }
        let request: VolumeRequest
        var accountedBytes = 0
        switch command {
        case .read(let offset, let length, _):
            let prefix = structuredReplies ? NBDWireSize.structuredReadPrefix : NBDWireSize.simpleReplyHeader
            var buffer = context.channel.allocator.buffer(capacity: prefix + Int(length))
            buffer.moveWriterIndex(forwardBy: prefix)
            request = .read(offset: offset, lengthBytes: length, buffer: buffer)
            accountedBytes = Int(length)
        case .write(let offset, _, let fua):
            // A zero-length write has no payload on the wire.
            let data = payload ?? ByteBuffer()
            request = .write(offset: offset, data: data, fua: fua)
            accountedBytes = data.readableBytes
        case .flush:
            request = .flush
        case .trim(let offset, let length, let fua):
            request = .trim(offset: offset, lengthBytes: length, fua: fua)
        case .cache(let offset, let length):
            request = .cache(offset: offset, lengthBytes: length)
        case .writeZeroes(let offset, let length, let fua, let noHole, let fastZero):
            var flags: WriteZeroesFlags = []
            if fua { flags.insert(.fua) }
            if noHole { flags.insert(.noHole) }
            if fastZero { flags.insert(.fastOnly) }
            request = .writeZeroes(offset: offset, lengthBytes: length, flags: flags)
        case .blockStatus(let offset, let length, let requestOne):
            request = .blockStatus(offset: offset, lengthBytes: length, maximumExtents: requestOne ? 1 : 1024)
        case .disconnect:
            preconditionFailure("handled above")
        }
        var entry = InFlightRequest()
        entry.cookie = header.cookie
        entry.command = header.command
        entry.offset = header.offset
        entry.lengthBytes = header.lengthBytes
        entry.fastZero = header.flags.contains(.fastZero)
        entry.requestOne = header.flags.contains(.requestOne)
        entry.accountedBytes = accountedBytes
        entry.isActive = true
        let tag = beginRequest(entry)
        pauseReadingIfNeeded(context: context)
        session!.submit(request, tag: tag, sink: self)
    }

    // MARK: - Completions

    func volumeRequestCompleted(tag: UInt32, reply: consuming VolumeReply) {
        precondition(Int(tag) < inFlight.count && inFlight[Int(tag)].isActive, "completion for an unknown request \(tag)")
        let request = inFlight[Int(tag)]
        inFlight[Int(tag)] = InFlightRequest()
        freeSlots.append(tag)
        inFlightCount -= 1
        inFlightBytes -= request.accountedBytes
        guard let context, phase != .closed else { return }
        // Consumed, so a read's buffer arrives uniquely owned and its prefix is set in place.
        switch consume reply {
        case .done:
            replyBuffer.writeNBDSimpleReply(error: .none, cookie: request.cookie)
            hasUnflushedReplies = true
        case .data(var buffer):
            let prefix = structuredReplies ? NBDWireSize.structuredReadPrefix : NBDWireSize.simpleReplyHeader
            precondition(buffer.readableBytes == prefix + Int(request.lengthBytes), "a read returned the wrong length")
            if structuredReplies {
                if request.lengthBytes == 0 {
                    replyBuffer.writeNBDChunkDone(cookie: request.cookie)
                    hasUnflushedReplies = true
                    break
                }
                buffer.setNBDOffsetDataPrefix(
                    cookie: request.cookie, offset: request.offset, dataBytes: Int(request.lengthBytes), at: buffer.readerIndex)
            } else {
                buffer.setNBDSimpleReply(error: .none, cookie: request.cookie, at: buffer.readerIndex)
            }
            write(buffer, context: context)
        case .extents(let extents):
            writeBlockStatus(extents, for: request, context: context)
        case .failed(let error):
            let code = NBDReplyMapping.error(for: error, command: request.command, fastZero: request.fastZero)
            if case .io = error {
                logger.warning("I/O error", metadata: ["command": "\(request.command)", "offset": "\(request.offset)",
                                                       "length": "\(request.lengthBytes)", "error": "\(error)"])
            }
            writeError(code, message: NBDReplyMapping.message(for: error), cookie: request.cookie, context: context)
        }
        resumeReadingIfPossible(context: context)
        if case .closing = phase {
            closeIfIdle(context: context)
        }
    }

    func volumeCompletionBurstEnded() {
        guard let context else { return }
        flushIfNeeded(context: context)
    }

    private func writeBlockStatus(_ extents: [BlockStatusExtent], for request: InFlightRequest, context: ChannelHandlerContext) {
        var descriptors: [(lengthBytes: UInt32, flags: UInt32)] = []
        descriptors.reserveCapacity(extents.count)
        var covered: UInt64 = 0
        for extent in extents where extent.lengthBytes > 0 {
            // The first N-1 extents must stay inside the request; only the last may run past it,
            // and with REQ_ONE not even that.
            guard covered < UInt64(request.lengthBytes) else { break }
            var length = extent.lengthBytes
            if request.requestOne {
                length = min(length, request.lengthBytes)
            }
            descriptors.append((length, extent.flags.rawValue))
            covered += UInt64(length)
            if request.requestOne { break }
        }
        guard !descriptors.isEmpty else {
            writeError(.inputOutput, message: "the volume described no extents", cookie: request.cookie, context: context)
            return
        }
        replyBuffer.writeNBDChunkBlockStatus(cookie: request.cookie, contextID: NBDMetaContext.baseAllocationID, descriptors: descriptors)
        hasUnflushedReplies = true
    }

    // MARK: - Replies

    private func refuse(_ header: NBDRequestHeader, error: NBDError, message: String, context: ChannelHandlerContext) {
        writeError(error, message: message, cookie: header.cookie, context: context)
    }

    private func writeError(_ error: NBDError, message: String, cookie: UInt64, context: ChannelHandlerContext) {
        if structuredReplies {
            replyBuffer.writeNBDChunkError(cookie: cookie, error: error, message: message)
        } else {
            replyBuffer.writeNBDSimpleReply(error: error, cookie: cookie)
        }
        hasUnflushedReplies = true
    }

    private func write(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        context.write(wrapOutboundOut(buffer), promise: nil)
        hasUnflushedReplies = true
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        // A flush can re-enter this handler (writability changes, completions), which may queue
        // more replies; the loop flushes those too. It is bounded by the replies that can be queued.
        var rounds = 0
        while hasUnflushedReplies {
            hasUnflushedReplies = false
            rounds += 1
            precondition(rounds < 1_000_000, "reply flushing does not settle")
            if replyBuffer.readableBytes > 0 {
                // Hand the gathered replies over and gather new ones in the other buffer, so nothing
                // queued during the flush is lost. The buffer coming back is normally unique again
                // (the socket took its bytes), so clearing it keeps its storage.
                let out = replyBuffer
                swap(&replyBuffer, &spareReplyBuffer)
                replyBuffer.clear()
                context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            } else {
                context.flush()
            }
        }
    }

    // MARK: - Flow control

    private var shouldPauseReading: Bool {
        inFlightCount >= configuration.inFlightRequestsMax
            || (inFlightCount > 0 && inFlightBytes >= configuration.inFlightBytesMax)
            || !channelIsWritable
    }

    /// Stops reading from the client once a new request crosses a limit.
    private func pauseReadingIfNeeded(context: ChannelHandlerContext) {
        guard !readPaused, shouldPauseReading else { return }
        readPaused = true
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
    }

    private func resumeReadingIfPossible(context: ChannelHandlerContext) {
        guard readPaused, !shouldPauseReading else { return }
        readPaused = false
        if leftover != nil {
            // Requests that arrived while paused are decoded before reading more, in a task of
            // their own: this may be called from deep inside a flush or a completion.
            guard !leftoverTaskScheduled else { return }
            leftoverTaskScheduled = true
            context.eventLoop.execute {
                self.leftoverTaskScheduled = false
                self.decodeLeftover(context: context)
            }
        } else {
            try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
        }
    }

    private func decodeLeftover(context: ChannelHandlerContext) {
        guard !readPaused, phase == .transmission || (phase == .closing && isDraining), var pending = leftover else { return }
        leftover = nil
        transmit(context: context, buffer: &pending)
        if pending.readableBytes > 0, phase != .closed {
            leftover = pending
        }
        session?.submitBatch()
        flushIfNeeded(context: context)
        if !readPaused, phase != .closed {
            try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        // A client that does not read its replies must not make the server queue them forever.
        channelIsWritable = context.channel.isWritable
        if channelIsWritable {
            resumeReadingIfPossible(context: context)
        } else {
            pauseReadingIfNeeded(context: context)
        }
        context.fireChannelWritabilityChanged()
    }

    private func beginRequest(_ entry: InFlightRequest) -> UInt32 {
        inFlightCount += 1
        inFlightBytes += entry.accountedBytes
        if let free = freeSlots.popLast() {
            inFlight[Int(free)] = entry
            return free
        }
        inFlight.append(entry)
        return UInt32(inFlight.count - 1)
    }

    private func closeIfIdle(context: ChannelHandlerContext) {
        guard inFlightCount == 0, phase != .closed else { return }
        phase = .closed
        leftover = nil
        flushIfNeeded(context: context)
        // Closing fails writes still queued in the channel; an empty write after the last reply
        // completes only once every reply before it is on the wire, so close from there.
        context.writeAndFlush(wrapOutboundOut(ByteBuffer())).whenComplete { _ in
            context.close(promise: nil)
        }
    }

    private func fail(context: ChannelHandlerContext, reason: String) {
        logger.info("closing connection", metadata: ["reason": "\(reason)"])
        phase = .closed
        context.close(promise: nil)
    }
}

