/*
 * fua_load: a load generator for FUA writes over NBD, on libnbd.
 *
 * fio's nbd engine never sends FUA, yet FUA writes are what a write-back cache with a persistent
 * buffer is meant to make cheap, so this tool drives them directly. Every connection is its own
 * libnbd handle, run by its own thread with its own poll loop, and keeps --depth writes in flight.
 * Offsets are random and aligned to --block-size, drawn from a seeded generator so two runs send
 * the same sequence. Every write's latency is measured from submission to completion, and one
 * JSON object is printed on standard output:
 *
 *   {"iops": ..., "writes": ..., "seconds": ..., "latency_us": {"p50": ..., "p99": ..., "mean": ...}}
 *
 * With --flush-each, each slot sends a FLUSH once its write has completed and sends its next write
 * only once the FLUSH has completed (fio's --fsync=1 at depth 1); the latency of such a write then
 * runs from the write's submission to the FLUSH's completion, because that is when the data is
 * durable, which is what the application waits for.
 *
 * Build: make .build/fua_load (cc -O2 -pthread -o .build/fua_load bench/fua_load.c $(pkg-config --cflags --libs libnbd))
 * Any failed write, flush or connection makes the tool exit with status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

struct options {
    const char *uri;
    int connections;
    int depth;
    double seconds;
    double warmup_seconds;
    uint64_t block_size;
    uint64_t size;            /* 0 means the export's size */
    bool fua;
    bool flush_each;
    uint64_t seed;
};

/* What a slot of a connection is waiting for. */
enum slot_state { SLOT_IDLE, SLOT_WRITING, SLOT_FLUSHING };

struct slot {
    enum slot_state state;
    int64_t cookie;
    uint64_t submitted_ns;
    void *buffer;
};

/* A growable array of latencies, one per connection, so threads never share memory while running. */
struct latencies {
    uint64_t *values;
    size_t count;
    size_t capacity;
};

struct connection {
    int index;
    const struct options *options;
    pthread_t thread;
    uint64_t random_state;
    struct latencies latencies;
    uint64_t last_completion_ns;
    bool failed;
};

/* The measurement window is shared by every connection: all of them start together once every
 * handle is connected, so connecting (which can be slow for a server with many connections) is
 * never part of the measured time. The main thread waits at `ready_barrier` with the connections,
 * sets the window, and releases them through `go_barrier`; the barriers order its writes of the
 * window before the connections read it. */
static pthread_barrier_t ready_barrier;
static pthread_barrier_t go_barrier;
static uint64_t measure_from_ns;   /* the end of the warmup */
static uint64_t deadline_ns;
static atomic_bool stop_everything; /* set by a connection that failed, so the others stop early */

static int monotonic_ns(uint64_t *result)
{
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) {
        perror("fua_load: clock_gettime");
        return -1;
    }
    *result = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    return 0;
}

/* SplitMix64: small, fast and good enough to spread offsets; seeded per connection. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static int append_latency(struct latencies *latencies, uint64_t value)
{
    if (latencies->count == latencies->capacity) {
        size_t capacity = latencies->capacity ? latencies->capacity * 2 : 65536;
        uint64_t *grown = realloc(latencies->values, capacity * sizeof *grown);
        if (grown == NULL) {
            perror("fua_load: realloc");
            return -1;
        }
        latencies->values = grown;
        latencies->capacity = capacity;
    }
    latencies->values[latencies->count++] = value;
    return 0;
}

static void report_nbd_error(const struct connection *connection, const char *what)
{
    fprintf(stderr, "fua_load: connection %d: %s: %s (errno %d)\n", connection->index, what,
            nbd_get_error() ? nbd_get_error() : "unknown error", nbd_get_errno());
}

static int wait_at(pthread_barrier_t *barrier)
{
    int result = pthread_barrier_wait(barrier);
    if (result != 0 && result != PTHREAD_BARRIER_SERIAL_THREAD) {
        errno = result;
        perror("fua_load: pthread_barrier_wait");
        return -1;
    }
    return 0;
}

static int submit_write(struct connection *connection, struct nbd_handle *handle, struct slot *slot)
{
    const struct options *options = connection->options;
    uint64_t blocks = options->size / options->block_size;
    uint64_t offset = (next_random(&connection->random_state) % blocks) * options->block_size;
    /* The first eight bytes carry the offset, so no two writes in a row carry the same data and a
     * server cannot recognise them as repeats. */
    memcpy(slot->buffer, &offset, sizeof offset);
    if (monotonic_ns(&slot->submitted_ns) != 0)
        return -1;
    uint32_t flags = options->fua ? LIBNBD_CMD_FLAG_FUA : 0;
    slot->cookie = nbd_aio_pwrite(handle, slot->buffer, options->block_size, offset, NBD_NULL_COMPLETION, flags);
    if (slot->cookie == -1) {
        report_nbd_error(connection, "nbd_aio_pwrite");
        return -1;
    }
    slot->state = SLOT_WRITING;
    return 0;
}

