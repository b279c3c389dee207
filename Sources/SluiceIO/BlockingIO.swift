import Glibc

/// Plain blocking transfers for the paths that do not go through io_uring (inline page-cache I/O,
/// offline tools). They finish short transfers and retry EINTR a bounded number of times.
public enum BlockingIO {
    /// `BLKGETSIZE64` from `<linux/fs.h>`, which Swift cannot import because it is a function-like macro.
    public static let blockDeviceSizeRequest: UInt = 0x8008_1272

    /// Writes all of `bytes` at `offset`; returns 0 or an errno.
    public static func write(fileDescriptor: Int32, bytes: UnsafeRawBufferPointer, offset: UInt64) -> Int32 {
        transferAll(count: bytes.count) { done in
            pwrite(fileDescriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
        }
    }

    /// Reads exactly `bytes.count` bytes at `offset`; returns 0 or an errno (EIO at end of file).
    public static func read(fileDescriptor: Int32, bytes: UnsafeMutableRawBufferPointer, offset: UInt64) -> Int32 {
        transferAll(count: bytes.count) { done in
            pread(fileDescriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
        }
    }

    /// Calls `step(bytesDoneSoFar)` until `count` bytes are done. A step that moves nothing is end of
    /// file (EIO); interruptions are retried a bounded number of times.
    private static func transferAll(count: Int, _ step: (Int) -> Int) -> Int32 {
        var done = 0
        var interruptions = 0
        while done < count {
            let moved = step(done)
            if moved > 0 {
                done += moved
            } else if moved < 0 && errno == EINTR {
                interruptions += 1
                if interruptions > 1000 { return EINTR }
            } else {
                return moved == 0 ? EIO : errno
            }
        }
        return 0
    }
}
