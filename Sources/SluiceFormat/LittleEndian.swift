/// Little-endian field access on a block of bytes. Every on-media integer is little-endian.
struct LittleEndianWriter {
    private(set) var bytes: [UInt8]
    private(set) var position = 0

    init(count: Int) {
        bytes = [UInt8](repeating: 0, count: count)
    }

    mutating func write<T: FixedWidthInteger>(_ value: T) {
        precondition(position + MemoryLayout<T>.size <= bytes.count, "field past the end of the block")
        var little = value.littleEndian
        withUnsafeBytes(of: &little) { raw in
            for (index, byte) in raw.enumerated() { bytes[position + index] = byte }
        }
        position += MemoryLayout<T>.size
    }

    mutating func write(bytes source: [UInt8]) {
        precondition(position + source.count <= bytes.count, "field past the end of the block")
        bytes.replaceSubrange(position..<(position + source.count), with: source)
        position += source.count
    }

    mutating func seek(to offset: Int) {
        precondition(offset >= 0 && offset <= bytes.count)
        position = offset
    }

    mutating func set<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        let saved = position
        position = offset
        write(value)
        position = saved
    }
}

struct LittleEndianReader {
    let bytes: UnsafeRawBufferPointer
    private(set) var position = 0

    init(_ bytes: UnsafeRawBufferPointer) {
        self.bytes = bytes
    }

    mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        precondition(position + MemoryLayout<T>.size <= bytes.count, "field past the end of the block")
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + MemoryLayout<T>.size)])) }
        position += MemoryLayout<T>.size
        return T(littleEndian: value)
    }

    mutating func read(count: Int) -> [UInt8] {
        precondition(position + count <= bytes.count, "field past the end of the block")
        defer { position += count }
        return Array(bytes[position..<(position + count)])
    }

    mutating func seek(to offset: Int) {
        precondition(offset >= 0 && offset <= bytes.count)
        position = offset
    }
}