static int submit_flush(struct connection *connection, struct nbd_handle *handle, struct slot *slot)
{
    slot->cookie = nbd_aio_flush(handle, NBD_NULL_COMPLETION, 0);
    if (slot->cookie == -1) {
        report_nbd_error(connection, "nbd_aio_flush");
        return -1;
    }
    slot->state = SLOT_FLUSHING;
    return 0;
}

/* Records a write that is now durable. Writes submitted during the warmup are not counted. */
static int write_done(struct connection *connection, struct slot *slot, uint64_t now_ns)
{
    slot->state = SLOT_IDLE;
    if (slot->submitted_ns < measure_from_ns)
        return 0;
    connection->last_completion_ns = now_ns;
    return append_latency(&connection->latencies, now_ns - slot->submitted_ns);
}

static int run_connection(struct connection *connection, struct nbd_handle *handle, struct slot *slots)
{
    const struct options *options = connection->options;
    int in_flight = 0;
    for (;;) {
        uint64_t now_ns;
        if (monotonic_ns(&now_ns) != 0)
            return -1;
        bool submitting = now_ns < deadline_ns && !atomic_load(&stop_everything);
        if (submitting) {
            for (int i = 0; i < options->depth; i++) {
                if (slots[i].state == SLOT_IDLE) {
                    if (submit_write(connection, handle, &slots[i]) != 0)
                        return -1;
                    in_flight++;
                }
            }
        }
        /* Past the deadline the writes in flight still complete and count, so the tool never
         * leaves requests behind on the server. */
        if (in_flight == 0)
            return 0;
        /* A timeout bounds the wait so a stop requested by another connection is seen. */
        if (nbd_poll(handle, 1000) == -1) {
            report_nbd_error(connection, "nbd_poll");
            return -1;
        }
        if (monotonic_ns(&now_ns) != 0)
            return -1;
        for (int i = 0; i < options->depth; i++) {
            struct slot *slot = &slots[i];
            if (slot->state == SLOT_IDLE)
                continue;
            int completed = nbd_aio_command_completed(handle, (uint64_t)slot->cookie);
            if (completed == -1) {
                report_nbd_error(connection, slot->state == SLOT_WRITING ? "write failed" : "flush failed");
                return -1;
            }
            if (completed == 0)
                continue;
            if (slot->state == SLOT_WRITING && options->flush_each) {
                if (submit_flush(connection, handle, slot) != 0)
                    return -1;
                continue;
            }
            if (write_done(connection, slot, now_ns) != 0)
                return -1;
            in_flight--;
        }
    }
}

