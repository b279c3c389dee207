// System headers first, with the same feature macros as Swift's Glibc module, so that types
// such as fd_set have one definition across every C module a Swift file imports.
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <stdint.h>
#include <libnbd.h>
