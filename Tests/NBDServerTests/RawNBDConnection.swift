import Foundation
import NBDProtocol
import NIOCore

/// A deliberately dumb NBD client on a blocking Unix socket, for sending what well-behaved
/// clients never send: garbage, oversized payloads, truncated requests.
final class RawNBDConnection {
    private let socketDescriptor: Int32
    private(set) var isClosed = false
    /// Send every byte separately, with a pause after each, so the server sees one-byte reads.
    var sendsOneByteAtATime = false
    /// Give up on sending (without error) once the socket stops taking bytes for a second, for
    /// tests of a server that stops reading.
    var sendsWithoutBlocking = false

    init(socketPath: String) throws {
        socketDescriptor = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard socketDescriptor >= 0 else { throw POSIXError(.EIO) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(socketDescriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            let bytes = Array(socketPath.utf8)
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let status = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(socketDescriptor, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard status == 0 else {
            close(socketDescriptor)
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
    }

    deinit {
        close(socketDescriptor)
    }

    func send(_ bytes: [UInt8]) throws {
        if sendsOneByteAtATime {
            for byte in bytes {
                let count = withUnsafeBytes(of: byte) { Glibc.send(socketDescriptor, $0.baseAddress, 1, Int32(MSG_NOSIGNAL)) }
                guard count == 1 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EPIPE) }
                usleep(200)
            }
            return
        }
        var sent = 0
        var stalls = 0
        while sent < bytes.count {
            let flags = Int32(MSG_NOSIGNAL) | (sendsWithoutBlocking ? Int32(MSG_DONTWAIT) : 0)
            let count = bytes[sent...].withUnsafeBytes { Glibc.send(socketDescriptor, $0.baseAddress, $0.count, flags) }
            if count < 0 && sendsWithoutBlocking && errno == EAGAIN {
                stalls += 1
                if stalls > 100 { return }
                usleep(10_000)
                continue
            }
            guard count > 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EPIPE) }
            sent += count
        }
    }

    func send(_ buffer: ByteBuffer) throws {
        try send(Array(buffer.readableBytesView))
    }

    /// Reads exactly `count` bytes; nil if the server closed the connection first.
    func receive(_ count: Int) throws -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let got = bytes[received...].withUnsafeMutableBytes { recv(socketDescriptor, $0.baseAddress, $0.count, 0) }
            if got == 0 {
                isClosed = true
                return nil
            }
            guard got > 0 else {
                if errno == ECONNRESET {
                    isClosed = true
                    return nil
                }
                throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
            }
            received += got
        }
        return bytes
    }

    /// True once the server has closed the connection (reads end of stream within the timeout).
    func waitForClose() throws -> Bool {
        var scratch = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<1000 {
            let got = scratch.withUnsafeMutableBytes { recv(socketDescriptor, $0.baseAddress, $0.count, 0) }
            if got == 0 || (got < 0 && errno == ECONNRESET) { return true }
            if got < 0 { return false }
        }
        return false
    }

    /// Negotiates with NBD_OPT_GO for `export` and returns the export size. With `structuredReplies`
    /// the client first asks for structured replies and waits for the acknowledgement.
    func negotiate(export: String = "", structuredReplies: Bool = false) throws -> UInt64 {
        guard let greeting = try receive(18) else { throw POSIXError(.ECONNRESET) }
        precondition(Array(greeting[0..<8]) == Array("NBDMAGIC".utf8))
        var buffer = ByteBufferAllocator().buffer(capacity: 64)
        buffer.writeInteger(UInt32(3))
        if structuredReplies {
            buffer.writeInteger(NBDMagic.option)
            buffer.writeInteger(NBDOptionCode.structuredReply.rawValue)
            buffer.writeInteger(UInt32(0))
            try send(buffer)
            buffer.clear()
            guard let reply = try receive(20), ByteBuffer(bytes: reply).getInteger(at: 12, as: UInt32.self) == NBDOptionReplyType.ack.rawValue
            else { throw POSIXError(.EPROTO) }
        }
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(NBDOptionCode.go.rawValue)
        buffer.writeInteger(UInt32(4 + export.utf8.count + 2))
        buffer.writeInteger(UInt32(export.utf8.count))
        buffer.writeString(export)
        buffer.writeInteger(UInt16(0))
        try send(buffer)
        var size: UInt64 = 0
        while true {
            guard let header = try receive(20) else { throw POSIXError(.ECONNRESET) }
            var parsed = ByteBuffer(bytes: header)
            _ = parsed.readInteger(as: UInt64.self)
            _ = parsed.readInteger(as: UInt32.self)
            let type = parsed.readInteger(as: UInt32.self)!
            let length = Int(parsed.readInteger(as: UInt32.self)!)
            let payload = length > 0 ? try receive(length) ?? [] : []
            if type == NBDOptionReplyType.info.rawValue, payload.count >= 10, payload[0] == 0, payload[1] == 0 {
                size = ByteBuffer(bytes: payload[2..<10]).getInteger(at: 0, as: UInt64.self)!
            }
            if type == NBDOptionReplyType.ack.rawValue { return size }
            if type & 0x8000_0000 != 0 { throw POSIXError(.ENOENT) }
        }
    }

    func sendRequest(_ command: NBDCommand, cookie: UInt64, offset: UInt64, length: UInt32, flags: NBDCommandFlags = [], payload: [UInt8] = []) throws {
        var buffer = ByteBufferAllocator().buffer(capacity: 28 + payload.count)
        buffer.writeNBDRequestHeader(NBDRequestHeader(flags: flags, command: command, cookie: cookie, offset: offset, lengthBytes: length))
        buffer.writeBytes(payload)
        try send(buffer)
    }

    /// Reads one structured reply chunk: its flags, type, cookie and payload.
    func receiveChunk() throws -> (flags: UInt16, type: UInt16, cookie: UInt64, payload: [UInt8])? {
        guard let header = try receive(20) else { return nil }
        let buffer = ByteBuffer(bytes: header)
        precondition(buffer.getInteger(at: 0, as: UInt32.self) == NBDMagic.structuredReply, "not a structured reply chunk")
        let length = Int(buffer.getInteger(at: 16, as: UInt32.self)!)
        let payload = length > 0 ? try receive(length) : []
        guard let payload else { return nil }
        return (buffer.getInteger(at: 4, as: UInt16.self)!, buffer.getInteger(at: 6, as: UInt16.self)!,
                buffer.getInteger(at: 8, as: UInt64.self)!, payload)
    }

    /// Reads a simple reply: (error, cookie), then `dataBytes` of data for a successful read.
    func receiveSimpleReply(dataBytes: Int = 0) throws -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let header = try receive(16) else { return nil }
        let buffer = ByteBuffer(bytes: header)
        precondition(buffer.getInteger(at: 0, as: UInt32.self) == NBDMagic.simpleReply, "not a simple reply")
        let error = buffer.getInteger(at: 4, as: UInt32.self)!
        let cookie = buffer.getInteger(at: 8, as: UInt64.self)!
        var data: [UInt8] = []
        if error == 0 && dataBytes > 0 {
            guard let bytes = try receive(dataBytes) else { return nil }
            data = bytes
        }
        return (error, cookie, data)
    }
}
