import Glibc
import SluiceFormat
import SluiceVolume

/// Cache-device I/O errors, counted with a half-life (bcache's `io_error_limit` and
/// `io_error_halflife`): a burst of errors trips the limit, the odd error now and then does not.
struct DeviceErrorMeter {
    /// The decayed count.
    private(set) var count: Double = 0
    private var updatedNs: UInt64 = 0
    /// Errors in all, never decayed (for `status`).
    private(set) var total: UInt64 = 0

    /// Counts one error at `nowNs`; returns the decayed count including it.
    mutating func record(nowNs: UInt64, halfLifeSeconds: Int) -> Double {
        decay(nowNs: nowNs, halfLifeSeconds: halfLifeSeconds)
        count += 1
        total += 1
        return count
    }

    mutating func decay(nowNs: UInt64, halfLifeSeconds: Int) {
        defer { updatedNs = nowNs }
        guard halfLifeSeconds > 0, nowNs > updatedNs, count > 0 else { return }
        let halfLives = Double(nowNs - updatedNs) / (Double(halfLifeSeconds) * 1e9)
        count *= exp2(-halfLives)
    }
}

extension CacheEngine {
    /// The mode requests are served in: the recorded one, or passthrough once the cache device has
    /// exceeded its error limit (new data is no longer cached; what is dirty is still served and
    /// written back).
    var effectiveCacheMode: CacheMode { degradedReason == nil ? cacheMode : .passthrough }

    /// A cache-device operation failed in a way the engine survives (a client read): the error is
    /// counted, and past `io_error_limit` the cache degrades to passthrough, saying so in the log
    /// and in `status`. Errors that leave acknowledged data only in memory fail the engine instead
    /// (``fail(_:doing:)``).
    func cacheDeviceFailed(_ error: MediumError, doing what: String) {
        guard !lifecycle.isPoweredOff else { return }
        let count = cacheDeviceErrors.record(nowNs: clock.nowNs, halfLifeSeconds: tunables.ioErrorHalfLifeSeconds)
        logger.warning("cache device error while \(what): \(error)")
        guard degradedReason == nil, tunables.ioErrorLimit > 0, count > Double(tunables.ioErrorLimit) else { return }
        degradedReason = "the cache device exceeded io_error_limit (\(tunables.ioErrorLimit) errors, half-life \(tunables.ioErrorHalfLifeSeconds) s): "
            + "new data is not cached, dirty data is still served and written back; replace the cache device "
            + "(`sluice drain`, then a new `sluice format`)"
        logger.error("cache degraded to passthrough: \(degradedReason!)")
        drive()
    }
}
