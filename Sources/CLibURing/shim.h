// System headers first, with the same feature macros as Swift's Glibc module, so that types
// such as fd_set have one definition across every C module a Swift file imports. liburing.h
// defines _GNU_SOURCE for itself, which by then no longer changes those types.
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <signal.h>
#include <stdint.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/vfs.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <unistd.h>
#include <sys/syscall.h>

/// fallocate(2) without _GNU_SOURCE (which would clash with other modules' view of the headers).
static inline int sluice_fallocate(int fd, int mode, off_t offset, off_t length) {
    return (int)syscall(SYS_fallocate, fd, mode, offset, length);
}

/// preadv2(2) with RWF_NOWAIT: reads only what the page cache holds, never waiting for a device.
/// Returns the bytes read, or -1 with errno EAGAIN when the data is not cached.
static inline long sluice_pread_nowait(int fd, void *buffer, size_t count, uint64_t offset) {
    struct iovec vector = { buffer, count };
    return syscall(SYS_preadv2, fd, &vector, 1, (unsigned long)offset, 0UL, RWF_NOWAIT);
}

/// O_DIRECT without _GNU_SOURCE: glibc defines the architecture's value as __O_DIRECT.
static inline int sluice_o_direct(void) {
    return __O_DIRECT;
}