static void *connection_thread(void *argument)
{
    struct connection *connection = argument;
    const struct options *options = connection->options;
    struct nbd_handle *handle = NULL;
    struct slot *slots = NULL;
    bool waited = false;
    int result = -1;

    handle = nbd_create();
    if (handle == NULL) {
        report_nbd_error(connection, "nbd_create");
        goto out;
    }
    if (nbd_connect_uri(handle, options->uri) == -1) {
        report_nbd_error(connection, "nbd_connect_uri");
        goto out;
    }
    int64_t export_size = nbd_get_size(handle);
    if (export_size == -1) {
        report_nbd_error(connection, "nbd_get_size");
        goto out;
    }
    if (options->size > (uint64_t)export_size) {
        fprintf(stderr, "fua_load: --size %" PRIu64 " is larger than the export (%" PRId64 " bytes)\n", options->size,
                export_size);
        goto out;
    }
    if (options->fua) {
        int can_fua = nbd_can_fua(handle);
        if (can_fua == -1) {
            report_nbd_error(connection, "nbd_can_fua");
            goto out;
        }
        if (can_fua == 0) {
            fprintf(stderr, "fua_load: the server does not support FUA; without it the flag would be refused\n");
            goto out;
        }
    }
    if (options->flush_each) {
        int can_flush = nbd_can_flush(handle);
        if (can_flush == -1) {
            report_nbd_error(connection, "nbd_can_flush");
            goto out;
        }
        if (can_flush == 0) {
            fprintf(stderr, "fua_load: the server does not support FLUSH\n");
            goto out;
        }
    }
    if (connection->index == 0 && options->connections > 1) {
        int multi_connection = nbd_can_multi_conn(handle);
        if (multi_connection == -1) {
            report_nbd_error(connection, "nbd_can_multi_conn");
            goto out;
        }
        /* Only a warning: the load is still valid, but a FLUSH on one connection then need not
         * cover writes made on another. */
        if (multi_connection == 0)
            fprintf(stderr, "fua_load: warning: the server does not advertise CAN_MULTI_CONN\n");
    }

    slots = calloc((size_t)options->depth, sizeof *slots);
    if (slots == NULL) {
        perror("fua_load: calloc");
        goto out;
    }
    for (int i = 0; i < options->depth; i++) {
        /* Aligned, so a server that writes with O_DIRECT straight from the received data is not
         * penalised by this client. */
        int error = posix_memalign(&slots[i].buffer, 4096, options->block_size);
        if (error != 0) {
            errno = error;
            perror("fua_load: posix_memalign");
            goto out;
        }
        uint64_t fill_state = options->seed ^ ((uint64_t)connection->index << 32) ^ (uint64_t)i;
        uint64_t *words = slots[i].buffer;
        for (uint64_t w = 0; w < options->block_size / sizeof *words; w++)
            words[w] = next_random(&fill_state);
        slots[i].state = SLOT_IDLE;
    }

    waited = true;
    if (wait_at(&ready_barrier) != 0 || wait_at(&go_barrier) != 0)
        goto out;
    if (atomic_load(&stop_everything))
        goto out;
    result = run_connection(connection, handle, slots);

out:
    if (result != 0) {
        connection->failed = true;
        atomic_store(&stop_everything, true);
    }
    /* A connection that failed before the barriers still passes them, so no other thread waits
     * forever; the flag set above makes the others stop at once. */
    if (!waited) {
        (void)wait_at(&ready_barrier);
        (void)wait_at(&go_barrier);
    }
    /* Closing the handle first: libnbd may still refer to the buffers of commands in flight. */
    nbd_close(handle);
    if (slots != NULL) {
        for (int i = 0; i < options->depth; i++)
            free(slots[i].buffer);
        free(slots);
    }
    return NULL;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The nearest-rank percentile of sorted values. */
static double percentile_us(const uint64_t *sorted, size_t count, double percent)
{
    if (count == 0)
        return 0;
    size_t rank = (size_t)((percent / 100.0) * (double)count + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > count)
        rank = count;
    return (double)sorted[rank - 1] / 1000.0;
}

static void usage(FILE *stream)
{
    fprintf(stream,
            "usage: fua_load --uri URI [--connections N] [--depth Q] [--seconds S] [--warmup-seconds W]\n"
            "                [--block-size BYTES] [--size BYTES] [--fua] [--flush-each] [--seed N]\n"
            "\n"
            "Random aligned writes over NBD with N connections of Q writes in flight each; prints JSON.\n"
            "  --fua           set FUA on every write\n"
            "  --flush-each    send a FLUSH after each write completes, and the next write after it\n"
            "  --size          the span of offsets (default: the export's size)\n"
            "  --warmup-seconds  writes submitted during the first W seconds are not counted (default 0)\n");
}

static int parse_number(const char *text, const char *name, double minimum, double *result)
{
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || value < minimum) {
        fprintf(stderr, "fua_load: %s: invalid value '%s'\n", name, text);
        return -1;
    }
    *result = value;
    return 0;
}

/* A count, or a size with an optional K, M or G suffix (powers of 1024, as fio and nbdkit read them). */
static int parse_unsigned(const char *text, const char *name, uint64_t minimum, uint64_t *result)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    bool valid = errno == 0 && end != text && text[0] != '-';
    if (valid && *end != '\0') {
        const char *suffixes = "KMG";
        const char *suffix = strchr(suffixes, *end);
        if (suffix == NULL || end[1] != '\0') {
            valid = false;
        } else {
            unsigned shift = 10u * (unsigned)(suffix - suffixes + 1);
            valid = value <= (UINT64_MAX >> shift);
            value <<= shift;
        }
    }
    if (!valid || value < minimum) {
        fprintf(stderr, "fua_load: %s: invalid value '%s'\n", name, text);
        return -1;
    }
    *result = value;
    return 0;
}

int main(int argc, char **argv)
{
    struct options options = {
        .connections = 1, .depth = 1, .seconds = 5, .warmup_seconds = 0, .block_size = 4096, .seed = 1,
    };
    static const struct option long_options[] = {
        {"uri", required_argument, NULL, 'u'},
        {"connections", required_argument, NULL, 'c'},
        {"depth", required_argument, NULL, 'q'},
        {"seconds", required_argument, NULL, 's'},
        {"warmup-seconds", required_argument, NULL, 'w'},
        {"block-size", required_argument, NULL, 'b'},
        {"size", required_argument, NULL, 'z'},
        {"fua", no_argument, NULL, 'f'},
        {"flush-each", no_argument, NULL, 'F'},
        {"seed", required_argument, NULL, 'r'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    for (;;) {
        int option = getopt_long(argc, argv, "h", long_options, NULL);
        if (option == -1)
            break;
        uint64_t number;
        switch (option) {
        case 'u': options.uri = optarg; break;
        case 'c':
            if (parse_unsigned(optarg, "--connections", 1, &number) != 0 || number > 1024)
                return 2;
            options.connections = (int)number;
            break;
        case 'q':
            if (parse_unsigned(optarg, "--depth", 1, &number) != 0 || number > 65536)
                return 2;
            options.depth = (int)number;
            break;
        case 's':
            if (parse_number(optarg, "--seconds", 0.001, &options.seconds) != 0)
                return 2;
            break;
        case 'w':
            if (parse_number(optarg, "--warmup-seconds", 0, &options.warmup_seconds) != 0)
                return 2;
            break;
        case 'b':
            if (parse_unsigned(optarg, "--block-size", 512, &options.block_size) != 0)
                return 2;
            break;
        case 'z':
            if (parse_unsigned(optarg, "--size", 1, &options.size) != 0)
                return 2;
            break;
        case 'f': options.fua = true; break;
        case 'F': options.flush_each = true; break;
        case 'r':
            if (parse_unsigned(optarg, "--seed", 0, &options.seed) != 0)
                return 2;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || options.uri == NULL) {
        usage(stderr);
        return 2;
    }
    if (options.block_size % 512 != 0) {
        fprintf(stderr, "fua_load: --block-size must be a multiple of 512\n");
        return 2;
    }

    /* The span of offsets is known only after connecting when --size is not given; one probe
     * connection finds it so every writer draws from the same span. */
    if (options.size == 0) {
        struct nbd_handle *probe = nbd_create();
        if (probe == NULL) {
            fprintf(stderr, "fua_load: nbd_create: %s\n", nbd_get_error());
            return 1;
        }
        if (nbd_connect_uri(probe, options.uri) == -1) {
            fprintf(stderr, "fua_load: nbd_connect_uri: %s\n", nbd_get_error());
            nbd_close(probe);
            return 1;
        }
        int64_t export_size = nbd_get_size(probe);
        if (export_size == -1) {
            fprintf(stderr, "fua_load: nbd_get_size: %s\n", nbd_get_error());
            nbd_close(probe);
            return 1;
        }
        if (nbd_shutdown(probe, 0) == -1) {
            fprintf(stderr, "fua_load: nbd_shutdown: %s\n", nbd_get_error());
            nbd_close(probe);
            return 1;
        }
        nbd_close(probe);
        options.size = (uint64_t)export_size;
    }
    if (options.size < options.block_size) {
        fprintf(stderr, "fua_load: the span (%" PRIu64 " bytes) is smaller than one block\n", options.size);
        return 2;
    }

    struct connection *connections = calloc((size_t)options.connections, sizeof *connections);
    if (connections == NULL) {
        perror("fua_load: calloc");
        return 1;
    }
    /* The barriers have one more party than there are connections: the main thread, which opens
     * the measurement window once every connection is ready. */
    int error = pthread_barrier_init(&ready_barrier, NULL, (unsigned)options.connections + 1);
    if (error == 0)
        error = pthread_barrier_init(&go_barrier, NULL, (unsigned)options.connections + 1);
    if (error != 0) {
        errno = error;
        perror("fua_load: pthread_barrier_init");
        return 1;
    }
    int started = 0;
    for (int i = 0; i < options.connections; i++) {
        connections[i].index = i;
        connections[i].options = &options;
        /* Distinct, reproducible sequences per connection. */
        connections[i].random_state = options.seed * 0x100000001b3u + (uint64_t)i;
        error = pthread_create(&connections[i].thread, NULL, connection_thread, &connections[i]);
        if (error != 0) {
            errno = error;
            perror("fua_load: pthread_create");
            /* Returning from main ends the threads already started, which wait at the barrier. */
            return 1;
        }
        started++;
    }
    /* The window starts when the last connection is ready. */
    if (wait_at(&ready_barrier) != 0)
        return 1;
    uint64_t now_ns;
    if (monotonic_ns(&now_ns) != 0)
        return 1;
    measure_from_ns = now_ns + (uint64_t)(options.warmup_seconds * 1e9);
    deadline_ns = measure_from_ns + (uint64_t)(options.seconds * 1e9);
    if (wait_at(&go_barrier) != 0)
        return 1;

    bool failed = false;
    size_t total = 0;
    uint64_t end_ns = measure_from_ns;
    for (int i = 0; i < started; i++) {
        error = pthread_join(connections[i].thread, NULL);
        if (error != 0) {
            errno = error;
            perror("fua_load: pthread_join");
            return 1;
        }
        if (connections[i].failed)
            failed = true;
        total += connections[i].latencies.count;
        if (connections[i].last_completion_ns > end_ns)
            end_ns = connections[i].last_completion_ns;
    }
    if (failed)
        return 1;
    if (total == 0) {
        fprintf(stderr, "fua_load: no write completed inside the measurement window\n");
        return 1;
    }

    uint64_t *all = malloc(total * sizeof *all);
    if (all == NULL) {
        perror("fua_load: malloc");
        return 1;
    }
    size_t filled = 0;
    double sum = 0;
    for (int i = 0; i < started; i++) {
        struct latencies *latencies = &connections[i].latencies;
        for (size_t j = 0; j < latencies->count; j++) {
            all[filled++] = latencies->values[j];
            sum += (double)latencies->values[j];
        }
        free(latencies->values);
    }
    qsort(all, total, sizeof *all, compare_u64);

    /* The window runs from the end of the warmup to the last completion counted, so writes still in
     * flight at the deadline count against the time they took. */
    double seconds = (double)(end_ns - measure_from_ns) / 1e9;
    double iops = seconds > 0 ? (double)total / seconds : 0;
    double mean_us = total ? sum / (double)total / 1000.0 : 0;
    int printed = printf("{\"iops\": %.1f, \"writes\": %zu, \"seconds\": %.3f, \"connections\": %d, \"depth\": %d, "
                         "\"fua\": %s, \"flush_each\": %s, \"block_size\": %" PRIu64 ", "
                         "\"latency_us\": {\"p50\": %.1f, \"p99\": %.1f, \"p999\": %.1f, \"mean\": %.1f, \"max\": %.1f}}\n",
                         iops, total, seconds, options.connections, options.depth, options.fua ? "true" : "false",
                         options.flush_each ? "true" : "false", options.block_size, percentile_us(all, total, 50),
                         percentile_us(all, total, 99), percentile_us(all, total, 99.9), mean_us,
                         total ? (double)all[total - 1] / 1000.0 : 0.0);
    free(all);
    free(connections);
    if (printed < 0 || fflush(stdout) != 0) {
        perror("fua_load: printing the result");
        return 1;
    }
    if (pthread_barrier_destroy(&ready_barrier) != 0 || pthread_barrier_destroy(&go_barrier) != 0) {
        fprintf(stderr, "fua_load: pthread_barrier_destroy failed\n");
        return 1;
    }
    return 0;
}
